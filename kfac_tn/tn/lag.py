r"""Lag (Toeplitz) simplification of the KFAC-expand Gram for stride-1 convolutions.

For a stride-1 dimension the index pattern is a shifted identity, ``Π[k, o, i] = 1`` iff
``i = o + D·k`` (padded coordinates), so the pair contraction that the KFAC-expand factor needs,

.. math::
    \sum_o Π[k, o, i]\, Π[k', o, i'] = [\,i' - i = D(k' - k)\,]\;[\,i \in W(k)\,],
    \qquad W(k) = [D k, D k + O),

depends on ``(k, k')`` only through the *lag* ``m = k' - k`` and the window ``W(k)``.  Hence

.. math::
    A_{k, k+m} = \sum_n \sum_{i \in W(k)} x_{n,i}\, x_{n,i+Dm}^\top ,

and the ``K^{2N}`` block products of the unfolded-input Gram collapse to ``(2K-1)^N`` lag
products that are *shared* between all ``k``.  The windows are unions of *segments* (per
dimension, the intervals between the window edges ``{D k, D k + O}``): the middle segment
``[D(K-1), O)`` lies in every window, the ``K-1`` segments of length ``D`` on each side in some.
Every *cell* (product of one segment per dimension) is contracted once for every lag it needs
(GEMMs over ``(n, i ∈ cell)``; the lags of the first dimension are row offsets into one copy
of the cell's neighbourhood, those of the other dimensions lag-shifted copies as columns), and
``A_{k,k+m}`` is the sum of its cells.  Symmetry ``A_{k',k} = A_{k,k'}^\top`` halves the lags:
only lags whose first non-zero entry is positive are contracted (``N`` rectangles of lags per
cell), the rest are transposed copies, so the result is exactly symmetric.

On a 3×3 'same' convolution the lag products cost ``~13·(O+2)^2`` channel-Gram units instead of
``~54·O^2`` for the (block-triangular) unfolded Gram: 2.2-3.3x faster on CPU for 16-128
channels on 16×16 and 32×32 maps, 3.6-5.4x on 5×5 layers, less on small maps
(``python -m kfac_tn.benchmarks.expand_strategies``).  Cells that lie completely in the zero
padding are skipped.  :func:`lag_cost` estimates the cost, so that callers pick the faster of
this and the single GEMM per shape.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kfac_tn.tn._common import prod
from kfac_tn.tn.spec import ConvSpec, DimSpec
from kfac_tn.tn.views import pad

__all__ = ["LagPlan", "lag_cost", "lag_expand_gram", "lag_plan"]

# Elements of one lag-shifted operand chunk: small enough to stay in cache while the GEMMs read
# it (2^19 floats measured best among 2^18 ... 2^22 on the 2-core CPU, 1 and 2 threads).
_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class Segment:
    """One segment ``[start, stop)`` (padded coordinates) of one spatial dimension.

    Attributes:
        start: First padded position.
        stop: One past the last padded position.
        k_first: First kernel index whose window contains the segment.
        k_last: Last kernel index whose window contains the segment.
    """

    start: int
    stop: int
    k_first: int
    k_last: int


@dataclass(frozen=True)
class LagTask:
    """One task: a cell against a rectangle of lags (a GEMM per first-dimension lag).

    Attributes:
        start: Padded start of the cell per dimension.
        length: Cell length per dimension.
        lag_lo: Smallest lag per dimension.
        lag_count: Number of lags per dimension.
        dst: Rows ``k·K^N + k'`` of the ``[(k, k'), ...]`` accumulator that receive a lag
            (int64, CPU; built once with the cached plan).
        src: Flat lag index (within the rectangle) each ``dst`` row takes.
    """

    start: tuple[int, ...]
    length: tuple[int, ...]
    lag_lo: tuple[int, ...]
    lag_count: tuple[int, ...]
    dst: torch.Tensor = field(compare=False, repr=False)
    src: torch.Tensor = field(compare=False, repr=False)


@dataclass(frozen=True)
class LagPlan:
    """Cells, lag rectangles and scatter indices of :func:`lag_expand_gram` for one spec.

    Attributes:
        spec: The convolution's spec.
        tasks: One entry per (cell, lag rectangle).
    """

    spec: ConvSpec
    tasks: tuple[LagTask, ...]

    @property
    def calls(self) -> int:
        """Number of tasks (cell × lag rectangle), each a few GEMMs and copies."""
        return len(self.tasks)

    def units(self) -> int:
        """Count the channel-Gram units of the plan.

        Returns:
            ``Σ |cell|·|lags|`` over the tasks (FLOPs ``= 2·G·C_g²·N·units``).
        """
        return sum(prod(t.length) * prod(t.lag_count) for t in self.tasks)

    def contributions(self) -> int:
        """Count the accumulated ``C_g×C_g`` blocks.

        Returns:
            ``Σ |dst|`` over the tasks.
        """
        return sum(len(t.dst) for t in self.tasks)


def segments(dim: DimSpec) -> tuple[Segment, ...]:
    """Split the windows of one stride-1 dimension into segments.

    Args:
        dim: Geometry of the dimension (stride 1).

    Returns:
        The segments between consecutive window edges, in order, without those that lie
        completely in the padding or outside every window.
    """
    d, k, o = dim.dilation, dim.kernel, dim.out_size
    edges = sorted({d * j for j in range(k)} | {d * j + o for j in range(k)})
    data = (dim.pad_left, dim.pad_left + dim.in_size)
    out = []
    for start, stop in zip(edges[:-1], edges[1:]):
        if stop <= data[0] or start >= data[1]:
            continue  # only zeros
        ks = [j for j in range(k) if d * j <= start and stop <= d * j + o]
        if ks:  # positions outside every window (O < D) are never read
            out.append(Segment(start, stop, ks[0], ks[-1]))
    return tuple(out)


def _half_rectangles(lo: list[int], hi: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split ``{m : lo <= m <= hi}`` ∩ {m = 0 or first non-zero m_j > 0} into rectangles."""
    n = len(lo)
    out = []
    for t in range(n):
        if any(not lo[j] <= 0 <= hi[j] for j in range(t)):
            break
        first = max(lo[t], 1 if t < n - 1 else 0)
        r_lo = [0] * t + [first] + lo[t + 1 :]
        r_hi = [0] * t + hi[t:]
        if all(a <= b for a, b in zip(r_lo, r_hi)):
            out.append((r_lo, r_hi))
    return out


