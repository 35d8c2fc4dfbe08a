"""Where inverses are computed and applied: one process, or data-parallel workers.

A :class:`Placement` owns the two curvature stages of a step that distributed training changes:
recomputing inverses (:meth:`Placement.update_inverses`) and preconditioning gradients
(:meth:`Placement.precondition`). Three kinds exist (see :mod:`kfac_tn.distributed` for the
traffic and the equivalence with one process):

* :class:`Local` — single process: every block's inverse is computed and applied here;
* :class:`Replicated` (``distributed_strategy="replicate"``) — each layer's owner (assigned once
  by inversion cost) inverts it and broadcasts the inverse: every worker holds every inverse;
* :class:`Sharded` (``"shard"``) — only the owner keeps a layer's inverse; every step it
  preconditions that layer's gradients and broadcasts the result. EKFAC layers are the
  exception: every rank projects its own per-sample gradients into the eigenbasis, so their
  inverses (eigenbases and scalings) are broadcast and kept everywhere, as under ``"replicate"``.

:func:`consolidated_state_dict` gathers the inverses a sharded run spreads over the workers, so
that rank 0 can save a checkpoint that resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfac_tn.blocks import KroneckerBlock
from kfac_tn.distributed import Communicator, get_communicator
from kfac_tn.enums import DistributedStrategy, Inversion
from kfac_tn.optim.factored import Rows
from kfac_tn.optim.hyperparams import LayerHP
from kfac_tn.optim.inverses import InverseUpdater

__all__ = [
    "Local",
    "Placement",
    "Replicated",
    "Sharded",
    "consolidated_state_dict",
    "make_placement",
    "precondition_block",
]

State = Mapping[Tensor, dict[str, Any]]
HPs = Mapping[int, LayerHP]  # by id(block)


def precondition_block(
    block: KroneckerBlock,
    state: dict[str, Any],
    grads: list[Tensor],
    damping: float,
    rows: Rows | None = None,
) -> list[Tensor]:
    """Preconditioned gradients of one block (the plain gradients while it has no inverse).

    Args:
        block: The block.
        state: Its optimizer state (``state[block.weight]``).
        grads: ``[grad_weight]`` or ``[grad_weight, grad_bias]``.
        damping: The block's damping.
        rows: The gradient's factored rows, checked (:mod:`kfac_tn.optim.factored`), or
            ``None``; counted in ``state["factored_preconditionings"]`` when used.

    Returns:
        Fresh tensors shaped like ``grads``. Factors that never saw a finite batch give the plain
        gradient (a device-side choice, no sync; a CPU flag is read directly, which saves the
        select pass).
    """
    if "inverse" not in state:
        return [g.clone() for g in grads]
    if rows is not None and block.takes_rows(state):
        state["factored_preconditionings"] = state.get("factored_preconditionings", 0) + 1
    else:
        rows = None
    out = block.precondition(state, grads, damping=damping, rows=rows)
    valid = state["factors_valid"]
    if valid.device.type == "cpu":
        return out if bool(valid) else [g.clone() for g in grads]
    return [torch.where(valid, d, g) for d, g in zip(out, grads)]


class Placement:
    """Base class and single-process placement (:class:`Local`): no communication.

    Attributes:
        comm: The communicator, ``None`` for :class:`Local`.
    """

    comm: Communicator | None = None
    inverses: InverseUpdater  # how inverses are computed: batched, warm-started, timed

    def __init__(self) -> None:
        self.inverses = InverseUpdater()

    def update_inverses(self, due: list[KroneckerBlock], state: State, hps: HPs) -> None:
        """Recompute the inverses of the ``due`` blocks (in ``state[block.weight]``)."""
        self.inverses.update(due, state, hps)

    def precondition(
        self,
        blocks: list[KroneckerBlock],
        state: State,
        hps: HPs,
        factored: Mapping[int, Rows] | None = None,
    ) -> dict[int, Tensor]:
        """Preconditioned gradients keyed by ``id(param)`` (blocks without inverse: absent).

        ``factored``: ``{id(block): rows}`` of the blocks whose gradient is the sum of their
        rows' outer products (:mod:`kfac_tn.optim.factored`; kept in one process only).
        """
        factored = factored or {}
        directions: dict[int, Tensor] = {}
        for block in blocks:
            layer_state = state[block.weight]
            if "inverse" in layer_state:
                grads = [p.grad for p in block.params]
                damping = hps[id(block)].damping
                out = precondition_block(
                    block, layer_state, grads, damping, factored.get(id(block))
                )
                directions.update({id(p): d for p, d in zip(block.params, out)})
        return directions


Local = Placement


class _Distributed(Placement):
    """Shared parts of the distributed placements: the communicator and the layer owners."""

    def __init__(self, comm: Communicator, blocks: list[KroneckerBlock]) -> None:
        super().__init__()
        self.comm = comm
        self._blocks = blocks
        self._assigned = False

    def assign(self, blocks: list[KroneckerBlock]) -> None:
        """Assign layers to ranks by inversion cost, once (a collective: same on every rank)."""
        if not self._assigned and blocks:
            self.comm.assign({b.name: b.inversion_cost() for b in blocks})
            self._assigned = True

    def owns(self, block: KroneckerBlock) -> bool:
        """Whether this rank computes ``block``'s inverse."""
        return self.comm.owner(block.name) == self.comm.rank


