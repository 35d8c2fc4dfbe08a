"""Typed training configuration: dataclass schema, YAML loading, dotted overrides, validation.

The schema's defaults *are* the offline default run (`kfac-tn train` with no config file): a small
CNN on scikit-learn's 8x8 digits trained with KFAC. ``configs/digits_kfac.yaml`` spells the same
values out (a test keeps both identical).

Validation happens before any work and reports every problem at once, each as
``section.key: <value> <what is wrong>; allowed: ...``. YAML is read with ``yaml.safe_load`` only.
The ``optimizer:`` section maps one to one onto the keyword arguments of :class:`kfac_tn.KFAC`
(except ``loss``/``loss_reduction``, which follow from the task: cross-entropy for classifiers,
MSE for the autoencoder, both with mean reduction), and onto ``torch.optim.SGD``/``Adam``/``AdamW``.
Its choices are the library's enums (:mod:`kfac_tn.enums`) and the KFAC keys' ranges and
``layer_settings`` checks are the optimizer's own rules (:mod:`kfac_tn.optim.hyperparams`), so
the config accepts exactly what the optimizer accepts.

Overrides (``dotted.key=value``) apply left to right; ``SECTION=NAME`` selects a config group
(:func:`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from kfac_tn.enums import (
    BudgetCosts,
    Choice,
    DistributedStrategy,
    DtypeName,
    FisherType,
    Inversion,
    KFACApprox,
    NormBlock,
    Preconditioner,
    QModel,
    QModelJvp,
    StepSize,
)
from kfac_tn.optim import hyperparams
from kfac_tn.optim.hyperparams import Number

__all__ = [
    "BUILTIN_MODELS",
    "ConfigError",
    "DataConfig",
    "DataName",
    "DuplicateKeyError",
    "GROUPS",
    "Distributed",
    "ModelConfig",
    "OptimizerConfig",
    "OptimizerName",
    "Precision",
    "SampledBackpropConfig",
    "ScheduleConfig",
    "ScheduleName",
    "TrainConfig",
    "WIDTH_RESNETS",
    "apply_overrides",
    "config_from_dict",
    "config_reference",
    "config_to_dict",
    "kfac_arguments",
    "load_config",
    "parse_override",
    "read_yaml",
    "safe_load_yaml",
    "save_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names each bad key, its value and what is allowed."""


class DataName(Choice):
    """Data sets: offline digits, CIFAR (python-pickle format), ImageNet (ImageFolder), FakeData."""

    DIGITS = "digits"
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    IMAGENET = "imagenet"
    FAKE = "fake"


class OptimizerName(Choice):
    """Optimizers."""

    KFAC = "kfac"
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class ScheduleName(Choice):
    """Learning-rate schedules (stepped every iteration; ``warmup_epochs`` applies to all)."""

    NONE = "none"
    COSINE = "cosine"
    STEP = "step"
    MULTISTEP = "multistep"
    ONECYCLE = "onecycle"


