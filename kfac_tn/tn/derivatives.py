"""Vector-Jacobian and Jacobian-vector products of a convolution.

* :func:`conv_input_vjp` (= autograd's input gradient, a transposed convolution):
  ``n g c_out o…, k o i (per dim), g c_out c_in k… -> n g c_in i…``.
* :func:`conv_weight_vjp` (= autograd's weight gradient):
  ``n g c_in i…, k o i (per dim), n g c_out o… -> g c_out c_in k…``.
* :func:`conv_input_jvp` / :func:`conv_weight_jvp` (= ``torch.func.jvp``): the convolution is
  bilinear, so they are the forward network with the tangent in place of ``x`` / ``W``.

``impl``: ``'tn'`` plain network; ``'tn_simplified'`` strided views (input VJP: matmul then
one strided accumulation per tap; weight VJP: matmul on the patch view); ``'standard'``
torch's own kernels (``aten.convolution_backward``, the one autograd runs); ``'auto'``
torch's kernels where they exist, the simplified network for N > 3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kfac_tn.tn import networks
from kfac_tn.tn._common import (
    Shape,
    ShapeOnly,
    TensorLike,
    cached_call,
    check_cotangent,
    check_groups,
    check_impl,
    input_spatial,
    make_spec,
    names,
    spatial_ndim,
)
from kfac_tn.tn.convolution import conv
from kfac_tn.tn.einsum import to_letters
from kfac_tn.tn.expressions import evaluate, routine_expression
from kfac_tn.tn.spec import ConvSpec, IntOrSeq, Padding
from kfac_tn.tn.views import fold_patches, pad, patch_view

__all__ = [
    "conv_input_jvp",
    "conv_input_vjp",
    "conv_weight_jvp",
    "conv_weight_vjp",
    "input_vjp_simplified",
    "prepare_input_vjp",
    "prepare_weight_vjp",
    "weight_vjp_simplified",
]


def prepare_input_vjp(
    v: TensorLike,
    weight: TensorLike,
    input_size: Sequence[int],
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> tuple[ConvSpec, tuple[Shape, Shape]]:
    """Validate :func:`conv_input_vjp`'s arguments.

    Args:
        v: Output cotangent ``[N, C_out, *O]`` (a tensor or its shape).
        weight: Kernel ``[C_out, C_in/G, *K]`` (a tensor or its shape).
        input_size: Spatial input size ``(I_1, …, I_N)`` or a full ``[N, C_in, *I]`` shape.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (v.shape, weight.shape))``.

    Raises:
        ValueError: If shapes do not match each other or the geometry.
    """
    spatial_ndim(v, tuple(weight.shape[2:]), "v")
    check_groups(weight.shape[0], groups, "weight (output channels)")
    if v.shape[1] != weight.shape[0]:
        raise ValueError(
            f"Invalid v: shape {tuple(v.shape)} (expected C_out={weight.shape[0]} channels "
            f"like weight {tuple(weight.shape)})"
        )
    spatial = input_spatial(input_size, v.ndim - 2)
    spec = make_spec(spatial, tuple(weight.shape[2:]), stride, padding, dilation, groups)
    if tuple(v.shape[2:]) != spec.out_spatial:
        raise ValueError(
            f"Invalid v: shape {tuple(v.shape)} (expected output size {spec.out_spatial} for "
            f"input_size={tuple(input_size)!r})"
        )
    return spec, (tuple(v.shape), tuple(weight.shape))


def prepare_weight_vjp(
    x: TensorLike,
    v: TensorLike,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> tuple[ConvSpec, tuple[Shape, Shape]]:
    """Validate :func:`conv_weight_vjp`'s arguments.

    Args:
        x: Input ``[N, C_in, *I]`` (a tensor or its shape).
        v: Output cotangent ``[N, C_out, *O]`` (a tensor or its shape).
        kernel_size: Int or N ints.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (x.shape, v.shape))``.

    Raises:
        ValueError: If shapes do not match each other or the geometry.
    """
    spatial_ndim(x, kernel_size)
    check_groups(x.shape[1], groups)
    spec = make_spec(x.shape[2:], kernel_size, stride, padding, dilation, groups)
    check_groups(v.shape[1], groups, "v")
    check_cotangent(x, v, spec.out_spatial)
    return spec, (tuple(x.shape), tuple(v.shape))


def conv_input_vjp(
    v: torch.Tensor,
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Input VJP of a convolution: ``(∂ conv(x, W) / ∂x)^T v``.

    Args:
        v: Output cotangent ``[N, C_out, *O]``.
        weight: Kernel ``[C_out, C_in/G, *K]``.
        input_size: Spatial input size ``(I_1, …, I_N)`` or a full ``[N, C_in, *I]`` shape.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[N, C_in, *I]``.

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    spec, shapes, impl = cached_call(
        _input_vjp_plan, v.shape, weight.shape, input_size, stride, padding, dilation, groups, impl
    )
    if impl == "tn":
        expr = routine_expression(networks.conv_input_vjp, spec, shapes)
        return evaluate(expr, spec, {"v": v, "weight": weight})
    if impl == "standard" and spec.ndim <= 3:
        return _backward(v, None, weight, spec, input_mask=True)
    return input_vjp_simplified(v, weight, spec)


def conv_weight_vjp(
    x: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Weight VJP of a convolution: ``(∂ conv(x, W) / ∂W)^T v``.

    Args:
        x: Input ``[N, C_in, *I]``.
        v: Output cotangent ``[N, C_out, *O]``.
        kernel_size: Int or N ints.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[C_out, C_in/G, *K]``.

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    spec, shapes, impl = cached_call(
        _weight_vjp_plan, x.shape, v.shape, kernel_size, stride, padding, dilation, groups, impl
    )
    if impl == "tn":
        expr = routine_expression(networks.conv_weight_vjp, spec, shapes)
        return evaluate(expr, spec, {"x": x, "v": v})
    if impl == "standard" and spec.ndim <= 3:
        return _backward(v, x, None, spec, input_mask=False)
    return weight_vjp_simplified(x, v, spec)


@functools.lru_cache(maxsize=4096)
def _input_vjp_plan(
    v_shape: torch.Size,
    w_shape: torch.Size,
    input_size: Sequence[int],
    stride: IntOrSeq,
    padding: Padding,
    dilation: IntOrSeq,
    groups: int,
    impl: str,
) -> tuple[ConvSpec, tuple[Shape, Shape], str]:
    """Validate once per shapes / hyperparameters: ``(spec, shapes, resolved impl)``."""
    check_impl(impl)
    v, w = ShapeOnly(v_shape), ShapeOnly(w_shape)
    spec, shapes = prepare_input_vjp(v, w, input_size, stride, padding, dilation, groups)
    return spec, shapes, _auto(spec) if impl == "auto" else impl


@functools.lru_cache(maxsize=4096)
def _weight_vjp_plan(
    x_shape: torch.Size,
    v_shape: torch.Size,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: Padding,
    dilation: IntOrSeq,
    groups: int,
    impl: str,
) -> tuple[ConvSpec, tuple[Shape, Shape], str]:
    """Validate once per shapes / hyperparameters: ``(spec, shapes, resolved impl)``."""
    check_impl(impl)
    x, v = ShapeOnly(x_shape), ShapeOnly(v_shape)
    spec, shapes = prepare_weight_vjp(x, v, kernel_size, stride, padding, dilation, groups)
    return spec, shapes, _auto(spec) if impl == "auto" else impl


def _auto(spec: ConvSpec) -> str:
    """Torch's own kernel where it exists (N <= 3), the simplified network otherwise."""
    return "standard" if spec.ndim <= 3 else "tn_simplified"


