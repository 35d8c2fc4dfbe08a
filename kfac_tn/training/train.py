"""Training loop behind ``kfac-tn train``: :func:`train`, driven by a :class:`TrainConfig`.

Per run directory (``out_dir/run_name``, rank 0 only):

- ``config.yaml`` -- the resolved config (every key, defaults included),
- ``metrics.jsonl`` -- one JSON row per epoch: ``epoch, train_loss, train_acc, test_loss,
  test_acc, wall_clock_s, lr, images_per_s, max_memory_mib`` (accuracies are ``null`` for
  reconstruction; peak CUDA memory of the epoch on this rank, ``null`` on CPU), and with KFAC
  ``damping`` (the first param group's, at the end of the epoch), ``rho`` (the last reduction
  ratio), ``step_scale`` (the last quadratic-model step scale) and ``skipped_steps``,
- ``checkpoint.pt`` -- model, optimizer (all KFAC state), scheduler, GradScaler, RNG states, epoch,
  metrics so far; written atomically every ``checkpoint_period`` epochs and at the end,
- ``curves.png`` -- loss/accuracy curves, ``train.log`` -- the log.

Resuming (``resume=RUN_DIR``) restores everything and continues; data order is a pure function
of ``(seed, epoch)``, so on CPU the resumed losses equal those of an uninterrupted run.

Distributed (``distributed: ddp``, launched with ``torchrun``): one process per device, gloo on CPU
and NCCL on CUDA with a bounded collective timeout, ``DistributedSampler`` for training, disjoint
test shards with summed metrics, DistributedDataParallel, KFAC factor averaging through
:mod:`kfac_tn.distributed`. A dead peer makes the survivors fail with
:class:`DistributedRunError` after at most ``dist_timeout_s`` instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kfac_tn import KFAC
from kfac_tn.optim.placement import consolidated_state_dict
from kfac_tn.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    capture_rng_state,
    check_run_checkpoint,
    clean_stale_temporaries,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from kfac_tn.training.config import (
    OPTIMIZER_KEYS,
    ConfigError,
    Distributed,
    OptimizerName,
    Precision,
    ScheduleConfig,
    ScheduleName,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    is_path_component,
    kfac_arguments,
    save_config,
)
from kfac_tn.training.data import DataBundle, build_datasets, build_loaders
from kfac_tn.training.models import build_model, is_reconstruction

__all__ = [
    "DistContext",
    "DistributedRunError",
    "Run",
    "RunResult",
    "build_optimizer",
    "lr_factor",
    "read_metrics",
    "resolve_device",
    "resolve_resume_dir",
    "train",
]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
LOG_NAME = "train.log"
PLOT_NAME = "curves.png"

RESUMABLE_KEYS = frozenset(
    {
        "epochs",
        "device",
        "quiet",
        "log_every",
        "checkpoint_period",
        "out_dir",
        "run_name",
        "dist_timeout_s",
        "test_batch_size",
        "data.root",
        "data.download",
        "data.num_workers",
    }
)
"""Config keys that may differ between a checkpoint and the run resuming it."""


class DistributedRunError(RuntimeError):
    """A distributed run failed on this rank (often because a peer died or timed out)."""


@dataclasses.dataclass
class RunResult:
    """Outcome of :func:`train`.

    Attributes:
        run_dir: the run directory (``None`` on ranks other than 0).
        metrics: one dict per epoch (all epochs, including those before a resume).
    """

    run_dir: Path | None
    metrics: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Map the config's device string to a ``torch.device``.

    Args:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        local_rank: in DDP runs ``auto``/``cuda`` pick ``cuda:local_rank``.

    Returns:
        The device.

    Raises:
        ValueError: if CUDA is requested but not available.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available; use 'cpu'")
        return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    return torch.device(device)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning-rate multiplier at iteration ``step`` (0-based) of a run.

    Args:
        cfg: schedule config.
        step: iteration index.
        steps_per_epoch: iterations per epoch.
        epochs: total epochs.

    Returns:
        Multiplier of the base learning rate.
    """
    total = max(1, steps_per_epoch * epochs)
    t = step / total  # progress in [0, 1)
    epoch = step / max(1, steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch
    warm_factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    lo = cfg.min_lr_ratio
    if cfg.name == ScheduleName.NONE:
        f = 1.0
    elif cfg.name == ScheduleName.COSINE:
        f = lo + (1 - lo) * 0.5 * (1 + np.cos(np.pi * t))
    elif cfg.name == ScheduleName.STEP:
        f = cfg.gamma ** int(epoch // cfg.step_epochs)
    elif cfg.name == ScheduleName.MULTISTEP:
        f = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    elif cfg.name == ScheduleName.ONECYCLE:
        if t < cfg.pct_start:
            f = (step + 1) / (cfg.pct_start * total)
        else:
            u = (t - cfg.pct_start) / (1 - cfg.pct_start)
            f = lo + (1 - lo) * 0.5 * (1 + np.cos(np.pi * u))
    else:  # pragma: no cover - enum is exhaustive
        raise ValueError(f"schedule.name: {cfg.name!r} is not one of {list(ScheduleName)}")
    return float(f * warm_factor)


_TORCH_OPTIMIZERS: dict[OptimizerName, type[torch.optim.Optimizer]] = {
    OptimizerName.SGD: torch.optim.SGD,
    OptimizerName.ADAM: torch.optim.Adam,
    OptimizerName.ADAMW: torch.optim.AdamW,
}


def build_optimizer(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    reconstruction: bool,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> torch.optim.Optimizer:
    """Instantiate the configured optimizer for ``model``.

    SGD/Adam/AdamW take the section's keys for them
    (:data:`~kfac_tn.training.config.OPTIMIZER_KEYS`). For KFAC the keyword arguments are
    :func:`~kfac_tn.training.config.kfac_arguments` (the hyperparameters of
    :data:`kfac_tn.optim.hyperparams.KFAC_KEYS` and ``layer_settings``) plus ``loss`` (``mse``
    for reconstruction, else ``cross_entropy``) and ``loss_reduction="mean"``, matching the loss
    the loop minimises, and the loop's ``grad_scaler`` (fp16), whose scale KFAC divides out of
    its gradient factors.

    Args:
        cfg: The validated config (only ``cfg.optimizer`` is read).
        model: The network (not wrapped in DistributedDataParallel).
        reconstruction: Whether the task is reconstruction (MSE) rather than classification.
        grad_scaler: The fp16 loss scaler of the loop, if any.

    Returns:
        The optimizer over ``model``'s trainable parameters.
    """
    o = cfg.optimizer
    if o.name in _TORCH_OPTIMIZERS:
        params = [p for p in model.parameters() if p.requires_grad]
        kwargs = {k: getattr(o, k) for k in OPTIMIZER_KEYS[o.name]}
        return _TORCH_OPTIMIZERS[o.name](params, **kwargs)
    return KFAC(
        model,
        **kfac_arguments(o),
        loss="mse" if reconstruction else "cross_entropy",
        loss_reduction="mean",
        grad_scaler=grad_scaler,
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Read the metrics of a run.

    Args:
        run_dir: The run directory.

    Returns:
        The rows of ``run_dir/metrics.jsonl``, one dict per epoch (``[]`` if there is none).

    Raises:
        ValueError: naming the file and line of a truncated or corrupt row.
    """
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    from kfac_tn.training.plots import read_rows

    return read_rows(path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "layer_settings":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    return [
        f"{k}: checkpoint has {a.get(k)!r}, config has {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)
    ]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Distributed context
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistContext:
    """Where this process stands in a (possibly distributed) run.

    Attributes:
        enabled: Whether a process group was initialised (``distributed: ddp``).
        rank: Global rank (0 when not distributed).
        world_size: Number of processes.
        local_rank: Rank on this node (picks the CUDA device).
    """

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes the run directory."""
        return self.rank == 0


def _init_distributed(cfg: TrainConfig) -> tuple[DistContext, torch.device]:
    import os

    if cfg.distributed == Distributed.OFF:
        return DistContext(), resolve_device(cfg.device)
    from kfac_tn.distributed import init_process_group_from_env

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank, world, _ = init_process_group_from_env(backend, timeout_s=cfg.dist_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(True, rank, world, local_rank), device


def _all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------
# Run directory and logging
# ----------------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    """Keeps the records logged while a run is built, for its ``train.log`` once it exists."""

    def __init__(self) -> None:
        """Collect INFO and above."""
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record``."""
        self.records.append(record)


@contextlib.contextmanager
def _collect_logs() -> Iterator[_Collect]:
    handler = _Collect()
    pkg = logging.getLogger("kfac_tn")
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield handler
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)


@contextlib.contextmanager
def _file_logging(path: Path | None, replay: list[logging.LogRecord] = ()) -> Iterator[None]:
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for record in replay:  # what was logged while the run was built, before the file existed
        handler.handle(record)
    pkg = logging.getLogger("kfac_tn")
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


def _planned_run_dir(cfg: TrainConfig) -> Path:
    """Return ``out_dir/run_name`` for a new run (not created), refusing an occupied one."""
    name = cfg.run_name or (
        f"{cfg.model.name}-{cfg.optimizer.name.value}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if not is_path_component(name):  # config_from_dict refuses it too; a TrainConfig may be
        raise ConfigError(  # built directly
            f"run_name: {name!r} is not a single directory name; allowed: null or a name "
            f"without a slash, backslash or NUL that is not '', '.' or '..'"
        )
    run_dir = Path(cfg.out_dir).expanduser() / name
    if (run_dir / METRICS_NAME).exists() or (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"run_name: {str(run_dir)!r} already holds a run; pass --resume {run_dir} to continue "
            f"it or choose another run_name/out_dir"
        )
    return run_dir


class _RunDirectory:
    """A new run's directory, removable again if the run fails before recording anything.

    On such a failure exactly what this invocation created goes: its own files, then the
    directories it made (if empty).
    """

    OWN_FILES = (CONFIG_NAME, LOG_NAME, PLOT_NAME)

    def __init__(self, run_dir: Path) -> None:
        """Create ``run_dir`` (and its parents), remembering what existed before."""
        self.run_dir = run_dir
        self.made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        self.existed = {n for n in self.OWN_FILES if (run_dir / n).exists()}
        run_dir.mkdir(parents=True, exist_ok=True)

    def discard(self) -> None:
        """Undo the creation if the run recorded nothing (no metrics row, no checkpoint)."""
        d = self.run_dir
        if (d / METRICS_NAME).exists() or (d / CHECKPOINT_NAME).exists():
            return  # a run with results: keep it (resumable or inspectable)
        for name in self.OWN_FILES:
            if name not in self.existed:
                with contextlib.suppress(FileNotFoundError):
                    (d / name).unlink()
        for made in self.made:  # innermost first; only directories this run made, if empty
            with contextlib.suppress(OSError):
                made.rmdir()


def resolve_resume_dir(path: str | Path) -> Path:
    """Return the run directory that ``--resume PATH`` means.

    ``PATH`` is a run directory (it holds ``checkpoint.pt`` or ``config.yaml``), or a folder of
    run directories such as ``out_dir``: then the run whose ``checkpoint.pt`` was written last
    is resumed, and the choice is logged.

    Args:
        path: The ``--resume`` argument.

    Returns:
        The run directory.

    Raises:
        CheckpointError: if ``path`` is not a directory, holds no resumable run, or its newest
            checkpoints tie; the message lists the runs found.
    """
    p = Path(path).expanduser()
    if (p / CHECKPOINT_NAME).is_file() or (p / CONFIG_NAME).is_file():
        return p
    if not p.is_dir():
        what = "is not a directory" if p.exists() else "does not exist"
        raise CheckpointError(f"resume: {str(path)!r} {what}; allowed: a run directory")
    runs = sorted(c for c in p.iterdir() if c.is_dir() and (c / CHECKPOINT_NAME).is_file())
    if not runs:
        subdirs = sorted(c.name for c in p.iterdir() if c.is_dir())
        raise CheckpointError(
            f"resume: {str(path)!r} is neither a run directory (no {CHECKPOINT_NAME}, "
            f"{CONFIG_NAME}) nor a folder of runs (no subdirectory holds {CHECKPOINT_NAME}; "
            f"subdirectories: {subdirs})"
        )
    times = {r: (r / CHECKPOINT_NAME).stat().st_mtime_ns for r in runs}
    newest = max(times.values())
    latest = [r for r in runs if times[r] == newest]
    listing = ", ".join(
        f"{r.name} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(times[r] / 1e9))})"
        for r in sorted(runs, key=times.get, reverse=True)
    )
    if len(latest) > 1:
        raise CheckpointError(
            f"resume: {str(path)!r} holds {len(runs)} runs whose newest checkpoints were written "
            f"at the same time ({', '.join(r.name for r in latest)}); pass one of them: {listing}"
        )
    logger.info(
        "resume: %s is a folder of %d runs; resuming the newest checkpoint, %s (runs: %s)",
        p,
        len(runs),
        latest[0],
        listing,
    )
    return latest[0]


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, *, resume: str | Path | None = None, stop_after: int | None = None
) -> RunResult:
    """Train and evaluate as configured; see the module docstring for the outputs.

    Everything that can fail on a valid config (the checkpoint to resume and its fit, data
    sets, model, optimizer) is built before a new run directory is created; if the run still
    fails before its first epoch is recorded, what this call created is removed again.

    Args:
        cfg: validated config. When resuming, it must agree with the checkpoint's config except
            for :data:`RESUMABLE_KEYS` (e.g. more ``epochs`` or another ``device``).
        resume: run directory to continue from its ``checkpoint.pt``, or a folder of run
            directories (the newest checkpoint is resumed, :func:`resolve_resume_dir`).
        stop_after: end this invocation (with a checkpoint) after this many more epochs even
            if ``cfg.epochs`` is not reached, as a preempted job would; resume later.

    Returns:
        The run directory and the per-epoch metrics.

    Raises:
        ConfigError: on an invalid config or an occupied run directory.
        CheckpointError: on a missing, corrupt, malformed or mismatched checkpoint.
        DistributedRunError: when a distributed run fails (e.g. a peer died).
        ValueError: if ``stop_after`` is below 1.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after: {stop_after!r} is out of range; allowed: >= 1 or None")
    ctx, device = _init_distributed(cfg)
    finished = False
    try:
        result = _train(cfg, resume, ctx, device, stop_after)
        finished = True
        return result
    except (ConfigError, CheckpointError):
        raise
    except Exception as exc:
        if not ctx.enabled:
            raise
        logger.error(
            "rank %d/%d: distributed training aborted (%s: %s); if another rank died, its log "
            "holds the original error",
            ctx.rank,
            ctx.world_size,
            type(exc).__name__,
            exc,
        )
        raise DistributedRunError(
            f"rank {ctx.rank}: distributed training aborted: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        if ctx.enabled:
            from kfac_tn.distributed import close_process_group

            with contextlib.suppress(Exception):
                close_process_group(finished=finished)


def _train(
    cfg: TrainConfig,
    resume: str | Path | None,
    ctx: DistContext,
    device: torch.device,
    stop_after: int | None,
) -> RunResult:
    state, run_dir = _open_run(cfg, resume, ctx)
    with _collect_logs() as early:  # nothing is written until everything is built
        run = Run(cfg, ctx, device, run_dir)
        if state is not None:
            run.restore(state, run_dir / CHECKPOINT_NAME if run_dir else CHECKPOINT_NAME)
    created = _RunDirectory(run_dir) if ctx.is_main and state is None else None
    try:
        with _file_logging(run_dir / LOG_NAME if ctx.is_main else None, early.records):
            if ctx.is_main:
                clean_stale_temporaries(run_dir / CHECKPOINT_NAME)
                save_config(cfg, run_dir / CONFIG_NAME)
                logger.info(
                    "run directory %s (device %s, world size %d)", run_dir, device, ctx.world_size
                )
                if state is not None:  # rows a crashed run wrote after its checkpoint go
                    _write_metrics(run_dir, run.rows)
            return run.execute(stop_after)
    except BaseException:
        if created is not None:
            created.discard()
        raise


def _open_run(
    cfg: TrainConfig, resume: str | Path | None, ctx: DistContext
) -> tuple[dict[str, Any] | None, Path | None]:
    """Return the checkpoint to resume (checked against ``cfg``) or ``None``, and the run dir.

    Nothing is created: a new run's directory is only planned (:func:`_planned_run_dir`).
    """
    if resume is None:
        return None, (_planned_run_dir(cfg) if ctx.is_main else None)
    run_dir = resolve_resume_dir(resume)
    path = run_dir / CHECKPOINT_NAME
    state = load_checkpoint(path, map_location="cpu")
    check_run_checkpoint(state, path)
    try:
        saved_cfg = config_from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint: stored config is invalid: {exc}") from exc
    mismatch = _config_mismatch(config_to_dict(saved_cfg), config_to_dict(cfg))
    if mismatch:
        raise CheckpointError(
            f"checkpoint: {str(path)!r} belongs to a different run:\n  " + "\n  ".join(mismatch)
        )
    return state, run_dir


class Run:
    """One training run: the model, data, optimizer and counters that its epochs share.

    Built (in this order, which fixes the random streams) from a seeded config: data sets and
    loaders, model (sampled conv layers, device, DDP wrapper), loss scaler, loss, optimizer,
    per-iteration schedule. :meth:`restore` continues from a checkpoint; :meth:`execute` runs the
    remaining epochs, writing metrics and checkpoints on rank 0, and plots the curves.

    Attributes:
        cfg: The validated config.
        ctx: The distributed context (rank 0 of 1 when not distributed).
        device: Where the model and batches live.
        run_dir: The run directory on rank 0, ``None`` on other ranks.
        recon: Whether the task is reconstruction (MSE on the input) instead of classification.
        model: The network (its state is checkpointed; evaluation runs it).
        train_model: ``model``, wrapped in DistributedDataParallel in a distributed run.
        loaders: The training loader of each epoch and the test loader.
        steps_per_epoch: Training iterations per epoch (``data.limit_batches`` applied).
        scaler: The GradScaler (enabled for fp16 only).
        loss_fn: Cross-entropy, or MSE for reconstruction (mean reduction).
        optimizer: The configured optimizer (:func:`build_optimizer`).
        scheduler: Multiplies the learning rate by :func:`lr_factor` every iteration.
        start_epoch: Epochs done before this invocation.
        elapsed: Wall-clock seconds of training and evaluation so far (all invocations).
        rows: One metrics row per epoch done (see the module docstring).
        show_bar: Whether epochs show a progress bar (rank 0, a terminal, not ``quiet``).
    """

    def __init__(
        self, cfg: TrainConfig, ctx: DistContext, device: torch.device, run_dir: Path | None
    ) -> None:
        """Seed every generator with ``cfg.seed`` and build the run (see the class docstring)."""
        self.cfg, self.ctx, self.device, self.run_dir = cfg, ctx, device, run_dir
        _seed_everything(cfg.seed)
        self.recon = is_reconstruction(cfg.model)
        bundle = build_datasets(cfg.data)
        self.loaders = build_loaders(
            bundle,
            batch_size=cfg.batch_size,
            test_batch_size=cfg.test_batch_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            pin_memory=device.type == "cuda",
        )
        self.model = _build_model(cfg, bundle, device)
        self.train_model = _wrap_ddp(self.model, ctx, device)
        self.steps_per_epoch = len(self.loaders.train_loader(0))
        if cfg.data.limit_batches is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.data.limit_batches)
        amp_dtype = torch.bfloat16 if cfg.precision == Precision.BF16 else torch.float16
        self._autocast = {
            "device_type": device.type,
            "dtype": amp_dtype,
            "enabled": cfg.precision != Precision.FP32,
        }
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == Precision.FP16)
        self.loss_fn: nn.Module = nn.MSELoss() if self.recon else nn.CrossEntropyLoss()
        self.optimizer = build_optimizer(
            cfg, self.model, reconstruction=self.recon, grad_scaler=self.scaler
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(cfg.schedule, step, self.steps_per_epoch, cfg.epochs),
        )
        self.start_epoch, self.elapsed, self.rows = 0, 0.0, []
        self.show_bar = ctx.is_main and not cfg.quiet and sys.stderr.isatty()

    def restore(self, state: dict[str, Any], path: str | Path = CHECKPOINT_NAME) -> None:
        """Continue from a checkpoint: states, RNGs, epoch, elapsed time and metrics rows.

        Writes nothing (the caller rewrites ``metrics.jsonl`` with the checkpoint's rows). The
        model's entries (names and shapes) and a torch optimizer's per-parameter state shapes
        are checked before anything is loaded; KFAC checks its own state dict.

        Args:
            state: The checkpoint (loaded by
                :func:`~kfac_tn.training.checkpoint.load_checkpoint` and checked by
                :func:`~kfac_tn.training.checkpoint.check_run_checkpoint`).
            path: Its file (for messages).

        Raises:
            CheckpointError: naming the entry if the states do not fit the configured
                model/optimizer.
        """
        _check_model_state(self.model, state["model"], path)
        if not isinstance(self.optimizer, KFAC):
            _check_torch_optimizer_state(self.optimizer, state["optimizer"], path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint: {str(path)!r}: state does not fit the configured model/optimizer "
                f"({exc})"
            ) from exc
        restore_rng_state(state["rng"])
        self.start_epoch, self.elapsed = state["epoch"], state["elapsed_s"]
        self.rows = list(state["metrics"])
        logger.info("resumed from epoch %d", self.start_epoch)

    def execute(self, stop_after: int | None = None) -> RunResult:
        """Run the remaining epochs (at most ``stop_after`` of them), then plot the curves.

        Each epoch appends a metrics row; a checkpoint is written every ``checkpoint_period``
        epochs and after the last epoch of this invocation.

        Args:
            stop_after: End this invocation after this many epochs (``None``: at ``epochs``).

        Returns:
            The run directory and every metrics row (also those before a resume).
        """
        cfg = self.cfg
        end = cfg.epochs if stop_after is None else min(cfg.epochs, self.start_epoch + stop_after)
        for epoch in range(self.start_epoch, end):
            row = self.epoch(epoch)
            self.rows.append(row)
            self._log(row)
            period = cfg.checkpoint_period
            last = epoch + 1 == end
            self._record(row, save=last or (period > 0 and (epoch + 1) % period == 0))
        if hasattr(self.optimizer, "remove_hooks"):
            self.optimizer.remove_hooks()
        if self.ctx.is_main and self.rows:
            from kfac_tn.training.plots import plot_run

            plot_run(self.run_dir, self.run_dir / PLOT_NAME)
            logger.info("wrote %s", self.run_dir / PLOT_NAME)
        return RunResult(self.run_dir, self.rows)

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, then evaluate.

        Args:
            epoch: The epoch (0-based).

        Returns:
            Its metrics row (keys in the module docstring).
        """
        device = self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_stats = self.train_epoch(epoch)
        train_time = time.perf_counter() - t0
        test_stats = self.evaluate()
        self.elapsed += time.perf_counter() - t0
        return {
            "epoch": epoch + 1,
            "train_loss": train_stats["loss"],
            "train_acc": train_stats["acc"],
            "test_loss": test_stats["loss"],
            "test_acc": test_stats["acc"],
            "wall_clock_s": self.elapsed,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": train_stats["images"] / max(train_time, 1e-9),
            "max_memory_mib": (
                torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            ),
            **self_tuning_metrics(self.optimizer),
        }

    def train_epoch(self, epoch: int) -> dict[str, float | None]:
        """Train ``steps_per_epoch`` iterations of one epoch.

        Args:
            epoch: The epoch (0-based), which fixes the data order.

        Returns:
            ``loss`` (mean over the epoch's samples on all ranks), ``acc`` (``None`` for
            reconstruction) and ``images`` (samples seen on all ranks).
        """
        self.train_model.train()
        device = self.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        progress = _Progress(
            self.steps_per_epoch,
            f"epoch {epoch + 1}/{self.cfg.epochs}",
            enabled=self.show_bar,
            every=self.cfg.log_every,
            accuracy=not self.recon,
        )
        for step, (x, y) in enumerate(self.loaders.train_loader(epoch)):
            if step >= self.steps_per_epoch:
                break
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            out, loss = self._step(x, y)
            seen += x.shape[0]
            loss_sum += loss.detach().double() * x.shape[0]
            if not self.recon:
                correct += (out.detach().argmax(1) == y).sum()
            progress.update(step, loss_sum, correct, seen)
        progress.close()
        _sync(device)
        count = torch.tensor(float(seen), device=device, dtype=torch.float64)
        totals = _all_reduce_sum(torch.stack([loss_sum, correct.double(), count]), self.ctx)
        total_loss, total_correct, total_seen = totals.tolist()
        return {
            "loss": total_loss / total_seen,
            "acc": None if self.recon else total_correct / total_seen,
            "images": total_seen,
        }

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on the batch ``(x, y)``; returns the output and the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**self._autocast):
            out = self.train_model(x)
            loss = self.loss_fn(out.float(), x if self.recon else y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return out, loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Evaluate ``model`` on this rank's test shard, summed over all ranks.

        Returns:
            ``loss`` (mean over all test samples) and ``acc`` (``None`` for reconstruction).
        """
        self.model.eval()
        device = self.device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        for x, y in self.loaders.test:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            with torch.autocast(**self._autocast):
                out = self.model(x)
                loss = self.loss_fn(out.float(), x if self.recon else y)
            totals[0] += loss.double() * x.shape[0]
            if not self.recon:
                totals[1] += (out.argmax(1) == y).sum()
            totals[2] += x.shape[0]
        loss_sum, n_correct, count = _all_reduce_sum(totals, self.ctx).tolist()
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "acc": None if self.recon else n_correct / count}

    def _log(self, row: dict[str, Any]) -> None:
        logger.info(
            "epoch %d/%d: train loss %.4f%s, test loss %.4f%s, %.0f img/s, %.1f s",
            row["epoch"],
            self.cfg.epochs,
            row["train_loss"],
            "" if self.recon else f" acc {row['train_acc']:.4f}",
            row["test_loss"],
            "" if self.recon else f" acc {row['test_acc']:.4f}",
            row["images_per_s"],
            self.elapsed,
        )

    def _record(self, row: dict[str, Any], save: bool) -> None:
        """Append ``row`` to ``metrics.jsonl`` and, if ``save``, write the checkpoint (rank 0).

        Collective when ``save`` (all ranks call it): under ``distributed_strategy: shard`` the
        owners send their inverses to rank 0, so that the checkpoint resumes exactly.
        """
        opt_state = consolidated_state_dict(self.optimizer) if save else None
        if not self.ctx.is_main:
            return
        with open(self.run_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(row) + "\n")
        if save:
            save_checkpoint(
                {
                    "epoch": row["epoch"],
                    "config": config_to_dict(self.cfg),
                    "model": self.model.state_dict(),
                    "optimizer": opt_state,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "rng": capture_rng_state(),
                    "elapsed_s": self.elapsed,
                    "metrics": self.rows,
                },
                self.run_dir / CHECKPOINT_NAME,
            )


def _check_model_state(model: nn.Module, saved: dict[str, Any], path: str | Path) -> None:
    """Refuse a model state with a missing or extra entry or a tensor of another shape."""
    expected = model.state_dict()
    where = f"checkpoint: {str(path)!r} entry"
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(
            f"{where} model[{missing[0]!r}] is missing ({len(missing)} entries of the configured "
            f"model are: {missing[:5]})"
        )
    extra = [k for k in saved if k not in expected]
    if extra:
        raise CheckpointError(
            f"{where} model[{extra[0]!r}] is not in the configured model ({len(extra)} unknown "
            f"entries: {extra[:5]})"
        )
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{where} model[{key!r}] has shape {tuple(tensor.shape)}; the configured model's "
                f"is {tuple(expected[key].shape)}"
            )


def _check_torch_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], path: str | Path
) -> None:
    """Refuse a torch optimizer state whose parameters or per-parameter tensors do not fit."""
    where = f"checkpoint: {str(path)!r} entry optimizer"
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a torch optimizer state dict (state, param_groups)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    if len(ids) != len(params):
        raise CheckpointError(
            f"{where}: {len(ids)} parameters; the configured optimizer has {len(params)}"
        )
    by_id = dict(zip(ids, params))
    for pid, entries in state.items():
        if pid not in by_id or not isinstance(entries, dict):
            raise CheckpointError(f"{where}['state'][{pid!r}] is not a parameter's state")
        for name, value in entries.items():
            shape = by_id[pid].shape
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != shape:
                raise CheckpointError(
                    f"{where}['state'][{pid!r}][{name!r}] has shape {tuple(value.shape)}; its "
                    f"parameter's is {tuple(shape)}"
                )