class Precision(Choice):
    """Forward/backward precision: fp32, bf16 autocast, or fp16 autocast with a GradScaler."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Distributed(Choice):
    """Multi-process training: off, or DistributedDataParallel launched by torchrun."""

    OFF = "off"
    DDP = "ddp"


class SampleAxis(Choice):
    """Leg sampled by randomized backpropagation in the weight VJP."""

    SPATIAL = "spatial"
    CHANNEL = "channel"


BUILTIN_MODELS: tuple[str, ...] = ("digits_cnn", "2c2d", "3c3d", "allcnnc", "autoencoder")
"""Models defined in :mod:`kfac_tn.models`; any torchvision classification model name works too."""

WIDTH_RESNETS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
"""torchvision ResNets that accept ``model.width`` and ``model.cifar_stem``."""


@dataclasses.dataclass
class ModelConfig:
    """Network.

    Attributes:
        name: a built-in model (``digits_cnn``, ``2c2d``, ``3c3d``, ``allcnnc``, ``autoencoder``)
            or a torchvision classification model name (``resnet18``, ``resnet50``, ...).
        width: channel multiplier (1.0 = the published architecture); for torchvision only
            ResNets (resnet18/34/50/101/152) support values other than 1.0 (their stem keeps 64).
        cifar_stem: torchvision ResNets: replace the 7x7/s2 stem and max-pool by a 3x3/s1 conv.
        dropout: dropout probability for models that have dropout (All-CNN-C uses 0.2 on the
            input and 0.5 after the stride-2 convs when ``dropout`` is 0.5).
    """

    name: str = "digits_cnn"
    width: float = 1.0
    cifar_stem: bool = False
    dropout: float = 0.0


@dataclasses.dataclass
class DataConfig:
    """Data set and loading.

    Attributes:
        name: data set.
        root: directory of CIFAR (``cifar-10-batches-py``/``cifar-100-python`` inside) or
            ImageNet (``train/`` and ``val/`` class folders inside); unused for digits/fake.
        download: download CIFAR into ``root`` if it is missing (needs internet).
        image_size: side length the images are resized/cropped to (``None``: the data set's own;
            digits default 8, ImageNet 224, fake 32).
        augment: standard training augmentation (CIFAR: random crop with 4-pixel padding and
            horizontal flip; ImageNet: random-resized crop and flip; digits: none).
        num_workers: DataLoader worker processes.
        train_subset: use only the first N training examples (``None``: all).
        test_subset: use only the first N test examples (``None``: all).
        limit_batches: stop each training epoch after this many batches (``None``: no limit).
        fake_train_size: number of FakeData training images.
        fake_test_size: number of FakeData test images.
        fake_num_classes: number of FakeData classes.
    """

    name: DataName = DataName.DIGITS
    root: str | None = None
    download: bool = False
    image_size: int | None = None
    augment: bool = True
    num_workers: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    limit_batches: int | None = None
    fake_train_size: int = 512
    fake_test_size: int = 128
    fake_num_classes: int = 10


@dataclasses.dataclass
class OptimizerConfig:
    """Optimizer and its hyperparameters (keys map one to one onto the constructor arguments).

    Keys marked (kfac) only apply to ``name: kfac``; ``betas``, ``eps`` and ``amsgrad`` only to
    Adam/AdamW; ``dampening`` only to SGD. Setting a key that does not apply is an error.
    """

    name: OptimizerName = OptimizerName.KFAC
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    dampening: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    damping: float | None = None
    factor_decay: float = 0.95
    factor_update_period: int | None = None
    inverse_update_period: int | None = None
    curvature_budget: float | None = 0.4
    budget_costs: BudgetCosts = BudgetCosts.MODEL
    eigenbasis_tolerance: float = 0.0
    kfac_approx: KFACApprox = KFACApprox.EXPAND
    fisher_type: FisherType = FisherType.EMPIRICAL
    mc_samples: int = 1
    inversion: Inversion | None = None
    preconditioner: Preconditioner = Preconditioner.KFAC
    norm_block: NormBlock = NormBlock.UNITWISE
    kl_clip: float | None = 1e-3
    factor_dtype: DtypeName | None = None
    inverse_dtype: DtypeName | None = None
    layer_settings: dict[str, Any] | None = None
    distributed_strategy: DistributedStrategy = DistributedStrategy.REPLICATE
    bucket_cap_mb: float = 25.0
    damping_adaptation: bool = True
    damping_adaptation_period: int = 5
    damping_adaptation_decay: float = 0.9
    min_damping: float | None = None
    max_damping: float = 1e3
    qmodel: QModel = QModel.KRONECKER
    step_size: StepSize = StepSize.QMODEL
    max_step_scale: float = 1.0
    qmodel_samples: int | None = 64
    qmodel_jvp: QModelJvp = QModelJvp.AUTO


KFAC_KEYS: tuple[str, ...] = tuple(
    f.name
    for f in dataclasses.fields(OptimizerConfig)
    if f.name in hyperparams.KFAC_KEYS or f.name == "layer_settings"
)
"""Keys passed to :class:`kfac_tn.KFAC` (``loss``/``loss_reduction`` come from the task): the
optimizer's :data:`~kfac_tn.optim.hyperparams.KFAC_KEYS` and ``layer_settings``, in schema order."""

KFAC_LAYER_KEYS: tuple[str, ...] = hyperparams.LAYER_KEYS
"""Keys an ``optimizer.layer_settings`` entry may override (besides the value ``skip``)."""

OPTIMIZER_KEYS: dict[OptimizerName, tuple[str, ...]] = {
    OptimizerName.KFAC: KFAC_KEYS,
    OptimizerName.SGD: ("lr", "momentum", "nesterov", "weight_decay", "dampening"),
    OptimizerName.ADAM: ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    OptimizerName.ADAMW: ("lr", "betas", "eps", "weight_decay", "amsgrad"),
}
"""Which ``optimizer.*`` keys each optimizer takes (``name`` aside)."""


