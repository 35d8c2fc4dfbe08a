r"""Curvature statistics: what the hooks capture for each block, and how it is scaled.

A :class:`StatisticsCollector` owns the capture of one optimizer: the hooks (:mod:`.hooks`), the
per-layer callbacks that turn a layer's input and output gradient into the block's statistics
(:meth:`KroneckerBlock.forward_statistic`, :meth:`KroneckerBlock.backward_statistics`), the extra
backward passes of the Monte-Carlo and type-2 Fisher, the queueing of distributed factor
averages, and the scale that turns a captured gradient sum into ``G``.

Fisher types. ``"empirical"`` uses the gradients of your loss (captured by tensor hooks during
your ``backward()``). ``"mc"`` and ``"type2"`` need gradients of a *different* loss: the model's
forward hook sees its output ``f`` and, right there, runs ``mc_samples`` (``"mc"``: labels sampled
from the model's predictive distribution) or ``C`` (``"type2"``: columns of the loss-Hessian
square root) extra backward passes from ``f`` to the layer outputs with
``torch.autograd.grad(..., retain_graph=True)`` (parameter gradients are not touched). The
statistics are committed when your own ``backward()`` reaches the output, so a forward pass
without backward never counts.

What is captured, per block and per pass, is decided by the optimizer before the pass
(:meth:`StatisticsCollector.plan`): the settings of the blocks due for a factor update and, for
EKFAC blocks, the eigenbasis their per-sample gradients are projected into (a reference to the
stored eigenvectors: no copy, no host synchronisation in the hooks).

Factored gradients. With the empirical Fisher in one process, a block whose pass gradient is a
sum of few outer products (:meth:`KroneckerBlock.gradient_rows`, when that is cheaper to
precondition: :func:`kfac_tn.linalg.factored_pays`) also keeps those rows until the step
(:meth:`StatisticsCollector.take_gradient_rows`), on every pass, not only on factor-update
steps, for the blocks the optimizer names (those with a Cholesky inverse). They are references
to the layer's input and output gradient plus a bias column, no other copy. Float16/bfloat16
passes (autocast) keep none.

A pass over an empty batch (zero samples) captures nothing and is not recorded for the
self-tuning: its step keeps every factor as it was. Distributed, the statistics' averages are
collectives every rank must join, so an empty batch on one rank raises instead of hanging the
others (pad the ranks' batches, as ``DistributedSampler`` does).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kfac_tn import linalg
from kfac_tn.blocks import STATISTICS, EigenBasis, Forward, KroneckerBlock
from kfac_tn.distributed import Communicator
from kfac_tn.enums import FisherType, LossReduction, LossType
from kfac_tn.losses import output_gradients, reduction_scale
from kfac_tn.optim.hooks import GradCallback, HookSet
from kfac_tn.optim.hyperparams import LayerHP
from kfac_tn.optim.qmodel import RecordedPass, RngState
from kfac_tn.optim.schedule import CostMeter

__all__ = ["Capture", "StatisticsCollector"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capture:
    """What the coming passes capture for one block.

    Attributes:
        hp: The block's settings for the step.
        basis: The EKFAC eigenbasis ``(Q_A, Q_G)`` the per-sample gradients are projected into,
            or ``None`` (KFAC, or no eigenbasis yet).
    """

    hp: LayerHP
    basis: EigenBasis | None = None


@dataclass
class _PendingForward:
    """A layer's forward pass awaiting its Monte-Carlo / type-2 output gradients."""

    block: KroneckerBlock
    output: Tensor
    forward: Forward
    version: int  # the output's version counter when it was produced


