r"""KFAC factors of convolutions: input factors (KFC / KFAC-expand, KFAC-reduce), gradient factors.

Input factors, per channel group ``g`` (block-diagonal, exact for grouped convolutions), with
``u_{n,o}`` the unfolded input column of sample ``n`` at output position ``o``
(``D = C_in/G·ΠK`` entries, ordered ``(c_in_of_group, k_1, ..., k_N)`` like
``weight.view(C_out, -1)`` of one group):

.. math::
    A^{\text{expand}}_g = \frac{1}{N\,O} \sum_{n,o} u_{n,o} u_{n,o}^\top, \qquad
    A^{\text{reduce}}_g = \frac{1}{N} \sum_n \bar u_n \bar u_n^\top,\quad
    \bar u_n = \frac{1}{O}\sum_o u_{n,o},

``O = ΠO_j`` the number of output positions.  With ``bias=True`` a constant ``1`` is
appended to every column (last row/column; for reduce the mean of ones is ``1``).

Transposed convolutions (``transpose=True``): ``x`` is the ConvTranspose input
``[N, C_in, *O]`` and the hyperparameters are the ConvTranspose's.  The columns are the
*transpose-unfolded* input ``u_{n,i}[(c, k)] = Σ_o Π[k, o, i] x[n, c, o]`` at the output
positions ``i`` of the transposed convolution (input positions of the associated
convolution), and ``O`` above becomes ``I = ΠI_j``.  The rows ``(c_in_of_group, k)`` match the
ConvTranspose weight ``[C_in, C_out/G, *K]`` flattened per group as
``weight.view(G, C_in/G, C_out/G, *K).transpose(1, 2).reshape(G, C_out/G, C_in/G·ΠK)``
(the gradient of that matrix is ``Σ g u^T``, so it pairs with the ``C_out/G`` gradient factor).

Gradient factors (no normalisation; the optimizer applies its scale conventions), for
``g: [N, C_out, *spatial]`` the output gradients:
``grad_expand_factor = Σ_{n,o} g g^T`` and ``grad_reduce_factor = Σ_n (Σ_o g)(Σ_o g)^T``,
per group ``[G, C_out/G, C_out/G]``.

Every function takes ``impl``:

* ``"tn"``: the plain tensor network (input copies and index patterns Π) contracted along a
  cached opt_einsum ``dp`` path;
* ``"tn_simplified"``: the simplified network: Π contractions become strided views of the
  padded input (dense dimensions a reshape, down-sampling dimensions a strided slice); for
  KFAC-reduce each Π is summed over its private output leg first (``Π̄[k, i] = Σ_o Π``), and
  dense / down-sampling dimensions are summed on the strided view, so the unfolded input is
  never materialised; for KFAC-expand of stride-1 convolutions on CPU the pair contraction
  ``Σ_o Π Π`` is Toeplitz in ``k' - k`` and shared lag products replace the block products
  where that is faster (:mod:`kfac_tn.tn.lag`, :func:`expand_strategy`);
* ``"standard"``: unfold (``F.unfold``, or a one-hot convolution for N ≠ 2, as BackPACK does)
  followed by a matmul or a spatial mean (the curvlinops / BackPACK way);
* ``"auto"`` (default): the faster of the above for the call's shapes (see :func:`choose_impl`).

Symmetry: every ``impl`` but ``"standard"`` returns factors that are exactly (bitwise)
symmetric by construction — one triangle is computed and mirrored (:mod:`kfac_tn.tn.gram`), so
the property does not depend on the BLAS kernel. ``"standard"`` stays what the peers compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kfac_tn.tn import networks
from kfac_tn.tn._common import (
    Shape,
    TensorLike,
    check_groups,
    check_impl,
    join,
    make_spec,
    names,
    prod,
    spatial_ndim,
)
from kfac_tn.tn.cost import expand_factor_work, expand_strategy, resolve_impl
from kfac_tn.tn.einsum import contract
from kfac_tn.tn.expressions import evaluate, routine_expression
from kfac_tn.tn.gram import mirror_upper_, symmetric_gram
from kfac_tn.tn.lag import lag_expand_gram
from kfac_tn.tn.patterns import cached_summed_index_pattern
from kfac_tn.tn.spec import ConvSpec, DimCategory, IntOrSeq, Padding
from kfac_tn.tn.unfolding import standard_unfold, standard_unfold_transpose
from kfac_tn.tn.views import patch_view, scatter_patches

__all__ = [
    "grad_expand_factor",
    "grad_reduce_factor",
    "kfac_expand_factor",
    "kfac_expand_work",
    "kfac_reduce_factor",
    "prepare_factor",
    "prepare_grad_factor",
    "summed_patches",
    "summed_transpose_patches",
]

ExpandPath = Callable[[torch.Tensor, ConvSpec, bool], torch.Tensor]
"""One implementation of the expand factor: ``(x, spec, bias) -> [G, D(+1), D(+1)]``."""


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def kfac_expand_factor(
    x: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    bias: bool = False,
    transpose: bool = False,
    output_padding: IntOrSeq = 0,
    impl: str = "auto",
) -> torch.Tensor:
    r"""KFC / KFAC-expand input factor :math:`\frac{1}{N O}\sum_{n,o} u u^\top` per group.

    Args:
        x: Layer input ``[N, C_in, *spatial]`` (for ``transpose=True`` the ConvTranspose
            input, spatial size ``O``).
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'`` (ints only for
            ``transpose=True``).
        dilation: Dilation, int or N ints.
        groups: Channel groups ``G`` (must divide ``C_in``).
        bias: Append a constant-one entry to every column (last row/column).
        transpose: Treat the layer as a transposed convolution (see module docstring).
        output_padding: Output padding of the transposed convolution.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[G, C_in/G·ΠK (+1), C_in/G·ΠK (+1)]``, symmetric.

    Raises:
        ValueError: On invalid hyperparameters, input rank, groups, an empty batch or ``impl``.
    """
    spec = _factor_spec(
        x, kernel_size, stride, padding, dilation, groups, transpose, output_padding
    )
    path = _expand_path(resolve_impl("expand", impl, spec, x), spec, x)
    return path(x, spec, bias)


def kfac_expand_work(
    x_shape: Shape,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    device_type: str = "cpu",
) -> float:
    """Modeled work of :func:`kfac_expand_factor` (``impl='auto'``, no transpose), in flops.

    The fitted time model of the faster simplified strategy at its GEMM rate (an upper bound
    where ``'auto'`` picks the plain network; :func:`kfac_tn.tn.cost.expand_factor_work`):
    deterministic in the shapes, used by ``curvature_budget``'s cost model.

    Args:
        x_shape: Layer input shape ``[N, C_in, *spatial]``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: As in :func:`kfac_expand_factor`.
        dilation: Dilation, int or N ints.
        groups: Channel groups ``G``.
        device_type: ``'cpu'``, ``'cuda'``, ...

    Returns:
        GEMM-flop equivalents ``>= 0``.

    Raises:
        ValueError: On invalid hyperparameters, input rank or groups.
    """
    x = torch.empty(tuple(x_shape), device="meta")
    spec, _ = prepare_factor(x, kernel_size, stride, padding, dilation, groups)
    return expand_factor_work(spec, x.shape[0], x.shape[1], device_type)


def kfac_reduce_factor(
    x: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    bias: bool = False,
    transpose: bool = False,
    output_padding: IntOrSeq = 0,
    impl: str = "auto",
) -> torch.Tensor:
    r"""KFAC-reduce input factor :math:`\frac{1}{N}\sum_n \bar u_n \bar u_n^\top` per group.

    :math:`\bar u_n` is the spatial mean of the unfolded input (over output positions; for
    ``transpose=True`` over the transposed convolution's output positions).  Arguments as in
    :func:`kfac_expand_factor`.

    Args:
        x: Layer input ``[N, C_in, *spatial]``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: As in :func:`kfac_expand_factor`.
        dilation: Dilation, int or N ints.
        groups: Channel groups ``G`` (must divide ``C_in``).
        bias: Append a constant-one entry to every column (last row/column).
        transpose: Treat the layer as a transposed convolution.
        output_padding: Output padding of the transposed convolution.
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[G, C_in/G·ΠK (+1), C_in/G·ΠK (+1)]``, symmetric.

    Raises:
        ValueError: On invalid hyperparameters, input rank, groups, an empty batch or ``impl``.
    """
    spec = _factor_spec(
        x, kernel_size, stride, padding, dilation, groups, transpose, output_padding
    )
    impl = resolve_impl("reduce", impl, spec, x)
    if impl == "tn":
        return _reduce_tn(x, spec, bias)
    if impl == "standard":
        return _mean_gram(_standard_columns(x, spec).mean(dim=3), bias)
    summed = summed_transpose_patches(x, spec) if transpose else summed_patches(x, spec)
    ubar = summed.reshape(x.shape[0], groups, -1) / _positions(spec)
    return mirror_upper_(_mean_gram(ubar, bias))


def grad_expand_factor(g: torch.Tensor, groups: int = 1, *, impl: str = "auto") -> torch.Tensor:
    r"""Output-gradient factor :math:`\sum_{n,o} g_{n,o} g_{n,o}^\top` per group (no scaling).

    Args:
        g: Output gradients ``[N, C_out, *spatial]``.
        groups: Channel groups ``G`` (must divide ``C_out``).
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[G, C_out/G, C_out/G]``.

    Raises:
        ValueError: If ``g`` has rank < 3 or no samples, ``groups`` does not divide ``C_out``
            or ``impl`` is invalid.
    """
    impl = _check_grad(g, groups, impl)
    n, c = g.shape[:2]
    if impl == "tn":
        spec, shapes = prepare_grad_factor(g, groups)
        expr = routine_expression(networks.grad_expand_factor, spec, shapes)
        return mirror_upper_(evaluate(expr, spec, {"g": g}))
    cg = c // groups
    gv = g.reshape(n, groups, cg, -1)
    if impl == "tn_simplified" and gv.shape[-1] >= cg:
        # at least as many positions as channels: one GEMM per sample on g's own layout, then
        # the (smaller) per-sample results summed: no copy of g (1.2-2x faster on CPU)
        per_sample = gv.reshape(n * groups, cg, -1)
        out = torch.bmm(per_sample, per_sample.transpose(1, 2)).view(n, groups, cg, cg).sum(0)
        return (out + out.transpose(1, 2)).mul_(0.5)  # exactly symmetric
    flat = gv.permute(1, 2, 0, 3).reshape(groups, cg, -1)  # [G, C/G, N·O]
    if impl == "tn_simplified":  # merged legs (o…) and (n o), block-triangular Gram
        return symmetric_gram(flat)
    return torch.bmm(flat, flat.transpose(1, 2))


def grad_reduce_factor(g: torch.Tensor, groups: int = 1, *, impl: str = "auto") -> torch.Tensor:
    r"""Output-gradient factor :math:`\sum_n (\sum_o g_{n,o})(\sum_o g_{n,o})^\top` per group.

    Args:
        g: Output gradients ``[N, C_out, *spatial]``.
        groups: Channel groups ``G`` (must divide ``C_out``).
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[G, C_out/G, C_out/G]`` (no normalisation).

    Raises:
        ValueError: As :func:`grad_expand_factor`.
    """
    impl = _check_grad(g, groups, impl)
    n, c = g.shape[:2]
    if impl == "tn":
        spec, shapes = prepare_grad_factor(g, groups)
        expr = routine_expression(networks.grad_reduce_factor, spec, shapes)
        return mirror_upper_(evaluate(expr, spec, {"g": g}))
    s = g.reshape(n, groups, c // groups, -1).sum(-1)  # [N, G, C/G]
    st = s.permute(1, 0, 2)  # [G, N, C/G]
    out = torch.bmm(st.transpose(1, 2), st)
    return out if impl == "standard" else mirror_upper_(out)


# --------------------------------------------------------------------------------------------
# argument preparation (shared with symbolic())
# --------------------------------------------------------------------------------------------
def prepare_factor(
    x: TensorLike,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    bias: bool = False,
    transpose: bool = False,
    output_padding: IntOrSeq = 0,
) -> tuple[ConvSpec, tuple[Shape]]:
    """Validate the input-factor arguments (those of :func:`kfac_expand_factor`).

    Args:
        x: Layer input ``[N, C_in, *spatial]`` (a tensor or its shape).
        kernel_size: Int or N ints.
        stride: Int or N ints.
        padding: As in :func:`kfac_expand_factor`.
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        bias: Unused (the networks are those without bias).
        transpose: The layer is a transposed convolution.
        output_padding: Output padding of the transposed convolution.

    Returns:
        ``(spec, (x.shape,))``.

    Raises:
        ValueError: On invalid hyperparameters, input rank or groups.
    """
    spatial_ndim(x, kernel_size)
    check_groups(x.shape[1], groups)
    spec = make_spec(
        x.shape[2:],
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
        transpose=transpose,
        output_padding=output_padding,
    )
    return spec, (tuple(x.shape),)


def prepare_grad_factor(g: TensorLike, groups: int = 1) -> tuple[ConvSpec, tuple[Shape]]:
    """Validate the gradient-factor arguments.

    Args:
        g: Output gradients ``[N, C_out, *spatial]`` (a tensor or its shape).
        groups: Channel groups ``G``.

    Returns:
        ``(spec, (g.shape,))``: the spec is that of a 1×1 convolution on ``g``'s spatial size
        (it only carries ``groups``).

    Raises:
        ValueError: If ``g`` has rank < 3 or ``groups`` does not divide ``C_out``.
    """
    if g.ndim < 3:
        raise ValueError(
            f"Invalid g: shape {tuple(g.shape)} (expected [N, C_out, *spatial] with at least one "
            f"spatial dimension)"
        )
    check_groups(g.shape[1], groups, "g")
    return make_spec(g.shape[2:], 1, groups=groups), (tuple(g.shape),)


def _factor_spec(
    x: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: Padding,
    dilation: IntOrSeq,
    groups: int,
    transpose: bool,
    output_padding: IntOrSeq,
) -> ConvSpec:
    _check_samples(x, "x")
    spec, _ = prepare_factor(
        x,
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
        transpose=transpose,
        output_padding=output_padding,
    )
    return spec


def _check_samples(t: torch.Tensor, name: str) -> None:
    """Reject an empty batch: a factor is a mean over samples (0/0 otherwise)."""
    if t.dim() >= 1 and t.shape[0] == 0:
        raise ValueError(
            f"Invalid {name}: shape {tuple(t.shape)} holds no samples; a factor is a mean over "
            "at least one sample"
        )


def _check_grad(g: torch.Tensor, groups: int, impl: str) -> str:
    """Check the gradient-factor arguments; ``'auto'`` is the simplified network."""
    _check_samples(g, "g")
    check_impl(impl)
    prepare_grad_factor(g, groups)
    return "tn_simplified" if impl == "auto" else impl


def _positions(spec: ConvSpec) -> int:
    """Count the positions a column is taken at: ``O`` (``I`` for transposed convolutions)."""
    return prod(spec.in_spatial if spec.transpose else spec.out_spatial)


def _expand_scale(x: torch.Tensor, spec: ConvSpec) -> float:
    """Return the expand factor's normalisation ``1 / (N·O)``."""
    return 1.0 / (x.shape[0] * _positions(spec))


# --------------------------------------------------------------------------------------------
# the five implementations of the expand factor
# --------------------------------------------------------------------------------------------
def _expand_path(impl: str, spec: ConvSpec, x: torch.Tensor) -> ExpandPath:
    """Pick the implementation of the expand factor for a resolved ``impl``."""
    if impl == "standard":
        return _expand_standard
    if impl == "tn":
        return _expand_tn
    if spec.transpose:
        return _expand_scattered
    if expand_strategy(spec, x.shape[0], x.shape[1], x.device) == "lag":
        return _expand_lag
    return _expand_gemm


def _expand_standard(x: torch.Tensor, spec: ConvSpec, bias: bool) -> torch.Tensor:
    """``impl='standard'``: unfold (torch), one batched matmul, then the scaling (not mirrored)."""
    u = _standard_columns(x, spec)  # [N, G, D, L]
    a = _gram_expand(u, symmetric=False, alpha=_expand_scale(x, spec))
    return _augment(a, u.mean(dim=(0, 3))) if bias else a


def _expand_tn(x: torch.Tensor, spec: ConvSpec, bias: bool) -> torch.Tensor:
    """``impl='tn'``: the plain network, mirrored from its upper triangle."""
    expr = routine_expression(networks.kfac_expand_factor, spec, (tuple(x.shape),))
    a = mirror_upper_(evaluate(expr, spec, {"x": x}))
    if not bias:
        return a
    return _augment(a, _tn_summed(x, spec).mean(0).reshape(spec.groups, -1) / _positions(spec))


def _expand_scattered(x: torch.Tensor, spec: ConvSpec, bias: bool) -> torch.Tensor:
    """Transposed convolutions: the transpose-unfolded columns by one strided write, one Gram."""
    n, c = x.shape[:2]
    d = c // spec.groups * prod(spec.kernel_size)
    cols = scatter_patches(x, spec).reshape(n, spec.groups, d, -1)
    a = _gram_expand(cols, symmetric=True, alpha=_expand_scale(x, spec))
    return _augment(a, cols.mean(dim=(0, 3))) if bias else a


def _expand_gemm(x: torch.Tensor, spec: ConvSpec, bias: bool) -> torch.Tensor:
    """Convolutions: one Gram GEMM of the strided patch view (:func:`_view_expand`)."""
    a = _view_expand(x, spec, spec.groups, _expand_scale(x, spec))
    return _augment(a, _column_mean(x, spec)) if bias else a


def _expand_lag(x: torch.Tensor, spec: ConvSpec, bias: bool) -> torch.Tensor:
    """Stride-1 convolutions on CPU: the lag products (:mod:`kfac_tn.tn.lag`)."""
    scale, groups = _expand_scale(x, spec), spec.groups
    if not bias:
        return lag_expand_gram(x, spec, groups, scale=scale)
    # the Gram is written straight into the augmented factor (no copy)
    d = x.shape[1] // groups * prod(spec.kernel_size)
    out = x.new_empty(groups, d + 1, d + 1)
    lag_expand_gram(x, spec, groups, scale=scale, out=out[:, :d, :d])
    return _fill_bias(out, _column_mean(x, spec))


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def _reduce_tn(x: torch.Tensor, spec: ConvSpec, bias: bool) -> torch.Tensor:
    """``impl='tn'`` of the reduce factor: the plain network, mirrored from its upper triangle."""
    expr = routine_expression(networks.kfac_reduce_factor, spec, (tuple(x.shape),))
    a = mirror_upper_(evaluate(expr, spec, {"x": x}))
    if not bias:
        return a
    ubar = _tn_summed(x, spec).reshape(x.shape[0], spec.groups, -1) / _positions(spec)
    return _augment(a, ubar.mean(0))


def _mean_gram(ubar: torch.Tensor, bias: bool) -> torch.Tensor:
    """``(1/N) Σ_n ū ūᵀ`` per group from the mean columns ``ubar: [N, G, D]``, ``[G, D, D]``.

    With ``bias`` a ones entry per column yields ``[[A, mean], [mean^T, 1]]`` in the same GEMM.
    """
    n = ubar.shape[0]
    if bias:
        ubar = torch.cat([ubar, ubar.new_ones(*ubar.shape[:2], 1)], dim=2)  # [N, G, D+1]
    ubar_t = ubar.permute(1, 2, 0)  # [G, D(+1), N]
    return torch.bmm(ubar_t, ubar_t.transpose(1, 2)).div_(n)


def _augment(a: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Bias augmentation: ``[[A, m], [m^T, 1]]`` per group; ``a: [G, D, D]``, ``mean: [G, D]``."""
    g, d, _ = a.shape
    out = a.new_empty(g, d + 1, d + 1)
    out[:, :d, :d] = a
    return _fill_bias(out, mean)


def _fill_bias(out: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Write the bias row/column ``m`` and corner ``1`` of ``out: [G, D+1, D+1]``; return it."""
    d = out.shape[-1] - 1
    out[:, :d, d] = mean
    out[:, d, :d] = mean
    out[:, d, d] = 1.0
    return out


def _gram_expand(cols: torch.Tensor, *, symmetric: bool, alpha: float = 1.0) -> torch.Tensor:
    """``alpha · Σ_{n,l} u u^T`` per group from columns ``[N, G, D, L]`` -> ``[G, D, D]``.

    ``symmetric=False`` is the standard way (one batched matmul, then the scaling); ``True``
    uses :func:`symmetric_gram`.
    """
    g, d = cols.shape[1], cols.shape[2]
    flat = cols.permute(1, 2, 0, 3).reshape(g, d, -1)  # [G, D, N·L]
    if symmetric:
        return symmetric_gram(flat, alpha)
    return torch.bmm(flat, flat.transpose(1, 2)).mul_(alpha)


def _view_expand(x: torch.Tensor, spec: ConvSpec, groups: int, scale: float) -> torch.Tensor:
    """``scale · Σ_{n,o} u u^T`` per group via the strided patch view (no Π), ``[G, D, D]``.

    The view is copied once, straight into the ``[G, (c k…), (n o…)]`` layout of the matmul
    (the standard way copies twice: im2col, then the rearrangement).
    """
    n, c = x.shape[:2]
    cg, nd = c // groups, spec.ndim
    view = patch_view(x.reshape(n, groups, cg, *x.shape[2:]), spec)  # [N, G, Cg, *O, *K]
    perm = (1, 2, *range(3 + nd, 3 + 2 * nd), 0, *range(3, 3 + nd))  # [G, Cg, *K, N, *O]
    flat = view.permute(perm).reshape(groups, cg * prod(spec.kernel_size), -1)
    return symmetric_gram(flat, scale)


def _column_mean(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Mean of the unfolded columns over samples and positions, per group: ``[G, D]``."""
    return summed_patches(x, spec).mean(0).reshape(spec.groups, -1) / _positions(spec)


def _tn_summed(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Plain-TN sum of the unfolded columns over positions: ``[N, G, C/G, *K]``."""
    expr = routine_expression(networks.factor_column_sum, spec, (tuple(x.shape),))
    return evaluate(expr, spec, {"x": x})


def _standard_columns(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Unfolded columns of a (transposed) convolution, ``[N, G, C/G·ΠK, L]``."""
    n = x.shape[0]
    u = standard_unfold_transpose(x, spec) if spec.transpose else standard_unfold(x, spec)
    return u.reshape(n, spec.groups, -1, u.shape[-1])


# --------------------------------------------------------------------------------------------
# the unfolded input summed over positions, never materialised (KFAC-reduce, bias entries)
# --------------------------------------------------------------------------------------------
def summed_patches(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Sum the unfolded input over output positions without materialising it.

    ``out[..., k] = Σ_o x_pad[..., S·o + D·k]``.  One-tap dense / down-sampling dimensions
    (1×1 convolutions, strided or not) are summed on a strided view; all other dimensions are
    contracted with the 0/1 matrix ``Π̄ = Σ_o Π`` ``[K, I]``, one matmul per dimension.

    Args:
        x: ``[*lead, I_1, ..., I_N]``.
        spec: The convolution's spec.

    Returns:
        ``[*lead, K_1, ..., K_N]``.
    """
    nd = spec.ndim
    lead = x.shape[: x.ndim - nd]
    nl = len(lead)
    # 1-tap dimensions without padding (1x1, 1x1/s2): a strided subsample, summed directly;
    # all others (measured faster also for K = S > 1): a matmul with the 0/1 matrix Π̄ [K, I]
    simple = [d.category is not DimCategory.GENERAL and d.kernel == 1 for d in spec.dims]
    if any(simple):
        st = x.stride()
        size, stride, o_axes = list(lead), list(st[:nl]), []
        for j, d in enumerate(spec.dims):
            s = st[nl + j]
            if simple[j]:
                o_axes.append(len(size))
                size += [d.out_size, d.kernel]
                stride += [d.stride * s, s]
            else:
                size.append(d.in_size)
                stride.append(s)
        x = x.as_strided(size, stride, x.storage_offset()).sum(dim=o_axes)
        if all(simple):
            return x
    # contract the remaining dimensions with Π̄ one at a time, last to first: the trailing
    # dimensions are then already reduced to K, and each step is one (batched) matmul
    sizes = list(x.shape[nl:])
    lead_numel = prod(lead)
    for j in reversed(range(nd)):
        if simple[j]:
            continue
        d = spec.dims[j]
        pbar = cached_summed_index_pattern(d, x.dtype, x.device, over="o")  # [K, I]
        trailing = prod(sizes[j + 1 :])
        if trailing == 1:
            x = torch.matmul(x.reshape(-1, d.in_size), pbar.t())
        else:
            x = torch.matmul(pbar, x.reshape(lead_numel * prod(sizes[:j]), d.in_size, trailing))
        sizes[j] = d.kernel
    return x.reshape(*lead, *sizes)


def summed_transpose_patches(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Sum the transpose-unfolded input over its positions without materialising it.

    ``out[..., k] = Σ_o x[..., o] Σ_i Π[k, o, i]``.  Without padding every tap of every ``o``
    lands inside the output, so the sum over ``o`` is taken first and broadcast over ``k``;
    padded dimensions are contracted with ``Σ_i Π`` (``[K, O]``).

    Args:
        x: ConvTranspose input ``[*lead, O_1, ..., O_N]``.
        spec: The transposed convolution's spec.

    Returns:
        ``[*lead, K_1, ..., K_N]`` (a broadcast view along unpadded dimensions).
    """
    nd = spec.ndim
    nl = x.ndim - nd
    full = [d.pad_left == 0 and d.pad_right == 0 for d in spec.dims]
    sum_axes = [nl + j for j in range(nd) if full[j]]
    if sum_axes:
        x = x.sum(dim=sum_axes, keepdim=True)
    lead_names = names("l", nl)
    k = names("k", nd)
    legs = ["one" + str(j) if full[j] else f"o{j}" for j in range(nd)]
    operands, terms = [x], [join(lead_names, legs)]
    for j, d in enumerate(spec.dims):
        if not full[j]:
            operands.append(cached_summed_index_pattern(d, x.dtype, x.device, over="i"))
            terms.append(f"{k[j]} o{j}")
    out_legs = [legs[j] if full[j] else k[j] for j in range(nd)]
    if all(full):
        return x.expand(*x.shape[:nl], *spec.kernel_size)
    out = contract(f"{', '.join(terms)} -> {join(lead_names, out_legs)}", *operands)
    return out.expand(*out.shape[:nl], *spec.kernel_size)
