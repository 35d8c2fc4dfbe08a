r"""Curvature diagonals of a convolution: GGN/Fisher weight diagonal and diagonal backpropagation.

:func:`ggn_diagonal`: with ``s[m, n]`` the backpropagated loss-Hessian square root at the
layer output (``Σ_m s[m,n] s[m,n]^T = J_f^T ∇²ℓ J_f`` per sample; ``m`` runs over classes or
Monte-Carlo samples), the weight GGN diagonal is :math:`\sum_{m,n} (J_W^\top s[m,n])^2`:
``(n g c_in i…, k o i (per dim), m n g c_out o… -> m n g c_out c_in k…)`` squared and summed
over ``m, n``.

:func:`hessian_diagonal`: given the diagonal ``h`` of the curvature at the layer output
(``H_y = diag(h)`` per sample), returns the *exact diagonals* of the pulled-back curvature

.. math::
    \operatorname{diag}(J_W^\top \operatorname{diag}(h) J_W), \qquad
    \operatorname{diag}(J_x^\top \operatorname{diag}(h) J_x).

The convolution is bilinear, so its second derivative w.r.t. the weight alone (or the input
alone) vanishes and these are the exact weight / input blocks' diagonals of the loss Hessian
whenever the output Hessian is ``diag(h)``.  They are cheap because Π is binary and for fixed
``(k, o)`` hits at most one ``i`` (and for fixed ``(o, i)`` at most one ``k``): the squared
Jacobian entries are ``Σ_i Π x²`` and ``Σ_k Π W²``, so both diagonals are the ordinary weight /
input VJPs of ``h`` with the squared input / squared kernel:

``weight: (x⊙x) ⊛ h`` (weight VJP) and ``input: h ⊛ (W⊙W)`` (input VJP).

What diagonal backpropagation (BackPACK's ``DiagHessian``) does with the input diagonal —
treat it as the diagonal output curvature of the previous layer — drops the off-diagonal
terms of :math:`J_x^\top \operatorname{diag}(h) J_x`; that step is an approximation, the two
returned diagonals are not.
"""

from __future__ import annotations

import torch

from kfac_tn.tn import networks
from kfac_tn.tn._common import (
    Shape,
    TensorLike,
    check_groups,
    check_impl,
    make_spec,
    names,
    spatial_ndim,
)
from kfac_tn.tn.convolution import check_weight
from kfac_tn.tn.derivatives import conv_input_vjp, conv_weight_vjp
from kfac_tn.tn.einsum import to_letters
from kfac_tn.tn.expressions import evaluate, routine_expression
from kfac_tn.tn.spec import ConvSpec, IntOrSeq, Padding
from kfac_tn.tn.unfolding import standard_unfold
from kfac_tn.tn.views import patch_view

__all__ = ["ggn_diagonal", "hessian_diagonal", "prepare_ggn_diagonal", "prepare_hessian_diagonal"]