class Replicated(_Distributed):
    """Owners invert and broadcast their layers' inverses; every rank holds all of them."""

    def update_inverses(self, due: list[KroneckerBlock], state: State, hps: HPs) -> None:
        """Invert the owned ``due`` blocks, then broadcast every ``due`` inverse from its owner."""
        self.assign(self._blocks)
        _replicate_inverses(self, due, state, hps)


class Sharded(_Distributed):
    """Owners keep their layers' inverses and broadcast preconditioned gradients every step."""

    def update_inverses(self, due: list[KroneckerBlock], state: State, hps: HPs) -> None:
        """Invert the owned ``due`` blocks (no traffic); EKFAC blocks as under "replicate"."""
        self.assign(self._blocks)
        replicated = [b for b in due if _ekfac(b, hps)]
        self.inverses.update([b for b in due if self.owns(b) and b not in replicated], state, hps)
        _replicate_inverses(self, replicated, state, hps)

    def precondition(
        self,
        blocks: list[KroneckerBlock],
        state: State,
        hps: HPs,
        factored: Mapping[int, Rows] | None = None,
    ) -> dict[int, Tensor]:
        """Owners precondition their blocks' gradients; the results are broadcast to all.

        EKFAC blocks, whose inverses every rank holds, are preconditioned locally.
        ``factored`` is unused: distributed, no rows are kept (the gradients are averages).
        """
        self.assign(self._blocks)
        replicated = [b for b in blocks if _ekfac(b, hps)]
        directions = super().precondition(replicated, state, hps)
        sharded = [b for b in blocks if b not in replicated]
        for block in sharded:
            layer_state = state[block.weight]
            grads = [p.grad for p in block.params]
            if self.owns(block):
                # same memory layout as the receivers' buffers: reductions over these tensors
                # (KL clip) then round identically and replicas stay bitwise equal
                result = precondition_block(block, layer_state, grads, hps[id(block)].damping)
                out = [torch.empty_like(g).copy_(d) for g, d in zip(grads, result)]
            else:
                # only the owner keeps an inverse (drops one loaded from a full checkpoint,
                # which would never be updated here)
                layer_state.pop("inverse", None)
                out = [torch.empty_like(g) for g in grads]
            self.comm.broadcast(block.name, out)
            directions.update({id(p): d for p, d in zip(block.params, out)})
        if sharded:
            self.comm.wait_broadcasts()
        return directions


def _replicate_inverses(
    placement: _Distributed, due: list[KroneckerBlock], state: State, hps: HPs
) -> None:
    """Owners invert the ``due`` blocks; every inverse (and EKFAC scalings) is broadcast."""
    placement.inverses.update([b for b in due if placement.owns(b)], state, hps)
    for block in due:
        hp, layer_state = hps[id(block)], state[block.weight]
        # the receive buffers (an owner whose first inversion failed sends zeros)
        block.prepare_receive(
            layer_state,
            inversion=hp.inversion,
            preconditioner=hp.preconditioner,
            dtype=hp.inverse_dtype,
            device=block.weight.device,
        )
        # Cholesky inverses are symmetric matrices: only upper triangles travel
        placement.comm.broadcast(
            block.name,
            block.broadcast_tensors(layer_state),
            symmetric=layer_state["inverse_kind"] == Inversion.CHOLESKY.value,
            kind="inverses",
        )
    if due:
        placement.comm.wait_broadcasts()


