"""torch.distributed plumbing for data-parallel KFAC.

The optimizer talks to other workers only through a :class:`Communicator`, obtained with
:func:`get_communicator` (``None`` when ``torch.distributed`` is not initialised, in which case the
optimizer takes its single-process path). Three kinds of traffic exist:

* **factors** -- every Kronecker factor computed in a capture hook is queued with
  :meth:`Communicator.all_reduce_factor`. Only the upper triangle of each symmetric
  ``[..., d, d]`` factor is packed (``d (d + 1) / 2`` instead of ``d^2`` entries), packed factors
  are concatenated into flat buckets of at most ``bucket_cap_mb`` and each full bucket is
  all-reduced asynchronously at once, so communication overlaps the rest of the backward pass.
  :meth:`Communicator.wait_factors` flushes the last partial bucket, waits, divides by the world
  size and writes the symmetric average back into the factors in place.
* **inverses** (strategy ``"replicate"``) -- the layers are assigned to ranks once by inversion cost
  (:meth:`Communicator.assign`, greedy longest-processing-time first). The owner of a layer inverts
  both of its factors and broadcasts the result (:meth:`Communicator.broadcast`), so every worker
  holds every inverse: most memory, least communication.
* **gradients** (strategy ``"shard"``) -- each worker keeps only the inverses of the layers it owns;
  every step the owner preconditions its layers' gradients and broadcasts the preconditioned
  gradients: inverse memory divided by the world size, one gradient-sized broadcast per step.

Scale conventions. Each worker computes its factors from its local batch with the optimizer's
normalisation by the *local* batch size (for example ``A = 1/(N_local O) sum_{n,o} u u^T``), and DDP
averages the gradients of the per-worker mean losses. Averaging the factors over workers therefore
gives exactly the factors of one process on the concatenated global batch with ``loss_reduction =
"mean"`` (equal local batch sizes), and the averaged gradient is that process's gradient; the
preconditioned update is identical up to floating-point round-off (the tests check 1e-10 in
float64 after several steps, for 2 and 3 workers and both strategies). With unequal local batch
sizes every worker still counts equally, in the factors as in DDP's gradient average. With
``loss_reduction="sum"`` DDP's average is ``1/W`` times the global sum and so are the averaged
factors: the update then differs from one process only through the damping; use ``"mean"`` for
exact equivalence. Replicas stay bitwise identical: every rank unpacks the same averaged buffer,
and broadcast tensors (with ``symmetric=True`` the owner's copy too) are identical everywhere.

Checkpoints. Factors are identical on all ranks after averaging. Under ``"replicate"`` rank 0 holds
every inverse, so its ``optimizer.state_dict()`` resumes exactly, in one process or distributed.
Under ``"shard"`` rank 0 lacks the inverses of the layers other ranks own; a missing inverse would
be recomputed at the next step from newer factors (close, not exact). For exact resumption call
:func:`kfac_tn.optim.placement.consolidated_state_dict` on *every* rank (the owners send their
inverses to rank 0 with :meth:`Communicator.transfer`) and save what rank 0 gets; the training
front end does this. Which layers a rank owns and what travels when is decided by
:mod:`kfac_tn.optim.placement`; this module only moves tensors.

With a single worker (``world_size == 1``) the communicator sends nothing: factors and broadcasts
are left as they are.

Collective order. All ranks must queue the same factors (same shapes, same order) and call
:meth:`Communicator.broadcast` for the same keys in the same order; this holds when every rank runs
the same model and the same optimizer settings. The first :meth:`Communicator.wait_factors` and
:meth:`Communicator.assign` check it across ranks and raise :class:`CommunicationError` otherwise.

Timeouts and dead workers. Initialise with a bounded timeout, e.g. ``init_process_group("gloo",
timeout=datetime.timedelta(minutes=5))`` or :func:`init_process_group_from_env`. With gloo a
collective whose peer died or stalls raises after at most that timeout (usually at once when the
peer's socket closes); the communicator re-raises it as :class:`CommunicationError` naming the
operation and the rank. With NCCL the watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default)
tears the process down after the timeout. Either way the surviving workers exit instead of hanging,
and ``torchrun`` reports the failure.

Byte counts. :attr:`Communicator.bytes_communicated` holds the cumulative *payload* bytes of the
collectives this rank took part in, per kind (``"factors"``, ``"inverses"``, ``"gradients"``;
``"checkpoint"`` for :meth:`Communicator.transfer`, counted by the sender): the size of each
all-reduced or broadcast buffer. A ring all-reduce moves ``2 (W - 1) / W`` times its
payload over each rank's link; payloads are what is comparable with DDP's gradient buckets.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from kfac_tn.enums import DistributedStrategy

__all__ = [
    "STRATEGIES",
    "TRAFFIC_KINDS",
    "CommunicationError",
    "Communicator",
    "assign_by_cost",
    "close_process_group",
    "get_communicator",
    "init_process_group_from_env",
    "packed_size",
]

logger = logging.getLogger(__name__)

STRATEGIES = tuple(s.value for s in DistributedStrategy)
TRAFFIC_KINDS = ("factors", "inverses", "gradients", "checkpoint")
_BACKENDS = ("auto", "gloo", "nccl")
# dtypes a point-to-point transfer can carry (the header sends the index)
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.uint8,
)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid strategy: {strategy!r} (allowed: {', '.join(STRATEGIES)})")


class CommunicationError(RuntimeError):
    """A collective failed: a peer died, timed out, or the ranks disagree on what to send."""


def packed_size(shape: Sequence[int], symmetric: bool = True) -> int:
    """Count the entries sent for a tensor of ``shape``.

    Args:
        shape: Tensor shape; for ``symmetric`` it is ``[..., d, d]``.
        symmetric: Whether only the upper triangle (incl. the diagonal) of the last two
            dimensions is sent.

    Returns:
        ``prod(shape[:-2]) * d (d + 1) / 2`` for symmetric tensors with ``d > 1``, else
        ``prod(shape)``.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if not symmetric or len(shape) < 2 or shape[-1] <= 1:
        return numel
    d = int(shape[-1])
    return numel // (d * d) * (d * (d + 1) // 2)


