"""Plots of run metrics (``metrics.jsonl``): one run's curves and multi-run comparisons.

Uses matplotlib's non-interactive Agg backend through an explicit ``Figure`` (no pyplot global
state), so it works headless and from several threads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["compare_runs", "load_run", "plot_run", "read_rows", "summarize_runs"]

logger = logging.getLogger(__name__)


def load_run(run_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Label and metrics rows of a run directory.

    Args:
        run_dir: directory containing ``metrics.jsonl``.

    Returns:
        ``(label, rows)``; the label is the directory name.

    Raises:
        ValueError: if ``run_dir`` has no ``metrics.jsonl`` or it has no rows.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"run_dir: {str(run_dir)!r} has no metrics.jsonl (not a kfac-tn run?)")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"run_dir: {str(run_dir)!r} has an empty metrics.jsonl")
    return Path(run_dir).name, rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file: one JSON object per non-blank line.

    Args:
        path: The file.

    Returns:
        Its rows, in order.

    Raises:
        ValueError: naming the file and the line if a line is not UTF-8, not JSON (e.g. cut
            off by a crash) or not a JSON object.
    """
    data = Path(path).read_bytes()
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"metrics: {str(path)!r} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where}: not UTF-8 text; the file is corrupt") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); the file is "
                f"truncated or corrupt"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: {line.strip()[:40]!r} is not a JSON object (one per epoch)")
        rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=110)
    return out


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Overlay runs: test accuracy and training loss against epoch and against wall-clock time.

    Reconstruction runs (no accuracy) show test loss in the accuracy panels.

    Args:
        run_dirs: run directories (each with ``metrics.jsonl``).
        out: PNG file to write.

    Returns:
        The PNG path.

    Raises:
        ValueError: if ``run_dirs`` is empty or a directory is not a run.
    """
    if not run_dirs:
        raise ValueError("run_dirs: [] is empty; pass at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    has_acc = any(r.get("test_acc") is not None for _, rows in runs for r in rows)
    top = "test_acc" if has_acc else "test_loss"
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], "epoch", top),
        (axes[0, 1], "wall_clock_s", top),
        (axes[1, 0], "epoch", "train_loss"),
        (axes[1, 1], "wall_clock_s", "train_loss"),
    ]
    for ax, x, y in panels:
        for label, rows in runs:
            xs, ys = _series(rows, x, y)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch" if x == "epoch" else "wall-clock time [s]")
        ax.set_ylabel(y.replace("_", " "))
        if y.endswith("loss"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    return _save(fig, out)


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Plot one run's training/test loss and accuracy per epoch (and KFAC's damping).

    Args:
        run_dir: run directory.
        out: PNG file to write.

    Returns:
        The PNG path.
    """
    label, rows = load_run(run_dir)
    tuned = any(row.get("damping") is not None for row in rows)
    fig = Figure(figsize=(15 if tuned else 10, 4), layout="constrained")
    axes = fig.subplots(1, 3 if tuned else 2)
    ax_loss, ax_acc = axes[0], axes[1]
    for key in ("train_loss", "test_loss"):
        ax_loss.plot(*_series(rows, "epoch", key), marker="o", markersize=3, label=key)
    ax_loss.set_yscale("log")
    for key in ("train_acc", "test_acc"):
        xs, ys = _series(rows, "epoch", key)
        if xs:
            ax_acc.plot(xs, ys, marker="o", markersize=3, label=key)
    if not ax_acc.lines:  # reconstruction: no accuracy
        ax_acc.text(0.5, 0.5, "no accuracy (reconstruction)", ha="center", va="center")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if tuned:
        _plot_damping(axes[2], rows)
    fig.suptitle(label)
    return _save(fig, out)


def _plot_damping(ax: Any, rows: list[dict[str, Any]]) -> None:
    """KFAC's adapted damping per epoch (log scale)."""
    ax.plot(*_series(rows, "epoch", "damping"), marker="o", markersize=3, label="damping")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("damping (end of epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def summarize_runs(run_dirs: Sequence[str | Path], target: float | None = None) -> str:
    """Plain-text table per run: epochs, best test accuracy, first epoch reaching ``target``.

    Args:
        run_dirs: run directories.
        target: test-accuracy threshold in ``(0, 1]`` (``None``: no target columns).

    Returns:
        The table (one header line, one line per run). Reconstruction runs show their best test
        loss instead of an accuracy.

    Raises:
        ValueError: if ``target`` is outside ``(0, 1]`` or a directory is not a run.
    """
    if target is not None and not 0 < target <= 1:
        raise ValueError(f"target: {target!r} is out of range; allowed: (0, 1]")
    header = f"{'run':<28} {'epochs':>6} {'best test acc':>13}"
    if target is not None:
        header += f" {'epoch >= ' + format(target, '.4g'):>14} {'wall-clock [s]':>14}"
    lines = [header]
    for run_dir in run_dirs:
        label, rows = load_run(run_dir)
        accs = [r.get("test_acc") for r in rows]
        if any(a is None for a in accs):
            best = f"loss {min(r['test_loss'] for r in rows):.4g}"
        else:
            best = f"{max(accs):.4f}"
        line = f"{label:<28} {len(rows):>6} {best:>13}"
        if target is not None:
            hit = next((r for r in rows if (r.get("test_acc") or 0.0) >= target), None)
            reached = "-" if hit is None else str(hit["epoch"])
            wall = "-" if hit is None else f"{hit['wall_clock_s']:.1f}"
            line += f" {reached:>14} {wall:>14}"
        lines.append(line)
    return "\n".join(lines)
