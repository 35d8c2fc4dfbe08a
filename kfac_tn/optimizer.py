r"""KFAC as a ``torch.optim.Optimizer``.

Usage is the ordinary training loop::

    opt = KFAC(model, lr=0.05, momentum=0.9, weight_decay=5e-4, damping=1e-3)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

What is preconditioned. Every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``
(see :mod:`kfac_tn.blocks`; more via :func:`kfac_tn.blocks.register_block`) whose weight (and bias)
the optimizer updates gets a Kronecker block :math:`A \otimes G` per channel group. All other
parameters (norm layers, embeddings, layers marked ``"skip"`` in ``layer_settings``, ...) are
trained with the plain momentum-SGD update below — nothing is left untrained.

The update, per parameter ``p`` of a group with learning rate :math:`\eta`:

.. math::
    d = \nu\,(A \otimes G + \delta I)^{-1} \nabla_p L + \lambda p, \qquad
    b \leftarrow \mu b + d, \qquad p \leftarrow p - \eta\,(d + \mu b \text{ if Nesterov else } b)

with damping :math:`\delta` (``"eigen"``: exact; ``"cholesky"``: factored π-damping, see
:mod:`kfac_tn.linalg`), weight decay :math:`\lambda` added *after* preconditioning (as when a KFAC
preconditioner feeds ``torch.optim.SGD``), and the KL-clipping factor
:math:`\nu = \min(1, \sqrt{\kappa / \sum_\ell \eta^2 \langle \Delta_\ell, \nabla_\ell\rangle})`
over all preconditioned layers (``kl_clip=None``: :math:`\nu = 1`). Non-preconditioned parameters
use :math:`d = \nabla_p L + \lambda p`.

Scale convention (see :mod:`kfac_tn.blocks.base`): :math:`A \otimes G` approximates the curvature
of the loss *as reduced* (``loss_reduction`` must match the loss you backpropagate), so a damping
value means the same for every batch size. Gradient accumulation: statistics of all
forward/backward passes between two ``step()`` calls are pooled, so ``M`` micro-batches with the
loss divided by ``M`` (the usual recipe for ``"mean"``) give exactly the factors and the update of
one batch ``M`` times larger.

Fisher types. ``"empirical"`` uses the gradients of your loss (captured by tensor hooks during
your ``backward()``). ``"mc"`` and ``"type2"`` need gradients of a *different* loss: a forward hook
on ``model`` sees its output ``f`` and, right there, runs ``mc_samples`` (``"mc"``: labels sampled
from the model's predictive distribution) or ``C`` (``"type2"``: columns of the loss-Hessian square
root, ``C`` = number of outputs per sample) extra backward passes from ``f`` to the layer outputs
with ``torch.autograd.grad(..., retain_graph=True)`` (parameter gradients are not touched; tensor
and module backward hooks that *other* code placed on the same layers do see these passes). The
loop stays unchanged; the model's output must be the tensor your loss consumes (``[N, C]`` logits
for cross-entropy). The statistics are committed when your own ``backward()`` reaches the output.

Statistics are captured only on factor-update steps, in training mode, with gradients enabled.
``zero_grad()`` also discards captured statistics, so a step skipped by ``GradScaler`` (inf/NaN
gradients: ``scaler.step`` does not call ``step``) never reaches the factors. Pass the
``grad_scaler`` so that ``G`` is computed from unscaled gradients.

State. Factors, inverses, momentum buffers and counters live in ``self.state[p]`` (the layer
weight holds its block's), so ``state_dict()``/``load_state_dict()`` resume exactly; factors and
inverses keep their own dtype across a load (torch would cast them to the parameter dtype).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from kfac_tn import linalg
from kfac_tn.blocks import KFACApprox, KroneckerBlock, block_class_for
from kfac_tn.capture import GradCallback, HookSet
from kfac_tn.losses import FisherType, LossReduction, LossType, output_gradients, reduction_scale

logger = logging.getLogger(__name__)

__all__ = ["KFAC", "DistributedStrategy"]


class DistributedStrategy(str, Enum):
    """Where inverses live in data-parallel training (see :mod:`kfac_tn.distributed`)."""

    REPLICATE = "replicate"
    SHARD = "shard"


# keys of a layer's optimizer state that belong to the curvature (not cast on load)
_CURVATURE_KEYS = (
    "A",
    "G",
    "factors_valid",
    "skipped_factor_updates",
    "inverse",
    "inverse_kind",  # a str: torch's load_state_dict would turn it into a generator
)
# hyperparameters a ``layer_settings`` entry may override
_LAYER_KEYS = (
    "damping",
    "factor_decay",
    "factor_update_period",
    "inverse_update_period",
    "kfac_approx",
    "inversion",
    "factor_dtype",
    "inverse_dtype",
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------- validation
def _enum(cls: type[Enum], name: str, value: Any) -> Enum:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise ValueError(f"Invalid {name} value: {value!r} (allowed: {allowed})") from None


def _number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'>' if low_open else '>='} {low}"
        hi = "" if high == math.inf else f" and {'<' if high_open else '<='} {high}"
        kind = "an int" if integer else "a number"
        raise ValueError(f"Invalid {name} value: {value!r} (must be {kind} {lo}{hi})")


def _dtype(name: str, value: Any) -> None:
    if value is not None and value not in _FLOAT_DTYPES:
        raise ValueError(
            f"Invalid {name} value: {value!r} (allowed: None, torch.float16, torch.bfloat16, "
            "torch.float32, torch.float64)"
        )


def _validate_hyperparameters(hp: Mapping[str, Any]) -> None:
    """Check every known hyperparameter present in ``hp``; raise ``ValueError`` naming it."""
    checks: dict[str, Callable[[Any], None]] = {
        "lr": lambda v: _number("learning rate", v, low=0.0),
        "momentum": lambda v: _number("momentum", v, low=0.0, high=1.0, high_open=True),
        "weight_decay": lambda v: _number("weight_decay", v, low=0.0),
        "damping": lambda v: _number("damping", v, low=0.0, low_open=True),
        "factor_decay": lambda v: _number("factor_decay", v, low=0.0, high=1.0, high_open=True),
        "factor_update_period": lambda v: _number("factor_update_period", v, low=1, integer=True),
        "inverse_update_period": lambda v: _number("inverse_update_period", v, low=1, integer=True),
        "kfac_approx": lambda v: _enum(KFACApprox, "kfac_approx", v),
        "inversion": lambda v: _enum(linalg.Inversion, "inversion", v),
        "kl_clip": lambda v: None if v is None else _number("kl_clip", v, low=0.0, low_open=True),
        "factor_dtype": lambda v: _dtype("factor_dtype", v),
        "inverse_dtype": lambda v: _dtype("inverse_dtype", v),
    }
    for key, value in hp.items():
        if key in checks:
            checks[key](value)
    if "nesterov" in hp:
        if not isinstance(hp["nesterov"], bool):
            raise ValueError(f"Invalid nesterov value: {hp['nesterov']!r} (allowed: True, False)")
        if hp["nesterov"] and hp.get("momentum", 0.0) <= 0:
            raise ValueError(
                f"Invalid nesterov value: True needs momentum > 0 (momentum={hp.get('momentum')})"
            )


@dataclass(frozen=True)
class _LayerHP:
    """Hyperparameters of one layer for one step (group values with layer overrides applied)."""

    lr: float
    damping: float
    factor_decay: float
    factor_update_period: int
    inverse_update_period: int
    kfac_approx: KFACApprox
    inversion: linalg.Inversion
    factor_dtype: torch.dtype
    inverse_dtype: torch.dtype
    kl_clip: float | None


# ---------------------------------------------------------------------------------- optimizer
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
        damping: Damping ``δ > 0`` of the Kronecker blocks.
        factor_decay: EMA coefficient of the factors in ``[0, 1)`` (0: only the last batch).
        factor_update_period: Capture statistics and update factors every this many steps.
        inverse_update_period: Recompute inverses every this many steps.
        kfac_approx: ``"expand"`` (KFC) or ``"reduce"`` (Eschenhagen et al., 2023).
        fisher_type: ``"empirical"``, ``"mc"`` or ``"type2"``.
        mc_samples: Monte-Carlo samples per factor update (``fisher_type="mc"``).
        loss: ``"cross_entropy"`` or ``"mse"`` (the loss you backpropagate).
        loss_reduction: ``"mean"`` or ``"sum"``, the reduction of that loss.
        inversion: ``"eigen"`` or ``"cholesky"``.
        kl_clip: KL-clipping bound ``κ > 0``, or ``None`` to disable.
        factor_dtype: Factor dtype (default: float32 for half-precision parameters, else theirs).
        inverse_dtype: Inverse dtype (default: the factor dtype).
        layer_settings: ``{fnmatch pattern on module name: {hyperparameter: value} | "skip"}``;
            the first matching pattern applies. Overridable: damping, factor_decay,
            factor_update_period, inverse_update_period, kfac_approx, inversion, factor_dtype,
            inverse_dtype. ``"skip"`` trains the layer with plain momentum SGD.
        distributed_strategy: ``"replicate"`` or ``"shard"`` (used when ``torch.distributed`` is
            initialised).
        bucket_cap_mb: Bucket size of the factor all-reduce, ``> 0``.
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
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_period: int = 1,
        inverse_update_period: int = 10,
        kfac_approx: str = "expand",
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        loss: str = "cross_entropy",
        loss_reduction: str = "mean",
        inversion: str = "eigen",
        kl_clip: float | None = 1e-3,
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        layer_settings: Mapping[str, Mapping[str, Any] | str] | None = None,
        distributed_strategy: str = "replicate",
        bucket_cap_mb: float = 25.0,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model value: {model!r} (must be a torch.nn.Module)")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            damping=damping,
            factor_decay=factor_decay,
            factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period,
            kfac_approx=_enum(KFACApprox, "kfac_approx", kfac_approx).value,
            inversion=_enum(linalg.Inversion, "inversion", inversion).value,
            kl_clip=kl_clip,
            factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype,
        )
        _validate_hyperparameters(defaults)
        self.fisher_type = _enum(FisherType, "fisher_type", fisher_type)
        _number("mc_samples", mc_samples, low=1, integer=True)
        self.mc_samples = int(mc_samples)
        self.loss = _enum(LossType, "loss", loss)
        self.loss_reduction = _enum(LossReduction, "loss_reduction", loss_reduction)
        self.distributed_strategy = _enum(
            DistributedStrategy, "distributed_strategy", distributed_strategy
        )
        _number("bucket_cap_mb", bucket_cap_mb, low=0.0, low_open=True)
        self.layer_settings = _validate_layer_settings(layer_settings)
        self.grad_scaler = grad_scaler

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)

        self.model = model
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.blocks: list[KroneckerBlock] = self._make_blocks(model)
        self._entries_per_sample: int | None = None
        self._hooks_removed = False
        self._attach()

    def _attach(self) -> None:
        """Set up the runtime parts (hooks, communicator, lookup tables) from the blocks."""
        self._block_of_module = {id(b.module): b for b in self.blocks}
        self._comm = _get_communicator(self.distributed_strategy.value, self.bucket_cap_mb)
        self._assigned = False
        # (block, layer output, input statistic, samples, output version) of the running forward
        # pass (MC/type-2), and the layer-output gradients collected during a sampled backward
        self._pending_forward: list[tuple[KroneckerBlock, Tensor, Tensor, int, int]] = []
        self._sampled_grads: dict[int, Tensor] | None = None
        self._refresh_capture_settings()
        self._hooks = HookSet()
        if self._hooks_removed:
            return
        for block in self.blocks:
            self._hooks.add_layer(
                block.module, active=self._capture_active, on_forward=self._on_layer_forward
            )
        self._hooks.add_model(self.model, self._on_model_output)

    def __getstate__(self) -> dict[str, Any]:
        # everything but the runtime parts, which __setstate__ rebuilds (deepcopy gets working
        # hooks on the copied model; hooks left on the copy by the original stay inert)
        state = self.__dict__.copy()
        for key in (
            "_hooks",
            "_comm",
            "_block_of_module",
            "_capture_hp",
            "_pending_forward",
            "_sampled_grads",
        ):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "blocks" in state:
            for block in self.blocks:
                block.clear_statistics()
            self._attach()

    # ------------------------------------------------------------------ construction helpers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated like the constructor's."""
        _validate_hyperparameters(param_group)
        for key, cls in (("kfac_approx", KFACApprox), ("inversion", linalg.Inversion)):
            if key in param_group:
                param_group[key] = _enum(cls, key, param_group[key]).value
        super().add_param_group(param_group)

    def _make_blocks(self, model: nn.Module) -> list[KroneckerBlock]:
        group_of = self._group_index()
        blocks, seen = [], set()
        for name, module in model.named_modules():
            cls = block_class_for(module)
            if cls is None or getattr(module, "weight", None) is None:
                continue
            if self._layer_override(name) == "skip":
                logger.info("Layer %s: skipped by layer_settings, trained with SGD", name)
                continue
            block = cls(module, name)
            params = [block.weight] + ([block.bias] if block.bias is not None else [])
            if not all(id(p) in group_of for p in params) or id(block.weight) in seen:
                if any(id(p) in group_of for p in params):
                    logger.warning(
                        "Layer %s: weight and bias are not both optimised (or the weight is shared)"
                        "; its optimised parameters are trained with SGD",
                        name,
                    )
                continue
            if len({group_of[id(p)] for p in params}) > 1:
                raise ValueError(
                    f"Invalid params: weight and bias of layer {name!r} are in different param "
                    "groups (a Kronecker block needs one group)"
                )
            seen.add(id(block.weight))
            blocks.append(block)
        return blocks

    def _layer_override(self, name: str) -> Mapping[str, Any] | str | None:
        for pattern, setting in self.layer_settings.items():
            if fnmatch.fnmatchcase(name, pattern):
                return setting
        return None

    def _group_index(self) -> dict[int, int]:
        return {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}

    def _layer_hp(self, block: KroneckerBlock, group: Mapping[str, Any]) -> _LayerHP:
        values = {k: group[k] for k in _LAYER_KEYS}
        override = self._layer_override(block.name)
        if isinstance(override, Mapping):
            values.update(override)
        param_dtype = block.weight.dtype
        factor_dtype = values["factor_dtype"] or (
            torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype
        )
        return _LayerHP(
            lr=group["lr"],
            damping=values["damping"],
            factor_decay=values["factor_decay"],
            factor_update_period=int(values["factor_update_period"]),
            inverse_update_period=int(values["inverse_update_period"]),
            kfac_approx=KFACApprox(values["kfac_approx"]),
            inversion=linalg.Inversion(values["inversion"]),
            factor_dtype=factor_dtype,
            inverse_dtype=values["inverse_dtype"] or factor_dtype,
            kl_clip=group["kl_clip"],
        )

    def _all_layer_hp(self) -> dict[int, _LayerHP]:
        group_of = self._group_index()
        return {
            id(b): self._layer_hp(b, self.param_groups[group_of[id(b.weight)]]) for b in self.blocks
        }

    def _refresh_capture_settings(self) -> None:
        """Recompute the settings the hooks use until the next step."""
        self._capture_hp = self._all_layer_hp()

    # ------------------------------------------------------------------ capture callbacks
    def _capture_active(self, module: nn.Module) -> bool:
        if not (module.training and torch.is_grad_enabled()):
            return False
        block = self._block_of_module.get(id(module))
        if block is None:
            return False
        hp = self._capture_hp[id(block)]
        return self.state[block.weight].get("kfac_step", 0) % hp.factor_update_period == 0

    def _on_layer_forward(
        self, module: nn.Module, x: Tensor, output: Tensor
    ) -> GradCallback | None:
        block = self._block_of_module[id(module)]
        hp = self._capture_hp[id(block)]
        if not output.requires_grad:
            return None
        a_mean, n = block.input_statistic(x, output, hp.kfac_approx, hp.factor_dtype)
        if self.fisher_type is not FisherType.EMPIRICAL:
            index = len(self._pending_forward)
            self._pending_forward.append((block, output, a_mean, n, output._version))

            def on_sampled_grad(g: Tensor) -> None:
                # used only when the output was later modified in place (see _on_model_output)
                if self._sampled_grads is not None:
                    self._sampled_grads[index] = g

            return on_sampled_grad
        comm = self._comm

        def on_grad(g: Tensor) -> None:
            g_sum = block.grad_statistic(g, hp.kfac_approx, hp.factor_dtype)
            if comm is not None:
                comm.all_reduce_factor(a_mean)
                comm.all_reduce_factor(g_sum)
            block.add_statistics(a_mean, n, g_sum)

        return on_grad

    def _on_model_output(self, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() >= 1:
            self._entries_per_sample = output[0].numel()
        pending, self._pending_forward = self._pending_forward, []
        if not pending or not isinstance(output, Tensor) or not output.requires_grad:
            return
        # Monte-Carlo / type-2 backward passes from the model output to the layer outputs. If a
        # layer output was modified in place afterwards (ReLU(inplace=True)), differentiating
        # w.r.t. it would give the gradient of the modified value; then differentiate w.r.t. the
        # weights instead and read the layer-output gradients from the tensor hooks registered
        # in the forward pass, which see the values the layers produced.
        outputs = [entry[1] for entry in pending]
        modified = any(o._version != version for _, o, _, _, version in pending)
        weights = [e[0].weight for e in pending if e[0].weight.requires_grad]
        stats: list[list[Tensor]] = [[] for _ in pending]
        with torch.enable_grad():
            for grad_output in output_gradients(
                output, self.loss, self.fisher_type, self.mc_samples
            ):
                if modified:
                    self._sampled_grads = {}
                    try:
                        torch.autograd.grad(
                            output,
                            weights,
                            grad_outputs=grad_output,
                            retain_graph=True,
                            allow_unused=True,
                        )
                        grads = [self._sampled_grads.get(i) for i in range(len(pending))]
                    finally:
                        self._sampled_grads = None
                else:
                    grads = torch.autograd.grad(
                        output,
                        outputs,
                        grad_outputs=grad_output,
                        retain_graph=True,
                        allow_unused=True,
                    )
                for i, ((block, *_), g) in enumerate(zip(pending, grads)):
                    if g is not None:
                        hp = self._capture_hp[id(block)]
                        stats[i].append(block.grad_statistic(g, hp.kfac_approx, hp.factor_dtype))
        committed = [
            (block, a_mean, n, torch.stack(s).sum(0))
            for (block, _, a_mean, n, _), s in zip(pending, stats)
            if s
        ]
        comm = self._comm

        def commit(_: Tensor) -> None:
            # the user's backward reached the model output: this forward pass counts
            for block, a_mean, n, g_sum in committed:
                if comm is not None:
                    comm.all_reduce_factor(a_mean)
                    comm.all_reduce_factor(g_sum)
                block.add_statistics(a_mean, n, g_sum)

        output.register_hook(lambda grad: commit(grad))

    # ------------------------------------------------------------------ public helpers
    def remove_hooks(self) -> None:
        """Remove all capture hooks; afterwards every parameter gets the momentum-SGD update."""
        self._hooks.remove()
        self._hooks_removed = True
        for block in self.blocks:
            block.clear_statistics()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients and discard statistics captured since the last step."""
        super().zero_grad(set_to_none)
        self._pending_forward = []  # MC/type-2 forward passes whose model hook never ran
        for block in self.blocks:
            block.clear_statistics()

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over layers (reading them synchronises with the device)."""
        out = dict.fromkeys(
            (
                "steps",
                "factor_updates",
                "skipped_factor_updates",
                "inverse_updates",
                "fallback_inversions",
                "failed_inversions",
            ),
            0,
        )
        out["kfac_layers"] = len(self.blocks)
        for block in self.blocks:
            state = self.state.get(block.weight, {})
            out["steps"] = max(out["steps"], state.get("kfac_step", 0))
            for key in tuple(out)[1:6]:
                value = state.get(key, 0)
                out[key] += int(value.item()) if isinstance(value, Tensor) else int(value)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; curvature tensors keep their saved dtype (moved to the device)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        kept: dict[int, dict[str, Any]] = {}
        stripped = {**state_dict, "state": {}}
        for key, value in state_dict["state"].items():
            value = dict(value)
            kept[key] = {k: value.pop(k) for k in _CURVATURE_KEYS if k in value}
            stripped["state"][key] = value
        super().load_state_dict(stripped)
        for key, entries in kept.items():
            param = id_map.get(key)
            if param is not None:
                self.state[param].update(_to_device(entries, param.device))
        self._refresh_capture_settings()

    # ------------------------------------------------------------------ the algorithm
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimisation step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss; run under
                ``torch.enable_grad()`` before the update (its backward is captured as usual).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        layer_hp = self._all_layer_hp()
        blocks = [b for b in self.blocks if all(p.grad is not None for p in b.params)]
        if self._hooks_removed:
            blocks = []

        # 1. factors: finish the distributed averaging, then fold the batch statistics into the EMA
        if self._comm is not None and any(b.has_statistics for b in blocks):
            self._comm.wait_factors()
        grad_scale_amp = self._amp_scale()
        for block in blocks:
            if block.has_statistics:
                hp = layer_hp[id(block)]
                state = self.state[block.weight]
                block.update_factors(
                    state,
                    decay=hp.factor_decay,
                    grad_scale=self._grad_statistic_scale(block) * grad_scale_amp,
                )
                state["factor_updates"] = state.get("factor_updates", 0) + 1
        for block in self.blocks:
            block.clear_statistics()
        self._pending_forward = []

        # 2. inverses: every inverse_update_period steps (and as soon as first factors exist)
        due = [b for b in blocks if self._inverse_due(b, layer_hp[id(b)])]
        self._update_inverses(due, layer_hp)

        # 3. precondition the gradients of the Kronecker-factored layers
        directions = self._precondition(blocks, layer_hp)

        # 4. KL clipping (one factor per param group, from all preconditioned layers)
        nu = self._kl_clip_factors(directions, layer_hp)

        # 5. momentum-SGD update of every parameter (preconditioned direction where available)
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = directions.get(id(p))
                if d is None:
                    d = p.grad
                elif nu is not None and nu.get(index) is not None:
                    d = d * nu[index]
                self._sgd_update(p, d, group)

        # 6. advance the per-layer step counters; refresh the settings the hooks use
        for block in blocks:
            state = self.state[block.weight]
            state["kfac_step"] = state.get("kfac_step", 0) + 1
        self._refresh_capture_settings()
        return loss

    # ------------------------------------------------------------------ step stages
    def _grad_statistic_scale(self, block: KroneckerBlock) -> float:
        """Multiplier turning the captured gradient sum into ``G`` (module docstring of blocks)."""
        r = reduction_scale(
            self.loss, self.loss_reduction, block._samples, self._entries_per_sample
        )
        if self.fisher_type is FisherType.EMPIRICAL:
            return 1.0 / r
        if self.fisher_type is FisherType.MC:
            return r / self.mc_samples
        return r

    def _amp_scale(self) -> float:
        """Return ``1/scale²`` of an enabled GradScaler (its scale multiplies every gradient)."""
        scaler = self.grad_scaler
        if (
            self.fisher_type is not FisherType.EMPIRICAL
            or scaler is None
            or not scaler.is_enabled()
        ):
            return 1.0
        return 1.0 / scaler.get_scale() ** 2

    def _inverse_due(self, block: KroneckerBlock, hp: _LayerHP) -> bool:
        state = self.state[block.weight]
        if "A" not in state:
            return False
        if "inverse" not in state or state.get("inverse_kind") != hp.inversion.value:
            return True
        return state.get("kfac_step", 0) % hp.inverse_update_period == 0

    def _update_inverses(self, due: list[KroneckerBlock], layer_hp: dict[int, _LayerHP]) -> None:
        comm = self._comm
        if comm is not None and not self._assigned:
            comm.assign({b.name: b.inversion_cost() for b in self.blocks})
            self._assigned = True
        for block in due:
            hp = layer_hp[id(block)]
            state = self.state[block.weight]
            owner = comm is None or comm.owner(block.name) == comm.rank
            if owner:
                block.update_inverses(
                    state, inversion=hp.inversion, damping=hp.damping, dtype=hp.inverse_dtype
                )
            if comm is not None and self.distributed_strategy is DistributedStrategy.REPLICATE:
                if "inverse" not in state or state.get("inverse_kind") != hp.inversion.value:
                    state["inverse"] = _empty_inverse(block, hp)
                    state["inverse_kind"] = hp.inversion.value
                # Cholesky inverses are symmetric matrices: only upper triangles travel
                comm.broadcast(
                    block.name,
                    state["inverse"],
                    symmetric=hp.inversion is linalg.Inversion.CHOLESKY,
                )
        if comm is not None and due and self.distributed_strategy is DistributedStrategy.REPLICATE:
            comm.wait_broadcasts()

    def _precondition(
        self, blocks: list[KroneckerBlock], layer_hp: dict[int, _LayerHP]
    ) -> dict[int, Tensor]:
        """Preconditioned gradients keyed by ``id(param)`` (layers without inverse: absent)."""
        comm = self._comm
        shard = comm is not None and self.distributed_strategy is DistributedStrategy.SHARD
        directions: dict[int, Tensor] = {}
        for block in blocks:
            hp = layer_hp[id(block)]
            state = self.state[block.weight]
            grads = [p.grad for p in block.params]
            if shard:
                if comm.owner(block.name) == comm.rank:
                    # same memory layout as the receivers' buffers: reductions over these
                    # tensors (KL clip) then round identically and replicas stay bitwise equal
                    result = self._precondition_block(block, state, grads, hp)
                    out = [torch.empty_like(g).copy_(d) for g, d in zip(grads, result)]
                else:
                    # "shard": only the owner keeps an inverse (drops one loaded from a full
                    # checkpoint, which would never be updated here)
                    state.pop("inverse", None)
                    out = [torch.empty_like(g) for g in grads]
                comm.broadcast(block.name, out)
            elif "inverse" in state:
                out = self._precondition_block(block, state, grads, hp)
            else:
                continue
            for p, d in zip(block.params, out):
                directions[id(p)] = d
        if shard and blocks:
            comm.wait_broadcasts()
        return directions

    @staticmethod
    def _precondition_block(
        block: KroneckerBlock, state: dict, grads: list[Tensor], hp: _LayerHP
    ) -> list[Tensor]:
        if "inverse" not in state:
            return [g.clone() for g in grads]
        out = block.precondition(state, grads, damping=hp.damping)
        # factors never saw a finite batch: plain gradient (a device-side choice, no sync; a CPU
        # flag is read directly, which saves the select pass)
        valid = state["factors_valid"]
        if valid.device.type == "cpu":
            return out if bool(valid) else [g.clone() for g in grads]
        return [torch.where(valid, d, g) for d, g in zip(out, grads)]

    def _kl_clip_factors(
        self, directions: dict[int, Tensor], layer_hp: dict[int, _LayerHP]
    ) -> dict[int, Tensor] | None:
        if not directions:
            return None
        vg_sum = None
        for block in self.blocks:
            hp = layer_hp[id(block)]
            for p in block.params:
                d = directions.get(id(p))
                if d is None:
                    continue
                term = (d * p.grad).sum() * hp.lr**2
                vg_sum = term if vg_sum is None else vg_sum + term
        if vg_sum is None:
            return None
        tiny = torch.finfo(vg_sum.dtype).tiny
        factors: dict[int, Tensor] = {}
        for index, group in enumerate(self.param_groups):
            kl_clip = group["kl_clip"]
            if kl_clip is None:
                continue
            factors[index] = (kl_clip / vg_sum.abs().clamp_min(tiny)).sqrt().clamp(max=1.0)
        return factors

    def _sgd_update(self, p: Tensor, d: Tensor, group: Mapping[str, Any]) -> None:
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()
            else:
                buf.mul_(momentum).add_(d)
            d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(d, alpha=-group["lr"])


# ---------------------------------------------------------------------------------- helpers
def _validate_layer_settings(
    settings: Mapping[str, Mapping[str, Any] | str] | None,
) -> dict[str, Mapping[str, Any] | str]:
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"Invalid layer_settings value: {settings!r} (must be a dict pattern -> dict | 'skip')"
        )
    out: dict[str, Mapping[str, Any] | str] = {}
    for pattern, setting in settings.items():
        if isinstance(setting, str):
            if setting != "skip":
                raise ValueError(
                    f"Invalid layer_settings value for {pattern!r}: {setting!r} "
                    "(allowed: 'skip' or a dict of overrides)"
                )
            out[pattern] = setting
            continue
        if not isinstance(setting, Mapping):
            raise ValueError(
                f"Invalid layer_settings value for {pattern!r}: {setting!r} "
                "(allowed: 'skip' or a dict of overrides)"
            )
        unknown = sorted(set(setting) - set(_LAYER_KEYS))
        if unknown:
            raise ValueError(
                f"Invalid layer_settings key for {pattern!r}: {unknown[0]!r} "
                f"(allowed: {', '.join(_LAYER_KEYS)})"
            )
        _validate_hyperparameters(setting)
        setting = dict(setting)
        for key, cls in (("kfac_approx", KFACApprox), ("inversion", linalg.Inversion)):
            if key in setting:
                setting[key] = _enum(cls, key, setting[key]).value
        out[pattern] = setting
    return out


def _get_communicator(strategy: str, bucket_cap_mb: float):
    """Return the distributed communicator, or ``None`` for single-process training."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        from kfac_tn.distributed import get_communicator
    except ImportError:
        return None
    return get_communicator(bucket_cap_mb=bucket_cap_mb, strategy=strategy)


def _empty_inverse(block: KroneckerBlock, hp: _LayerHP) -> list[Tensor]:
    """Allocate receive buffers for a broadcast inverse (see :func:`linalg.compute_inverse`)."""
    d_a, d_g = block.dims
    kw = dict(dtype=hp.inverse_dtype, device=block.weight.device)
    g = block.groups
    if hp.inversion is linalg.Inversion.EIGEN:
        return [
            torch.zeros(g, d_a, **kw),
            torch.zeros(g, d_a, d_a, **kw),
            torch.zeros(g, d_g, **kw),
            torch.zeros(g, d_g, d_g, **kw),
        ]
    return [torch.zeros(g, d_a, d_a, **kw), torch.zeros(g, d_g, d_g, **kw)]


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