class StatisticsCollector:
    """Captures the statistics of a set of blocks (see the module docstring).

    Args:
        model: The model (its output hook runs the sampled backward passes).
        blocks: The blocks to capture for.
        fisher_type: ``"empirical"``, ``"mc"`` or ``"type2"``.
        mc_samples: Monte-Carlo samples per factor update.
        loss: The loss the user backpropagates.
        loss_reduction: Its reduction.
        comm: The distributed communicator (factor averages are queued in the hooks), or
            ``None``.
        grad_scaler: The ``GradScaler`` scaling the loss, if any.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[KroneckerBlock],
        *,
        fisher_type: FisherType,
        mc_samples: int,
        loss: LossType,
        loss_reduction: LossReduction,
        comm: Communicator | None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.fisher_type = FisherType(fisher_type)
        self.mc_samples = mc_samples
        self.loss = LossType(loss)
        self.loss_reduction = LossReduction(loss_reduction)
        self.comm = comm
        self.grad_scaler = grad_scaler
        self.entries_per_sample: int | None = None  # of the model output (MSE's reduction)
        self._plan: dict[int, Capture] = {}
        self._block_of_module = {id(b.module): b for b in blocks}
        self._pending: list[_PendingForward] = []
        self._sampled_grads: dict[int, Tensor] | None = None
        self._hooks = HookSet()
        self._warned_eval = False
        self._record = False  # keep the model's inputs, outputs and output gradients
        self._recording: RecordedPass | None = None
        self._records: list[RecordedPass] = []
        self._rows: dict[int, list[tuple[Tensor, Tensor]]] = {}  # id(block) -> passes' rows
        self._keep_rows = self.fisher_type is FisherType.EMPIRICAL and comm is None
        self._rows_for: frozenset[int] = frozenset()  # id(block) keeping rows in coming passes
        # times the capture work of sampled steps (kfac_tn.optim.schedule.CostMeter), or None
        self.meter: CostMeter | None = None
        # called when a training forward of the model begins (opens a sampled step), or None
        self.on_model_start: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> None:
        """Register the hooks on every block's layer and on the model."""
        for block in self.blocks:
            self._hooks.add_layer(block.module, active=self._active, on_forward=self._on_forward)
        self._hooks.add_model_input(self.model, self._on_model_input)
        self._hooks.add_model(self.model, self._on_model_output)

    def remove(self) -> None:
        """Remove the hooks and drop everything captured."""
        self._hooks.remove()
        self.discard()

    def plan(
        self,
        captures: Mapping[int, Capture],
        *,
        record: bool = False,
        rows: Collection[int] = (),
    ) -> None:
        """Set what the coming passes capture.

        Args:
            captures: ``{id(block): capture}`` of the blocks due for a factor update.
            record: Also record the model's inputs, outputs and output gradients
                (:class:`~kfac_tn.optim.qmodel.RecordedPass`, for the quadratic model).
            rows: ``id(block)`` of the blocks whose factored gradient rows the step can use
                (kept whether or not a factor update is due; module docstring).
        """
        self._plan = dict(captures)
        self._record = record
        self._records = []
        self._rows_for = frozenset(rows) if self._keep_rows else frozenset()

    def take_records(self) -> list[RecordedPass]:
        """Return the complete recorded passes since :meth:`plan`; the collector forgets them."""
        records, self._records, self._recording = self._records, [], None
        return [r for r in records if r.complete]

    def take_gradient_rows(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Return ``{id(block): (g_rows, x_rows)}`` of the passes since the last call; forget them.

        The rows of all passes, concatenated; ``g_rows`` unscaled by an enabled ``GradScaler``.
        Blocks whose rows together no longer pay (:func:`kfac_tn.linalg.factored_pays`) are left
        out.
        """
        kept, self._rows = self._rows, {}
        unscale = self._amp_unscale()
        out = {}
        for block in self.blocks:
            parts = kept.get(id(block))
            if not parts:
                continue
            g_rows = torch.cat([g for g, _ in parts]) if len(parts) > 1 else parts[0][0]
            x_rows = torch.cat([x for _, x in parts]) if len(parts) > 1 else parts[0][1]
            if linalg.factored_pays(x_rows.shape[0], g_rows.shape[1], x_rows.shape[1]):
                out[id(block)] = (g_rows * unscale if unscale != 1.0 else g_rows, x_rows)
        return out

    def discard(self) -> None:
        """Drop captured statistics and pending forward passes (``zero_grad``, a skipped step)."""
        self._pending = []
        self._rows = {}
        for block in self.blocks:
            block.clear_statistics()

    def wait_averaged(self, blocks: list[KroneckerBlock]) -> None:
        """Finish the distributed averaging of the statistics queued for ``blocks``."""
        if self.comm is not None and any(b.has_statistics for b in blocks):
            self.comm.wait_factors()

    def warn_if_eval_mode(self, blocks: list[KroneckerBlock]) -> None:
        """Warn once if blocks due for capture got nothing because their layers are in eval mode.

        (``model.eval()`` during training silently turns KFAC into momentum SGD otherwise.)
        """
        if self._warned_eval:
            return
        idle = [
            b.name
            for b in blocks
            if id(b) in self._plan and not b.has_statistics and not b.module.training
        ]
        if idle:
            self._warned_eval = True
            logger.warning(
                "KFAC step with layers in eval mode (%s%s): no curvature statistics were "
                "captured, so their factors are not updated; call model.train() for training",
                ", ".join(idle[:3]),
                ", ..." if len(idle) > 3 else "",
            )

    # ------------------------------------------------------------------ scale
    def grad_scale(self, block: KroneckerBlock) -> float:
        """Multiplier turning ``block``'s captured gradient sum into ``G``.

        ``1/r`` for the empirical Fisher (the backpropagated gradients carry the loss scale
        ``r``), ``r / mc_samples`` for MC, ``r`` for type-2 (see :mod:`kfac_tn.blocks.base`),
        times ``1/scale²`` of an enabled ``GradScaler`` for the empirical Fisher.
        """
        r = reduction_scale(self.loss, self.loss_reduction, block.samples, self.entries_per_sample)
        if self.fisher_type is FisherType.EMPIRICAL:
            return 1.0 / r * self._amp_scale()
        if self.fisher_type is FisherType.MC:
            return r / self.mc_samples
        return r

    def _amp_scale(self) -> float:
        return self._amp_unscale() ** 2

    def _amp_unscale(self) -> float:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return 1.0 / scaler.get_scale()

    # ------------------------------------------------------------------ hook callbacks
    def _active(self, module: nn.Module) -> bool:
        if not (module.training and torch.is_grad_enabled()):
            return False
        block = self._block_of_module.get(id(module))
        return block is not None and (id(block) in self._plan or id(block) in self._rows_for)

    def _on_forward(self, module: nn.Module, x: Tensor, output: Tensor) -> GradCallback | None:
        block = self._block_of_module[id(module)]
        capture = self._plan.get(id(block))
        if not output.requires_grad or _empty(x, self.comm):
            return None
        if capture is None:
            return self._rows_only(block, x)
        hp, basis = capture.hp, capture.basis
        dtype = hp.factor_dtype_for(block.weight.dtype)
        with self._timed(block.name):
            forward = block.forward_statistic(x, output, hp.kfac_approx, dtype, basis)
        if self.fisher_type is not FisherType.EMPIRICAL:
            index = len(self._pending)
            self._pending.append(_PendingForward(block, output, forward, output._version))

            def on_sampled_grad(g: Tensor) -> None:
                # used only when the output was later modified in place (see _sampled_stats)
                if self._sampled_grads is not None:
                    self._sampled_grads[index] = g

            return on_sampled_grad

        layer_input = x.detach() if id(block) in self._rows_for else None

        def on_grad(g: Tensor) -> None:
            with self._timed(block.name):
                stats = block.backward_statistics(forward, g, hp.kfac_approx, dtype, basis)
                self._commit(block, forward, stats)
                if layer_input is not None:
                    self._keep_gradient_rows(block, layer_input, g.detach())

        return on_grad

    def _rows_only(self, block: KroneckerBlock, x: Tensor) -> GradCallback | None:
        """Return the output-gradient callback of a pass that keeps only ``block``'s rows."""
        if id(block) not in self._rows_for:
            return None
        layer_input = x.detach()

        def on_grad(g: Tensor) -> None:
            self._keep_gradient_rows(block, layer_input, g.detach())

        return on_grad

    def _keep_gradient_rows(self, block: KroneckerBlock, x: Tensor, g: Tensor) -> None:
        """Keep the pass's factored gradient rows of ``block``, if it has them and they pay."""
        dtype = block.weight.dtype
        if not (x.dtype == g.dtype == dtype and dtype in (torch.float32, torch.float64)):
            return
        rows = block.gradient_rows(x, g)  # None if the layer has no such form or it won't pay
        if rows is not None:
            self._rows.setdefault(id(block), []).append(rows)

    def _timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time the enclosed capture work as layer ``name``'s factor cost (sampled steps)."""
        if self.meter is None:
            return contextlib.nullcontext()
        return self.meter.span("factor", name)

    def _commit(self, block: KroneckerBlock, forward: Forward, stats: dict[str, Tensor]) -> None:
        if self.comm is not None:
            self.comm.all_reduce_factor(forward.a_mean)
            for key, t in stats.items():
                self.comm.all_reduce_factor(t, symmetric=STATISTICS[key])
        block.add_statistics(forward.a_mean, forward.samples, stats)

    def _on_model_input(self, args: tuple, kwargs: dict) -> None:
        if self.on_model_start is not None and self.model.training:
            self.on_model_start()
        if not (self._record and self.model.training and torch.is_grad_enabled()):
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device = tensors[0].device if tensors else None
        kinds = {"cpu", device.type if device is not None else "cpu"}
        autocast = any(torch.is_autocast_enabled(k) for k in kinds)
        self._recording = RecordedPass(args, kwargs, RngState.capture(device), autocast=autocast)

    def _on_model_output(self, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() >= 1 and output.shape[0] > 0:
            self.entries_per_sample = output[0].numel()
        if self._recording is not None:  # before the sampled statistics below draw labels
            self._recording.drew_random = not self._recording.rng.unchanged()
        self._sample_and_commit(output)
        # after the sampled backward passes above, so that only the user's backward is recorded
        self._record_output(output)

    def _record_output(self, output: object) -> None:
        record, self._recording = self._recording, None
        if record is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if output.numel() == 0:  # an empty batch says nothing about the step
            return
        record.output = output.detach()
        self._records.append(record)

        def keep(grad: Tensor) -> None:
            record.output_grad = grad.detach() * self._amp_unscale()

        output.register_hook(keep)

    def _sample_and_commit(self, output: object) -> None:
        pending, self._pending = self._pending, []
        if not pending or not isinstance(output, Tensor) or not output.requires_grad:
            return
        with self._timed(""):  # shared by the pending layers (split by factor size)
            stats = self._sampled_stats(output, pending)
        committed = [(p.block, p.forward, _summed(s)) for p, s in zip(pending, stats) if s]

        def commit(_: Tensor) -> None:
            # the user's backward reached the model output: this forward pass counts
            for entry in committed:
                self._commit(*entry)

        output.register_hook(commit)

    def _sampled_stats(
        self, output: Tensor, pending: list[_PendingForward]
    ) -> list[list[dict[str, Tensor]]]:
        """Gradient statistics of the MC / type-2 backward passes, per pending layer.

        If a layer output was modified in place afterwards (``ReLU(inplace=True)``),
        differentiating w.r.t. it would give the gradient of the modified value; then the
        passes differentiate w.r.t. the weights instead and read the layer-output gradients from
        the tensor hooks registered in the forward pass, which see the values the layers produced.
        """
        modified = any(p.output._version != p.version for p in pending)
        weights = [p.block.weight for p in pending if p.block.weight.requires_grad]
        outputs = [p.output for p in pending]
        stats: list[list[dict[str, Tensor]]] = [[] for _ in pending]
        with torch.enable_grad():
            for grad_output in output_gradients(
                output, self.loss, self.fisher_type, self.mc_samples
            ):
                if modified:
                    grads = self._grads_via_weights(output, weights, grad_output, len(pending))
                else:
                    grads = torch.autograd.grad(
                        output, outputs, grad_output, retain_graph=True, allow_unused=True
                    )
                for i, (p, g) in enumerate(zip(pending, grads)):
                    if g is not None:
                        capture = self._plan[id(p.block)]
                        dtype = capture.hp.factor_dtype_for(p.block.weight.dtype)
                        stats[i].append(
                            p.block.backward_statistics(
                                p.forward, g, capture.hp.kfac_approx, dtype, capture.basis
                            )
                        )
        return stats

    def _grads_via_weights(
        self, output: Tensor, weights: list[Tensor], grad_output: Tensor, count: int
    ) -> list[Tensor | None]:
        self._sampled_grads = {}
        try:
            torch.autograd.grad(output, weights, grad_output, retain_graph=True, allow_unused=True)
            return [self._sampled_grads.get(i) for i in range(count)]
        finally:
            self._sampled_grads = None


def _empty(x: Tensor, comm: Communicator | None) -> bool:
    """Whether the layer input ``x`` holds no samples (then nothing is captured).

    Raises:
        RuntimeError: If so in a distributed run (the ranks' collectives would not match).
    """
    if x.numel():
        return False
    if comm is not None:
        raise RuntimeError(
            f"KFAC: a layer input of shape {tuple(x.shape)} holds no samples on this rank; "
            "distributed curvature capture needs samples on every rank in every step "
            "(pad the ranks' batches, e.g. DistributedSampler(drop_last=False))"
        )
    return True


def _summed(stats: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Sum the statistics of several backward passes of one forward pass, key by key."""
    if len(stats) == 1:
        return stats[0]
    return {key: torch.stack([s[key] for s in stats]).sum(0) for key in stats[0]}