def _build_model(cfg: TrainConfig, bundle: DataBundle, device: torch.device) -> nn.Module:
    model = build_model(cfg.model, bundle.in_channels, bundle.image_size, bundle.num_classes)
    if cfg.sampled_backprop.enabled:
        from kfac_tn.nn import convert_sampled

        sb = cfg.sampled_backprop
        model = convert_sampled(model, keep_prob=sb.keep_prob, axis=sb.axis.value, layers=sb.layers)
    return model.to(device)


def _wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


class _Progress:
    """An epoch's progress bar, refreshed with the running loss/accuracy; a no-op if disabled."""

    def __init__(self, total: int, desc: str, *, enabled: bool, every: int, accuracy: bool):
        from tqdm.auto import tqdm

        self._total, self._enabled, self._every, self._accuracy = total, enabled, every, accuracy
        self._t0 = time.perf_counter()
        self._bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)

    def update(self, step: int, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        """Advance one step; every ``every`` steps and at the end show the running metrics."""
        self._bar.update()
        if self._enabled and ((step + 1) % self._every == 0 or step + 1 == self._total):
            post = {"loss": f"{loss_sum.item() / seen:.4f}"}  # host sync only when displayed
            if self._accuracy:
                post["acc"] = f"{correct.item() / seen:.4f}"
            post["img/s"] = f"{seen / (time.perf_counter() - self._t0):.0f}"
            self._bar.set_postfix(post)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    (run_dir / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def self_tuning_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float | int | None]:
    """KFAC's self-tuning values for a metrics row (``{}`` for other optimizers).

    Args:
        optimizer: The run's optimizer.

    Returns:
        ``damping`` (first param group), ``rho``, ``step_scale`` and ``skipped_steps``; a
        non-finite ``rho`` (no adaptation yet) is ``None`` so that the row stays valid JSON.
    """
    if not isinstance(optimizer, KFAC):
        return {}
    stats = optimizer.stats
    rho = float(stats["rho"])
    return {
        "damping": float(stats["damping"][0]),
        "rho": rho if math.isfinite(rho) else None,
        "step_scale": float(stats["step_scale"]),
        "skipped_steps": int(stats["skipped_steps"]),
    }