def conv_input_jvp(
    x_dot: torch.Tensor,
    weight: torch.Tensor,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Input JVP ``(∂ conv(x, W) / ∂x) ẋ = conv(ẋ, W)`` (linear in ``x``; no bias).

    Args:
        x_dot: Input tangent ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in/G, *K]``.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[N, C_out, *O]``.
    """
    return conv(x_dot, weight, None, stride, padding, dilation, groups, impl=impl)


def conv_weight_jvp(
    x: torch.Tensor,
    weight_dot: torch.Tensor,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Weight JVP ``(∂ conv(x, W) / ∂W) Ẇ = conv(x, Ẇ)`` (linear in ``W``; no bias).

    Args:
        x: Input ``[N, C_in, *I]``.
        weight_dot: Kernel tangent ``[C_out, C_in/G, *K]``.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[N, C_out, *O]``.
    """
    return conv(x, weight_dot, None, stride, padding, dilation, groups, impl=impl)


def input_vjp_simplified(v: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Input VJP: one matmul into columns ``[N, G, C_in/G, *O, *K]``, then col2im (fold).

    Args:
        v: Output cotangent ``[N, C_out, *O]``.
        weight: Kernel ``[C_out, C_in/G, *K]``.
        spec: The convolution's spec.

    Returns:
        ``[N, C_in, *I]``.
    """
    n, c_out = v.shape[:2]
    g, nd = spec.groups, spec.ndim
    c_in = weight.shape[1]
    vv = v.reshape(n, g, c_out // g, -1)
    wv = weight.reshape(g, c_out // g, -1)  # [G, Co, Ci·ΠK]
    cols = torch.einsum("ngdo,gdc->ngco", vv, wv)  # [N, G, Ci·ΠK, ΠO]
    cols = cols.reshape(n, g, c_in, *spec.kernel_size, *spec.out_spatial)
    cols = cols.permute(0, 1, 2, *range(3 + nd, 3 + 2 * nd), *range(3, 3 + nd))
    return fold_patches(cols, spec).reshape(n, g * c_in, *spec.in_spatial)


def weight_vjp_simplified(x: torch.Tensor, v: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Weight VJP: contract the strided patch view of ``x`` with ``v`` (no Π).

    Args:
        x: Input ``[N, C_in, *I]``.
        v: Output cotangent ``[N, C_out, *O]``.
        spec: The convolution's spec.

    Returns:
        ``[C_out, C_in/G, *K]``.
    """
    n, c_in = x.shape[:2]
    g, nd = spec.groups, spec.ndim
    c_out = v.shape[1]
    view = patch_view(x.reshape(n, g, c_in // g, *x.shape[2:]), spec)  # [N,G,Ci,*O,*K]
    vv = v.reshape(n, g, c_out // g, *spec.out_spatial)
    o, k = " ".join(names("o", nd)), " ".join(names("k", nd))
    eq = f"n g c {o} {k}, n g d {o} -> g d c {k}"
    return torch.einsum(to_letters(eq), view, vv).reshape(c_out, c_in // g, *spec.kernel_size)


def _backward(
    v: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor | None,
    spec: ConvSpec,
    *,
    input_mask: bool,
) -> torch.Tensor:
    """Torch's own ``aten.convolution_backward`` for one of the two gradients."""
    symmetric, padded, stride, padding, dilation, zeros = _backward_args(spec)
    if input_mask:
        c_in = weight.shape[1] * spec.groups
        shape = (v.shape[0], c_in, *(spec.in_spatial if symmetric else padded))
        x = v.new_empty(()).expand(shape)  # only its shape is read (as in torch.nn.grad)
    else:
        if not symmetric:
            x = pad(x, spec.dims)
        shape = (v.shape[1], x.shape[1] // spec.groups, *spec.kernel_size)
        weight = v.new_empty(()).expand(shape)
    grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
        v,
        x,
        weight,
        None,
        stride,
        padding,
        dilation,
        False,
        zeros,
        spec.groups,
        [input_mask, not input_mask, False],
    )
    if not input_mask:
        return grad_w
    if symmetric:
        return grad_in
    crop = tuple(slice(d.pad_left, d.pad_left + d.in_size) for d in spec.dims)
    return grad_in[(Ellipsis, *crop)]


@functools.lru_cache(maxsize=4096)
def _backward_args(
    spec: ConvSpec,
) -> tuple[bool, Shape, list[int], list[int], list[int], list[int]]:
    """``(symmetric, padded size, stride, padding, dilation, output padding)`` for aten."""
    dims = spec.dims
    symmetric = all(d.pad_left == d.pad_right for d in dims)
    padded = tuple(d.in_size + d.pad_left + d.pad_right for d in dims)
    padding = [d.pad_left for d in dims] if symmetric else [0] * spec.ndim
    return (
        symmetric,
        padded,
        [d.stride for d in dims],
        padding,
        [d.dilation for d in dims],
        [0] * spec.ndim,
    )
