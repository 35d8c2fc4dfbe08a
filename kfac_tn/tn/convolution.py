"""Convolution, transposed convolution and the Toeplitz (kernel-unfolded) matrix.

* :func:`conv` equals ``F.conv1d/2d/3d`` (and works for any N):
  ``n g c_in i…, k o i (per dim), g c_out c_in k… -> n g c_out o…``.
* :func:`conv_transpose` equals ``F.conv_transpose1d/2d/3d``:
  ``n g c_in o…, k o i (per dim), g c_in c_out k… -> n g c_out i…``.
* :func:`kernel_unfold` is the Toeplitz matrix ``T`` of a kernel, per group:
  ``conv(x)[n, g] == T[g] @ x[n, g].flatten()``:
  ``g c_out c_in k…, k o i (per dim) -> g (c_out o…) (c_in i…)``.

``impl``: ``'tn'`` contracts the plain network (:mod:`kfac_tn.tn.networks`);
``'tn_simplified'`` replaces every Π by a strided view of the padded input (forward) or a
per-tap strided accumulation (transposed) / one strided write (Toeplitz); ``'standard'`` is
torch's own kernel (for N > 3, where torch has none, an unfold followed by a matmul);
``'auto'`` picks torch's kernel where it exists (never slower than torch) and the simplified
network otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kfac_tn.tn import networks
from kfac_tn.tn._common import (
    Shape,
    ShapeOnly,
    TensorLike,
    cached_call,
    check_groups,
    check_impl,
    input_spatial,
    make_spec,
    names,
    prod,
    spatial_ndim,
)
from kfac_tn.tn.einsum import to_letters
from kfac_tn.tn.expressions import evaluate, routine_expression
from kfac_tn.tn.spec import ConvSpec, IntOrSeq, Padding
from kfac_tn.tn.views import fold_patches, patch_view, scatter_kernel

__all__ = [
    "check_weight",
    "conv",
    "conv_simplified",
    "conv_transpose",
    "conv_transpose_simplified",
    "kernel_unfold",
    "prepare_conv",
    "prepare_conv_transpose",
    "prepare_kernel_unfold",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

_TorchConvArgs = tuple  # (conv function, pad list or None, stride, padding, dilation, groups)


# --------------------------------------------------------------------------------------------
# argument preparation (shared with symbolic())
# --------------------------------------------------------------------------------------------
def check_weight(
    x: TensorLike,
    weight: TensorLike,
    groups: int,
    *,
    transpose: bool = False,
    x_name: str = "x",
) -> None:
    """Check ``weight`` against ``x`` and ``groups``.

    Conv weights are ``[C_out, C_in/G, *K]``, ConvTranspose weights ``[C_in, C_out/G, *K]``.

    Args:
        x: The input ``[N, C_in, *spatial]`` (a tensor or its shape).
        weight: The kernel (a tensor or its shape).
        groups: Channel groups ``G``.
        transpose: ``weight`` is a ConvTranspose weight.
        x_name: The input's name in error messages.

    Raises:
        ValueError: Naming the mismatching argument and its shape.
    """
    spatial_ndim(x, tuple(weight.shape[2:]), x_name)
    c_in = x.shape[1]
    check_groups(c_in, groups, x_name)
    if transpose:
        if weight.shape[0] != c_in:
            raise ValueError(
                f"Invalid weight: shape {tuple(weight.shape)} (expected [C_in={c_in}, C_out/G, *K] "
                f"for a transposed convolution)"
            )
        return
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"Invalid weight: shape {tuple(weight.shape)} (expected [C_out, C_in/G={c_in // groups}"
            f", *K] for {c_in} input channels and groups={groups})"
        )
    check_groups(weight.shape[0], groups, "weight (output channels)")


def prepare_conv(
    x: TensorLike,
    weight: TensorLike,
    bias: TensorLike | None = None,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> tuple[ConvSpec, tuple[Shape, Shape]]:
    """Validate :func:`conv`'s arguments (also those of the JVPs).

    Args:
        x: Input ``[N, C_in, *I]`` (a tensor or its shape).
        weight: Kernel ``[C_out, C_in/G, *K]`` (a tensor or its shape).
        bias: Unused (not part of the network).
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (x.shape, weight.shape))``.

    Raises:
        ValueError: On invalid shapes or hyperparameters.
    """
    check_weight(x, weight, groups)
    spec = make_spec(x.shape[2:], tuple(weight.shape[2:]), stride, padding, dilation, groups)
    return spec, (tuple(x.shape), tuple(weight.shape))


def prepare_conv_transpose(
    x: TensorLike,
    weight: TensorLike,
    bias: TensorLike | None = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq = 0,
    output_padding: IntOrSeq = 0,
    groups: int = 1,
    dilation: IntOrSeq = 1,
) -> tuple[ConvSpec, tuple[Shape, Shape]]:
    """Validate :func:`conv_transpose`'s arguments.

    Args:
        x: Input ``[N, C_in, *O]`` (a tensor or its shape).
        weight: Kernel ``[C_in, C_out/G, *K]`` (a tensor or its shape).
        bias: Unused (not part of the network).
        stride: Int or N ints.
        padding: Int or N ints (symmetric).
        output_padding: Int or N ints.
        groups: Channel groups ``G``.
        dilation: Int or N ints.

    Returns:
        ``(spec, (x.shape, weight.shape))``.

    Raises:
        ValueError: On invalid shapes or hyperparameters.
    """
    check_weight(x, weight, groups, transpose=True)
    spec = make_spec(
        x.shape[2:],
        tuple(weight.shape[2:]),
        stride,
        padding,
        dilation,
        groups,
        transpose=True,
        output_padding=output_padding,
    )
    return spec, (tuple(x.shape), tuple(weight.shape))


def prepare_kernel_unfold(
    weight: TensorLike,
    input_size: Sequence[int],
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> tuple[ConvSpec, tuple[Shape]]:
    """Validate :func:`kernel_unfold`'s arguments.

    Args:
        weight: Kernel ``[C_out, C_in/G, *K]`` (a tensor or its shape).
        input_size: Spatial input size ``(I_1, ..., I_N)`` or a full ``[N, C_in, *I]`` shape.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (weight.shape,))``.

    Raises:
        ValueError: On invalid shapes or hyperparameters.
    """
    if weight.ndim < 3:
        raise ValueError(
            f"Invalid weight: shape {tuple(weight.shape)} (expected [C_out, C_in/G, *K])"
        )
    check_groups(weight.shape[0], groups, "weight (output channels)")
    spatial = input_spatial(input_size, weight.ndim - 2)
    spec = make_spec(spatial, tuple(weight.shape[2:]), stride, padding, dilation, groups)
    return spec, (tuple(weight.shape),)


# --------------------------------------------------------------------------------------------
# routines
# --------------------------------------------------------------------------------------------
def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """N-d convolution, equal to ``F.conv1d/2d/3d``.

    Args:
        x: Input ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in/G, *K]``.
        bias: Optional ``[C_out]``.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[N, C_out, *O]``.

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    plan = cached_call(_conv_plan, x.shape, weight.shape, stride, padding, dilation, groups, impl)
    return plan(x, weight, bias)


