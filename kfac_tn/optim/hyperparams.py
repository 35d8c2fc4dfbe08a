"""Hyperparameters of :class:`kfac_tn.KFAC`: one rule per setting, layer overrides, resolution.

Every setting is defined here once. The optimizer validates its constructor arguments, param
groups and ``layer_settings`` with :func:`validate` / :func:`validate_layer_settings` (raising
``ValueError("Invalid <name> value: <value> (allowed: ...)")`` on the first problem); the
configuration front end lists *all* problems of a config with :func:`problems` /
:func:`layer_settings_problems` and formats them with its own key paths. Both read the same
:data:`RULES`, so they cannot disagree.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kfac_tn.enums import (
    BudgetCosts,
    Choice,
    DistributedStrategy,
    DtypeName,
    FisherType,
    Inversion,
    KFACApprox,
    LossReduction,
    LossType,
    NormBlock,
    Preconditioner,
    QModel,
    QModelJvp,
    StepSize,
)

__all__ = [
    "DEFAULT_PERIODS",
    "KFAC_KEYS",
    "LAYER_KEYS",
    "RULES",
    "START_DAMPING",
    "Dtype",
    "Flag",
    "LayerHP",
    "Number",
    "OneOf",
    "Problem",
    "auto_inversion",
    "layer_override",
    "layer_settings_problems",
    "normalized",
    "problems",
    "resolve_layer_hp",
    "validate",
    "validate_layer_settings",
]


# ---------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Number:
    """A finite real (or integer) in a range; ``nullable`` also admits ``None``."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` satisfies the rule (bools are not numbers)."""
        if value is None:
            return self.nullable
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def allowed(self) -> str:
        """E.g. ``'> 0'``, ``'[0, 1)'``, ``'an int >= 1'``, ``'> 0 or null'``."""
        low = _fmt(self.low)
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {low}"
        else:
            text = f"{'(' if self.low_open else '['}{low}, {_fmt(self.high)}"
            text += ")" if self.high_open else "]"
        if self.integer:
            text = f"an int {text}" if self.high == math.inf else f"an int in {text}"
        return f"{text} or null" if self.nullable else text


@dataclass(frozen=True)
class OneOf:
    """One of a :class:`~kfac_tn.enums.Choice` enum's values (or a member).

    ``nullable`` also admits ``None``.
    """

    choices: type[Choice]
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is a member or the value of one (or ``None`` if nullable)."""
        if value is None:
            return self.nullable
        try:
            self.choices(value)
        except ValueError:
            return False
        return True

    @property
    def allowed(self) -> str:
        """The quoted values (and ``None`` if nullable)."""
        return self.choices.allowed() + (", None" if self.nullable else "")


@dataclass(frozen=True)
class Flag:
    """``True`` or ``False``."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is a bool."""
        return isinstance(value, bool)

    @property
    def allowed(self) -> str:
        """``'True, False'``."""
        return "True, False"


@dataclass(frozen=True)
class Dtype:
    """``None`` or a floating torch dtype (``torch.float32``, ...); names are not accepted."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is ``None`` or one of the :class:`~kfac_tn.enums.DtypeName` dtypes."""
        return value is None or value in _FLOAT_DTYPES

    @property
    def allowed(self) -> str:
        """``'None, torch.float32, ...'``."""
        return "None, " + ", ".join(f"torch.{d.value}" for d in DtypeName)


Rule = Number | OneOf | Flag | Dtype
_FLOAT_DTYPES = tuple(getattr(torch, d.value) for d in DtypeName)

RULES: dict[str, Rule] = {
    "lr": Number(0.0),
    "momentum": Number(0.0, 1.0, high_open=True),
    "nesterov": Flag(),
    "weight_decay": Number(0.0),
    "damping": Number(0.0, low_open=True, nullable=True),
    "factor_decay": Number(0.0, 1.0, high_open=True),
    "factor_update_period": Number(1, integer=True, nullable=True),
    "inverse_update_period": Number(1, integer=True, nullable=True),
    "curvature_budget": Number(0.0, 1.0, low_open=True, high_open=True, nullable=True),
    "budget_costs": OneOf(BudgetCosts),
    "eigenbasis_tolerance": Number(0.0, 1.0),
    "kfac_approx": OneOf(KFACApprox),
    "fisher_type": OneOf(FisherType),
    "mc_samples": Number(1, integer=True),
    "loss": OneOf(LossType),
    "loss_reduction": OneOf(LossReduction),
    "inversion": OneOf(Inversion, nullable=True),
    "preconditioner": OneOf(Preconditioner),
    "norm_block": OneOf(NormBlock),
    "kl_clip": Number(0.0, low_open=True, nullable=True),
    "factor_dtype": Dtype(),
    "inverse_dtype": Dtype(),
    "distributed_strategy": OneOf(DistributedStrategy),
    "bucket_cap_mb": Number(0.0, low_open=True),
    "damping_adaptation": Flag(),
    "damping_adaptation_period": Number(1, integer=True),
    "damping_adaptation_decay": Number(0.0, 1.0, low_open=True, high_open=True),
    "min_damping": Number(0.0, low_open=True, nullable=True),
    "max_damping": Number(0.0, low_open=True),
    "qmodel": OneOf(QModel),
    "step_size": OneOf(StepSize),
    "max_step_scale": Number(0.0, low_open=True),
    "qmodel_samples": Number(1, integer=True, nullable=True),
    "qmodel_jvp": OneOf(QModelJvp),
}
"""The rule of every hyperparameter the optimizer validates."""