def prepare_ggn_diagonal(
    x: TensorLike,
    s: TensorLike,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> tuple[ConvSpec, tuple[Shape, Shape]]:
    """Validate :func:`ggn_diagonal`'s arguments.

    Args:
        x: Layer input ``[N, C_in, *I]`` (a tensor or its shape).
        s: Loss-Hessian square root at the output ``[M, N, C_out, *O]`` (or its shape).
        kernel_size: Int or N ints.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (x.shape, s.shape))``.

    Raises:
        ValueError: If ``s`` is not ``[M, N, C_out, *O]`` for ``x`` and the geometry.
    """
    spatial_ndim(x, kernel_size)
    check_groups(x.shape[1], groups)
    spec = make_spec(x.shape[2:], kernel_size, stride, padding, dilation, groups)
    if s.ndim != x.ndim + 1 or s.shape[1] != x.shape[0] or tuple(s.shape[3:]) != spec.out_spatial:
        raise ValueError(
            f"Invalid s: shape {tuple(s.shape)} (expected [M, {x.shape[0]}, C_out, "
            f"*{spec.out_spatial}] for x of shape {tuple(x.shape)})"
        )
    check_groups(s.shape[2], groups, "s")
    return spec, (tuple(x.shape), tuple(s.shape))


def prepare_hessian_diagonal(
    x: TensorLike,
    weight: TensorLike,
    h: TensorLike,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> tuple[ConvSpec, tuple[Shape, Shape, Shape]]:
    """Validate :func:`hessian_diagonal`'s arguments.

    Args:
        x: Layer input ``[N, C_in, *I]`` (a tensor or its shape).
        weight: Kernel ``[C_out, C_in/G, *K]`` (a tensor or its shape).
        h: Diagonal of the output curvature ``[N, C_out, *O]`` (a tensor or its shape).
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (x.shape, weight.shape, h.shape))``.

    Raises:
        ValueError: If ``h`` does not have the convolution's output shape.
    """
    check_weight(x, weight, groups)
    spec = make_spec(x.shape[2:], tuple(weight.shape[2:]), stride, padding, dilation, groups)
    expected = (x.shape[0], weight.shape[0], *spec.out_spatial)
    if tuple(h.shape) != expected:
        raise ValueError(
            f"Invalid h: shape {tuple(h.shape)} (expected the output shape {expected})"
        )
    return spec, (tuple(x.shape), tuple(weight.shape), tuple(h.shape))


def ggn_diagonal(
    x: torch.Tensor,
    s: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    r"""Weight GGN / Fisher diagonal :math:`\sum_{m,n} (J_W^\top s[m,n])^2`.

    Args:
        x: Layer input ``[N, C_in, *I]``.
        s: Backpropagated loss-Hessian square root at the layer output ``[M, N, C_out, *O]``.
        kernel_size: Int or N ints.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'`` (unfold, then einsum
            as BackPACK does).

    Returns:
        ``[C_out, C_in/G, *K]`` (the weight's shape).

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    check_impl(impl)
    spec, shapes = prepare_ggn_diagonal(x, s, kernel_size, stride, padding, dilation, groups)
    if impl == "tn":
        expr = routine_expression(networks.ggn_diagonal, spec, shapes)
        return evaluate(expr, spec, {"x": x, "s": s})
    m, n, c_out = s.shape[:3]
    c_in, g, nd = x.shape[1], groups, spec.ndim
    sv = s.reshape(m, n, g, c_out // g, -1)
    if impl == "standard":
        u = standard_unfold(x, spec).reshape(n, g, -1, sv.shape[-1])  # [N, G, Ci·ΠK, ΠO]
        jac = torch.einsum("ngko,mngdo->mngdk", u, sv)
    else:  # auto / tn_simplified: contract the strided patch view, nothing unfolded
        view = patch_view(x.reshape(n, g, c_in // g, *x.shape[2:]), spec)  # [N,G,Ci,*O,*K]
        o, k = " ".join(names("o", nd)), " ".join(names("k", nd))
        eq = f"n g c {o} {k}, m n g d {o} -> m n g d c {k}"
        jac = torch.einsum(to_letters(eq), view, sv.reshape(m, n, g, c_out // g, *spec.out_spatial))
    return jac.square().sum(dim=(0, 1)).reshape(c_out, c_in // g, *spec.kernel_size)


def hessian_diagonal(
    x: torch.Tensor,
    weight: torch.Tensor,
    h: torch.Tensor,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Diagonal backpropagation through a convolution (see module docstring).

    Args:
        x: Layer input ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in/G, *K]``.
        h: Diagonal of the output curvature ``[N, C_out, *O]``.
        stride: Int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``(weight_diag [C_out, C_in/G, *K], input_diag [N, C_in, *I])``:
        :math:`\operatorname{diag}(J_W^\top \operatorname{diag}(h) J_W)` and
        :math:`\operatorname{diag}(J_x^\top \operatorname{diag}(h) J_x)` (per sample).  The
        bias diagonal, if needed, is ``h.sum`` over batch and spatial dimensions.

    Raises:
        ValueError: On invalid shapes, hyperparameters or ``impl``.
    """
    check_impl(impl)
    spec, shapes = prepare_hessian_diagonal(x, weight, h, stride, padding, dilation, groups)
    x2, w2 = x.square(), weight.square()
    if impl == "tn":
        e_w = routine_expression(networks.hessian_diagonal_weight, spec, shapes)
        e_x = routine_expression(networks.hessian_diagonal_input, spec, shapes)
        return (
            evaluate(e_w, spec, {"x_squared": x2, "h": h}),
            evaluate(e_x, spec, {"h": h, "weight_squared": w2}),
        )
    hyper = dict(stride=spec.strides, padding=spec.padding_pairs, dilation=spec.dilations)
    weight_diag = conv_weight_vjp(x2, h, spec.kernel_size, **hyper, groups=groups, impl=impl)
    input_diag = conv_input_vjp(h, w2, spec.in_spatial, **hyper, groups=groups, impl=impl)
    return weight_diag, input_diag