def _ekfac(block: KroneckerBlock, hps: HPs) -> bool:
    return block.uses_ekfac(hps[id(block)].preconditioner)


def make_placement(
    strategy: DistributedStrategy | str, bucket_cap_mb: float, blocks: list[KroneckerBlock]
) -> Placement:
    """Make the placement of this process: :class:`Local` unless torch.distributed runs.

    Args:
        strategy: ``"replicate"`` or ``"shard"`` (used when ``torch.distributed`` is initialised).
        bucket_cap_mb: Bucket size of the communicator's collectives, ``> 0``.
        blocks: The optimizer's blocks (assigned to ranks on the first inverse update).
    """
    strategy = DistributedStrategy(strategy)
    comm = get_communicator(bucket_cap_mb=bucket_cap_mb, strategy=strategy.value)
    if comm is None:
        return Local()
    cls = Replicated if strategy is DistributedStrategy.REPLICATE else Sharded
    return cls(comm, blocks)


def consolidated_state_dict(optimizer: torch.optim.Optimizer, to: int = 0) -> dict | None:
    """Complete optimizer state dict on rank ``to``: a collective for checkpoints.

    With :class:`kfac_tn.KFAC` and strategy ``"shard"`` a rank holds only the inverses of the
    layers it owns, so its ``state_dict()`` alone cannot resume exactly (a missing inverse is
    recomputed at the next step from *newer* factors). Every rank must call this function; the
    owners send their inverses to rank ``to``, which returns its state dict with every layer's
    inverse filled in (a copy: its own state is unchanged). Such a dict loads into one process
    (``"replicate"`` or single-process training continue exactly as the distributed run) and into
    a distributed run. Other optimizers, ``"replicate"`` and single-process runs need no
    communication: rank ``to`` just returns ``optimizer.state_dict()``.

    Args:
        optimizer: The optimizer (every rank passes its own).
        to: Rank that receives the complete state dict.

    Returns:
        The state dict on rank ``to`` (or in a single process), ``None`` on the other ranks.

    Raises:
        ValueError: If ``to`` is not a rank of the communicator's group.
    """
    placement = getattr(optimizer, "placement", None)
    if not isinstance(placement, _Distributed):
        return optimizer.state_dict()
    comm = placement.comm
    if not isinstance(placement, Sharded):
        return optimizer.state_dict() if comm.rank == to else None
    if not 0 <= to < comm.world_size:
        raise ValueError(f"Invalid to: {to} (must be in [0, {comm.world_size}))")
    blocks: list[KroneckerBlock] = list(optimizer.blocks)  # type: ignore[attr-defined]
    placement.assign(blocks)  # no inverse step yet: assign exactly as the optimizer will
    received = _gather_inverses(optimizer.state, blocks, comm, to)
    if comm.rank != to:
        return None
    full = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for pid, (tensors, kind) in received.items():
        i = index[pid]
        full["state"][i] = {**full["state"][i], "inverse": tensors, "inverse_kind": kind}
    return full


def _gather_inverses(
    state: State, blocks: list[KroneckerBlock], comm: Communicator, to: int
) -> dict[int, tuple[list[Tensor], str]]:
    """Send each owned inverse to rank ``to``; there, return what arrived by ``id(weight)``."""
    kinds = [k.value for k in Inversion]
    received: dict[int, tuple[list[Tensor], str]] = {}
    for block in blocks:
        layer_state = state.get(block.weight, {})
        payload = None
        if comm.is_owner(block.name) and "inverse" in layer_state:
            code = torch.tensor([kinds.index(layer_state["inverse_kind"])], dtype=torch.int64)
            payload = [*layer_state["inverse"], code]
        got = comm.transfer(block.name, payload, to, device=block.weight.device)
        if comm.rank == to and not comm.is_owner(block.name) and got is not None:
            received[id(block.weight)] = (got[:-1], kinds[int(got[-1])])
    return received