KFAC_KEYS: tuple[str, ...] = tuple(k for k in RULES if k not in ("loss", "loss_reduction"))
"""Constructor keywords a training config sets (``loss``/``loss_reduction`` follow the task),
besides ``layer_settings``."""

LAYER_KEYS: tuple[str, ...] = (
    "damping",
    "factor_decay",
    "factor_update_period",
    "inverse_update_period",
    "eigenbasis_tolerance",
    "kfac_approx",
    "inversion",
    "preconditioner",
    "norm_block",
    "factor_dtype",
    "inverse_dtype",
)
"""Hyperparameters a ``layer_settings`` entry may override (besides the value ``"skip"``)."""

START_DAMPING: dict[str, float] = {StepSize.QMODEL.value: 1e-4, StepSize.FIXED.value: 1e-3}
"""Start ``damping`` of a group whose ``damping`` is ``None`` (the default), by ``step_size``:
the quadratic-model scale and the KL clip bound the step, so a small damping pays (fewer epochs);
a fixed step has only the KL clip, and 1e-4 collapsed the digits CNN with it (see
:mod:`kfac_tn.optim.damping`)."""

DEFAULT_PERIODS: tuple[int, int] = (1, 10)
"""``(factor_update_period, inverse_update_period)`` of a layer whose periods are ``None``
(automatic) when no ``curvature_budget`` chooses them (and while the budget is still measuring)."""

# names in messages, as torch.optim spells them
_LABELS = {"lr": "learning rate"}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Problem:
    """One invalid setting.

    Attributes:
        key: The setting's key, e.g. ``"damping"`` (``""`` for a whole ``layer_settings`` entry).
        value: The offending value.
        reason: ``"out of range"``, ``"unknown key"``, ``"not an override"``, ``"not a mapping"``,
            ``"needs momentum > 0"`` or ``"needs inversion='eigen'"``.
        allowed: What would be accepted.
        pattern: The ``layer_settings`` pattern the problem is in, or ``None``.
    """

    key: str
    value: Any
    reason: str
    allowed: str
    pattern: str | None = None


def problems(hp: Mapping[str, Any]) -> list[Problem]:
    """All invalid known settings in ``hp`` (unknown keys are ignored), in ``hp``'s order.

    Args:
        hp: Hyperparameter values by key (a param group, constructor arguments, a config).

    Returns:
        One :class:`Problem` per invalid value, plus the cross-key ones: Nesterov momentum
        without momentum, ``min_damping > max_damping``, EKFAC without eigendecompositions.
    """
    out = [
        Problem(key, value, "out of range", RULES[key].allowed)
        for key, value in hp.items()
        if key in RULES and not RULES[key].accepts(value)
    ]
    momentum = hp.get("momentum", 0.0)
    if hp.get("nesterov") is True and RULES["momentum"].accepts(momentum) and momentum <= 0:
        out.append(Problem("nesterov", True, "needs momentum > 0", f"momentum={momentum}"))
    low, high = hp.get("min_damping"), hp.get("max_damping")
    valid = RULES["min_damping"].accepts(low) and RULES["max_damping"].accepts(high)
    if valid and low is not None and low > high:
        out.append(Problem("max_damping", high, "below min_damping", f">= {low}"))
    out.extend(_ekfac_problems(hp))
    return out


def _ekfac_problems(hp: Mapping[str, Any]) -> list[Problem]:
    """EKFAC rescales in the Kronecker eigenbasis: it needs ``inversion="eigen"``."""
    pre, inv = hp.get("preconditioner"), hp.get("inversion")
    if inv is None:  # eigen for EKFAC layers (auto_inversion)
        return []
    if not (RULES["preconditioner"].accepts(pre) and RULES["inversion"].accepts(inv)):
        return []
    if Preconditioner(pre) is Preconditioner.EKFAC and Inversion(inv) is not Inversion.EIGEN:
        return [
            Problem("preconditioner", "ekfac", _NEEDS_EIGEN, f"inversion={Inversion(inv).value!r}")
        ]
    return []