@functools.lru_cache(maxsize=512)
def lag_plan(spec: ConvSpec) -> LagPlan | None:
    """Plan the lag products of ``spec`` (cached).

    The lag structure applies to convolutions (not transposed) with stride 1 in every
    dimension; padding and dilation are arbitrary.

    Args:
        spec: The convolution's spec.

    Returns:
        The plan, or ``None`` where the lag structure does not apply.
    """
    if spec.transpose or any(d.stride != 1 for d in spec.dims):
        return None
    kernel = spec.kernel_size
    kn = prod(kernel)
    tasks = []
    for cell in itertools.product(*(segments(d) for d in spec.dims)):
        lo = [-s.k_last for s in cell]
        hi = [k - 1 - s.k_first for s, k in zip(cell, kernel)]
        for r_lo, r_hi in _half_rectangles(lo, hi):
            count = tuple(b - a + 1 for a, b in zip(r_lo, r_hi))
            dst, src = [], []
            for flat_m, m in enumerate(
                itertools.product(*(range(a, b + 1) for a, b in zip(r_lo, r_hi)))
            ):
                for k in itertools.product(*(range(s.k_first, s.k_last + 1) for s in cell)):
                    k2 = tuple(a + b for a, b in zip(k, m))
                    if all(0 <= v < kk for v, kk in zip(k2, kernel)):
                        dst.append(_flat(k, kernel) * kn + _flat(k2, kernel))
                        src.append(flat_m)
            tasks.append(
                LagTask(
                    start=tuple(s.start for s in cell),
                    length=tuple(s.stop - s.start for s in cell),
                    lag_lo=tuple(r_lo),
                    lag_count=count,
                    dst=torch.tensor(dst, dtype=torch.int64),
                    src=torch.tensor(src, dtype=torch.int64),
                )
            )
    return LagPlan(spec, tuple(tasks))


def _flat(index: Sequence[int], sizes: Sequence[int]) -> int:
    """Row-major flat index of ``index`` in a grid of ``sizes``."""
    out = 0
    for i, s in zip(index, sizes):
        out = out * s + i
    return out


def lag_cost(plan: LagPlan, batch: int, channels: int, groups: int) -> dict[str, float]:
    """FLOPs, elements moved and tasks of :func:`lag_expand_gram` (inputs of the cost model).

    Args:
        plan: The plan (see :func:`lag_plan`).
        batch: ``N``.
        channels: Input channels ``C_in``.
        groups: Channel groups ``G``.

    Returns:
        ``{'flops', 'elements', 'calls'}``: GEMM FLOPs; elements copied or accumulated (the
        cell and lag-shifted operands, the scattered blocks, and three passes over the result);
        number of tasks (cell × lag rectangle), which carries the per-call overhead.
    """
    cg = channels // groups
    d = cg * prod(plan.spec.kernel_size)
    units = plan.units()
    dil1 = plan.spec.dims[0].dilation
    copied = sum(  # the cell and its lag-shifted operand (first-dimension lags are offsets)
        prod(t.length)
        + (t.length[0] + dil1 * (t.lag_count[0] - 1)) * prod(t.length[1:]) * prod(t.lag_count[1:])
        for t in plan.tasks
    )
    elements = (
        batch * channels * copied + 2 * plan.contributions() * groups * cg * cg + 3 * groups * d * d
    )
    return {
        "flops": 2.0 * groups * cg * cg * batch * units,
        "elements": float(elements),
        "calls": float(plan.calls),
    }


