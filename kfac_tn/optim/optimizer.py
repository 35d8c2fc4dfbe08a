r"""KFAC as a ``torch.optim.Optimizer``.

Usage is the ordinary training loop::

    opt = KFAC(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

What is preconditioned. Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``
(see :mod:`kfac_tn.blocks`; more via :func:`kfac_tn.blocks.register_block`) whose weight (and bias)
the optimizer updates gets a Kronecker block :math:`A \otimes G` per channel group
(:mod:`kfac_tn.optim.layers`); with ``preconditioner="ekfac"`` its eigenbasis is used with
scalings re-estimated from per-sample gradients (:mod:`kfac_tn.blocks.ekfac`). The scale and
shift of BatchNorm / GroupNorm / LayerNorm / InstanceNorm layers get a 2×2 block per channel
with ``norm_block="unitwise"`` (or its diagonal, ``"diagonal"``; :mod:`kfac_tn.blocks.norm`).
All other parameters (embeddings, norm layers with ``norm_block="skip"``, layers marked
``"skip"`` in ``layer_settings``, ...) are trained with the plain momentum-SGD update below —
nothing is left untrained.

The update, per parameter ``p`` of a group with learning rate :math:`\eta`:

.. math::
    d = \nu\,(A \otimes G + \delta I)^{-1} \nabla_p L + \lambda p, \qquad
    b \leftarrow \mu b + d, \qquad p \leftarrow p - \eta\,(d + \mu b \text{ if Nesterov else } b)

with damping :math:`\delta` (``"eigen"``: exact; ``"cholesky"``, the default for KFAC layers:
factored π-damping, see :mod:`kfac_tn.linalg` and
:func:`~kfac_tn.optim.hyperparams.auto_inversion`), weight decay :math:`\lambda` added *after*
preconditioning (as when a KFAC preconditioner feeds ``torch.optim.SGD``), and the KL-clipping
factor
:math:`\nu = \min(1, \sqrt{\kappa / \sum_\ell \eta^2 \langle \Delta_\ell, \nabla_\ell\rangle})`
over all preconditioned layers (``kl_clip=None``: :math:`\nu = 1`). Non-preconditioned parameters
use :math:`d = \nabla_p L + \lambda p`.

Scale convention (see :mod:`kfac_tn.blocks.base`): :math:`A \otimes G` approximates the curvature
of the loss *as reduced* (``loss_reduction`` must match the loss you backpropagate), so a damping
value means the same for every batch size. Gradient accumulation: statistics of all
forward/backward passes between two ``step()`` calls are pooled, so ``M`` micro-batches with the
loss divided by ``M`` (the usual recipe for ``"mean"``) give exactly the factors and the update of
one batch ``M`` times larger. Fisher types and capture: :mod:`kfac_tn.optim.statistics`.

Statistics are captured only on factor-update steps, in training mode, with gradients enabled.
``zero_grad()`` also discards captured statistics, so a step skipped by ``GradScaler`` (inf/NaN
gradients: ``scaler.step`` does not call ``step``) never reaches the factors. Pass the
``grad_scaler`` so that ``G`` is computed from unscaled gradients.

State. Factors, inverses, momentum buffers and counters live in ``self.state[p]`` (the layer
weight holds its block's), so ``state_dict()``/``load_state_dict()`` resume exactly; factors and
inverses keep their own dtype across a load (torch would cast them to the parameter dtype).
Hyperparameters live in the param groups; the settings that hold for the whole optimizer
(``fisher_type``, ``mc_samples``, ``loss``, ``loss_reduction``, ``layer_settings``,
``distributed_strategy``, ``bucket_cap_mb``) are in ``defaults`` and every group too, so a state
dict carries them, and one with other values is refused at load. The runtime collaborators —
:attr:`KFAC.statistics` (capture) and :attr:`KFAC.placement` (where inverses live) — hold no state
that a checkpoint needs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kfac_tn.blocks import EigenBasis, KroneckerBlock
from kfac_tn.enums import (
    BudgetCosts,
    DistributedStrategy,
    Inversion,
    KFACApprox,
    LossReduction,
    LossType,
    QModel,
    QModelJvp,
    StepSize,
)
from kfac_tn.faults import log_fault
from kfac_tn.losses import reduction_scale
from kfac_tn.optim import hyperparams
from kfac_tn.optim.damping import (
    damping_factor,
    levenberg_marquardt,
    optimal_scale,
    reduction_ratio,
)
from kfac_tn.optim.factored import FactoredCheck, Rows
from kfac_tn.optim.hyperparams import LayerHP, resolve_layer_hp
from kfac_tn.optim.inverses import PATH_COUNTERS
from kfac_tn.optim.layers import find_blocks
from kfac_tn.optim.placement import Placement, make_placement
from kfac_tn.optim.qmodel import (
    RecordedPass,
    SampledBatch,
    StepPieces,
    jvp_forwards,
    recorded_loss,
    sampled_loss,
    sampling_offset,
    step_pieces,
)
from kfac_tn.optim.schedule import (
    TUNING,
    CostMeter,
    CurvatureSchedule,
    LayerWork,
    check_schedule_state,
)
from kfac_tn.optim.state_dict import CURVATURE_KEYS, check_state_dict
from kfac_tn.optim.statistics import Capture, StatisticsCollector
from kfac_tn.optim.update import Update, propose

logger = logging.getLogger(__name__)

__all__ = ["KFAC", "DistributedStrategy"]

# settings of the whole optimizer: in defaults (and so in every group), never per group
GLOBAL_KEYS = (
    "fisher_type",
    "mc_samples",
    "loss",
    "loss_reduction",
    "layer_settings",
    "distributed_strategy",
    "bucket_cap_mb",
    "damping_adaptation_period",
    "qmodel",
    "step_size",
    "max_step_scale",
    "qmodel_samples",
    "qmodel_jvp",
    "curvature_budget",
    "budget_costs",
)
_COUNTERS = (
    "factor_updates",
    "skipped_factor_updates",
    "inverse_updates",
    "fallback_inversions",
    "failed_inversions",
    "invalid_factors",
    *PATH_COUNTERS,
    "factored_preconditionings",
)
_OWN = "kfac"  # key of the optimizer's own (not per-parameter) entry in self.state


class KFAC(torch.optim.Optimizer):
    """KFAC with a tensor-network curvature engine (see the module docstring).

    Args:
        model: The model; layers are found in ``model.named_modules()`` and hooked.
        params: Parameters or param groups to optimise (default: all of ``model``'s parameters
            that require gradients). A layer is preconditioned only if its weight (and bias) are
            among them, in the same group.
        lr: Learning rate ``>= 0``.
        momentum: Momentum in ``[0, 1)``.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient ``>= 0``, added after preconditioning.
        damping: Damping ``δ > 0`` of the Kronecker blocks (the start value when
            ``damping_adaptation``); ``None``: 1e-4 with ``step_size="qmodel"``, 1e-3 with
            ``"fixed"`` (:data:`~kfac_tn.optim.hyperparams.START_DAMPING`).
        factor_decay: EMA coefficient of the factors in ``[0, 1)`` (0: only the last batch).
        factor_update_period: Capture statistics and update factors every this many steps;
            ``None``: chosen by ``curvature_budget``, else 1.
        inverse_update_period: Recompute inverses every this many steps (each layer on its own
            phase, see :mod:`kfac_tn.optim.schedule`); ``None``: chosen by
            ``curvature_budget``, else 10.
        curvature_budget: Fraction in ``(0, 1)`` of a step's work that curvature work
            (capture, factors, decompositions, preconditioning) may take (default 0.4); the
            periods that are ``None`` are chosen per layer to keep it, never costing more than
            the fixed periods ``1/10`` would (:mod:`kfac_tn.optim.schedule`). ``None``: fixed
            periods ``1/10``. The step includes the self-tuning's forward passes, so a cheaper
            JVP leaves less room: 0.4 with the difference-quotient JVP takes the plan 0.3 took
            with forward mode, and passes the robustness grid where 0.3 then dipped (README,
            "Cost-aware curvature").
        budget_costs: What the budget plans with: ``"model"`` (work computed from the layer
            shapes of the first step, periods chosen once: a rerun, its resume and its replicas
            are bitwise reproducible by construction) or ``"measured"`` (seconds of sampled
            steps: follows the machine, adapts, but depends on timing).
        eigenbasis_tolerance: Keep (or refine with one QR iteration) a layer's previous
            eigenbasis when its relative off-diagonal mass on the new factor is at most this, in
            ``[0, 1]``; 0: a full ``eigh`` every inverse update (:mod:`kfac_tn.decompositions`).
        kfac_approx: ``"expand"`` (KFC) or ``"reduce"`` (Eschenhagen et al., 2023).
        fisher_type: ``"empirical"``, ``"mc"`` or ``"type2"``.
        mc_samples: Monte-Carlo samples per factor update (``fisher_type="mc"``).
        loss: ``"cross_entropy"`` or ``"mse"`` (the loss you backpropagate).
        loss_reduction: ``"mean"`` or ``"sum"``, the reduction of that loss.
        inversion: ``"eigen"`` (exact damping of ``A ⊗ G``, four GEMMs per step) or
            ``"cholesky"`` (π-damped factors, two GEMMs); ``None``: Cholesky, or eigen for a
            layer that needs the eigenbasis (EKFAC, ``eigenbasis_tolerance > 0``), see
            :func:`~kfac_tn.optim.hyperparams.auto_inversion`.
        preconditioner: ``"kfac"`` (Kronecker eigenvalues) or ``"ekfac"`` (scalings in the
            Kronecker eigenbasis from per-sample gradients; needs ``inversion="eigen"`` or
            ``None``, which picks eigen for EKFAC layers).
        norm_block: Curvature of norm layers' scale and shift: ``"unitwise"`` (2×2 per
            channel), ``"diagonal"`` or ``"skip"`` (momentum SGD).
        kl_clip: KL-clipping bound ``κ > 0``, or ``None`` to disable.
        factor_dtype: Factor dtype (default: float32 for half-precision parameters, else theirs).
        inverse_dtype: Inverse dtype (default: the factor dtype).
        layer_settings: ``{fnmatch pattern on module name: {hyperparameter: value} | "skip"}``;
            the first matching pattern applies. Overridable: see
            :data:`kfac_tn.optim.hyperparams.LAYER_KEYS`. ``"skip"`` trains the layer with plain
            momentum SGD.
        distributed_strategy: ``"replicate"`` or ``"shard"`` (used when ``torch.distributed`` is
            initialised).
        bucket_cap_mb: Bucket size of the factor all-reduce, ``> 0``.
        damping_adaptation: Adapt ``damping`` by the Levenberg–Marquardt rule
            (:mod:`kfac_tn.optim.damping`); the param group's ``damping`` is the start value.
        damping_adaptation_period: Adapt every this many steps (``T``).
        damping_adaptation_decay: ``ω = decay^T`` in ``(0, 1)`` scales the damping down after
            good steps and up after bad ones.
        min_damping: Lower bound of the adapted damping, ``> 0``; ``None``: the group's
            ``damping`` at construction (the adaptation then only raises the damping when steps
            fail, and lowers it back).
        max_damping: Upper bound, ``>= min_damping``.
        qmodel: Curvature of the quadratic model that judges a step for the damping
            adaptation: ``"kronecker"`` (the blocks, cheap) or ``"exact"`` (the GGN, one
            forward-mode pass).
        step_size: ``"fixed"`` (learning rate, momentum and KL clip as given) or ``"qmodel"``
            (every step rescaled by the minimiser of the exact quadratic model along it, capped by
            ``max_step_scale``).
        max_step_scale: Largest rescaling of a step with ``step_size="qmodel"``, ``> 0``.
        qmodel_samples: Samples of the step's batch the exact curvature term ``Δᵀ G Δ`` is
            evaluated on (``None``: all). Below the batch size they are drawn with
            probability proportional to their loss-Hessian trace (the uncertain predictions,
            which carry the curvature) and reweighted, an unbiased estimate
            (:func:`kfac_tn.optim.qmodel.exact_curvature`); before that they were the first
            ones, and 32 of them (the default then) let one data order in ten dip by
            0.03-0.05 in an epoch. 64 (the whole batch of the robustness grid, exact there):
            at batch 128 the worst drop over 80 runs is 0.008 on AVX-512 and 0.003 on AVX2,
            where the first 64 had 0.017 and 0.025. 32 also passes the grid (0 of 320 runs
            break its rule at batch 64, 0 of 160 at 128) and saves about a tenth of an SGD
            step on 3c3d at batch 128, but at batch 64 it trades the exact term for an
            estimate (worst drop 0.025 against 0.014) and the race and the main job were no
            faster with it (``python -m kfac_tn.benchmarks.robustness``). When the exact term
            ran on such a sub-batch, the damping's reduction ratio is taken on it too (one
            forward pass over those samples instead of the batch; see ``_adapt_damping``).
        qmodel_jvp: How ``Δᵀ G Δ``'s Jacobian-vector product ``JΔ`` is computed:
            ``"forward"`` (``torch.func.jvp``, exact, about three forward passes),
            ``"difference"`` (one forward pass at ``θ + tΔ`` against the recorded output,
            relative error of ``Δᵀ G Δ`` about 1e-3 in float32; float32/float64 parameters
            only, forward mode otherwise) or ``"auto"`` (default: ``"difference"`` on CPU,
            ``"forward"`` elsewhere, where TF32 or reduced-precision kernels would swamp a
            difference).
        grad_scaler: The ``torch.amp.GradScaler`` scaling the loss, if any (its scale is divided
            out of ``G``).

    Raises:
        ValueError: On an invalid hyperparameter, naming it, its value and the allowed values.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        damping: float | None = None,
        factor_decay: float = 0.95,
        factor_update_period: int | None = None,
        inverse_update_period: int | None = None,
        curvature_budget: float | None = 0.4,
        budget_costs: str = "model",
        eigenbasis_tolerance: float = 0.0,
        kfac_approx: str = "expand",
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        loss: str = "cross_entropy",
        loss_reduction: str = "mean",
        inversion: str | None = None,
        preconditioner: str = "kfac",
        norm_block: str = "unitwise",
        kl_clip: float | None = 1e-3,
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        layer_settings: Mapping[str, Mapping[str, Any] | str] | None = None,
        distributed_strategy: str = "replicate",
        bucket_cap_mb: float = 25.0,
        damping_adaptation: bool = True,
        damping_adaptation_period: int = 5,
        damping_adaptation_decay: float = 0.9,
        min_damping: float | None = None,
        max_damping: float = 1e3,
        qmodel: str = "kronecker",
        step_size: str = "qmodel",
        max_step_scale: float = 1.0,
        qmodel_samples: int | None = 64,
        qmodel_jvp: str = "auto",
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model value: {model!r} (must be a torch.nn.Module)")
        # the keyword arguments above, except model, params, layer_settings and grad_scaler
        defaults = {k: v for k, v in locals().items() if k in hyperparams.RULES}
        hyperparams.validate(defaults)
        defaults = hyperparams.normalized(defaults)
        defaults["layer_settings"] = hyperparams.validate_layer_settings(layer_settings)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.model = model
        self.grad_scaler = grad_scaler
        found = find_blocks(model, self.param_groups, defaults["layer_settings"])
        self.blocks: list[KroneckerBlock] = [block for block, _ in found]
        self._overrides = {block.name: override for block, override in found}  # names: copyable
        self._hooks_removed = False
        self._attach()

    # ------------------------------------------------------------------ wiring
    def _attach(self) -> None:
        """Build the runtime collaborators (placement, statistics capture) from the settings."""
        d = self.defaults
        self.placement: Placement = make_placement(
            d["distributed_strategy"], d["bucket_cap_mb"], self.blocks
        )
        self.statistics = StatisticsCollector(
            self.model,
            self.blocks,
            fisher_type=d["fisher_type"],
            mc_samples=int(d["mc_samples"]),
            loss=d["loss"],
            loss_reduction=d["loss_reduction"],
            comm=self.placement.comm,
            grad_scaler=self.grad_scaler,
        )
        self.schedule = _make_schedule(self)
        self.factored = FactoredCheck()
        self.placement.inverses.meter = self.schedule.meter
        self.statistics.meter = self.schedule.meter
        self.statistics.on_model_start = self.schedule.on_forward
        if not self._hooks_removed:
            self.statistics.attach()
        self._plan_capture()

    def __getstate__(self) -> dict[str, Any]:
        # everything but the runtime collaborators, which __setstate__ rebuilds (a deepcopy gets
        # working hooks on the copied model; the original's hooks on the copy are inert)
        state = self.__dict__.copy()
        state.pop("statistics", None)
        state.pop("placement", None)
        state.pop("schedule", None)
        state.pop("factored", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "blocks" in state:
            for block in self.blocks:
                block.clear_statistics()
            self._attach()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated like the constructor's.

        Raises:
            ValueError: On an invalid value, or a whole-optimizer setting (``fisher_type``, ...)
                that differs from the constructor's.
        """
        hyperparams.validate(param_group)
        if hasattr(self, "blocks"):  # after construction: the global settings are fixed
            _check_global(param_group, self.defaults)
        super().add_param_group(hyperparams.normalized(param_group))
        group = self.param_groups[-1]
        if group["damping"] is None:  # the start value suited to how steps are sized
            group["damping"] = hyperparams.START_DAMPING[group["step_size"]]
        if group["min_damping"] is None:  # the floor is the damping the group starts with
            group["min_damping"] = group["damping"]
            hyperparams.validate(group)

    def layer_hp(self) -> dict[int, LayerHP]:
        """Hyperparameters of every block for the coming step, by ``id(block)``."""
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        hps = {}
        for b in self.blocks:
            hp = resolve_layer_hp(
                self.param_groups[group_of[id(b.weight)]], self._overrides[b.name], b.weight.dtype
            )
            periods = self.schedule.periods(b.name, *hp.explicit_periods)
            if periods != (hp.factor_update_period, hp.inverse_update_period):
                hp = dataclasses.replace(
                    hp, factor_update_period=periods.factor, inverse_update_period=periods.inverse
                )
            hps[id(b)] = hp
        return hps

    def _plan_capture(self) -> None:
        """Tell the hooks which blocks capture in the coming passes, and with what.

        The settings of each block, and for EKFAC blocks the eigenbasis to project into.
        """
        hps = self.layer_hp()
        record = self._qmodel_step() or self._damping_due()
        active = self._active(self.blocks, hps)
        self.statistics.plan(
            {
                id(b): Capture(hps[id(b)], self._capture_basis(b, hps[id(b)]))
                for b in active
                if self.schedule.factor_due(self._step_count_of(b), hps[id(b)].factor_update_period)
            },
            record=record,
            rows=[id(b) for b in active if b.takes_rows(self.state.get(b.weight, {}))],
        )

    def _capture_basis(self, block: KroneckerBlock, hp: LayerHP) -> EigenBasis | None:
        """Return the eigenbasis an EKFAC block's per-sample gradients are projected into."""
        state = self.state.get(block.weight)
        if state is None or not block.uses_ekfac(hp.preconditioner) or "scalings" not in state:
            return None
        return block.eigenbasis(state)

    # ------------------------------------------------------------------ public helpers
    def remove_hooks(self) -> None:
        """Remove all capture hooks; afterwards every parameter gets the momentum-SGD update."""
        self.statistics.remove()
        self._hooks_removed = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients and discard statistics captured since the last step."""
        super().zero_grad(set_to_none)
        self.statistics.discard()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters summed over layers, and the self-tuning values (reading syncs the device).

        Counters: ``steps`` (taken), ``skipped_steps`` (non-finite gradients or statistics:
        nothing changed), ``factor_updates``, ``skipped_factor_updates``, ``inverse_updates``,
        ``fallback_inversions`` (float64 retries), ``failed_inversions``, ``invalid_factors``
        (non-finite factors reset), ``damping_adaptations``, ``factored_preconditionings`` (layer
        steps preconditioned from the gradient's outer products, :mod:`.factored`), the
        decomposition paths per factor
        matrix (``eigh_decompositions``, ``warm_decompositions``, ``qr_decompositions``,
        ``cholesky_decompositions``, ``offloaded_decompositions``; see
        :mod:`kfac_tn.optim.inverses`), ``kfac_layers``. Values: ``damping`` (per param group),
        ``rho`` (the last reduction ratio, ``nan`` before the first) and ``step_scale`` (the
        last ``step_size="qmodel"`` scale, 1 otherwise).
        """
        own = self.state[_OWN] if _OWN in self.state else {}
        out: dict[str, Any] = dict.fromkeys(("steps", "skipped_steps", *_COUNTERS), 0)
        out["skipped_steps"] = own.get("skipped_steps", 0)
        out["damping_adaptations"] = own.get("damping_adaptations", 0)
        out["kfac_layers"] = len(self.blocks)
        out["damping"] = [g["damping"] for g in self.param_groups]
        out["rho"] = own.get("rho", math.nan)
        out["step_scale"] = own.get("step_scale", 1.0)
        for block in self.blocks:
            state = self.state.get(block.weight, {})
            out["steps"] = max(out["steps"], state.get("kfac_step", 0))
            for key in _COUNTERS:
                value = state.get(key, 0)
                out[key] += int(value.item()) if isinstance(value, Tensor) else int(value)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Return the state dict; the optimizer's own entry is a copy (later steps leave it)."""
        out = super().state_dict()
        if _OWN in out["state"]:
            out["state"] = {**out["state"], _OWN: copy.deepcopy(out["state"][_OWN])}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; curvature tensors keep their saved dtype (moved to the device).

        Raises:
            ValueError: Naming the entry, if the state dict is not one this optimizer can
                continue from (another optimizer's, another model's, invalid values); the
                optimizer is then unchanged (:mod:`kfac_tn.optim.state_dict`).
        """
        check_state_dict(state_dict, self.param_groups, self.blocks, self.defaults, GLOBAL_KEYS)
        own = state_dict["state"].get(_OWN)
        check_schedule_state(own.get("schedule") if isinstance(own, Mapping) else None)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        kept: dict[int, dict[str, Any]] = {}
        stripped = {**state_dict, "state": {}}
        for key, value in state_dict["state"].items():
            value = dict(value)
            kept[key] = {k: value.pop(k) for k in CURVATURE_KEYS if k in value}
            stripped["state"][key] = value
        super().load_state_dict(stripped)
        for group in self.param_groups:  # a state dict of an older release may lack settings
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if _OWN in self.state and self.param_groups[0]["params"]:
            self.state[_OWN] = _to_device(
                self.state[_OWN], self.param_groups[0]["params"][0].device
            )
        for key, entries in kept.items():
            param = id_map.get(key)
            if param is not None:
                self.state[param].update(_to_device(entries, param.device))
        if _OWN in self.state:  # not shared with the caller's dict
            self.state[_OWN] = copy.deepcopy(self.state[_OWN])
        self._plan_capture()

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimisation step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss; run under
                ``torch.enable_grad()`` before the update (its backward is captured as usual).

        Returns:
            The closure's loss, or ``None``.

        A step whose gradients or captured statistics are not all finite changes nothing but
        ``stats["skipped_steps"]`` (like a step ``GradScaler`` skips): parameters, momentum,
        factors, inverses and step counters stay as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hps = self.layer_hp()
        blocks = self._active(self._blocks_with_grad(), hps)
        meter = self.schedule.meter  # times the stages on sampled steps (curvature_budget)
        rows = self.statistics.take_gradient_rows()
        with meter.span("factor"):
            self.statistics.wait_averaged(blocks)
        with meter.span("fixed"):
            finite, factored = self._check_gradients(blocks, rows)
        if not finite:
            self._skip_step()
            self.schedule.discard()
            return loss
        self._maybe_update_factors(blocks, hps)
        with meter.span("fixed"):
            due = self._drop_non_finite_factors(self._inverses_due(blocks, hps))
        self.placement.update_inverses(due, self.state, hps)
        with meter.span("fixed"):
            directions = self.placement.precondition(blocks, self.state, hps, factored)
        self._clip(directions, hps)
        update = propose(self.param_groups, self.state, directions)
        records = self.statistics.take_records()
        pieces = self._judge(update, records)
        alpha = self._rescale(update, pieces)
        update.apply(self.state)
        self._adapt_damping(pieces, alpha, records)
        self._advance_counters(blocks)
        return loss

    # ------------------------------------------------------------------ step stages
    def _blocks_with_grad(self) -> list[KroneckerBlock]:
        if self._hooks_removed:
            return []
        return [b for b in self.blocks if all(p.grad is not None for p in b.params)]

    @staticmethod
    def _active(blocks: list[KroneckerBlock], hps: dict[int, LayerHP]) -> list[KroneckerBlock]:
        """Drop the blocks switched off for this step (``norm_block="skip"`` set after init)."""
        return [b for b in blocks if not b.skipped(hps[id(b)].norm_block)]

    def _check_gradients(
        self, blocks: list[KroneckerBlock], rows: Mapping[int, Rows]
    ) -> tuple[bool, dict[int, Rows]]:
        """Whether every gradient and statistic is finite, and the blocks taking factored rows.

        One host sync per step for both answers. Distributed, the gradients (DDP) and
        statistics are averaged first, so every rank takes the same decision (and no rows are
        kept: :mod:`kfac_tn.optim.factored`).

        Returns:
            ``(finite, {id(block): rows})``: the blocks whose gradient is the sum of their
            captured rows' outer products (:class:`FactoredCheck`).
        """
        tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        tensors += [t for b in blocks for t in b.pending_statistics()]
        # min and max propagate inf/NaN; one pass per tensor, ~4x faster on CPU than the
        # inf-norm (_foreach_norm) and with no temporary copy
        ends = [e.to(torch.float32) for t in tensors if t.numel() for e in torch.aminmax(t)]
        checks = self.factored.checks(blocks, rows, self.state) if rows else []
        if not ends and not checks:
            return True, {}
        flags = [torch.stack(ends).isfinite().all()] if ends else []
        answers = torch.stack(flags + [ok for _, ok in checks]).tolist()
        finite = all(answers[: len(flags)])
        accepted = [b for (b, _), ok in zip(checks, answers[len(flags) :]) if ok]
        return finite, {id(b): rows[id(b)] for b in accepted}

    def _skip_step(self) -> None:
        """Count a skipped step and drop its statistics; nothing else changes."""
        own = self.state[_OWN]
        own["skipped_steps"] = own.get("skipped_steps", 0) + 1
        self.statistics.discard()
        self.statistics.take_records()  # recorded passes of the skipped step are dropped too
        log_fault(
            logger,
            own["skipped_steps"],
            "KFAC skipped a step: non-finite gradients or curvature statistics; parameters, "
            "momentum and curvature are unchanged",
        )

    def _maybe_update_factors(self, blocks: list[KroneckerBlock], hps: dict[int, LayerHP]) -> None:
        """Fold the captured statistics into the factors' EMA."""
        self.statistics.warn_if_eval_mode(blocks)
        for block in blocks:
            if block.has_statistics:
                state = self.state[block.weight]
                with self.schedule.meter.span("factor", block.name):
                    block.update_factors(
                        state,
                        decay=hps[id(block)].factor_decay,
                        grad_scale=self.statistics.grad_scale(block),
                    )
                state["factor_updates"] = state.get("factor_updates", 0) + 1
        self.statistics.discard()

    def _inverses_due(
        self, blocks: list[KroneckerBlock], hps: dict[int, LayerHP]
    ) -> list[KroneckerBlock]:
        """Blocks whose inverse is recomputed now: staggered phases, and as soon as factors exist.

        See :mod:`kfac_tn.optim.schedule` for the phases.
        """
        periods = {b.name: hps[id(b)].inverse_update_period for b in self.blocks}
        due = []
        for block in blocks:
            state, hp = self.state[block.weight], hps[id(block)]
            if "A" not in state:
                continue
            if _stale(block, state, hp) or self.schedule.inverse_due(
                block.name, state.get("kfac_step", 0), periods
            ):
                due.append(block)
        return due

    def _drop_non_finite_factors(self, due: list[KroneckerBlock]) -> list[KroneckerBlock]:
        """Reset the ``due`` blocks whose factors are not finite; return the others.

        One host sync, on inverse-update steps only. The factors are averaged over workers,
        so every rank resets the same blocks.
        """
        if not due:
            return due
        sums = [self.state[b.weight]["A"].sum() + self.state[b.weight]["G"].sum() for b in due]
        finite = torch.stack([s.to(torch.float32) for s in sums]).isfinite().tolist()
        for block, ok in zip(due, finite):
            if not ok:
                block.reset_factors(self.state[block.weight])
        return [b for b, ok in zip(due, finite) if ok]

    def _clip(self, directions: dict[int, Tensor], hps: dict[int, LayerHP]) -> None:
        r"""KL clipping, in place: each group's directions times :math:`\nu` (module docstring).

        The sum over layers uses finite terms only, so a layer whose direction is not finite
        cannot change the step of the others.
        """
        terms = [
            (directions[id(p)] * p.grad).sum() * hps[id(block)].lr ** 2
            for block in self.blocks
            for p in block.params
            if id(p) in directions
        ]
        if not terms:
            return
        terms = torch.stack(terms)
        vg_sum = torch.where(terms.isfinite(), terms, 0.0).sum()
        tiny = torch.finfo(vg_sum.dtype).tiny
        for group in self.param_groups:
            if group["kl_clip"] is not None:
                nu = (group["kl_clip"] / vg_sum.abs().clamp_min(tiny)).sqrt().clamp(max=1.0)
                for p in group["params"]:
                    if id(p) in directions:
                        directions[id(p)] = directions[id(p)] * nu

    def _judge(self, update: Update, records: list[RecordedPass]) -> StepPieces | None:
        """Evaluate the quadratic-model terms of the proposed step, on steps that use them."""
        d = self.defaults
        qmodel_step = self._qmodel_step()
        damping_due = self._damping_due()
        if not records or not (qmodel_step or damping_due):
            return None
        # with the exact curvature at hand for the step size, the damping uses it too
        curvature = QModel.EXACT if qmodel_step else QModel(d["qmodel"])
        with self.schedule.meter.span(TUNING):  # timed apart: base time for the budget
            return step_pieces(
                update,
                self.param_groups,
                self.blocks,
                self.state,
                model=self.model,
                records=records,
                loss=LossType(d["loss"]),
                r=self._record_scale(records),
                curvature=curvature if damping_due else None,
                exact=qmodel_step,
                comm=self.placement.comm,
                samples=d["qmodel_samples"],
                jvp_mode=QModelJvp(d["qmodel_jvp"]),
                offset=sampling_offset(self.state[_OWN].get("step", 0)),
                keep_sample=damping_due,
            )

    def _rescale(self, update: Update, pieces: StepPieces | None) -> float:
        """``step_size="qmodel"``: scale the step by the quadratic model's minimiser along it.

        Every step; a step without a recorded batch (e.g. no backward reached the model output)
        is not scaled.
        """
        if pieces is None or not self._qmodel_step():
            return 1.0
        curvature = pieces.exact_curvature + pieces.decay_square + pieces.damping_square
        alpha = optimal_scale(
            pieces.linear + pieces.decay_linear, curvature, self.defaults["max_step_scale"]
        )
        self.state[_OWN]["step_scale"] = alpha
        update.scale(alpha)
        return alpha

    def _adapt_damping(
        self, pieces: StepPieces | None, alpha: float, records: list[RecordedPass]
    ) -> None:
        """Levenberg–Marquardt: move each adapting group's damping by the reduction ratio.

        The ratio compares the objective's change over the applied step with the change the
        quadratic model predicted, both on the step's own batch (one extra forward pass), or,
        when the step scale's exact curvature ran on a sub-batch of it, both on that sub-batch
        (the forward pass on those samples only; Horvitz-Thompson estimates of the batch's
        changes from the same draw, so their errors are correlated).
        """
        if pieces is None or not self._damping_due():
            return
        sampled = pieces.sampled is not None and math.isfinite(pieces.sampled_linear)
        with self.schedule.meter.span(TUNING):
            rho = self._reduction_ratio(pieces, alpha, records, sampled=sampled)
        for group in self.param_groups:
            if group["damping_adaptation"]:
                group["damping"] = levenberg_marquardt(
                    group["damping"],
                    rho,
                    omega=damping_factor(group),
                    min_damping=group["min_damping"],
                    max_damping=group["max_damping"],
                )
        own = self.state[_OWN]
        own["rho"] = rho
        own["damping_adaptations"] = own.get("damping_adaptations", 0) + 1

    def _reduction_ratio(
        self, pieces: StepPieces, alpha: float, records: list[RecordedPass], *, sampled: bool
    ) -> float:
        """Return ρ of the applied step: on ``pieces.sampled`` if ``sampled``, else the batch."""
        new, old = self._losses_before_and_after(records, pieces.sampled if sampled else None)
        predicted = pieces.predicted(alpha, sampled=sampled)
        return reduction_ratio(new - old + pieces.decay_change(alpha), predicted)

    def _losses_before_and_after(
        self, records: list[RecordedPass], sampled: SampledBatch | None
    ) -> tuple[float, float]:
        """Return the recorded batch's loss at the current and at the recorded parameters.

        One extra forward pass (on the ``sampled`` samples alone, weighted, if given);
        averaged over workers when distributed.
        """
        loss, r = LossType(self.defaults["loss"]), self._record_scale(records)
        current = dict(self._named_parameters())
        if sampled is not None:
            losses = torch.stack(sampled_loss(self.model, sampled, loss, r, current))
        else:
            losses = torch.stack(
                [
                    recorded_loss(self.model, records, loss, r, params=current),
                    recorded_loss(self.model, records, loss, r),
                ]
            )
        if self.placement.comm is not None:
            losses = self.placement.comm.average(losses)
        new, old = losses.tolist()
        return new, old

    def _named_parameters(self) -> Iterable[tuple[str, Tensor]]:
        model = self.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        return model.named_parameters()

    def _qmodel_step(self) -> bool:
        return self.defaults["step_size"] == StepSize.QMODEL.value

    def _damping_due(self) -> bool:
        """Whether this step adapts the damping: every ``T`` steps, if a group adapts."""
        if not any(g["damping_adaptation"] for g in self.param_groups):
            return False
        step = self.state[_OWN].get("step", 0) if _OWN in self.state else 0
        return step % int(self.defaults["damping_adaptation_period"]) == 0

    def _record_scale(self, records: list[RecordedPass]) -> float:
        samples = sum(r.output.shape[0] for r in records)
        d = self.defaults
        return reduction_scale(
            LossType(d["loss"]),
            LossReduction(d["loss_reduction"]),
            samples,
            self.statistics.entries_per_sample,
        )

    def _advance_counters(self, blocks: list[KroneckerBlock]) -> None:
        """Advance the step counters; let the schedule decide; plan the coming passes' capture."""
        for block in blocks:
            state = self.state[block.weight]
            state["kfac_step"] = state.get("kfac_step", 0) + 1
        own = self.state[_OWN]
        own["step"] = own.get("step", 0) + 1
        if self.schedule.budget is not None:
            self.schedule.end_step(self._due_next, self._explicit_periods, self._layer_work)
        self._plan_capture()

    # ------------------------------------------------------------------ small helpers
    def _step_count_of(self, block: KroneckerBlock) -> int:
        return self.state[block.weight].get("kfac_step", 0) if block.weight in self.state else 0

    def _hp_by_block(self) -> dict[KroneckerBlock, LayerHP]:
        hps = self.layer_hp()
        return {b: hps[id(b)] for b in self.blocks}

    def _explicit_periods(self) -> dict[str, tuple[int | None, int | None]]:
        """Layer -> its explicit (factor, inverse) periods, ``None`` where the budget chooses."""
        return {b.name: hp.explicit_periods for b, hp in self._hp_by_block().items()}

    def _layer_work(self) -> tuple[dict[str, LayerWork], float]:
        """Return what the modeled budget plans with (:func:`.schedule.modeled_costs`).

        Layer -> its :class:`LayerWork` (shapes of its last capture), for the layers seen, and
        the self-tuning's forward passes per step.
        """
        out = {}
        for block, hp in self._hp_by_block().items():
            seen = block.seen_positions()
            if seen is None or block.skipped(hp.norm_block):
                continue
            d_a, d_g = block.dims
            out[block.name] = LayerWork(
                samples=seen[0],
                input_positions=seen[1],
                output_positions=seen[2],
                groups=block.groups,
                d_a=d_a,
                d_g=d_g,
                reduce=hp.kfac_approx is KFACApprox.REDUCE,
                cholesky=block.inversion_for(hp.inversion) is Inversion.CHOLESKY,
                ekfac=block.uses_ekfac(hp.preconditioner),
                input_factor_work=block.input_factor_work(hp.kfac_approx),
            )
        return out, self._extra_forwards(out)

    def _extra_forwards(self, layers: Mapping[str, LayerWork]) -> float:
        """Forward passes of the batch the self-tuning adds per step, amortised.

        A JVP (``step_size="qmodel"`` every step, ``qmodel="exact"`` on adaptation steps) costs
        about three forward passes on its samples in forward mode and one as a difference
        quotient (:func:`~kfac_tn.optim.qmodel.jvp_forwards`); the damping adaptation one
        forward, on the JVP's samples when the step scale drew them.
        """
        d = self.defaults
        batch = max((w.samples for w in layers.values()), default=1)
        share = 1.0 if d["qmodel_samples"] is None else min(1.0, d["qmodel_samples"] / batch)
        period = int(d["damping_adaptation_period"])
        adapting = any(g["damping_adaptation"] for g in self.param_groups)
        jvp = jvp_forwards(QModelJvp(d["qmodel_jvp"]), [b.weight for b in self.blocks]) * share
        extra = jvp if self._qmodel_step() else 0.0
        if adapting:
            exact = not self._qmodel_step() and d["qmodel"] == QModel.EXACT.value
            judged = share if self._qmodel_step() or exact else 1.0  # ρ on the JVP's samples
            extra += (judged + (jvp if exact else 0.0)) / period
        return extra

    def _due_next(self) -> dict[str, tuple[bool, bool]]:
        """Layer -> (factor update, inverse update) due at its next step (sampling decisions)."""
        hps = self._hp_by_block()
        periods = {b.name: hp.inverse_update_period for b, hp in hps.items()}
        out = {}
        for block, hp in hps.items():
            step = self._step_count_of(block)
            out[block.name] = (
                self.schedule.factor_due(step, hp.factor_update_period),
                self.schedule.inverse_due(block.name, step, periods),
            )
        return out


def _make_schedule(opt: KFAC) -> CurvatureSchedule:
    """Build the optimizer's :class:`CurvatureSchedule` (persistent part: ``state["kfac"]``)."""
    budget = opt.defaults["curvature_budget"]
    device = opt.blocks[0].weight.device if opt.blocks else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    comm = opt.placement.comm
    return CurvatureSchedule(
        layers=[(b.name, b.inversion_cost(), _factor_size(b)) for b in opt.blocks],
        budget=budget,
        costs_from=BudgetCosts(opt.defaults["budget_costs"]),
        meter=CostMeter(sync=sync),
        agree=comm.agree if comm is not None else None,
        store=(lambda: opt.state[_OWN].setdefault("schedule", {})) if budget is not None else None,
    )


def _factor_size(block: KroneckerBlock) -> float:
    d_a, d_g = block.dims
    return float(block.groups * (d_a * d_a + d_g * d_g))


def _stale(block: KroneckerBlock, state: dict[str, Any], hp: LayerHP) -> bool:
    """Whether the stored inverse does not fit the layer's settings (recomputed at once)."""
    if "inverse" not in state:
        return True
    if state.get("inverse_kind") != block.inversion_for(hp.inversion).value:
        return True
    return ("scalings" in state) != block.uses_ekfac(hp.preconditioner)


def _check_global(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse a group whose whole-optimizer settings differ from ``defaults``."""
    for key in GLOBAL_KEYS:
        if key in group and hyperparams.normalized({key: group[key]})[key] != defaults[key]:
            raise ValueError(
                f"Invalid {key} value: {group[key]!r} (a setting of the whole optimizer: "
                f"{defaults[key]!r} here; it cannot differ per param group)"
            )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