_NEEDS_EIGEN = "needs inversion='eigen'"


def layer_settings_problems(settings: Any) -> list[Problem]:
    """All problems of a ``layer_settings`` value (``{pattern: {key: value} | "skip"}``).

    Args:
        settings: The value to check (``None`` is valid: no overrides).

    Returns:
        Problems carrying their ``pattern`` (``key=""`` for a bad entry).
    """
    if settings is None:
        return []
    if not isinstance(settings, Mapping):
        return [Problem("", settings, "not a mapping", "a dict pattern -> dict | 'skip'")]
    out: list[Problem] = []
    for pattern, setting in settings.items():
        if isinstance(setting, str) and setting == "skip":
            continue
        if not isinstance(setting, Mapping):
            allowed = "'skip' or a dict of overrides"
            out.append(Problem("", setting, "not an override", allowed, pattern))
            continue
        for key, value in setting.items():
            if key not in LAYER_KEYS:
                allowed = ", ".join(LAYER_KEYS)
                out.append(Problem(key, value, "unknown key", allowed, pattern))
            elif key == "damping" and value is None:  # None means "by step_size": groups only
                out.append(Problem(key, value, "not a number", "a number > 0", pattern))
        for p in problems({k: v for k, v in setting.items() if k in LAYER_KEYS}):
            out.append(Problem(p.key, p.value, p.reason, p.allowed, pattern))
    return out


def _error(problem: Problem) -> ValueError:
    """Build the optimizer's error for one problem (torch.optim style)."""
    pattern = problem.pattern
    if pattern is not None and problem.reason == "not an override":
        text = f"Invalid layer_settings value for {pattern!r}: {problem.value!r}"
        return ValueError(f"{text} (allowed: {problem.allowed})")
    if pattern is not None and problem.reason == "unknown key":
        text = f"Invalid layer_settings key for {pattern!r}: {problem.key!r}"
        return ValueError(f"{text} (allowed: {problem.allowed})")
    name = _LABELS.get(problem.key, problem.key or "layer_settings")
    if problem.reason == "needs momentum > 0":
        return ValueError(f"Invalid {name} value: True needs momentum > 0 ({problem.allowed})")
    if problem.reason == _NEEDS_EIGEN:
        where = f" for {pattern!r}" if pattern is not None else ""
        return ValueError(
            f"Invalid {name} value{where}: 'ekfac' {_NEEDS_EIGEN} (got {problem.allowed})"
        )
    return ValueError(f"Invalid {name} value: {problem.value!r} (allowed: {problem.allowed})")


def validate(hp: Mapping[str, Any]) -> None:
    """Raise on the first invalid known setting in ``hp``.

    Raises:
        ValueError: ``Invalid <name> value: <value> (allowed: ...)``.
    """
    found = problems(hp)
    if found:
        raise _error(found[0])


def validate_layer_settings(settings: Any) -> dict[str, Mapping[str, Any] | str]:
    """Check ``layer_settings`` and return it normalised (enum values as strings).

    Raises:
        ValueError: On the first problem, naming the pattern and the key.
    """
    found = layer_settings_problems(settings)
    if found:
        raise _error(found[0])
    out: dict[str, Mapping[str, Any] | str] = {}
    for pattern, setting in (settings or {}).items():
        if isinstance(setting, str):
            out[pattern] = setting
        else:
            out[pattern] = {k: _normalized(k, v) for k, v in setting.items()}
    return out


def normalized(hp: Mapping[str, Any]) -> dict[str, Any]:
    """``hp`` with choice values as plain strings (``KFACApprox.REDUCE`` -> ``"reduce"``)."""
    return {k: _normalized(k, v) for k, v in hp.items()}


def _normalized(key: str, value: Any) -> Any:
    rule = RULES.get(key)
    return rule.choices(value).value if isinstance(rule, OneOf) and value is not None else value


# ---------------------------------------------------------------------------------- resolution
def layer_override(
    name: str, settings: Mapping[str, Mapping[str, Any] | str]
) -> Mapping[str, Any] | str | None:
    """Return the first ``layer_settings`` entry whose fnmatch pattern matches ``name``."""
    for pattern, setting in settings.items():
        if fnmatch.fnmatchcase(name, pattern):
            return setting
    return None


