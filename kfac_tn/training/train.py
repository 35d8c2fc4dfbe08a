"""Training loop behind ``kfac-tn train``: :func:`train`, driven by a :class:`TrainConfig`.

Per run directory (``out_dir/run_name``, rank 0 only):

- ``config.yaml`` -- the resolved config (every key, defaults included),
- ``metrics.jsonl`` -- one JSON row per epoch: ``epoch, train_loss, train_acc, test_loss,
  test_acc, wall_clock_s, lr, images_per_s, max_memory_mib`` (accuracies are ``null`` for
  reconstruction; peak CUDA memory of the epoch on this rank, ``null`` on CPU),
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
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kfac_tn.optim.placement import consolidated_state_dict
from kfac_tn.training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from kfac_tn.training.config import (
    ConfigError,
    Distributed,
    OptimizerName,
    Precision,
    ScheduleConfig,
    ScheduleName,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    save_config,
)
from kfac_tn.training.data import build_datasets, build_loaders
from kfac_tn.training.models import build_model, is_reconstruction

__all__ = [
    "DistributedRunError",
    "RunResult",
    "build_optimizer",
    "lr_factor",
    "read_metrics",
    "resolve_device",
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


def _torch_dtype(name: Any) -> torch.dtype | None:
    return None if name is None else getattr(torch, str(name))


def build_optimizer(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    reconstruction: bool,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> torch.optim.Optimizer:
    """Instantiate the configured optimizer for ``model``.

    For KFAC the keyword arguments are the ``optimizer`` section's KFAC keys plus
    ``loss`` (``mse`` for reconstruction, else ``cross_entropy``) and ``loss_reduction="mean"``,
    matching the loss the loop minimises, and the loop's ``grad_scaler`` (fp16), whose scale KFAC
    divides out of its gradient factors.
    """
    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == OptimizerName.SGD:
        return torch.optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            dampening=o.dampening,
        )
    if o.name in (OptimizerName.ADAM, OptimizerName.ADAMW):
        cls = torch.optim.Adam if o.name == OptimizerName.ADAM else torch.optim.AdamW
        return cls(
            params,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            amsgrad=o.amsgrad,
        )
    from kfac_tn.optimizer import KFAC

    layer_settings = None
    if o.layer_settings:
        layer_settings = {
            pattern: override
            if override == "skip"
            else {
                k: _torch_dtype(v) if k in ("factor_dtype", "inverse_dtype") else v
                for k, v in override.items()
            }
            for pattern, override in o.layer_settings.items()
        }
    return KFAC(
        model,
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        damping=o.damping,
        factor_decay=o.factor_decay,
        factor_update_period=o.factor_update_period,
        inverse_update_period=o.inverse_update_period,
        kfac_approx=o.kfac_approx.value,
        fisher_type=o.fisher_type.value,
        mc_samples=o.mc_samples,
        loss="mse" if reconstruction else "cross_entropy",
        loss_reduction="mean",
        inversion=o.inversion.value,
        kl_clip=o.kl_clip,
        factor_dtype=_torch_dtype(o.factor_dtype),
        inverse_dtype=_torch_dtype(o.inverse_dtype),
        layer_settings=layer_settings,
        distributed_strategy=o.distributed_strategy.value,
        bucket_cap_mb=o.bucket_cap_mb,
        grad_scaler=grad_scaler,
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``run_dir/metrics.jsonl`` (empty list if there is none)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
class _DistContext:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(cfg: TrainConfig) -> tuple[_DistContext, torch.device]:
    import os

    if cfg.distributed == Distributed.OFF:
        return _DistContext(), resolve_device(cfg.device)
    from kfac_tn.distributed import init_process_group_from_env

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank, world, _ = init_process_group_from_env(backend, timeout_s=cfg.dist_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return _DistContext(True, rank, world, local_rank), device


def _all_reduce_sum(t: torch.Tensor, ctx: _DistContext) -> torch.Tensor:
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------
# Run directory and logging
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_logging(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


def _new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_name or (
        f"{cfg.model.name}-{cfg.optimizer.name.value}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = Path(cfg.out_dir).expanduser() / name
    if (run_dir / METRICS_NAME).exists() or (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"run_name: {str(run_dir)!r} already holds a run; pass --resume {run_dir} to continue "
            f"it or choose another run_name/out_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, *, resume: str | Path | None = None, stop_after: int | None = None
) -> RunResult:
    """Train and evaluate as configured; see the module docstring for the outputs.

    Args:
        cfg: validated config. When resuming, it must agree with the checkpoint's config except
            for :data:`RESUMABLE_KEYS` (e.g. more ``epochs`` or another ``device``).
        resume: run directory to continue from its ``checkpoint.pt``.
        stop_after: end this invocation (with a checkpoint) after this many more epochs even
            if ``cfg.epochs`` is not reached, as a preempted job would; resume later.

    Returns:
        The run directory and the per-epoch metrics.

    Raises:
        ConfigError: on an invalid config or an occupied run directory.
        CheckpointError: on a missing, corrupt or mismatched checkpoint.
        DistributedRunError: when a distributed run fails (e.g. a peer died).
    """
    ctx, device = _init_distributed(cfg)
    try:
        return _train(cfg, resume, ctx, device, stop_after)
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
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    resume: str | Path | None,
    ctx: _DistContext,
    device: torch.device,
    stop_after: int | None,
) -> RunResult:
    state = None
    if resume is not None:
        run_dir = Path(resume).expanduser()
        state = load_checkpoint(run_dir / CHECKPOINT_NAME, map_location="cpu")
        try:
            saved_cfg = config_from_dict(state["config"])
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint: stored config is invalid: {exc}") from exc
        mismatch = _config_mismatch(config_to_dict(saved_cfg), config_to_dict(cfg))
        if mismatch:
            raise CheckpointError(
                f"checkpoint: {str(run_dir / CHECKPOINT_NAME)!r} belongs to a different run:\n  "
                + "\n  ".join(mismatch)
            )
    else:
        run_dir = _new_run_dir(cfg) if ctx.is_main else None

    with _file_logging(run_dir / LOG_NAME if ctx.is_main and run_dir else None):
        if ctx.is_main:
            save_config(cfg, run_dir / CONFIG_NAME)
            logger.info(
                "run directory %s (device %s, world size %d)", run_dir, device, ctx.world_size
            )
        return _loop(cfg, state, run_dir, ctx, device, stop_after)


def _loop(
    cfg: TrainConfig,
    state: dict[str, Any] | None,
    run_dir: Path | None,
    ctx: _DistContext,
    device: torch.device,
    stop_after: int | None = None,
) -> RunResult:
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after: {stop_after!r} is out of range; allowed: >= 1 or None")
    _seed_everything(cfg.seed)
    recon = is_reconstruction(cfg.model)
    bundle = build_datasets(cfg.data)
    loaders = build_loaders(
        bundle,
        batch_size=cfg.batch_size,
        test_batch_size=cfg.test_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=device.type == "cuda",
    )
    model = build_model(cfg.model, bundle.in_channels, bundle.image_size, bundle.num_classes)
    if cfg.sampled_backprop.enabled:
        from kfac_tn.nn import convert_sampled

        sb = cfg.sampled_backprop
        model = convert_sampled(model, keep_prob=sb.keep_prob, axis=sb.axis.value, layers=sb.layers)
    model.to(device)

    train_model: nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    steps_per_epoch = len(loaders.train_loader(0))
    if cfg.data.limit_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.data.limit_batches)
    use_amp = cfg.precision != Precision.FP32
    amp_dtype = torch.bfloat16 if cfg.precision == Precision.BF16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == Precision.FP16)
    loss_fn: nn.Module = nn.MSELoss() if recon else nn.CrossEntropyLoss()
    optimizer = build_optimizer(cfg, model, reconstruction=recon, grad_scaler=scaler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.schedule, step, steps_per_epoch, cfg.epochs)
    )

    start_epoch, elapsed, rows = 0, 0.0, []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint: state does not fit the configured model/optimizer ({exc})"
            ) from exc
        restore_rng_state(state["rng"])
        start_epoch, elapsed, rows = state["epoch"], state["elapsed_s"], list(state["metrics"])
        logger.info("resumed from epoch %d", start_epoch)
        if ctx.is_main:  # drop rows written after the checkpoint (e.g. by a crashed run)
            _write_metrics(run_dir, rows)

    show_bar = ctx.is_main and not cfg.quiet and sys.stderr.isatty()
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_stats = _train_epoch(
            cfg,
            epoch,
            train_model,
            optimizer,
            scheduler,
            scaler,
            loss_fn,
            loaders,
            device,
            steps_per_epoch,
            recon,
            use_amp,
            amp_dtype,
            ctx,
            show_bar,
        )
        train_time = time.perf_counter() - t0
        test_stats = _evaluate(model, loss_fn, loaders.test, device, recon, use_amp, amp_dtype, ctx)
        elapsed += time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,
            "train_loss": train_stats["loss"],
            "train_acc": train_stats["acc"],
            "test_loss": test_stats["loss"],
            "test_acc": test_stats["acc"],
            "wall_clock_s": elapsed,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": train_stats["images"] / max(train_time, 1e-9),
            "max_memory_mib": (
                torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            ),
        }
        rows.append(row)
        logger.info(
            "epoch %d/%d: train loss %.4f%s, test loss %.4f%s, %.0f img/s, %.1f s",
            epoch + 1,
            cfg.epochs,
            row["train_loss"],
            "" if recon else f" acc {row['train_acc']:.4f}",
            row["test_loss"],
            "" if recon else f" acc {row['test_acc']:.4f}",
            row["images_per_s"],
            elapsed,
        )
        last = epoch + 1 == end_epoch
        period = cfg.checkpoint_period
        save_now = last or (period > 0 and (epoch + 1) % period == 0)
        # collective (all ranks): under distributed_strategy "shard" the owners send their
        # inverses to rank 0 so that the checkpoint resumes exactly (kfac_tn.distributed)
        opt_state = consolidated_state_dict(optimizer) if save_now else None
        if ctx.is_main:
            with open(run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(row) + "\n")
            if save_now:
                save_checkpoint(
                    {
                        "epoch": epoch + 1,
                        "config": config_to_dict(cfg),
                        "model": model.state_dict(),
                        "optimizer": opt_state,
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "rng": capture_rng_state(),
                        "elapsed_s": elapsed,
                        "metrics": rows,
                    },
                    run_dir / CHECKPOINT_NAME,
                )
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    if ctx.is_main and rows:
        from kfac_tn.training.plots import plot_run

        plot_run(run_dir, run_dir / PLOT_NAME)
        logger.info("wrote %s", run_dir / PLOT_NAME)
    return RunResult(run_dir, rows)


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    (run_dir / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_epoch(
    cfg: TrainConfig,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    loaders: Any,
    device: torch.device,
    steps: int,
    recon: bool,
    use_amp: bool,
    amp_dtype: torch.dtype,
    ctx: _DistContext,
    show_bar: bool,
) -> dict[str, float | None]:
    from tqdm.auto import tqdm

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(
        total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_bar, leave=False
    )
    for step, (x, y) in enumerate(loaders.train_loader(epoch)):
        if step >= steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        target = x if recon else y
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = model(x)
            loss = loss_fn(out.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = x.shape[0]
        seen += n
        loss_sum += loss.detach().double() * n
        if not recon:
            correct += (out.detach().argmax(1) == y).sum()
        bar.update()
        if show_bar and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
            post = {"loss": f"{loss_sum.item() / seen:.4f}"}  # host sync only when displayed
            if not recon:
                post["acc"] = f"{correct.item() / seen:.4f}"
            post["img/s"] = f"{seen / (time.perf_counter() - t0):.0f}"
            bar.set_postfix(post)
    bar.close()
    _sync(device)
    totals = torch.stack(
        [loss_sum, correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)]
    )
    totals = _all_reduce_sum(totals, ctx).tolist()
    return {
        "loss": totals[0] / totals[2],
        "acc": None if recon else totals[1] / totals[2],
        "images": totals[2],
    }


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Any,
    device: torch.device,
    recon: bool,
    use_amp: bool,
    amp_dtype: torch.dtype,
    ctx: _DistContext,
) -> dict[str, float | None]:
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            out = model(x)
            loss = loss_fn(out.float(), x if recon else y)
        totals[0] += loss.double() * x.shape[0]
        if not recon:
            totals[1] += (out.argmax(1) == y).sum()
        totals[2] += x.shape[0]
    loss_sum, n_correct, count = _all_reduce_sum(totals, ctx).tolist()
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc": None if recon else n_correct / count}
