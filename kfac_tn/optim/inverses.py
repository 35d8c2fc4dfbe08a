r"""Recomputing the inverses of many blocks at once: batched by shape, warm-started, counted, timed.

:class:`InverseUpdater` is what a :class:`~kfac_tn.optim.placement.Placement` calls for the
blocks this process inverts. It collects every factor of those blocks, groups same-shaped
factors (same size, dtype, device and method) across layers and decomposes each group in one
call (:mod:`kfac_tn.decompositions`), then hands each block its result through the block's
own bookkeeping (:meth:`KroneckerBlock.update_inverses` with ``result=``: counters, fault
logging, the stored form). Blocks whose class overrides ``update_inverses`` are inverted by
their own method, one by one.

Methods per factor:

* ``inversion="eigen"``: a warm start from the layer's previous eigenbasis when
  ``eigenbasis_tolerance > 0`` and one exists (same dtype and shape), else a full ``eigh``;
* ``inversion="cholesky"``: the π-damped factor's Cholesky inverse (two GEMMs per step when
  preconditioning; :mod:`kfac_tn.linalg`).

Paths are counted per factor matrix (a grouped layer has one per group) in the layer state as
``<path>_decompositions`` (``eigh``, ``warm``, ``qr``, ``cholesky``), plus
``offloaded_decompositions`` for accelerator factors decomposed on the CPU; ``KFAC.stats`` sums
them. On accelerators the updater measures, once per (method, size, dtype, device), whether the
group runs faster on the device or copied to the CPU, and uses the faster one from then on
(synchronising the device for that one measurement). This choice is not measured on the project
machines (no GPU there) and is off for CPU factors, whose results therefore depend only on the
factors (resume and data-parallel replicas are exact).

With a :class:`~kfac_tn.optim.schedule.CostMeter` that is active, each group's time is added to
its layers' ``("inverse", name)`` cost, split by their share of the group's matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kfac_tn import decompositions, linalg
from kfac_tn.blocks import KroneckerBlock
from kfac_tn.decompositions import Outcome, Path
from kfac_tn.enums import Inversion
from kfac_tn.optim.hyperparams import LayerHP
from kfac_tn.optim.schedule import CostMeter

__all__ = ["PATH_COUNTERS", "QR_ITERATIONS", "InverseUpdater"]

PATH_COUNTERS = tuple(f"{p.value}_decompositions" for p in Path) + ("offloaded_decompositions",)
"""Per-layer state counters of the decomposition paths (summed in ``KFAC.stats``)."""

QR_ITERATIONS = 1
"""Orthogonal iterations tried before a full ``eigh`` when the previous eigenbasis misses the
tolerance (as Distributed Shampoo's default). On the project CPU a QR costs about half an
``eigh`` (1153×1153 float32, 1 thread: 0.21 s against 0.44 s), so the iteration pays when it
succeeds more than ~2/3 of the times it is tried; on the digits job (``eigenbasis_tolerance``
0.05) it succeeded 75% of the time."""


@dataclass
class _Job:
    """One factor of one block to decompose."""

    block: KroneckerBlock
    slot: int  # 0: A, 1: G
    matrix: Tensor  # [groups, n, n] in the inverse dtype (damped for Cholesky)
    method: str  # "eigh" | "warm" | "cholesky"
    basis: Tensor | None = None  # previous eigenbasis [groups, n, n] for "warm"
    tolerance: float = 0.0
    values: Tensor | None = None
    vectors: Tensor | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    offloaded: bool = False


def _uses_base_template(block: KroneckerBlock) -> bool:
    cls = type(block)
    return (
        cls.update_inverses is KroneckerBlock.update_inverses
        and cls.precondition is KroneckerBlock.precondition
    )


class InverseUpdater:
    """Inverts blocks in batches (see the module docstring).

    Args:
        batched: Decompose same-shaped factors of several layers in one call (``False``: one
            call per factor, the reference the tests compare with).
        meter: Records per-layer inverse costs on sampled steps (``None``: not timed).
    """

    def __init__(self, *, batched: bool = True, meter: CostMeter | None = None) -> None:
        self.batched = batched
        self.meter = meter
        self._where: dict[tuple, str] = {}  # accelerator groups: "device" or "cpu"

    def update(
        self,
        blocks: list[KroneckerBlock],
        state: Mapping[Tensor, dict[str, Any]],
        hps: Mapping[int, LayerHP],
    ) -> None:
        """Recompute the inverses of ``blocks`` (with factors) in ``state[block.weight]``."""
        jobs: list[_Job] = []
        for block in blocks:
            layer_state, hp = state[block.weight], hps[id(block)]
            if "A" not in layer_state:
                continue
            if not _uses_base_template(block):
                with self._span(block.name):
                    _invert(block, layer_state, hp)
                continue
            jobs += _jobs_of(block, layer_state, hp)
        for group in self._groups(jobs):
            self._run(group)
        for block, pair in _by_block(jobs):
            _finish(block, state[block.weight], hps[id(block)], pair)

    # ------------------------------------------------------------------ grouping and running
    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        if not self.batched:
            return [[job] for job in jobs]
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            m = job.matrix
            key = (job.method, job.tolerance, m.shape[-1], m.dtype, m.device)
            groups.setdefault(key, []).append(job)
        return list(groups.values())

    def _run(self, group: list[_Job]) -> None:
        first = group[0].matrix
        key = (group[0].method, first.shape[-1], first.dtype, first.device)
        meter = self.meter
        start = meter.now() if meter is not None and meter.active else None
        if first.device.type != "cpu" and key not in self._where:
            self._where[key] = self._measure_where(group)  # leaves the device results
        else:
            _decompose(group, offload=self._where.get(key) == "cpu")
        if start is not None and meter is not None:
            seconds = meter.now() - start
            total = sum(job.matrix.shape[0] for job in group)
            for job in group:
                meter.add("inverse", job.block.name, seconds * job.matrix.shape[0] / total)

    def _measure_where(self, group: list[_Job]) -> str:
        """Time the group on the CPU, then on its accelerator; return the faster place.

        The jobs keep the accelerator's results (both are valid decompositions).
        """
        clock = self.meter.clock if self.meter is not None else CostMeter().clock
        sync = _device_sync(group[0].matrix.device)
        times = {}
        for where in ("cpu", "device"):
            sync()
            start = clock()
            _decompose(group, offload=where == "cpu")
            sync()
            times[where] = clock() - start
        return min(times, key=lambda w: (times[w], w != "device"))

    def _span(self, name: str):
        if self.meter is None:
            return _NULL
        return self.meter.span("inverse", name)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL = _Null()


def _invert(
    block: KroneckerBlock,
    layer_state: dict[str, Any],
    hp: LayerHP,
    result: linalg.InverseResult | None = None,
) -> None:
    """Let the block store its inverse (``result``, or computed by the block itself)."""
    block.update_inverses(
        layer_state,
        inversion=hp.inversion,
        damping=hp.damping,
        dtype=hp.inverse_dtype,
        preconditioner=hp.preconditioner,
        norm_block=hp.norm_block,
        result=result,
    )


def _device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _jobs_of(block: KroneckerBlock, layer_state: dict[str, Any], hp: LayerHP) -> list[_Job]:
    """Make the two factor jobs of one block (in the inverse dtype; damped for Cholesky)."""
    dtype = hp.inverse_dtype
    A, G = (F.to(dtype) for F in block.inverse_inputs(layer_state, hp.norm_block))
    if block.inversion_for(hp.inversion) is Inversion.CHOLESKY:
        pi = linalg.pi_damping(A, G)
        root = hp.damping**0.5
        shifts = (pi * root, root / pi)
        return [
            _Job(block, slot, linalg.damped(F, shift), "cholesky")
            for slot, (F, shift) in enumerate(zip((A, G), shifts))
        ]
    previous = None
    if layer_state.get("inverse_kind") == Inversion.EIGEN.value and hp.eigenbasis_tolerance > 0:
        previous = layer_state["inverse"]
    jobs = []
    for slot, F in enumerate((A, G)):
        basis = None if previous is None else previous[1 + 2 * slot]
        if basis is not None and (basis.shape != F.shape or basis.dtype != F.dtype):
            basis = None
        if basis is None:
            jobs.append(_Job(block, slot, F, "eigh"))
        else:
            jobs.append(_Job(block, slot, F, "warm", basis, hp.eigenbasis_tolerance))
    return jobs


def _decompose(group: list[_Job], offload: bool) -> None:
    """Decompose a group of same-shaped jobs in one call; results go into the jobs."""
    device = group[0].matrix.device
    to = (lambda t: t.cpu()) if offload else (lambda t: t)
    back = (lambda t: t.to(device)) if offload else (lambda t: t)
    stacked = torch.cat([to(job.matrix) for job in group])
    method = group[0].method
    if method == "cholesky":
        vectors, outcomes = decompositions.cholesky_inverse_batch(stacked)
        values = None
    elif method == "warm":
        basis = torch.cat([to(job.basis) for job in group])  # type: ignore[arg-type]
        values, vectors, outcomes = decompositions.warm_eigh_batch(
            stacked, basis, tolerance=group[0].tolerance, iterations=QR_ITERATIONS
        )
    else:
        values, vectors, outcomes = decompositions.eigh_batch(stacked)
    # each job owns its tensors: views into the batch would keep the whole batch alive until
    # every member's inverse has been replaced (staggered updates: for a whole period)
    own = (lambda t: t.clone()) if len(group) > 1 and not offload else (lambda t: t)
    start = 0
    for job in group:
        size = job.matrix.shape[0]
        job.vectors = own(back(vectors[start : start + size])).contiguous()
        if values is not None:
            job.values = own(back(values[start : start + size])).contiguous()
        job.outcomes = outcomes[start : start + size]
        job.offloaded = offload
        start += size


def _by_block(jobs: list[_Job]) -> list[tuple[KroneckerBlock, tuple[_Job, _Job]]]:
    pairs: dict[int, list[_Job]] = {}
    order: list[KroneckerBlock] = []
    for job in jobs:
        if id(job.block) not in pairs:
            order.append(job.block)
        pairs.setdefault(id(job.block), []).append(job)
    return [(b, tuple(sorted(pairs[id(b)], key=lambda j: j.slot))) for b in order]  # type: ignore[misc]


def _finish(
    block: KroneckerBlock, layer_state: dict[str, Any], hp: LayerHP, pair: tuple[_Job, _Job]
) -> None:
    """Hand one block its result (bookkeeping in the block) and count the paths."""
    outcomes = [o for job in pair for o in job.outcomes]
    failed = next((o for o in outcomes if not o.ok), None)
    errors = [o.error for o in outcomes if o.error]
    tensors: linalg.Inverse | None
    if failed is not None:
        tensors = None
    elif block.inversion_for(hp.inversion) is Inversion.CHOLESKY:
        tensors = linalg.CholeskyInverse(pair[0].vectors, pair[1].vectors)
    else:
        a, g = pair
        tensors = linalg.EigenInverse(a.values, a.vectors, g.values, g.vectors)
    result = linalg.InverseResult(
        tensors,
        fallback=failed is None and any(o.fallback for o in outcomes),
        error=failed.error if failed is not None else (errors[0] if errors else None),
    )
    _invert(block, layer_state, hp, result)
    for o in outcomes:
        key = f"{o.path.value}_decompositions"
        layer_state[key] = layer_state.get(key, 0) + 1
    if pair[0].offloaded:
        layer_state["offloaded_decompositions"] = layer_state.get(
            "offloaded_decompositions", 0
        ) + len(outcomes)