_ConvCall = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@functools.lru_cache(maxsize=4096)
def _conv_plan(
    x_shape: torch.Size,
    w_shape: torch.Size,
    stride: IntOrSeq,
    padding: Padding,
    dilation: IntOrSeq,
    groups: int,
    impl: str,
) -> _ConvCall:
    """Validate once per shapes / hyperparameters and return ``(x, weight, bias) -> y``."""
    check_impl(impl)
    x, w = ShapeOnly(x_shape), ShapeOnly(w_shape)
    spec, shapes = prepare_conv(x, w, None, stride, padding, dilation, groups)
    nd = spec.ndim
    if impl == "auto":
        impl = "standard" if nd <= 3 else "tn_simplified"
    if impl == "standard" and nd <= 3:
        return functools.partial(_torch_conv_call, _torch_conv_args(spec))
    if impl == "tn":
        expr = routine_expression(networks.conv, spec, shapes)
        return lambda x, w, b: _add_bias(evaluate(expr, spec, {"x": x, "weight": w}), b, nd)
    return lambda x, w, b: _add_bias(conv_simplified(x, w, spec), b, nd)


def conv_transpose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq = 0,
    output_padding: IntOrSeq = 0,
    groups: int = 1,
    dilation: IntOrSeq = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """N-d transposed convolution, equal to ``F.conv_transpose1d/2d/3d``.

    Args:
        x: Input ``[N, C_in, *O]``.
        weight: Kernel ``[C_in, C_out/G, *K]``.
        bias: Optional ``[C_out]``.
        stride: Int or N ints.
        padding: Int or N ints (symmetric).
        output_padding: Int or N ints, each ``< max(stride, dilation)``.
        groups: Channel groups ``G``.
        dilation: Int or N ints.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[N, C_out, *I]`` with ``I = (O-1)·S - 2P + D·(K-1) + 1 + output_padding``.

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    check_impl(impl)
    spec, shapes = prepare_conv_transpose(
        x, weight, bias, stride, padding, output_padding, groups, dilation
    )
    if impl == "auto":
        impl = "standard" if spec.ndim <= 3 else "tn_simplified"
    if impl == "standard" and spec.ndim <= 3:
        return _torch_conv_transpose(x, weight, bias, spec)
    if impl == "tn":
        expr = routine_expression(networks.conv_transpose, spec, shapes)
        y = evaluate(expr, spec, {"x": x, "weight": weight})
    else:
        y = conv_transpose_simplified(x, weight, spec)
    return _add_bias(y, bias, spec.ndim)


def kernel_unfold(
    weight: torch.Tensor,
    input_size: Sequence[int],
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Toeplitz matrix ``T`` of a kernel: ``conv(x)[n, g].flatten() == T[g] @ x[n, g].flatten()``.

    Args:
        weight: Kernel ``[C_out, C_in/G, *K]``.
        input_size: Spatial input size ``(I_1, ..., I_N)`` or a full ``[N, C_in, *I]`` shape.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[G, C_out/G·ΠO, C_in/G·ΠI]``, rows ordered ``(c_out, o…)``, columns ``(c_in, i…)``.

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    check_impl(impl)
    spec, shapes = prepare_kernel_unfold(weight, input_size, stride, padding, dilation, groups)
    if impl == "tn":
        expr = routine_expression(networks.kernel_unfold, spec, shapes)
        return evaluate(expr, spec, {"weight": weight})
    if impl == "standard" and spec.ndim <= 3:
        return _kernel_unfold_standard(weight, spec)
    return scatter_kernel(weight, spec)


# --------------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------------
def conv_simplified(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Forward convolution through the strided patch view of the input (no Π).

    Args:
        x: Input ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in/G, *K]``.
        spec: The convolution's spec.

    Returns:
        ``[N, C_out, *O]`` (no bias).
    """
    n, c_in = x.shape[:2]
    g, nd = spec.groups, spec.ndim
    c_out = weight.shape[0]
    view = patch_view(x.reshape(n, g, c_in // g, *x.shape[2:]), spec)  # [N,G,Ci,*O,*K]
    w = weight.reshape(g, c_out // g, c_in // g, *spec.kernel_size)
    o, k = names("o", nd), names("k", nd)
    eq = f"n g c {' '.join(o)} {' '.join(k)}, g d c {' '.join(k)} -> n g d {' '.join(o)}"
    return torch.einsum(to_letters(eq), view, w).reshape(n, c_out, *spec.out_spatial)


def conv_transpose_simplified(
    x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec
) -> torch.Tensor:
    """Transposed convolution: one matmul into columns ``(o, k)``, then col2im (fold).

    Args:
        x: Input ``[N, C_in, *O]``.
        weight: Kernel ``[C_in, C_out/G, *K]``.
        spec: The transposed convolution's spec.

    Returns:
        ``[N, C_out, *I]`` (no bias).
    """
    n, c_in = x.shape[:2]
    g, nd = spec.groups, spec.ndim
    xv = x.reshape(n, g, c_in // g, -1)  # [N, G, Ci, ΠO]
    wv = weight.reshape(g, c_in // g, -1)  # [G, Ci, Co·ΠK]
    cols = torch.einsum("ngco,gcd->ngdo", xv, wv)  # [N, G, Co·ΠK, ΠO]
    c_out = weight.shape[1]
    cols = cols.reshape(n, g, c_out, *spec.kernel_size, *spec.out_spatial)
    cols = cols.permute(0, 1, 2, *range(3 + nd, 3 + 2 * nd), *range(3, 3 + nd))
    return fold_patches(cols, spec).reshape(n, g * c_out, *spec.in_spatial)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, nd: int) -> torch.Tensor:
    """Add ``bias: [C]`` in place to ``y: [N, C, *spatial]`` (a fresh result), if given."""
    return y if bias is None else y.add_(bias.view(1, -1, *([1] * nd)))


def _torch_conv_args(spec: ConvSpec) -> _TorchConvArgs:
    """``(conv function, pad list or None, stride, padding, dilation, groups)`` for torch."""
    dims = spec.dims
    symmetric = all(d.pad_left == d.pad_right for d in dims)
    pads = None
    if not symmetric:
        pads = [p for d in reversed(dims) for p in (d.pad_left, d.pad_right)]
    padding = tuple(d.pad_left for d in dims) if symmetric else 0
    stride = tuple(d.stride for d in dims)
    dilation = tuple(d.dilation for d in dims)
    return _CONV[spec.ndim], pads, stride, padding, dilation, spec.groups


def _torch_conv_call(
    args: _TorchConvArgs,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch's convolution kernel with prepared arguments (asymmetric padding applied first)."""
    fn, pads, stride, padding, dilation, groups = args
    if pads is not None:
        x = F.pad(x, pads)
    return fn(x, weight, bias, stride, padding, dilation, groups)


def _torch_conv_transpose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec
) -> torch.Tensor:
    """Torch's transposed-convolution kernel (N <= 3)."""
    return _CONV_T[spec.ndim](
        x,
        weight,
        bias,
        spec.strides,
        tuple(d.pad_left for d in spec.dims),
        spec.output_padding,
        spec.groups,
        spec.dilations,
    )


def _kernel_unfold_standard(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Torch's convolution applied to the identity basis (one batched call)."""
    g, nd = spec.groups, spec.ndim
    c_out, c_in = weight.shape[0] // g, weight.shape[1]
    basis = c_in * prod(spec.in_spatial)
    eye = torch.eye(basis, dtype=weight.dtype, device=weight.device)
    eye = eye.reshape(basis, c_in, *spec.in_spatial).repeat(1, g, *([1] * nd))
    y = _torch_conv_call(_torch_conv_args(spec), eye, weight)  # [B, G·Co, *O]
    y = y.reshape(basis, g, c_out * prod(spec.out_spatial))
    return y.permute(1, 2, 0).contiguous()