def lag_expand_gram(
    x: torch.Tensor,
    spec: ConvSpec,
    groups: int,
    *,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale · Σ_{n,o} u_{n,o} u_{n,o}^T`` per group via lag products.

    Args:
        x: Input ``[N, C_in, *I]``.
        spec: Spec of a stride-1 convolution on ``x`` (see :func:`lag_plan`).
        groups: Channel groups ``G``.
        scale: Factor applied to the result (on the small lag blocks, not the result).
        out: Optional ``[G, D, D]`` destination, any strides (e.g. the top-left block of a
            bias-augmented factor).

    Returns:
        ``[G, D, D]`` with ``D = C_in/G·ΠK`` (rows ordered ``(c, k_1, ..., k_N)``), exactly
        symmetric; ``out`` if given.

    Raises:
        ValueError: If the lag structure does not apply to ``spec``, or ``out`` has the wrong
            shape.
    """
    plan = lag_plan(spec)
    if plan is None:
        raise ValueError(f"Invalid spec for lag_expand_gram: {spec} (needs stride 1, no transpose)")
    cg, kn = x.shape[1] // groups, prod(spec.kernel_size)
    d = cg * kn
    if out is not None and tuple(out.shape) != (groups, d, d):
        raise ValueError(f"Invalid out: shape {tuple(out.shape)} (expected {(groups, d, d)})")
    # [N, *P, C]: a cell of one sample is a block of contiguous channel vectors, and the lag
    # shifts of the last dimension are adjacent in memory (cheap copies).
    xt = pad(x, spec.dims).movedim(1, -1).contiguous()
    layout = _Layout.of(xt, spec, groups)
    acc = x.new_zeros(kn * kn, groups * cg * cg)  # rows (k, k'), entries (g, c, c')
    for task in plan.tasks:
        blocks = _task_products(xt, layout, task)
        src, dst = task.src.to(x.device), task.dst.to(x.device)  # no copy on CPU
        acc.index_add_(0, dst, blocks.index_select(0, src), alpha=scale)
    return _write_symmetric(acc, x.new_empty(groups, d, d) if out is None else out, kn)


@dataclass(frozen=True)
class _Layout:
    """Sizes and strides of the padded channels-last input ``xt: [N, *P, C]``.

    Attributes:
        groups: Channel groups ``G``.
        channels: Channels per group ``C_g``.
        n_stride: Stride of the batch dimension.
        sp_stride: Stride of each spatial dimension.
        lag_stride: Stride of one lag step (dilation × spatial stride) per dimension.
        dilation: Dilation of the first spatial dimension (its lags are row offsets).
    """

    groups: int
    channels: int
    n_stride: int
    sp_stride: tuple[int, ...]
    lag_stride: tuple[int, ...]
    dilation: int

    @classmethod
    def of(cls, xt: torch.Tensor, spec: ConvSpec, groups: int) -> _Layout:
        """Read the layout of ``xt: [N, *P, C]`` for ``spec``.

        Args:
            xt: The padded input, channels last.
            spec: The convolution's spec.
            groups: Channel groups ``G``.

        Returns:
            The layout.
        """
        nd = spec.ndim
        sp_stride = xt.stride()[1 : 1 + nd]
        lag_stride = tuple(d.dilation * s for d, s in zip(spec.dims, sp_stride))
        return cls(
            groups,
            xt.shape[-1] // groups,
            xt.stride()[0],
            sp_stride,
            lag_stride,
            spec.dims[0].dilation,
        )


def _task_products(xt: torch.Tensor, layout: _Layout, task: LagTask) -> torch.Tensor:
    """Contract one task (a cell against a rectangle of lags), unscaled.

    The lags of the first spatial dimension are row offsets: with the rows ordered
    ``(i_1, n, i_2, ...)``, the operand of lag ``m_1`` is a contiguous row block of one copy
    that spans the cell extended by ``D_1·(r_1 - 1)`` positions; only the other lags are copied.

    Returns:
        ``[lags, G·C_g·C_g]``, lags in the rectangle's row-major order.
    """
    g, cg, sp = layout.groups, layout.channels, layout.sp_stride
    base = sum(a * s for a, s in zip(task.start, sp))
    offset = base + sum(m * s for m, s in zip(task.lag_lo, layout.lag_stride))
    len1, rest = task.length[0], task.length[1:]
    r1, rest_lags = task.lag_count[0], task.lag_count[1:]
    ext1 = len1 + layout.dilation * (r1 - 1)
    n = xt.shape[0]
    left = xt.as_strided((g, len1, n, *rest, cg), (cg, sp[0], layout.n_stride, *sp[1:], 1), base)
    right = xt.as_strided(
        (g, ext1, n, *rest, *rest_lags, cg),
        (cg, sp[0], layout.n_stride, *sp[1:], *layout.lag_stride[1:], 1),
        offset,
    )
    lags_rest = prod(rest_lags)
    prods = _chunked_products(left, right, r1, layout.dilation, lags_rest)
    prods = prods.view(r1, g, cg, lags_rest, cg).permute(0, 3, 1, 2, 4)
    return prods.reshape(prod(task.lag_count), -1)


def _chunked_products(
    left: torch.Tensor, right: torch.Tensor, r1: int, dil1: int, lags_rest: int
) -> torch.Tensor:
    """``Σ_{n, cell} left ⊗ right`` for every first-dimension lag, in batch chunks.

    Args:
        left: The cell, ``[G, L_1, N, *rest, C_g]`` (a strided view).
        right: Its lag-shifted neighbourhood, ``[G, L_1 + D_1·(r_1-1), N, *rest, *lags, C_g]``.
        r1: Number of first-dimension lags.
        dil1: Dilation ``D_1`` of the first dimension.
        lags_rest: Number of lags of the other dimensions.

    Returns:
        ``[r_1, G, C_g, lags_rest·C_g]``.
    """
    g, len1, n = left.shape[:3]
    rest, cg = left.shape[3:-1], left.shape[-1]
    ext1, cell_rest = right.shape[1], prod(rest)
    # chunks over the batch keep the copies in cache and bound their memory
    per_sample = g * ext1 * cell_rest * lags_rest * cg
    chunk = max(1, min(n, _CHUNK_ELEMENTS // per_sample))
    lbuf = left.new_empty(g, len1, chunk, *rest, cg)
    rbuf = left.new_empty(g, ext1, chunk, *right.shape[3:])
    prods = left.new_zeros(r1, g, cg, lags_rest * cg)
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        lb, rb = lbuf, rbuf
        if n1 - n0 < chunk:  # last, short chunk: buffers of its size
            lb = left.new_empty(g, len1, n1 - n0, *rest, cg)
            rb = left.new_empty(g, ext1, n1 - n0, *right.shape[3:])
        lb.copy_(left[:, :, n0:n1])
        rb.copy_(right[:, :, n0:n1])
        lc = lb.reshape(g, -1, cg).mT
        rows = len1 * (n1 - n0) * cell_rest
        rflat = rb.reshape(g, ext1 * (n1 - n0) * cell_rest, lags_rest * cg)
        step = (n1 - n0) * cell_rest  # rows per position of the first dimension
        for j in range(r1):
            r0 = dil1 * j * step
            prods[j].baddbmm_(lc, rflat[:, r0 : r0 + rows])
    return prods


def _write_symmetric(acc: torch.Tensor, out: torch.Tensor, kn: int) -> torch.Tensor:
    """Write the half-lag accumulator ``acc: [(k, k'), (g, c, c')]`` into ``out: [G, D, D]``.

    Lags with a negative first non-zero entry are transposed copies: ``A[k, k'] = half[k, k'] +
    half[k', k]^T`` (one of the two is zero); lag 0 (``k = k'``) appears twice, so it is halved.
    Summing in the accumulator's layout first, then one permuted copy, is 1-6x faster than
    adding two permuted views straight into ``out`` (measured for ``C_g = 64 ... 512``).

    Returns:
        ``out``, exactly symmetric.
    """
    groups, d = out.shape[0], out.shape[-1]
    cg = d // kn
    # out[g, (c, k), (c', k')] as [G, C_g, K^N, C_g, K^N]
    s_g, s_row, s_col = out.stride()
    view = out.as_strided(
        (groups, cg, kn, cg, kn), (s_g, s_row * kn, s_row, s_col * kn, s_col), out.storage_offset()
    )
    half = acc.view(kn, kn, groups, cg, cg)
    full = half + half.permute(1, 0, 2, 4, 3)
    full.diagonal(dim1=0, dim2=1).mul_(0.5)
    view.copy_(full.permute(2, 3, 0, 4, 1))
    return out