_OPTIMIZER_DOCS: dict[str, str] = {
    "name": "optimizer: ``kfac`` (kfac_tn.KFAC), ``sgd``, ``adam``, ``adamw`` (torch.optim). "
    "The override ``optimizer=NAME`` selects NAME with every other key at its default.",
    "lr": "base learning rate (multiplied by the schedule).",
    "momentum": "heavy-ball momentum.",
    "nesterov": "Nesterov momentum.",
    "weight_decay": "L2 coefficient (KFAC: added after preconditioning; AdamW: decoupled).",
    "dampening": "SGD momentum dampening.",
    "betas": "Adam moment coefficients.",
    "eps": "Adam denominator epsilon.",
    "amsgrad": "AMSGrad variant.",
    "damping": "Tikhonov damping of the Kronecker blocks (start value; null: 1e-4 with "
    "``step_size: qmodel``, 1e-3 with ``fixed``).",
    "factor_decay": "EMA coefficient of the Kronecker factors.",
    "factor_update_period": "update the factors every N steps (null: chosen by "
    "``curvature_budget``, else 1).",
    "inverse_update_period": "recompute the inverses every N steps, each layer on its own phase "
    "(null: chosen by ``curvature_budget``, else 10).",
    "curvature_budget": "fraction of a step's work curvature work may take; the null periods "
    "are chosen per layer to keep it, never costing more than fixed periods 1/10 "
    "(null: fixed periods 1/10).",
    "budget_costs": "what the budget plans with: ``model`` (work from the layer shapes, chosen "
    "once: reproducible) or ``measured`` (timed steps: follows the machine, adapts).",
    "eigenbasis_tolerance": "keep a layer's previous eigenbasis (after one QR iteration) while "
    "its relative off-diagonal mass stays below this (0: a full eigh every inverse update).",
    "kfac_approx": "``expand`` (KFC) or ``reduce`` (cheaper, Eschenhagen et al. 2023).",
    "fisher_type": "``empirical`` (your loss' gradients), ``mc`` (sampled labels), ``type2``.",
    "mc_samples": "Monte-Carlo samples per factor update (``fisher_type: mc``).",
    "inversion": "``eigen`` (exact damping) or ``cholesky`` (pi-damping, faster); null: "
    "cholesky, eigen where EKFAC or ``eigenbasis_tolerance`` needs the eigenbasis.",
    "preconditioner": "``kfac`` or ``ekfac`` (eigenvalues re-estimated from per-sample "
    "gradients; needs ``inversion: eigen``).",
    "norm_block": "norm layers' scale/shift: ``unitwise`` (2x2 per channel), ``diagonal``, "
    "``skip`` (momentum SGD).",
    "kl_clip": "KL-clipping bound of the update (null disables).",
    "factor_dtype": "dtype of the factors (null: float32 for half-precision params, else theirs).",
    "inverse_dtype": "dtype of the inverses (null: the factor dtype).",
    "layer_settings": "fnmatch pattern on module name -> ``{key: value}`` or ``skip``; keys: "
    + ", ".join(KFAC_LAYER_KEYS)
    + "; ``skip`` trains the layer with momentum SGD.",
    "distributed_strategy": "``replicate`` (all ranks hold all inverses) or ``shard``.",
    "bucket_cap_mb": "bucket size of the factor all-reduce (DDP).",
    "damping_adaptation": "adapt the damping by the Levenberg-Marquardt rule (``damping`` is "
    "the start value).",
    "damping_adaptation_period": "self-tuning (damping, ``step_size: qmodel``) every N steps.",
    "damping_adaptation_decay": "the damping moves by ``decay ** period`` per adaptation.",
    "min_damping": "lower bound of the adapted damping (null: the start value ``damping``, so "
    "the adaptation only raises it when steps fail).",
    "max_damping": "upper bound of the adapted damping.",
    "qmodel": "curvature judging a step for the damping: ``kronecker`` (cheap) or ``exact`` "
    "(GGN, one forward-mode pass).",
    "step_size": "``fixed`` (lr, momentum, KL clip) or ``qmodel`` (each step rescaled by the "
    "exact quadratic model's minimiser along it).",
    "max_step_scale": "largest rescaling of a step with ``step_size: qmodel``.",
    "qmodel_samples": "samples per batch the exact quadratic-model curvature is evaluated on "
    "(drawn by their loss-Hessian trace and reweighted; null: all).",
    "qmodel_jvp": "how that curvature's Jacobian-vector product is computed: ``forward`` "
    "(forward-mode AD, exact), ``difference`` (one forward pass, float32/float64 only) or "
    "``auto`` (difference on CPU, forward elsewhere).",
}


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate schedule, evaluated per iteration as a multiplier of ``optimizer.lr``.

    Attributes:
        name: ``none`` (constant), ``cosine`` (to ``min_lr_ratio``), ``step`` (x ``gamma`` every
            ``step_epochs``), ``multistep`` (x ``gamma`` at each of ``milestones``), ``onecycle``
            (linear warm-up over ``pct_start`` of training, then cosine to ``min_lr_ratio``).
        warmup_epochs: linear warm-up from 0 over this many epochs (fractions allowed).
        min_lr_ratio: final learning rate as a fraction of ``optimizer.lr`` (cosine/onecycle).
        step_epochs: period of ``step``.
        milestones: epochs of ``multistep``.
        gamma: decay factor of ``step``/``multistep``.
        pct_start: fraction of training spent warming up in ``onecycle``.
    """

    name: ScheduleName = ScheduleName.COSINE
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    step_epochs: int = 30
    milestones: list[int] = dataclasses.field(default_factory=list)
    gamma: float = 0.1
    pct_start: float = 0.3


@dataclasses.dataclass
class SampledBackpropConfig:
    """Randomized backpropagation (tensor dropout in the weight VJP of conv layers).

    Attributes:
        enabled: replace matching conv layers by their sampled counterparts.
        keep_prob: probability of keeping a slice (1.0 = exact).
        axis: sampled leg, ``spatial`` (input positions) or ``channel``.
        layers: fnmatch pattern on module names selecting the converted conv layers.
    """

    enabled: bool = False
    keep_prob: float = 0.5
    axis: SampleAxis = SampleAxis.SPATIAL
    layers: str = "*"


@dataclasses.dataclass
class TrainConfig:
    """A training run.

    Attributes:
        model: network.
        data: data set.
        optimizer: optimizer.
        schedule: learning-rate schedule.
        sampled_backprop: randomized backpropagation.
        epochs: number of training epochs.
        batch_size: training batch size per process.
        test_batch_size: evaluation batch size per process.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler).
        seed: seed of every random number generator (data order, initialisation, sampling).
        out_dir: parent directory of run directories.
        run_name: run directory name inside ``out_dir`` (``None``: ``<model>-<optimizer>-<time>``).
        checkpoint_period: checkpoint every N epochs and at the end (0: only at the end).
        distributed: ``off`` or ``ddp`` (launch with ``torchrun``).
        dist_timeout_s: collective timeout; a dead peer aborts the run with an error after it.
        quiet: no progress bars.
        log_every: refresh the progress bar's loss/accuracy every N iterations.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    sampled_backprop: SampledBackpropConfig = dataclasses.field(
        default_factory=SampledBackpropConfig
    )
    epochs: int = 10
    batch_size: int = 64
    test_batch_size: int = 512
    device: str = "auto"
    precision: Precision = Precision.FP32
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None
    checkpoint_period: int = 1
    distributed: Distributed = Distributed.OFF
    dist_timeout_s: float = 600.0
    quiet: bool = False
    log_every: int = 10


