"""Robustness grid over seeds: KFAC's defaults (and variants) on the digits CNN, lr × weight decay.

``python -m kfac_tn.benchmarks.robustness [--seeds 10] [--first-seed 0] [--lrs ...]
[--weight-decays ...] [--batch-size 64] [--variant NAME=JSON ...] [--threads 1] [--out DIR]``

Each run is the loop of ``tests/optim/test_robust_defaults.py`` (digits CNN, batch 64 unless
``--batch-size``,
:data:`EPOCHS` epochs, ``KFAC(model, lr=lr, weight_decay=wd)`` plus the variant's keyword
arguments, no schedule) with ``torch.manual_seed(seed)`` for the initialisation and the data
order; seed 0 is the test's run. A run passes the grid's rule (:func:`violations`) when no step
was skipped, its test accuracy never falls by more than :data:`MAX_DROP` from one epoch to the
next and ends at :data:`MIN_FINAL` or above. The table lists every failing run, then per
variant the failures, the worst drop and the mean and lowest final accuracy.

The ``curvature_budget`` plans depend on the expand cost model's CPU calibration; to see the
plan an AVX2 machine takes on an AVX-512 one, run with ``ATEN_CPU_CAPABILITY=avx2`` (torch then
also uses its AVX2 kernels). ``--out DIR`` writes ``robustness.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kfac_tn import KFAC

__all__ = ["EPOCHS", "MAX_DROP", "MIN_FINAL", "Run", "main", "train_digits", "violations"]

logger = logging.getLogger(__name__)

EPOCHS = 3
"""Epochs per run (as the test)."""
MAX_DROP = 0.03
"""Largest allowed fall of the test accuracy from one epoch to the next."""
MIN_FINAL = 0.95
"""Lowest allowed test accuracy after the last epoch."""
LRS = (0.01, 0.05, 0.3, 1.0)
WEIGHT_DECAYS = (5e-4, 0.0)
BATCH_SIZE = 64


@dataclass(frozen=True)
class Run:
    """One grid point.

    Attributes:
        variant: Variant name (``kfac``: the defaults).
        lr: Learning rate.
        weight_decay: Weight decay.
        seed: Seed of the initialisation and the data order.
        accuracies: Test accuracy after each epoch.
        skipped_steps: Steps the optimizer skipped (non-finite values).
    """

    variant: str
    lr: float
    weight_decay: float
    seed: int
    accuracies: tuple[float, ...]
    skipped_steps: int


def train_digits(
    lr: float,
    weight_decay: float,
    seed: int = 0,
    *,
    epochs: int = EPOCHS,
    options: Mapping[str, Any] | None = None,
    batch_size: int = BATCH_SIZE,
) -> tuple[list[float], dict]:
    """Train the digits CNN with KFAC and return the test accuracy after each epoch.

    Args:
        lr: Learning rate.
        weight_decay: Weight decay.
        seed: Seed of the initialisation and of the data order.
        epochs: Epochs.
        options: Further KFAC keyword arguments.
        batch_size: Samples per step (the last step of an epoch may have fewer).

    Returns:
        ``(accuracies, opt.stats)``.

    Raises:
        FloatingPointError: If a training loss is not finite.
    """
    from kfac_tn.training.data import load_digits_tensors
    from kfac_tn.training.models import DigitsCNN

    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = KFAC(model, lr=lr, weight_decay=weight_decay, **dict(options or {}))
    gen = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(y_train), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss {loss.item()} at lr {lr}, seed {seed}")
        with torch.no_grad():
            accuracies.append((model(x_test).argmax(1) == y_test).double().mean().item())
    return accuracies, opt.stats


def violations(accuracies: Sequence[float], skipped_steps: int = 0) -> list[str]:
    """Return how a run breaks the grid's rule (empty: it passes).

    Args:
        accuracies: Test accuracy after each epoch.
        skipped_steps: Steps the optimizer skipped.

    Returns:
        Human-readable reasons.
    """
    out = []
    if skipped_steps:
        out.append(f"{skipped_steps} skipped steps")
    drops = [a - b for a, b in zip(accuracies, accuracies[1:])]
    if drops and max(drops) > MAX_DROP:
        out.append(f"drop {max(drops):.3f} > {MAX_DROP}")
    if accuracies and accuracies[-1] < MIN_FINAL:
        out.append(f"final {accuracies[-1]:.3f} < {MIN_FINAL}")
    return out


def run_grid(
    variants: Mapping[str, Mapping[str, Any]],
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    seeds: Sequence[int],
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
) -> list[Run]:
    """Run every variant on every grid point.

    Args:
        variants: Name -> KFAC keyword arguments.
        lrs: Learning rates.
        weight_decays: Weight decays.
        seeds: Seeds.
        epochs: Epochs per run.
        batch_size: Samples per step.

    Returns:
        One :class:`Run` per variant and grid point.
    """
    runs = []
    for name, wd, lr, seed in itertools.product(variants, weight_decays, lrs, seeds):
        accs, stats = train_digits(
            lr, wd, seed, epochs=epochs, options=variants[name], batch_size=batch_size
        )
        runs.append(Run(name, lr, wd, seed, tuple(accs), stats["skipped_steps"]))
        logger.info("%s lr %g wd %g seed %d: %s", name, lr, wd, seed, accs)
    return runs


def format_table(runs: Sequence[Run]) -> str:
    """Format the failing runs, then one summary line per variant."""
    lines = []
    for r in runs:
        reasons = violations(r.accuracies, r.skipped_steps)
        if reasons:
            accs = " / ".join(f"{a:.3f}" for a in r.accuracies)
            lines.append(
                f"FAIL {r.variant}: lr {r.lr:g} wd {r.weight_decay:g} seed {r.seed}: {accs} "
                f"({'; '.join(reasons)})"
            )
    lines.append("variant | runs | fail | worst drop | mean final | lowest final")
    for name in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == name]
        fails = sum(bool(violations(r.accuracies, r.skipped_steps)) for r in mine)
        drops = [a - b for r in mine for a, b in zip(r.accuracies, r.accuracies[1:])]
        finals = [r.accuracies[-1] for r in mine]
        lines.append(
            f"{name} | {len(mine)} | {fails} | {max(drops, default=0.0):.3f} | "
            f"{sum(finals) / len(finals):.4f} | {min(finals):.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    """Command-line entry point (see the module docstring); returns the runs."""
    parser = argparse.ArgumentParser(
        prog="python -m kfac_tn.benchmarks.robustness", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seeds", type=int, default=10, help="N seeds, from --first-seed on")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS))
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a KFAC variant, e.g. 'budget={\"curvature_budget\": 0.5}' (repeatable)",
    )
    parser.add_argument("--no-defaults", action="store_true", help="only the variants")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write DIR/robustness.json")
    args = parser.parse_args(argv)
    if args.first_seed < 0:
        parser.error(f"Invalid --first-seed: {args.first_seed} (must be >= 0)")
    if min(args.seeds, args.epochs, args.threads, args.batch_size) < 1:
        parser.error("--seeds, --epochs, --threads and --batch-size must be >= 1")
    variants: dict[str, dict] = {} if args.no_defaults else {"kfac": {}}
    for text in args.variant:
        name, _, options = text.partition("=")
        try:
            value = json.loads(options)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            parser.error(f"--variant {text!r}: expected NAME=JSON object")
        variants[name] = value
    if not variants:
        parser.error("nothing to run: --no-defaults without --variant")
    torch.set_num_threads(args.threads)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = run_grid(variants, args.lrs, args.weight_decays, seeds, args.epochs, args.batch_size)
    print(
        f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()} "
        f"epochs={args.epochs} batch_size={args.batch_size}"
    )
    print(format_table(runs))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "robustness.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))
        print(f"wrote {args.out / 'robustness.json'}")
    return runs


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