@dataclass(frozen=True)
class LayerHP:
    """Hyperparameters of one layer for one step (group values with layer overrides applied).

    ``factor_update_period`` / ``inverse_update_period`` are the effective periods; which of
    them were set explicitly (and so are never changed by ``curvature_budget``) is in
    ``explicit_periods`` (``None``: automatic).
    """

    lr: float
    damping: float
    factor_decay: float
    factor_update_period: int
    inverse_update_period: int
    kfac_approx: KFACApprox
    inversion: Inversion
    factor_dtype: torch.dtype
    inverse_dtype: torch.dtype
    kl_clip: float | None
    preconditioner: Preconditioner = Preconditioner.KFAC
    norm_block: NormBlock = NormBlock.UNITWISE
    configured_factor_dtype: torch.dtype | None = None  # None: follow the parameters
    eigenbasis_tolerance: float = 0.0
    explicit_periods: tuple[int | None, int | None] = (None, None)

    def factor_dtype_for(self, param_dtype: torch.dtype) -> torch.dtype:
        """Return the factor dtype for parameters of ``param_dtype`` (it may change: model.to)."""
        return self.configured_factor_dtype or default_factor_dtype(param_dtype)


def default_factor_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Float32 for half-precision parameters, else the parameters' dtype."""
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


def auto_inversion(values: Mapping[str, Any]) -> Inversion:
    """Return a layer's inversion: its ``inversion``, or for ``None`` (the default) a choice.

    The choice is Cholesky unless something needs the eigenbasis (``preconditioner="ekfac"``,
    ``eigenbasis_tolerance > 0``).

    Why Cholesky by default: on the race benchmark (CPU, 1 thread, lr 0.01-0.3) it cut KFAC's
    mean time to target by 30% (digits), 43% (MNIST) and 27% (autoencoder) against ``"eigen"``
    (two GEMMs per step instead of four, a Cholesky factorisation instead of ``eigh``), and the
    robustness grid (10 seeds x 8 setups) passed as with ``"eigen"`` (worst drop 0.014 against
    0.008). ``"eigen"`` keeps the exact damping of ``A ⊗ G``; ``"cholesky"`` damps each factor
    (π-damping).

    Args:
        values: The layer's resolved settings (``inversion``, ``preconditioner``,
            ``eigenbasis_tolerance``).

    Returns:
        :attr:`Inversion.EIGEN` or :attr:`Inversion.CHOLESKY`.
    """
    if values["inversion"] is not None:
        return Inversion(values["inversion"])
    needs_basis = Preconditioner(values["preconditioner"]) is Preconditioner.EKFAC
    needs_basis = needs_basis or float(values["eigenbasis_tolerance"]) > 0
    return Inversion.EIGEN if needs_basis else Inversion.CHOLESKY


def resolve_layer_hp(
    group: Mapping[str, Any], override: Mapping[str, Any] | None, param_dtype: torch.dtype
) -> LayerHP:
    """Combine a param group's values with a layer's override.

    Args:
        group: The param group of the layer's weight.
        override: The layer's ``layer_settings`` entry (resolved once per layer), or ``None``.
        param_dtype: The layer weight's dtype (the default factor dtype: float32 for
            half-precision parameters, else theirs).

    Returns:
        The :class:`LayerHP`.

    Raises:
        ValueError: If the combined values conflict (``preconditioner="ekfac"`` of the override
            with the group's ``inversion="cholesky"``, or vice versa).
    """
    values = {k: group[k] for k in LAYER_KEYS}
    if override:
        values.update(override)
    found = _ekfac_problems(values)
    if found:
        raise _error(found[0])
    factor_dtype = values["factor_dtype"] or default_factor_dtype(param_dtype)
    explicit = tuple(
        None if values[k] is None else int(values[k])
        for k in ("factor_update_period", "inverse_update_period")
    )
    return LayerHP(
        lr=group["lr"],
        damping=values["damping"],
        factor_decay=values["factor_decay"],
        factor_update_period=DEFAULT_PERIODS[0] if explicit[0] is None else explicit[0],
        inverse_update_period=DEFAULT_PERIODS[1] if explicit[1] is None else explicit[1],
        kfac_approx=KFACApprox(values["kfac_approx"]),
        inversion=auto_inversion(values),
        factor_dtype=factor_dtype,
        inverse_dtype=values["inverse_dtype"] or factor_dtype,
        kl_clip=group["kl_clip"],
        preconditioner=Preconditioner(values["preconditioner"]),
        norm_block=NormBlock(values["norm_block"]),
        configured_factor_dtype=values["factor_dtype"],
        eigenbasis_tolerance=float(values["eigenbasis_tolerance"]),
        explicit_periods=explicit,  # type: ignore[arg-type]
    )