def assign_by_cost(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Greedy longest-processing-time assignment of keys to ranks.

    Keys are visited by decreasing cost (ties broken by key) and each goes to the currently least
    loaded rank (ties broken by the lower rank). The result depends only on the arguments, so all
    ranks compute the same assignment. LPT is within ``4/3`` of the optimal makespan.

    Args:
        costs: Key (layer name) -> non-negative, finite cost, e.g. ``d_A^3 + d_G^3``.
        world_size: Number of ranks (``>= 1``).

    Returns:
        Key -> rank in ``[0, world_size)``.

    Raises:
        ValueError: If ``world_size < 1`` or a cost is negative or not finite.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size} (must be >= 1)")
    for key, cost in costs.items():
        c = float(cost)
        if not (c >= 0.0 and c != float("inf")):
            raise ValueError(f"Invalid cost for key {key!r}: {cost} (must be finite and >= 0)")
    loads = [0.0] * world_size
    owners: dict[str, int] = {}
    for key in sorted(costs, key=lambda k: (-float(costs[k]), k)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[key] = rank
        loads[rank] += float(costs[key])
    return owners


@dataclass
class _Entry:
    """One tensor inside a bucket: where its values live in the flat buffer."""

    tensor: Tensor
    offset: int
    numel: int
    symmetric: bool


@dataclass
class _Bucket:
    """A flat buffer of packed tensors that travels in one collective."""

    dtype: torch.dtype
    device: torch.device
    kind: str
    src: int | None = None  # global source rank for broadcasts, None for all-reduce
    entries: list[_Entry] = field(default_factory=list)
    chunks: list[Tensor] = field(default_factory=list)
    numel: int = 0
    buffer: Tensor | None = None
    work: object | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Communicator:
    """Averages Kronecker factors and shares inversion work between data-parallel workers.

    Create it with :func:`get_communicator`. All methods must be called by every rank of the group
    in the same order with tensors of the same shapes (they issue collectives).

    Attributes:
        rank: This worker's rank in the communicator's group.
        world_size: Number of workers in the group.
        strategy: ``"replicate"`` (every worker keeps all inverses) or ``"shard"`` (each keeps its
            share, preconditioned gradients are broadcast).
        bucket_cap_bytes: Largest bucket payload in bytes (a larger single tensor travels alone).
        group: The process group the collectives run on.
        bytes_communicated: Cumulative payload bytes per kind (``"factors"``, ``"inverses"``,
            ``"gradients"``, ``"checkpoint"``).
        collectives: Cumulative number of collectives launched per kind.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        *,
        bucket_cap_mb: float = 25.0,
        strategy: str = "replicate",
    ) -> None:
        """Wrap an initialised process group.

        Args:
            group: The process group (this rank must be a member).
            bucket_cap_mb: Bucket size in MiB (``> 0``).
            strategy: ``"replicate"`` or ``"shard"``.

        Raises:
            ValueError: If ``strategy`` or ``bucket_cap_mb`` is invalid.
        """
        _check_strategy(strategy)
        cap = float(bucket_cap_mb)
        if not (cap > 0.0 and cap != float("inf")):
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb} (must be finite and > 0)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.strategy = strategy
        self.bucket_cap_bytes = max(1, int(cap * 1024 * 1024))
        self.bytes_communicated: dict[str, int] = dict.fromkeys(TRAFFIC_KINDS, 0)
        self.collectives: dict[str, int] = dict.fromkeys(TRAFFIC_KINDS, 0)
        self._global_ranks = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self._backend = str(dist.get_backend(group)).lower()
        self._owners: dict[str, int] = {}
        self._triu: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}
        # factor all-reduce state
        self._open_factor: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        self._launched_factor: list[_Bucket] = []
        self._factor_signature: list[tuple] = []
        self._checked_factor_signature: tuple | None = None
        # broadcast state
        self._open_bcast: dict[tuple[int, torch.dtype, torch.device, str], _Bucket] = {}
        self._bcast_order: list[_Bucket] = []

    def __repr__(self) -> str:
        return (
            f"Communicator(rank={self.rank}, world_size={self.world_size}, "
            f"strategy={self.strategy!r}, backend={self._backend!r}, "
            f"bucket_cap_mb={self.bucket_cap_bytes / 2**20:g})"
        )

    # ------------------------------------------------------------------ factors
    def all_reduce_factor(self, factor: Tensor, *, symmetric: bool = True) -> None:
        """Queue the in-place average over workers of a symmetric factor (or any statistic).

        The upper triangle (with the diagonal) is packed into the open bucket of the factor's dtype
        and device; a bucket that reaches the cap is all-reduced asynchronously at once. The
        factor must not be read or written until :meth:`wait_factors` returns.

        Args:
            factor: Symmetric factor ``[..., d, d]`` (floating point); updated in place.
            symmetric: ``False`` for a statistic of any shape (all entries travel), e.g. the
                EKFAC scalings ``[groups, d_G, d_A]``.

        Raises:
            ValueError: If ``factor`` is not floating point, or (``symmetric``) not
                ``[..., d, d]``.
        """
        if symmetric and (factor.dim() < 2 or factor.shape[-1] != factor.shape[-2]):
            raise ValueError(f"Invalid factor shape: {tuple(factor.shape)} (expected [..., d, d])")
        if not factor.is_floating_point():
            raise ValueError(f"Invalid factor dtype: {factor.dtype} (expected floating point)")
        if self.world_size == 1:  # the average over one worker is the factor itself
            return
        key = (factor.dtype, factor.device)
        symmetric = symmetric and factor.shape[-1] > 1
        packed = self._pack(factor, symmetric)
        bucket = self._bucket_with_room(
            self._open_factor,
            key,
            packed.numel(),
            lambda: _Bucket(factor.dtype, factor.device, "factors"),
        )
        self._add(bucket, factor, packed, symmetric)
        self._factor_signature.append((tuple(factor.shape), str(factor.dtype)))
        self._launch_if_full(self._open_factor, key)

    def wait_factors(self) -> None:
        """Complete all queued factor reductions and write the averages back in place.

        Raises:
            CommunicationError: If a collective failed (peer died, timeout) or the ranks queued
                different factors.
        """
        for key in list(self._open_factor):
            self._launch(self._open_factor.pop(key))
        buckets, self._launched_factor = self._launched_factor, []
        signature, self._factor_signature = tuple(self._factor_signature), []
        if not buckets:
            return
        for bucket in buckets:
            self._wait(bucket, "factor all-reduce")
        if signature != self._checked_factor_signature:
            # one small collective whenever the set of queued factors changes (normally once)
            self._check_same_on_all_ranks(repr(signature), "the queued factors (shapes, order)")
            self._checked_factor_signature = signature
        for bucket in buckets:
            assert bucket.buffer is not None
            bucket.buffer.div_(self.world_size)
            self._unpack(bucket, bucket.buffer)

    @property
    def pending_factors(self) -> bool:
        """Whether factor reductions are queued and :meth:`wait_factors` is due."""
        return bool(self._open_factor or self._launched_factor)

    # --------------------------------------------------------------- ownership
    def assign(self, costs: Mapping[str, float]) -> None:
        """Assign layers to ranks by inversion cost (greedy LPT, deterministic).

        Both factors of a layer go to the same rank. Checks that all ranks passed the same costs.

        Args:
            costs: Layer key (module name) -> inversion cost, about ``d_A^3 + d_G^3``.

        Raises:
            ValueError: If a cost is invalid.
            CommunicationError: If the ranks passed different keys or costs.
        """
        owners = assign_by_cost(costs, self.world_size)
        digest = repr(sorted((k, float(c)) for k, c in costs.items()))
        self._check_same_on_all_ranks(digest, "the layer costs passed to assign()")
        self._owners = owners
        if self.rank == 0:
            loads = [0.0] * self.world_size
            for key, rank in owners.items():
                loads[rank] += float(costs[key])
            logger.info("KFAC inversion assignment over %d ranks, loads %s", self.world_size, loads)

    def owner(self, key: str) -> int:
        """Rank (within the group) that inverts layer ``key``.

        Raises:
            KeyError: If ``key`` was not passed to :meth:`assign`.
        """
        try:
            return self._owners[key]
        except KeyError:
            raise KeyError(
                f"Layer {key!r} has no owner: call assign() with a cost for every layer first "
                f"({len(self._owners)} layers assigned)"
            ) from None

    def is_owner(self, key: str) -> bool:
        """Whether this rank inverts layer ``key``."""
        return self.owner(key) == self.rank

    @property
    def owners(self) -> dict[str, int]:
        """A copy of the layer key -> rank assignment."""
        return dict(self._owners)

    def agree(self, values: Tensor) -> Tensor:
        """Sum a small vector over ranks; return rank 0's sum on every rank (blocking).

        Used for decisions every rank must take identically (the curvature budget): the
        broadcast makes the result the same on all ranks by construction, whatever the
        all-reduce's summation order.

        Args:
            values: 1-d floating tensor (any device; the same length on every rank).

        Returns:
            A new tensor on ``values``' device.

        Raises:
            CommunicationError: If a collective failed.
        """
        wire = values.detach().to(self._collective_device()).clone()
        if self.world_size > 1:
            try:
                dist.all_reduce(wire, group=self.group)
                dist.broadcast(wire, src=self._global_ranks[0], group=self.group)
            except RuntimeError as err:
                raise self._error("agreeing on the curvature schedule", err) from err
        return wire.to(values.device)

    # -------------------------------------------------------------- broadcasts
    def broadcast(
        self,
        key: str,
        tensors: Sequence[Tensor],
        *,
        symmetric: bool = False,
        kind: str | None = None,
    ) -> None:
        """Queue an asynchronous in-place broadcast of ``tensors`` from ``owner(key)``.

        On the owner the values are copied into a bucket at once (the tensors may be reused right
        away); on the other ranks the tensors are receive buffers of the same shapes and dtypes,
        overwritten by :meth:`wait_broadcasts`. Broadcasts from the same owner are bucketed.

        Args:
            key: Layer key; its owner is the source.
            tensors: Tensors to send (owner) or receive into (others).
            symmetric: Whether every tensor is symmetric in its last two dimensions; then only
                upper triangles are sent, and every rank (the owner too) writes the upper
                triangle into the lower one, so all ranks end up with identical tensors.
            kind: Traffic kind for :attr:`bytes_communicated`; default ``"inverses"`` for
                strategy ``"replicate"`` and ``"gradients"`` for ``"shard"``.

        Raises:
            KeyError: If ``key`` has no owner.
            ValueError: If ``kind`` is invalid or a tensor is not ``[..., d, d]`` with
                ``symmetric``.
        """
        if kind is None:
            kind = "inverses" if self.strategy == "replicate" else "gradients"
        if kind not in TRAFFIC_KINDS:
            raise ValueError(f"Invalid kind: {kind!r} (allowed: {', '.join(TRAFFIC_KINDS)})")
        src = self.owner(key)
        if self.world_size == 1:  # the owner is the only receiver
            return
        for t in tensors:
            if symmetric and (t.dim() < 2 or t.shape[-1] != t.shape[-2]):
                raise ValueError(
                    f"Invalid tensor shape for symmetric=True: {tuple(t.shape)} "
                    f"(layer {key!r}, expected [..., d, d])"
                )
            sym = symmetric and t.shape[-1] > 1
            bkey = (src, t.dtype, t.device, kind)
            n = packed_size(t.shape, sym)

            def new_bucket(t: Tensor = t) -> _Bucket:
                bucket = _Bucket(t.dtype, t.device, kind, src=self._global_ranks[src])
                self._bcast_order.append(bucket)
                return bucket

            bucket = self._bucket_with_room(self._open_bcast, bkey, n, new_bucket)
            packed = self._pack(t, sym) if src == self.rank else None
            self._add(bucket, t, packed, sym, numel=n)
            self._launch_if_full(self._open_bcast, bkey)

    def wait_broadcasts(self) -> None:
        """Complete all queued broadcasts; receivers' tensors hold the owners' values afterwards.

        Raises:
            CommunicationError: If a collective failed (peer died, timeout).
        """
        for bucket in self._bcast_order:
            if bucket.work is None:
                self._launch(bucket)
        self._open_bcast.clear()
        buckets, self._bcast_order = self._bcast_order, []
        for bucket in buckets:
            self._wait(bucket, "broadcast")
        for bucket in buckets:
            assert bucket.buffer is not None
            if bucket.src != self._global_ranks[self.rank]:
                self._unpack(bucket, bucket.buffer)
            else:
                # the owner mirrors its upper triangles too, so that every rank holds identical
                # values even if the owner's tensor was symmetric only up to round-off
                self._unpack(bucket, bucket.buffer, only_symmetric=True)

    # ---------------------------------------------------------- scalars
    def average(self, values: Tensor) -> Tensor:
        """Average a small tensor over the workers (blocking; every rank must call it).

        Used for the few numbers behind a decision every rank must take alike (the damping
        adaptation's losses and curvature terms).

        Args:
            values: ``[k]`` floating point, on any device.

        Returns:
            A new tensor, the elementwise mean over the group, on ``values``' device.

        Raises:
            CommunicationError: If the collective fails.
        """
        if self.world_size == 1:
            return values.clone()
        buffer = values.detach().to(self._collective_device(), torch.float64).clone()
        try:
            dist.all_reduce(buffer, group=self.group)
        except RuntimeError as err:
            raise self._error("averaging scalars", err) from err
        return (buffer / self.world_size).to(values.device, values.dtype)

    # ---------------------------------------------------------- point-to-point
    def transfer(
        self,
        key: str,
        tensors: Sequence[Tensor] | None,
        dst: int,
        *,
        device: torch.device | str | None = None,
    ) -> list[Tensor] | None:
        """Send ``tensors`` from ``owner(key)`` to rank ``dst`` (blocking); for checkpoints.

        Only the owner and ``dst`` communicate (a small header with dtypes and shapes, then the
        tensors); other ranks return ``None`` at once. Nothing is sent if the owner is ``dst``.

        Args:
            key: Layer key; its owner sends.
            tensors: The owner's tensors, or ``None`` if it has nothing to send (ignored on other
                ranks).
            dst: Receiving rank within the group.
            device: Where ``dst`` allocates the received tensors (default: the collective
                device, CPU for gloo and the current GPU for NCCL).

        Returns:
            On ``dst`` (not the owner): the received tensors, or ``None`` if the owner sent
            nothing. On the owner: ``tensors``. Elsewhere: ``None``.

        Raises:
            ValueError: If ``dst`` is not a rank of the group.
            CommunicationError: If the transfer failed.
        """
        if not 0 <= dst < self.world_size:
            raise ValueError(f"Invalid dst: {dst} (must be in [0, {self.world_size}))")
        src = self.owner(key)
        if self.rank == src:
            if dst == src:
                return None if tensors is None else list(tensors)
        elif self.rank != dst:
            return None
        wire = self._collective_device()
        try:
            if self.rank == src:
                items = [] if tensors is None else list(tensors)
                header = [len(items)]
                for t in items:
                    header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
                head = torch.tensor(header, dtype=torch.int64, device=wire)
                size = torch.tensor([head.numel()], dtype=torch.int64, device=wire)
                dist.send(size, dst=self._global_ranks[dst], group=self.group)
                dist.send(head, dst=self._global_ranks[dst], group=self.group)
                for t in items:
                    payload = t.detach().to(wire).contiguous()
                    dist.send(payload, dst=self._global_ranks[dst], group=self.group)
                    nbytes = payload.numel() * payload.element_size()
                    self.bytes_communicated["checkpoint"] += nbytes
                return None if tensors is None else list(tensors)
            size = torch.empty(1, dtype=torch.int64, device=wire)
            dist.recv(size, src=self._global_ranks[src], group=self.group)
            head = torch.empty(int(size), dtype=torch.int64, device=wire)
            dist.recv(head, src=self._global_ranks[src], group=self.group)
            header = head.tolist()
            count, pos, out = header[0], 1, []
            for _ in range(count):
                dtype, ndim = _DTYPES[header[pos]], header[pos + 1]
                shape = header[pos + 2 : pos + 2 + ndim]
                pos += 2 + ndim
                buf = torch.empty(shape, dtype=dtype, device=wire)
                dist.recv(buf, src=self._global_ranks[src], group=self.group)
                out.append(buf.to(device if device is not None else wire))
            return out if count else None
        except RuntimeError as err:
            raise self._error(f"transfer of layer {key!r} to rank {dst}", err) from err

    # ------------------------------------------------------------- internals
    def _collective_device(self) -> torch.device:
        if "nccl" in self._backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _triu_indices(self, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (d, device)
        if key not in self._triu:
            rows, cols = torch.triu_indices(d, d, device=device)
            self._triu[key] = (rows, cols)
        return self._triu[key]

    def _pack(self, t: Tensor, symmetric: bool) -> Tensor:
        """Flat copy of ``t`` (upper triangle of the last two dims if ``symmetric``)."""
        if symmetric:
            rows, cols = self._triu_indices(t.shape[-1], t.device)
            return t.detach()[..., rows, cols].reshape(-1)
        return t.detach().reshape(-1).clone()

    def _bucket_with_room(
        self, open_buckets: dict, key: tuple, numel: int, new: Callable[[], _Bucket]
    ) -> _Bucket:
        """Return the open bucket under ``key`` with room for ``numel`` more entries.

        A non-empty bucket that would exceed the cap is launched first and replaced by ``new()``
        (a single tensor larger than the cap travels alone).
        """
        bucket = open_buckets.get(key)
        if bucket is not None and bucket.numel:
            if (bucket.numel + numel) * _itemsize(bucket.dtype) > self.bucket_cap_bytes:
                self._launch(open_buckets.pop(key))
                bucket = None
        if bucket is None:
            bucket = open_buckets[key] = new()
        return bucket

    def _launch_if_full(self, open_buckets: dict, key: tuple) -> None:
        if open_buckets[key].nbytes >= self.bucket_cap_bytes:
            self._launch(open_buckets.pop(key))

    def _add(
        self,
        bucket: _Bucket,
        tensor: Tensor,
        packed: Tensor | None,
        symmetric: bool,
        numel: int | None = None,
    ) -> None:
        n = packed.numel() if packed is not None else int(numel)  # type: ignore[arg-type]
        bucket.entries.append(_Entry(tensor, bucket.numel, n, symmetric))
        if packed is not None:
            bucket.chunks.append(packed)
        bucket.numel += n

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.src is None or bucket.src == self._global_ranks[self.rank]:
            bucket.buffer = torch.cat(bucket.chunks) if bucket.chunks else None
        else:
            bucket.buffer = torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        bucket.chunks = []
        if bucket.buffer is None:  # cannot happen: buckets are launched non-empty
            return
        try:
            if bucket.src is None:
                bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
                self._launched_factor.append(bucket)
            else:
                bucket.work = dist.broadcast(
                    bucket.buffer, src=bucket.src, group=self.group, async_op=True
                )
        except RuntimeError as err:
            raise self._error("launching a " + bucket.kind + " collective", err) from err
        self.bytes_communicated[bucket.kind] += bucket.nbytes
        self.collectives[bucket.kind] += 1

    def _wait(self, bucket: _Bucket, what: str) -> None:
        try:
            bucket.work.wait()  # type: ignore[union-attr]
        except RuntimeError as err:
            raise self._error(what, err) from err

    def _unpack(self, bucket: _Bucket, buffer: Tensor, only_symmetric: bool = False) -> None:
        with torch.no_grad():
            for e in bucket.entries:
                if only_symmetric and not e.symmetric:
                    continue
                vals = buffer[e.offset : e.offset + e.numel]
                t = e.tensor
                if e.symmetric:
                    rows, cols = self._triu_indices(t.shape[-1], t.device)
                    vals = vals.view(*t.shape[:-2], rows.numel())
                    t[..., rows, cols] = vals
                    t[..., cols, rows] = vals
                else:
                    t.copy_(vals.view(t.shape))

    def _check_same_on_all_ranks(self, text: str, what: str) -> None:
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64, device=self._collective_device())
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, mine, group=self.group)
        except RuntimeError as err:
            raise self._error(f"checking {what}", err) from err
        values = [int(g) for g in gathered]
        if len(set(values)) != 1:
            differing = [r for r, v in enumerate(values) if v != values[0]]
            raise CommunicationError(
                f"KFAC ranks disagree on {what}: ranks {differing} differ from rank 0 "
                "(every rank must run the same model and optimizer settings)"
            )

    def _error(self, what: str, err: Exception) -> CommunicationError:
        return CommunicationError(
            f"KFAC {what} failed on rank {self.rank} of {self.world_size} "
            f"(backend {self._backend}): a peer may have died or timed out. Cause: {err}"
        )


def get_communicator(
    process_group: dist.ProcessGroup | None = None,
    *,
    bucket_cap_mb: float = 25.0,
    strategy: str = "replicate",
    timeout: datetime.timedelta | None = None,
) -> Communicator | None:
    """Communicator for data-parallel KFAC, or ``None`` without ``torch.distributed``.

    With ``process_group=None`` a dedicated group over all ranks is created (``new_group``, a
    collective: every rank must call this function), so KFAC's collectives never interleave with
    DDP's gradient all-reduces on the default group. A given ``process_group`` is used as is.

    Args:
        process_group: Group to communicate in; ``None`` for all ranks (dedicated group).
        bucket_cap_mb: Bucket size in MiB for factor all-reduces and broadcasts.
        strategy: ``"replicate"`` or ``"shard"`` (see module docstring).
        timeout: Timeout of the dedicated group; ``None`` uses the default group's timeout.

    Returns:
        The communicator, or ``None`` if ``torch.distributed`` is unavailable or not initialised.

    Raises:
        ValueError: If ``strategy`` or ``bucket_cap_mb`` is invalid.
    """
    _check_strategy(strategy)
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if process_group is None:
        if timeout is None:
            timeout = _default_group_timeout()
        process_group = dist.new_group(timeout=timeout)
    return Communicator(process_group, bucket_cap_mb=bucket_cap_mb, strategy=strategy)


def _default_group_timeout() -> datetime.timedelta | None:
    """Timeout the default group was initialised with (``new_group`` does not inherit it).

    Uses the backend's options, a private attribute; returns ``None`` (torch's default timeout)
    where it is unavailable.
    """
    group = dist.group.WORLD
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda") if "nccl" in backend else torch.device("cpu")
    try:
        return group._get_backend(device).options._timeout  # type: ignore[union-attr]
    except (AttributeError, RuntimeError) as err:
        logger.warning("Cannot read the default process group's timeout (%s); using torch's", err)
        return None


def init_process_group_from_env(
    backend: str = "auto",
    *,
    timeout_s: float = 600.0,
) -> tuple[int, int, torch.device]:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment with a bounded timeout.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. With
    ``backend="auto"`` it picks NCCL when CUDA is available (one GPU per local rank) and gloo
    otherwise. A collective that waits longer than ``timeout_s`` for a peer fails instead of
    hanging. Does nothing but report the setup if the default group already exists.

    Args:
        backend: ``"auto"``, ``"gloo"`` or ``"nccl"``.
        timeout_s: Collective timeout in seconds (``> 0``).

    Returns:
        ``(rank, world_size, device)`` with the device this rank should compute on.

    Raises:
        ValueError: If ``backend`` or ``timeout_s`` is invalid, or the environment lacks ``RANK``
            / ``WORLD_SIZE``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (allowed: {', '.join(_BACKENDS)})")
    if not timeout_s > 0:
        raise ValueError(f"Invalid timeout_s: {timeout_s} (must be > 0)")
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(
            f"Missing environment variables {missing}: launch with torchrun "
            "(e.g. torchrun --nproc-per-node 2 -m kfac_tn train CONFIG distributed=ddp)"
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def close_process_group(*, finished: bool) -> None:
    """Destroy every process group, first waiting for all ranks when the run finished.

    Without the wait a rank that tore its gloo group down and exited while a peer still wrote
    its last checkpoint aborted in gloo's teardown ("terminate called without an active
    exception", SIGABRT; 3 of 10 two-rank CPU runs of ``kfac-tn train distributed=ddp``). A
    failed run does not wait: its peer may be dead. Reference cycles (DDP's reducer, KFAC's
    communicator) are collected first, so their groups are released now and not while the
    interpreter shuts down. Does nothing when ``torch.distributed`` is not initialised.

    Args:
        finished: Whether this rank completed its work (then it waits for the others).
    """
    if not dist.is_initialized():
        return
    if finished:
        try:
            dist.barrier()
        except RuntimeError as err:
            logger.warning("A peer did not reach the final barrier (%s); closing anyway", err)
    gc.collect()
    dist.destroy_process_group()