GROUPS: tuple[str, ...] = tuple(
    key
    for key, tp in typing.get_type_hints(TrainConfig).items()
    if dataclasses.is_dataclass(tp) and "name" in {f.name for f in dataclasses.fields(tp)}
)
"""Sections with a ``name`` that an override ``SECTION=NAME`` selects as a config group."""

GROUP_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("optimizer", "adam"): {"lr": 1e-3},
    ("optimizer", "adamw"): {"lr": 1e-3},
}
"""Keys a config group sets besides its name, where the schema's default does not suit it
(the schema's ``lr`` of 0.05 is an SGD/KFAC value; Adam's usual one is 1e-3)."""


# ----------------------------------------------------------------------------------------------
# Generic typed conversion
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + str([m.value for m in tp])
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _convert(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Convert a YAML value to ``tp``; append ``key: ...`` messages to ``errors`` on failure."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, errors)
        raise TypeError(f"unsupported schema type {tp}")  # pragma: no cover - schema bug
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{key}: {value!r} is not a mapping of {tp.__name__} keys")
            return tp()
        return _dataclass_from_mapping(tp, value, key, errors)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _to_choice(value, tp, key, errors)
    if tp in _SCALARS:
        converted = _SCALARS[tp](value)
        if converted is None:
            errors.append(f"{key}: {value!r} is not {_SCALAR_NAMES[tp]}")
        elif tp is float and not math.isfinite(converted):  # every float key, rule or not
            errors.append(f"{key}: {value!r} is not finite; allowed: {_allowed_number(key)}")
            return None
        return converted
    if origin in (list, tuple, dict):
        return _to_container(value, tp, key, errors)
    raise TypeError(f"unsupported schema type {tp}")  # pragma: no cover - schema bug


def _allowed_number(key: str) -> str:
    """Return what a float key allows: its range rule's text, else ``'a finite float'``."""
    section, _, name = key.rpartition(".")
    rule = _range_rule(section.split(".")[0], name)
    if rule is None and "layer_settings" in section:
        rule = _range_rule("optimizer", name)
    return rule.allowed if rule is not None else "a finite float"


def _to_choice(value: Any, tp: type[enum.Enum], key: str, errors: list[str]) -> Any:
    allowed = [m.value for m in tp]
    if isinstance(value, bool) and ("on" if value else "off") in allowed:
        value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a bool
    if isinstance(value, str) and value in allowed:
        return tp(value)
    errors.append(f"{key}: {value!r} is not one of {allowed}")
    return None


def _to_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _to_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _to_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return None


def _to_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML typed a name like 2024 as a number
    return None


_SCALARS: dict[type, Callable[[Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}
_SCALAR_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}


def _to_container(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Convert to ``list[T]``, ``tuple[T1, ..., Tn]`` or ``dict[str, Any]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: {value!r} is not a list of {_type_name(args[0])}")
            return []
        return [_convert(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            errors.append(f"{key}: {value!r} is not a list of {len(args)} values")
            return None
        return tuple(
            _convert(v, t, f"{key}[{i}]", errors) for i, (v, t) in enumerate(zip(value, args))
        )
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        errors.append(f"{key}: {value!r} is not a mapping with string keys")
        return None
    return dict(value)


def _dataclass_from_mapping(
    cls: type, raw: Mapping[str, Any], prefix: str, errors: list[str]
) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            errors.append(f"{key}: unknown key; allowed keys: {names}")
            continue
        count = len(errors)
        value = _convert(v, hints[k], key, errors)
        if len(errors) == count or dataclasses.is_dataclass(hints[k]):
            kwargs[k] = value  # a key that failed to convert keeps its (valid) default, so the
            # range checks still run on every other key without reporting this one again
    obj = cls()
    for k, v in kwargs.items():
        setattr(obj, k, v)
    return obj


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Return a config as a plain (YAML/JSON-serialisable) nested dict.

    Args:
        cfg: The config.

    Returns:
        Every key, with enums as their values; the ``optimizer`` section keeps only the keys of
        the chosen optimizer. :func:`config_from_dict` inverts it.
    """
    out = _to_plain(cfg)
    keys = OPTIMIZER_KEYS.get(cfg.optimizer.name, ())
    out["optimizer"] = {k: v for k, v in out["optimizer"].items() if k == "name" or k in keys}
    return out


# ----------------------------------------------------------------------------------------------
# Semantic checks: one function per section. The KFAC keys' ranges and choices are the
# optimizer's own rules (kfac_tn.optim.hyperparams); the config's other keys have rules below.
# ----------------------------------------------------------------------------------------------

_RANGES: dict[str, dict[str, Number]] = {
    "model": {"width": Number(0.0, low_open=True), "dropout": Number(0.0, 1.0, high_open=True)},
    "data": {
        "image_size": Number(1, nullable=True),
        "train_subset": Number(1, nullable=True),
        "test_subset": Number(1, nullable=True),
        "limit_batches": Number(1, nullable=True),
        "fake_train_size": Number(1),
        "fake_test_size": Number(1),
        "num_workers": Number(0),
        "fake_num_classes": Number(2),
    },
    "optimizer": {  # SGD/Adam-only keys; the KFAC keys are hyperparams.RULES
        "eps": Number(0.0, low_open=True),
        "dampening": Number(0.0, 1.0, high_open=True),
    },
    "schedule": {
        "warmup_epochs": Number(0.0),
        "min_lr_ratio": Number(0.0, 1.0),
        "step_epochs": Number(1),
        "gamma": Number(0.0, 1.0, low_open=True),
        "pct_start": Number(0.0, 1.0, low_open=True, high_open=True),
    },
    "sampled_backprop": {"keep_prob": Number(0.0, 1.0, low_open=True)},
    "": {
        "epochs": Number(1),
        "batch_size": Number(1),
        "test_batch_size": Number(1),
        "checkpoint_period": Number(0),
        "log_every": Number(1),
        "dist_timeout_s": Number(0.0, low_open=True),
    },
}
"""Range of every numeric config key that is not a KFAC hyperparameter, by section."""

_BETA = Number(0.0, 1.0, high_open=True)
_DTYPE_KEYS = frozenset(k for k, r in hyperparams.RULES.items() if isinstance(r, hyperparams.Dtype))


def _torchvision_models() -> list[str]:
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover - torchvision is part of the train extra
        return []
    return sorted(tvm.list_models(module=tvm))


def _out_of_range(key: str, value: Any, allowed: str) -> str:
    return f"{key}: {value!r} is out of range; allowed: {allowed}"


def _range_errors(section: Any, name: str) -> list[str]:
    """Out-of-range messages for the keys of ``section`` that :data:`_RANGES` has rules for."""
    prefix = f"{name}." if name else ""
    return [
        _out_of_range(prefix + key, getattr(section, key), rule.allowed)
        for key, rule in _RANGES[name].items()
        if not rule.accepts(getattr(section, key))
    ]


def _semantic_errors(cfg: TrainConfig, raw: Mapping[str, Any]) -> list[str]:
    """Every problem of a well-typed config, section by section."""
    raw_optimizer = raw.get("optimizer") if isinstance(raw, Mapping) else None
    return [
        *_model_errors(cfg.model, cfg.data),
        *_range_errors(cfg.data, "data"),
        *_data_path_errors(cfg.data),
        *_optimizer_errors(cfg.optimizer, raw_optimizer),
        *_schedule_errors(cfg.schedule),
        *_range_errors(cfg.sampled_backprop, "sampled_backprop"),
        *_run_errors(cfg),
    ]


def _model_errors(m: ModelConfig, d: DataConfig) -> list[str]:
    errors: list[str] = []
    if m.name not in BUILTIN_MODELS:
        if m.name not in _torchvision_models():
            errors.append(
                f"model.name: {m.name!r} is not a built-in model {list(BUILTIN_MODELS)} "
                f"nor a torchvision classification model (e.g. resnet18, resnet50)"
            )
        elif m.name not in WIDTH_RESNETS and (m.width != 1.0 or m.cifar_stem):
            key, val = ("model.width", m.width) if m.width != 1.0 else ("model.cifar_stem", True)
            errors.append(
                f"{key}: {val!r} is only supported for built-ins and {list(WIDTH_RESNETS)}"
            )
    elif m.cifar_stem:
        errors.append(f"model.cifar_stem: True is only supported for {list(WIDTH_RESNETS)}")
    errors.extend(_range_errors(m, "model"))
    if m.name == "autoencoder" and d.name == DataName.IMAGENET:
        errors.append("model.name: 'autoencoder' is for digits/CIFAR/fake data, not imagenet")
    return errors


def _data_path_errors(d: DataConfig) -> list[str]:
    if d.name in (DataName.CIFAR10, DataName.CIFAR100):
        sub = "cifar-10-batches-py" if d.name == DataName.CIFAR10 else "cifar-100-python"
        if d.root is None:
            return [
                f"data.root: None is required for data.name {d.name.value!r} (parent of {sub}/)"
            ]
        if not d.download and not (Path(d.root).expanduser() / sub).is_dir():
            return [
                f"data.root: {d.root!r} does not contain {sub}/; allowed: an existing CIFAR root "
                f"(python-pickle format) or set data.download=true"
            ]
    if d.name == DataName.IMAGENET:
        if d.root is None:
            return [
                "data.root: None is required for data.name 'imagenet' (directory of train/, val/)"
            ]
        root = Path(d.root).expanduser()
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            return [
                f"data.root: {d.root!r} has no {'/ and '.join(missing)}/ directory; allowed: an "
                f"ImageFolder root with train/<class>/* and val/<class>/*"
            ]
    return []


def _optimizer_errors(o: OptimizerConfig, raw: Any) -> list[str]:
    """Keys that do not apply to ``o.name``, then the values the rules reject."""
    errors: list[str] = []
    name = raw.get("name", o.name.value) if isinstance(raw, Mapping) else o.name.value
    name_ok = name in [m.value for m in OptimizerName]  # else: already a choice error
    if isinstance(raw, Mapping) and name_ok:  # only keys of the chosen optimizer may be set
        allowed = OPTIMIZER_KEYS[o.name]
        errors.extend(
            f"optimizer.{k}: does not apply to optimizer.name {o.name.value!r}; "
            f"allowed keys: {['name', *allowed]}"
            for k in raw
            if k != "name" and k not in allowed
        )
    values = {k: _library_value(k, getattr(o, k)) for k in hyperparams.KFAC_KEYS}
    errors.extend(_problem_message(p, "optimizer.") for p in hyperparams.problems(values))
    errors.extend(_range_errors(o, "optimizer"))
    if not all(_BETA.accepts(b) for b in o.betas):
        errors.append(
            _out_of_range("optimizer.betas", list(o.betas), f"two values in {_BETA.allowed}")
        )
    if o.layer_settings:
        errors.extend(_layer_settings_errors(o.layer_settings))
    return errors


def _problem_message(problem: hyperparams.Problem, prefix: str) -> str:
    if problem.reason == "out of range":
        return _out_of_range(prefix + problem.key, problem.value, problem.allowed)
    return f"{prefix}{problem.key}: {problem.value!r} {problem.reason} ({prefix}{problem.allowed})"


def _layer_settings_errors(settings: Mapping[str, Any]) -> list[str]:
    errors: list[str] = []
    typed = _typed_layer_settings(settings, errors)
    per_layer = list(hyperparams.LAYER_KEYS)
    for p in hyperparams.layer_settings_problems(typed):
        key = f"optimizer.layer_settings[{p.pattern!r}]"
        if p.reason == "not an override":
            errors.append(
                f"{key}: {p.value!r} is neither 'skip' nor a mapping of KFAC keys {per_layer}"
            )
        elif p.reason == "unknown key":
            errors.append(f"{key}.{p.key}: unknown key; allowed keys: {per_layer}")
        else:
            errors.append(_problem_message(p, f"{key}."))
    return errors


def _typed_layer_settings(settings: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    """``layer_settings`` with each known override converted to the library's value.

    A value of the wrong type is reported in ``errors`` and left out (so that the rules do not
    report it again); unknown keys and entries that are not mappings are kept for the rules.
    """
    hints = typing.get_type_hints(OptimizerConfig)
    out: dict[str, Any] = {}
    for pattern, override in settings.items():
        if not isinstance(override, Mapping):
            out[pattern] = override
            continue
        entry: dict[str, Any] = {}
        for k, v in override.items():
            if k not in hyperparams.LAYER_KEYS:
                entry[k] = v
                continue
            count = len(errors)
            value = _convert(v, hints[k], f"optimizer.layer_settings[{pattern!r}].{k}", errors)
            if len(errors) == count:
                entry[k] = _library_value(k, value)
        out[pattern] = entry
    return out


def _library_value(key: str, value: Any) -> Any:
    """Return a config value as :class:`kfac_tn.KFAC` takes it (choice strings, torch dtypes)."""
    if key in _DTYPE_KEYS and value is not None:
        return getattr(torch, DtypeName(value).value)
    return value.value if isinstance(value, enum.Enum) else value


def _schedule_errors(s: ScheduleConfig) -> list[str]:
    errors = _range_errors(s, "schedule")
    if any(m < 1 for m in s.milestones):
        errors.append(
            f"schedule.milestones: {s.milestones!r} is out of range; allowed: epochs >= 1"
        )
    return errors


def _run_errors(cfg: TrainConfig) -> list[str]:
    errors = _range_errors(cfg, "")
    if cfg.run_name is not None and not is_path_component(cfg.run_name):
        errors.append(
            f"run_name: {cfg.run_name!r} is not a single directory name; allowed: null or a "
            f"name without a slash, backslash or NUL that is not '', '.' or '..' (the run "
            f"directory is out_dir/run_name)"
        )
    if not _valid_device(cfg.device):
        errors.append(
            f"device: {cfg.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']"
        )
    return errors


def is_path_component(name: str) -> bool:
    """Whether ``name`` is one path component: a run name cannot leave ``out_dir``.

    Args:
        name: The candidate directory name.

    Returns:
        ``False`` for ``''``, ``'.'``, ``'..'`` and anything with a path separator (a slash or
        a backslash) or a NUL byte, so that ``out_dir / name`` is a direct child of ``out_dir``.
    """
    if name in ("", ".", "..") or "\x00" in name:
        return False
    return not any(sep in name for sep in ("/", "\\"))


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, idx = device.partition(":")
    return head == "cuda" and idx.isdigit()


def kfac_arguments(o: OptimizerConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`kfac_tn.KFAC` from a validated ``optimizer`` section.

    Args:
        o: The section (its KFAC keys are :data:`kfac_tn.optim.hyperparams.KFAC_KEYS` and
            ``layer_settings``).

    Returns:
        ``{key: value}`` for those keys, choices as their string values and dtype names as torch
        dtypes (also inside ``layer_settings``; an empty ``layer_settings`` becomes ``None``).
        ``loss``, ``loss_reduction`` and ``grad_scaler`` follow from the task and are not set.
    """
    kwargs = {k: _library_value(k, getattr(o, k)) for k in hyperparams.KFAC_KEYS}
    errors: list[str] = []
    layers = _typed_layer_settings(o.layer_settings, errors) if o.layer_settings else None
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    kwargs["layer_settings"] = layers
    return kwargs


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def config_from_dict(raw: Mapping[str, Any] | None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested mapping (e.g. parsed YAML).

    Args:
        raw: nested mapping; missing keys take the schema defaults. ``None`` means all defaults.

    Returns:
        The validated config.

    Raises:
        ConfigError: listing every unknown key, wrong type, bad choice, out-of-range value or
            missing data path, one per line.
    """
    raw = {} if raw is None else raw
    errors: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: {raw!r} is not a mapping of TrainConfig keys")
    cfg = _dataclass_from_mapping(TrainConfig, raw, "", errors)
    errors.extend(_semantic_errors(cfg, raw))  # type errors do not hide range errors
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value`` into its key path and YAML-typed value.

    A part of the key may be written in brackets, ``name[part]``: ``part`` is then taken whole,
    dots included (one pair of enclosing quotes is dropped, brackets inside must balance). This
    is how a ``layer_settings`` pattern with dots is written:
    ``optimizer.layer_settings[layer1.0.conv1].damping=0.01``.

    Args:
        text: e.g. ``optimizer.lr=0.1``, ``data.root=/data``, ``schedule.milestones=[30, 60]``.

    Returns:
        ``(["optimizer", "lr"], 0.1)``; ``(["optimizer", "layer_settings", "layer1.0.conv1",
        "damping"], 0.01)`` for the bracket example.

    Raises:
        ConfigError: if there is no ``=``, the key is empty or has an empty or unbalanced part.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    path = _split_key(key) if sep else None
    if not path:
        raise ConfigError(
            f"override: {text!r} is not of the form dotted.key=value (a part with dots goes in "
            f"brackets: optimizer.layer_settings[layer1.0.conv1].damping=0.01)"
        )
    try:
        parsed = safe_load_yaml(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {value!r} is not valid YAML ({exc})") from exc
    return path, parsed


def _split_key(key: str) -> list[str] | None:
    """Split ``a.b[c.d].e`` into ``["a", "b", "c.d", "e"]``; ``None`` if malformed."""
    parts: list[str] = []
    i, n = 0, len(key)
    while i < n:
        j = i
        while j < n and key[j] not in ".[]":
            j += 1
        if j == i:
            return None  # an empty part: "a..b", ".a", "a.", "[x]"
        parts.append(key[i:j])
        while j < n and key[j] == "[":
            depth, k = 0, j
            while k < n:
                depth += {"[": 1, "]": -1}.get(key[k], 0)
                if depth == 0:
                    break
                k += 1
            inner = key[j + 1 : k]
            if k == n or not inner.strip("'\""):
                return None  # unbalanced or empty brackets
            if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                inner = inner[1:-1]
            parts.append(inner)
            j = k + 1
        if j < n and key[j] != ".":
            return None  # "a]b"
        i = j + 1
        if j == n - 1:
            return None  # a trailing dot
    return parts


def apply_overrides(raw: Mapping[str, Any] | None, overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides, left to right, to a nested mapping (a copy).

    Below ``optimizer.layer_settings`` (the one mapping-valued key) an override names a
    pattern and optionally one of its keys: ``optimizer.layer_settings.conv1=skip`` sets the
    entry of pattern ``conv1``, ``optimizer.layer_settings.conv1.damping=0.01`` its ``damping``
    (kept with the entry's other keys). A pattern with dots goes in brackets:
    ``optimizer.layer_settings[layer1.0.conv1].damping=0.01``,
    ``optimizer.layer_settings[features.*]=skip``; a bare dotted pattern
    (``optimizer.layer_settings.features.0=skip``) is refused rather than guessed at. The whole
    mapping can also be given as YAML/JSON: ``optimizer.layer_settings='{"fc*": "skip"}'``.

    A section that has a ``name`` (:data:`GROUPS`: ``model``, ``data``, ``optimizer``,
    ``schedule``) set to a name selects a config group: ``optimizer=adam`` replaces the whole
    ``optimizer`` section by ``{name: adam}`` plus the group's own defaults
    (:data:`GROUP_DEFAULTS`: ``lr: 1e-3`` for Adam and AdamW), so every other key of it takes its
    documented default (``kfac-tn reference``), and later overrides (``optimizer.lr=3e-4``)
    refine it.
    ``optimizer.name=adam`` instead changes only the name and keeps the section's other keys.

    Args:
        raw: nested mapping (not modified).
        overrides: strings ``dotted.key=value``; values use YAML scalar typing.

    Returns:
        A new nested dict; unknown keys are left for :func:`config_from_dict` to reject.

    Raises:
        ConfigError: on a malformed override or a ``layer_settings`` key path that is not
            ``PATTERN`` or ``PATTERN.KEY``.
    """
    out = _deep_copy(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in GROUPS and isinstance(value, str):
            value = {"name": value, **GROUP_DEFAULTS.get((path[0], value), {})}
        node: dict[str, Any] = out
        cls: Any = TrainConfig
        for i, part in enumerate(path[:-1]):
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            tp = hints.get(part)
            sub = node.get(part)
            if not isinstance(sub, dict):
                sub = {}
                node[part] = sub
            if tp is not None and _is_mapping_type(tp):
                _set_entry(sub, path[: i + 1], path[i + 1 :], value, text)
                break
            node = sub
            cls = tp
        else:
            node[path[-1]] = value
    return out


def _set_entry(
    mapping: dict[str, Any], head: list[str], rest: list[str], value: Any, text: str
) -> None:
    """Set ``PATTERN`` or ``PATTERN.KEY`` (``rest``) below the mapping-valued key ``head``."""
    where = ".".join(head)
    if len(rest) == 2 and rest[1] not in KFAC_LAYER_KEYS and "." not in rest[0]:
        raise ConfigError(
            f"{where}: override {text!r} sets key {rest[1]!r} of pattern {rest[0]!r}, which is "
            f"not a key; allowed keys: {list(KFAC_LAYER_KEYS)}. A pattern with dots goes in "
            f"brackets: {where}[{'.'.join(rest)}]=..."
        )
    if len(rest) > 2:
        raise ConfigError(
            f"{where}: override {text!r} is ambiguous; allowed: {where}.PATTERN=VALUE or "
            f"{where}.PATTERN.KEY=VALUE, with a dotted pattern in brackets: "
            f"{where}[{'.'.join(rest[:-1])}].{rest[-1]}=..."
        )
    if len(rest) == 1:
        mapping[rest[0]] = value
        return
    entry = mapping.get(rest[0])
    mapping[rest[0]] = {**(entry if isinstance(entry, dict) else {}), rest[1]: value}


def _is_mapping_type(tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_mapping_type(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is dict


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names a key twice (``yaml.safe_load`` would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Construct a mapping like ``SafeLoader``, after checking that no key repeats.

        Raises:
            DuplicateKeyError: ``line N: duplicate key 'k' (first on line M)``.
        """
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden explicitly
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first is not None:
                raise DuplicateKeyError(
                    f"line {line}: duplicate key {key!r} (first on line {first})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def safe_load_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load`` (no code execution), refusing duplicate keys.

    Args:
        text: The YAML document.

    Returns:
        The parsed value.

    Raises:
        DuplicateKeyError: if a mapping repeats a key (naming it and both lines).
        yaml.YAMLError: if ``text`` is not valid YAML.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no code execution; a repeated key is an error).

    Args:
        path: The YAML file.

    Returns:
        Its mapping (``{}`` for an empty file).

    Raises:
        ConfigError: if the file is missing, unreadable, not UTF-8 (naming the line), not valid
            YAML, repeats a key (naming it and its lines) or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {str(path)!r} is not an existing file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config: {str(path)!r} cannot be read ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config: {str(path)!r} line {line}: byte 0x{data[exc.start]:02x} is not UTF-8; "
            f"allowed: a UTF-8 text file"
        ) from exc
    try:
        raw = safe_load_yaml(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"config: {str(path)!r} {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {str(path)!r} is not valid YAML ({exc})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {str(path)!r} holds {type(raw).__name__}, not a mapping")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config (or the built-in offline default), apply overrides, validate.

    Args:
        path: YAML file; ``None`` gives the schema defaults (offline digits + KFAC).
        overrides: ``dotted.key=value`` strings applied on top.

    Returns:
        The validated config.

    Raises:
        ConfigError: on any problem, before any training work happens.
    """
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (every key, defaults included).

    Args:
        cfg: The config.
        path: The file to write (replaced if it exists).
    """
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:  # pragma: no cover
        return ""
    v = _to_plain(v)
    return (
        "null"
        if v is None
        else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")
    )


def _field_docs(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    current = None
    in_attrs = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs:
            continue
        name, sep, rest = stripped.partition(":")
        if (
            sep
            and name.isidentifier()
            and line.startswith(" " * 8)
            and not line.startswith(" " * 12)
        ):
            current = name
            out[name] = rest.strip()
        elif current and stripped:
            out[current] += " " + stripped
    return out


def config_reference() -> str:
    """Return the Markdown reference of every config key (``kfac-tn reference``).

    Returns:
        A table with one row per dotted key: type (choices), default, description, the
        optimizers that use it and its allowed range.
    """
    lines = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        """Append the rows of ``cls``'s keys (recursing into sections)."""
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
                continue
            desc = docs.get(f.name, "")
            if cls is OptimizerConfig:
                users = [n.value for n, keys in OPTIMIZER_KEYS.items() if f.name in keys]
                desc = _OPTIMIZER_DOCS[f.name]
                if f.name != "name":
                    desc += " Used by: " + ", ".join(users) + "."
            rule = _range_rule(prefix.rstrip("."), f.name)
            if rule is not None:
                desc += f" Allowed: {rule.allowed}."
            lines.append(f"| `{key}` | {_type_name(tp)} | `{_default_repr(f)}` | {desc} |")

    walk(TrainConfig, "")
    return "\n".join(lines)


def _range_rule(section: str, key: str) -> Number | None:
    """Return the range rule of a numeric key (the optimizer's for KFAC keys), or ``None``."""
    rule = hyperparams.RULES.get(key) if section == "optimizer" else None
    rule = rule or _RANGES.get(section, {}).get(key)
    return rule if isinstance(rule, Number) else None
