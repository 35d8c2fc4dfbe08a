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

import functools

import torch
import torch.nn.functional as F

from kfac_tn.tn._common import (
    check_groups,
    check_impl,
    join,
    make_spec,
    names,
    pad,
    patch_view,
    prod,
    scatter_patches,
    spatial_ndim,
)
from kfac_tn.tn.einsum import contract, contraction_path
from kfac_tn.tn.expressions import evaluate, routine_expression
from kfac_tn.tn.gram import mirror_upper_, symmetric_gram
from kfac_tn.tn.lag import lag_cost, lag_expand_gram, lag_plan
from kfac_tn.tn.patterns import cached_index_pattern, cached_summed_index_pattern
from kfac_tn.tn.spec import ConvSpec, DimCategory

__all__ = [
    "choose_impl",
    "expand_strategy",
    "grad_expand_factor",
    "grad_reduce_factor",
    "kfac_expand_factor",
    "kfac_reduce_factor",
    "standard_unfold",
    "standard_unfold_transpose",
    "summed_patches",
    "summed_transpose_patches",
]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def kfac_expand_factor(
    x: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    bias: bool = False,
    transpose: bool = False,
    output_padding=0,
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
        ValueError: On invalid hyperparameters, input rank, groups or ``impl``.
    """
    spec = _factor_spec(
        x, kernel_size, stride, padding, dilation, groups, transpose, output_padding
    )
    impl = _resolve("expand", impl, spec, x)
    n, c = x.shape[:2]
    cg = c // groups
    positions = prod(spec.in_spatial if transpose else spec.out_spatial)
    scale = 1.0 / (n * positions)
    if impl == "standard":
        u = _standard_columns(x, spec)  # [N, G, D, L]
        a = _gram_expand(u, symmetric=False, alpha=scale)
        mean = u.mean(dim=(0, 3)) if bias else None
    elif impl == "tn":
        expr = routine_expression("kfac_expand_factor", spec, (tuple(x.shape),))
        a = mirror_upper_(evaluate(expr, spec, {"x": x}))
        mean = _tn_summed(x, spec).mean(0).reshape(groups, -1) / positions if bias else None
    else:
        if transpose:
            cols = scatter_patches(x, spec).reshape(n, groups, cg * prod(spec.kernel_size), -1)
            a = _gram_expand(cols, symmetric=True, alpha=scale)
            mean = cols.mean(dim=(0, 3)) if bias else None
        else:
            mean = summed_patches(x, spec).mean(0).reshape(groups, -1) / positions if bias else None
            if expand_strategy(spec, n, c, x.device) == "lag":
                if not bias:
                    return lag_expand_gram(x, spec, groups, scale=scale)
                # the Gram is written straight into the augmented factor (no copy)
                d = cg * prod(spec.kernel_size)
                out = x.new_empty(groups, d + 1, d + 1)
                lag_expand_gram(x, spec, groups, scale=scale, out=out[:, :d, :d])
                return _fill_bias(out, mean)
            a = _view_expand(x, spec, groups, scale)
    return _augment(a, mean) if bias else a


def kfac_reduce_factor(
    x: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    bias: bool = False,
    transpose: bool = False,
    output_padding=0,
    impl: str = "auto",
) -> torch.Tensor:
    r"""KFAC-reduce input factor :math:`\frac{1}{N}\sum_n \bar u_n \bar u_n^\top` per group.

    :math:`\bar u_n` is the spatial mean of the unfolded input (over output positions; for
    ``transpose=True`` over the transposed convolution's output positions).  Arguments as in
    :func:`kfac_expand_factor`.

    Returns:
        ``[G, C_in/G·ΠK (+1), C_in/G·ΠK (+1)]``, symmetric.

    Raises:
        ValueError: On invalid hyperparameters, input rank, groups or ``impl``.
    """
    spec = _factor_spec(
        x, kernel_size, stride, padding, dilation, groups, transpose, output_padding
    )
    impl = _resolve("reduce", impl, spec, x)
    n = x.shape[0]
    positions = prod(spec.in_spatial if transpose else spec.out_spatial)
    if impl == "standard":
        ubar = _standard_columns(x, spec).mean(dim=3)  # [N, G, D]
    elif impl == "tn":
        expr = routine_expression("kfac_reduce_factor", spec, (tuple(x.shape),))
        a = mirror_upper_(evaluate(expr, spec, {"x": x}))
        if not bias:
            return a
        ubar = _tn_summed(x, spec).reshape(n, groups, -1) / positions
        return _augment(a, ubar.mean(0))
    else:
        summed = summed_transpose_patches(x, spec) if transpose else summed_patches(x, spec)
        ubar = summed.reshape(n, groups, -1) / positions
    if bias:  # a ones entry per column yields [[A, mean], [mean^T, 1]] in the same GEMM
        ubar = torch.cat([ubar, ubar.new_ones(*ubar.shape[:2], 1)], dim=2)  # [N, G, D+1]
    ubar_t = ubar.permute(1, 2, 0)  # [G, D(+1), N]
    a = torch.bmm(ubar_t, ubar_t.transpose(1, 2)).div_(n)
    return a if impl == "standard" else mirror_upper_(a)


def grad_expand_factor(g: torch.Tensor, groups: int = 1, *, impl: str = "auto") -> torch.Tensor:
    r"""Output-gradient factor :math:`\sum_{n,o} g_{n,o} g_{n,o}^\top` per group (no scaling).

    Args:
        g: Output gradients ``[N, C_out, *spatial]``.
        groups: Channel groups ``G`` (must divide ``C_out``).
        impl: ``'auto'``, ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Returns:
        ``[G, C_out/G, C_out/G]``.

    Raises:
        ValueError: If ``g`` has rank < 3, ``groups`` does not divide ``C_out`` or ``impl`` is
            invalid.
    """
    impl = _check_grad(g, groups, impl)
    n, c = g.shape[:2]
    if impl == "tn":
        spec, shapes = prepare_grad_factor(g, groups)
        expr = routine_expression("grad_expand_factor", spec, shapes)
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
        expr = routine_expression("grad_reduce_factor", spec, shapes)
        return mirror_upper_(evaluate(expr, spec, {"g": g}))
    s = g.reshape(n, groups, c // groups, -1).sum(-1)  # [N, G, C/G]
    st = s.permute(1, 0, 2)  # [G, N, C/G]
    out = torch.bmm(st.transpose(1, 2), st)
    return out if impl == "standard" else mirror_upper_(out)


# --------------------------------------------------------------------------------------------
# implementation choice
# --------------------------------------------------------------------------------------------
def choose_impl(
    kind: str, spec: ConvSpec, batch_size: int, channels: int, dtype: torch.dtype, device
) -> str:
    """Pick the implementation ``impl='auto'`` uses for a factor, from shapes alone (cached).

    Cost model (calibrated on a 2-core CPU, one thread; see
    ``python -m kfac_tn.benchmarks.tn``):

    * KFAC-reduce: ``'tn_simplified'``.  It never materialises the unfolded input: 1×1
      dimensions are summed on strided views, all others contracted with the 0/1 band matrix
      ``Π̄`` — about one pass over the input (10-40x faster than unfold + mean on 3×3 / 7×7
      layers, and no auxiliary memory).
    * KFAC-expand: ``'tn_simplified'`` has two strategies (:func:`expand_strategy`): the single
      GEMM copies the strided patch view once, straight into the matmul layout
      ``[G, (c k…), (n o…)]`` (the standard way copies twice: im2col, then the rearrangement)
      and costs ``2·G·D²·N·O`` FLOPs; on CPUs, stride-1 layers can instead contract lag
      products (:mod:`kfac_tn.tn.lag`: the Π-pair contraction is Toeplitz, so ``(2K-1)^N``
      shared lags replace ``K^{2N}`` block products; 2-5x faster on 3×3 / 5×5 layers with
      ``C ≥ 8``).  The plain network can be cheaper when correlating the input *before*
      applying Π saves work (long kernels on small inputs, e.g. InceptionV3's 7×1 on GPUs):
      its opt_einsum ``dp`` path is chosen when its largest intermediate is at most twice the
      unfolded input and, on CPUs, its estimated time (FLOPs at 70% of the GEMM rate,
      intermediates, pairwise contractions) is below the simplified strategy's; on GPUs, when
      it needs under 70% of the single GEMM's FLOPs.

    Estimated time ``= FLOPs·8.5e-12 s + elements moved·8.9e-10 s + GEMM calls·7.6e-5 s``
    (relative least-squares fit over 25 layer shapes at batch 32-128, one thread:
    ``python -m kfac_tn.benchmarks.expand_strategies``; it picks the faster strategy wherever
    the two differ by more than the run-to-run noise).

    Args:
        kind: ``'expand'`` or ``'reduce'``.
        spec: The layer's spec.
        batch_size: ``N``.
        channels: Input channels ``C_in``.
        dtype: Input dtype.
        device: Input device.

    Returns:
        ``'tn'`` or ``'tn_simplified'``.

    Raises:
        ValueError: If ``kind`` is not ``'expand'`` or ``'reduce'``.
    """
    return _choose(kind, spec, batch_size, channels, dtype, torch.device(device).type)


# expand cost model: seconds per FLOP, per element copied or accumulated, per GEMM call
_SECONDS_PER_FLOP = 8.5e-12
_SECONDS_PER_ELEMENT = 8.9e-10
_SECONDS_PER_CALL = 7.6e-5


def _seconds(flops: float, elements: float, calls: float) -> float:
    return flops * _SECONDS_PER_FLOP + elements * _SECONDS_PER_ELEMENT + calls * _SECONDS_PER_CALL


@functools.lru_cache(maxsize=4096)
def _choose(
    kind: str, spec: ConvSpec, batch: int, channels: int, dtype: torch.dtype, device_type: str
) -> str:
    if kind not in ("expand", "reduce"):
        raise ValueError(f"Invalid kind: {kind!r} (allowed: 'expand', 'reduce')")
    if kind == "reduce" or spec.ndim > 4:  # N > 4: skip the (exponential) dp path search
        return "tn_simplified"
    spatial = spec.out_spatial if spec.transpose else spec.in_spatial
    expr = routine_expression("kfac_expand_factor", spec, ((batch, channels, *spatial),))
    info = contraction_path(expr.equation, [shape for _, shape in expr.operands])
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    unfolded = batch * channels * prod(spec.kernel_size) * positions
    # the plain network's pairwise einsums run at ~70% of the GEMM's FLOP rate (measured)
    if device_type == "cpu":  # time model: the simplified strategies include lag products
        simplified = _simplified_seconds(spec, batch, channels, device_type)
        plain = _seconds(
            float(info.opt_cost) / 0.7, sum(info.size_list), len(info.contraction_list)
        )
        cheaper = plain < min(simplified.values())
    else:  # accelerators: FLOPs only, as measured on the H100
        d = channels // spec.groups * prod(spec.kernel_size)
        cheaper = float(info.opt_cost) < 0.7 * 2 * spec.groups * d * d * batch * positions
    if cheaper and info.largest_intermediate <= 2 * unfolded:
        return "tn"
    return "tn_simplified"


def expand_strategy(spec: ConvSpec, batch_size: int, channels: int, device) -> str:
    """Strategy of ``kfac_expand_factor(..., impl='tn_simplified')`` for these shapes (cached).

    Returns:
        ``'lag'`` (lag products, :mod:`kfac_tn.tn.lag`; stride-1 convolutions on CPU, where the
        cost model estimates them faster) or ``'gemm'`` (one Gram GEMM of the patch view).
    """
    times = _simplified_seconds(spec, batch_size, channels, torch.device(device).type)
    return min(times, key=times.__getitem__)


@functools.lru_cache(maxsize=4096)
def _simplified_seconds(
    spec: ConvSpec, batch: int, channels: int, device_type: str
) -> dict[str, float]:
    """Estimated seconds of the simplified expand strategies that apply (``'gemm'`` always)."""
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    d = channels // spec.groups * prod(spec.kernel_size)
    blocks = 1 if d < 512 or device_type != "cpu" else (3 if d < 2048 else 4)  # symmetric_gram
    flops = 2 * spec.groups * d * d * batch * positions * (blocks + 1) / (2 * blocks)
    out = {"gemm": _seconds(flops, batch * channels * prod(spec.kernel_size) * positions, 1)}
    plan = lag_plan(spec) if device_type == "cpu" else None  # lag: never measured on GPUs
    if plan is not None:
        out["lag"] = _seconds(**lag_cost(plan, batch, channels, spec.groups))
    return out


def _resolve(kind: str, impl: str, spec: ConvSpec, x: torch.Tensor) -> str:
    check_impl(impl)
    if impl == "auto":
        return _choose(kind, spec, x.shape[0], x.shape[1], x.dtype, x.device.type)
    return impl


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def prepare_factor(
    x,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    *,
    bias=False,
    transpose=False,
    output_padding=0,
):
    """Validate the input-factor arguments; return ``(spec, (x.shape,))``."""
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


def prepare_grad_factor(g, groups=1):
    """Validate the gradient-factor arguments; return ``(spec, (g.shape,))``.

    The spec is that of a 1×1 convolution on ``g``'s spatial size (it only carries ``groups``).
    """
    if g.ndim < 3:
        raise ValueError(
            f"Invalid g: shape {tuple(g.shape)} (expected [N, C_out, *spatial] with at least one "
            f"spatial dimension)"
        )
    check_groups(g.shape[1], groups, "g")
    return make_spec(g.shape[2:], 1, groups=groups), (tuple(g.shape),)


def _factor_spec(x, kernel_size, stride, padding, dilation, groups, transpose, output_padding):
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


def _check_grad(g: torch.Tensor, groups: int, impl: str) -> str:
    check_impl(impl)
    prepare_grad_factor(g, groups)
    return "tn_simplified" if impl == "auto" else impl


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


def summed_patches(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Sum the unfolded input over output positions without materialising it.

    ``[*lead, *I] -> [*lead, *K]``.

    ``out[..., k] = Σ_o x_pad[..., S·o + D·k]``.  One-tap dense / down-sampling dimensions
    (1×1 convolutions, strided or not) are summed on a strided view; all other dimensions are
    contracted with the 0/1 matrix ``Π̄ = Σ_o Π`` ``[K, I]`` along a cached path.
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
    """Transpose-unfolded input summed over its positions: ``[*lead, *O] -> [*lead, *K]``.

    ``out[..., k] = Σ_o x[..., o] Σ_i Π[k, o, i]``.  Without padding every tap of every ``o``
    lands inside the output, so the sum over ``o`` is taken first and broadcast over ``k``;
    padded dimensions are contracted with ``Σ_i Π`` (``[K, O]``).
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


def _tn_operands(x: torch.Tensor, spec: ConvSpec, suffix: str, share: str):
    """Terms and operands of one unfolded-input copy in the plain TN (x with its Π's).

    ``share`` names the leg the two copies share (``'o'`` for conv expand, ``'i'`` for
    transpose expand, ``''`` for reduce: all private).
    """
    n, c = x.shape[:2]
    g = spec.groups
    nd = spec.ndim
    xv = x.reshape(n, g, c // g, *x.shape[2:])
    i = names("i", nd, "" if share == "i" else suffix)
    o = names("o", nd, "" if share == "o" else suffix)
    k = names("k", nd, suffix)
    x_legs = o if spec.transpose else i
    terms = [join("n g", "c" + suffix, x_legs)]
    operands = [xv]
    for j, d in enumerate(spec.dims):
        terms.append(f"{k[j]} {o[j]} {i[j]}")
        operands.append(cached_index_pattern(d, x.dtype, x.device))
    return terms, operands, join("c" + suffix, k)


def _tn_summed(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Plain-TN sum of the unfolded columns over positions: ``[N, G, C/G, *K]``."""
    terms, ops, out = _tn_operands(x, spec, "", "")
    return contract(f"{', '.join(terms)} -> {join('n g', out)}", *ops)


def standard_unfold(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Unfold the standard way: ``F.unfold`` (2-d) or a one-hot grouped convolution (1-d, 3-d).

    For N > 3, where torch has no convolution, the strided patch view is copied.

    Args:
        x: ``[N, C, *I]``.
        spec: The convolution's spec (any grouping is ignored).

    Returns:
        ``[N, C·ΠK, ΠO]`` with rows ordered ``(c, k_1, ..., k_N)``.
    """
    n, c = x.shape[:2]
    nd = spec.ndim
    kk = prod(spec.kernel_size)
    if nd > 3:
        view = patch_view(x, spec)  # [N, C, *O, *K]
        perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
        return view.permute(perm).reshape(n, c * kk, -1)
    symmetric, padding, stride, dilation = _torch_args(spec)
    if not symmetric:
        x = pad(x, spec.dims)
    if nd == 2:
        return F.unfold(x, spec.kernel_size, dilation=dilation, padding=padding, stride=stride)
    weight = _one_hot_kernel(c, spec.kernel_size, x.dtype, x.device)
    conv = F.conv1d if nd == 1 else F.conv3d
    out = conv(x, weight, stride=stride, padding=padding, dilation=dilation, groups=c)
    return out.reshape(n, c * kk, -1)


@functools.lru_cache(maxsize=4096)
def _torch_args(spec: ConvSpec):
    """``(symmetric, padding, stride, dilation)`` tuples for torch (padding 0 if asymmetric)."""
    dims = spec.dims
    symmetric = all(d.pad_left == d.pad_right for d in dims)
    padding = tuple(d.pad_left for d in dims) if symmetric else (0,) * spec.ndim
    return symmetric, padding, tuple(d.stride for d in dims), tuple(d.dilation for d in dims)


def standard_unfold_transpose(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Transpose-unfold the standard way: ``conv_transpose`` with a one-hot kernel (BackPACK).

    Args:
        x: ConvTranspose input ``[N, C, *O]``.
        spec: The transposed convolution's spec.

    Returns:
        ``[N, C·ΠK, ΠI]`` with rows ordered ``(c, k_1, ..., k_N)``.
    """
    n, c = x.shape[:2]
    kk = prod(spec.kernel_size)
    if spec.ndim > 3:
        return scatter_patches(x, spec).reshape(n, c * kk, -1)
    weight = _one_hot_kernel(c, spec.kernel_size, x.dtype, x.device).reshape(
        c, kk, *spec.kernel_size
    )
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spec.ndim - 1]
    out = conv_t(
        x,
        weight,
        stride=tuple(d.stride for d in spec.dims),
        padding=tuple(d.pad_left for d in spec.dims),
        output_padding=spec.output_padding,
        groups=c,
        dilation=tuple(d.dilation for d in spec.dims),
    )
    return out.reshape(n, c * kk, -1)


def _one_hot_kernel(channels: int, kernel: tuple[int, ...], dtype, device) -> torch.Tensor:
    """``[C·ΠK, 1, *K]`` (same memory for ``[C, ΠK, *K]``): one-hot taps repeated per channel."""
    kk = prod(kernel)
    eye = torch.eye(kk, dtype=dtype, device=device).reshape(kk, 1, *kernel)
    return eye.repeat(channels, *([1] * (len(kernel) + 1)))


def _standard_columns(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Unfolded columns of a (transposed) convolution, ``[N, G, C/G·ΠK, L]``."""
    n = x.shape[0]
    u = standard_unfold_transpose(x, spec) if spec.transpose else standard_unfold(x, spec)
    return u.reshape(n, spec.groups, -1, u.shape[-1])
