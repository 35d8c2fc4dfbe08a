"""Benchmark the two simplified KFAC-expand strategies and the cost model that picks between them.

Run ``python -m kfac_tn.benchmarks.expand_strategies [--threads T] [--repeats R] [--quick]
[--out DIR]``.

For each stride-1 layer shape (3c3d, 2c2d, All-CNN-C, ResNet and VGG-style 3×3 / 5×5 layers, small
and large channel counts, 1-d, 3-d and 1×7 kernels) it times, interleaved:

* ``gemm``: one Gram GEMM of the strided patch view (``kfac_tn.tn.kfac._view_expand``);
* ``lag``: the lag products of :mod:`kfac_tn.tn.lag`;
* ``plain``: the plain network (opt_einsum's path; ``impl='tn'``);

and prints the cost model's estimate of each (:mod:`kfac_tn.tn.cost`, this machine's
calibration), the choice of ``impl='auto'`` (plain, or the simplified strategy
:func:`kfac_tn.tn.expand_strategy` picks), the measured winner, and the fraction of the best
time the choice achieves. ``--fit`` fits the four constants of a
:class:`~kfac_tn.tn.cost.CpuCalibration` to the ``flops`` / ``elements`` / ``calls`` columns and
the measured times (relative least squares, non-negative) and prints them beside the machine's
CPU capability: that is how :data:`~kfac_tn.tn.cost.CALIBRATIONS` was filled (one thread).
``--out DIR`` writes ``DIR/expand_strategies.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from kfac_tn.benchmarks._timing import time_calls
from kfac_tn.tn import choose_impl, expand_strategy
from kfac_tn.tn._common import make_spec, prod
from kfac_tn.tn.cost import (
    CpuCalibration,
    plain_features,
    plain_seconds,
    simplified_seconds,
)
from kfac_tn.tn.kfac import _expand_tn, _view_expand
from kfac_tn.tn.lag import lag_cost, lag_expand_gram, lag_plan

logger = logging.getLogger(__name__)

# (input shape [N, C, *spatial], kernel size, padding)
SHAPES: tuple[tuple[tuple[int, ...], object, object], ...] = (
    ((128, 3, 32, 32), 5, 0),  # 3c3d conv1
    ((128, 64, 14, 14), 3, 0),  # 3c3d conv2
    ((128, 96, 6, 6), 3, 1),  # 3c3d conv3
    ((128, 64, 32, 32), 3, 1),
    ((128, 128, 16, 16), 3, 1),
    ((128, 256, 8, 8), 3, 1),
    ((128, 512, 4, 4), 3, 1),
    ((128, 16, 32, 32), 3, 1),
    ((128, 32, 16, 16), 3, 1),
    ((128, 32, 16, 16), 5, 2),
    ((128, 64, 8, 8), 5, 2),
    ((128, 128, 4, 4), 3, 1),
    ((32, 64, 56, 56), 3, 1),
    ((128, 256, 2, 2), 3, 1),
    ((128, 48, 17, 17), (1, 7), (0, 3)),
    ((128, 8, 32, 32), 3, 1),
    ((128, 3, 32, 32), 3, 1),
    ((128, 4, 16, 16), 3, 1),
    ((32, 1, 28, 28), 5, 2),  # 2c2d conv1
    ((128, 32, 14, 14), 5, 2),  # 2c2d conv2
    ((128, 64, 16, 16), 1, 0),
    ((128, 128, 8, 8), 2, 0),
    ((16, 32, 16, 16, 16), 3, 1),
    ((128, 64, 64), 3, 1),
    ((128, 16, 8, 8), 3, 1),
    ((64, 32, 8, 8), 3, 1),  # digits CNN conv2 (the main job)
    ((64, 64, 4, 4), 3, 1),  # digits CNN conv3
    ((128, 64, 4, 4), 3, 1),
    ((64, 64, 7, 7), 5, 2),
    ((64, 16, 7, 7), 5, 2),
    ((128, 16, 7, 7), (1, 7), (0, 3)),
    ((64, 256, 7, 7), (1, 7), (0, 3)),
)
QUICK = (1, 2, 16, 26)  # indices into SHAPES for --quick


def measure(shape, kernel, padding, repeats: int) -> dict:
    """Time both strategies on one shape; return the row (times, estimates, choice)."""
    x = torch.randn(shape)
    n, c = shape[:2]
    spec = make_spec(shape[2:], kernel, 1, padding, 1, 1)
    lag = lag_expand_gram(x, spec, 1)
    reference = _view_expand(x, spec, 1, 1.0)
    error = float((lag - reference).abs().max() / reference.abs().max())
    plain = plain_features(spec, n, c)
    timings = time_calls(
        {
            "gemm": lambda: _view_expand(x, spec, 1, 1.0),
            "lag": lambda: lag_expand_gram(x, spec, 1),
            "plain": lambda: _expand_tn(x, spec, False),
        },
        repeats=repeats,
        min_round_s=0.0,
    )
    d = c * prod(spec.kernel_size)
    positions = prod(spec.out_spatial)
    blocks = 1 if d < 512 else (3 if d < 2048 else 4)
    measured = {k: t.median_s for k, t in timings.items()}
    impl = choose_impl("expand", spec, n, c, x.dtype, "cpu")
    choice = "plain" if impl == "tn" else expand_strategy(spec, n, c, "cpu")
    estimated = dict(simplified_seconds(spec, n, c, "cpu"))
    estimated["plain"] = plain_seconds(plain)
    return {
        "shape": list(shape),
        "kernel": kernel,
        "padding": padding,
        "gemm_flops": 2 * d * d * n * positions * (blocks + 1) / (2 * blocks),
        "gemm_elements": n * d * positions,
        "lag": lag_cost(lag_plan(spec), n, c, 1),
        "plain": plain,
        "estimated_s": estimated,
        "measured_s": measured,
        "choice": choice,
        "winner": min(measured, key=measured.__getitem__),
        "efficiency": min(measured.values()) / measured[choice],
        "rel_err": error,
    }


def fit_calibration(rows: list[dict]) -> CpuCalibration:
    """Fit the time model's constants to measured rows (non-negative relative least squares).

    Each strategy's measured time ``t`` gives the equation ``features · θ / t = 1`` with
    ``θ = (s_flop, s_element, s_call, s_plain_flop)``: GEMM and lag FLOPs share ``s_flop``, the
    plain network's FLOPs have their own ``s_plain_flop = s_flop / plain_rate``.

    Args:
        rows: Rows of :func:`measure`.

    Returns:
        The fitted calibration.
    """
    from scipy.optimize import nnls

    equations: list[list[float]] = []
    for r in rows:
        t = r["measured_s"]
        gemm = [r["gemm_flops"], r["gemm_elements"], 1.0, 0.0]
        lag = [r["lag"]["flops"], r["lag"]["elements"], r["lag"]["calls"], 0.0]
        p = r["plain"]
        plain = [0.0, p["elements"], p["calls"], p["flops"]]
        for features, seconds in ((gemm, t["gemm"]), (lag, t["lag"]), (plain, t["plain"])):
            equations.append([f / seconds for f in features])
    a = torch.tensor(equations, dtype=torch.float64)
    scale = a.abs().amax(0).clamp_min(1e-300)  # column scaling for the solver
    theta, _ = nnls((a / scale).numpy(), torch.ones(len(equations), dtype=torch.float64).numpy())
    s_flop, s_element, s_call, s_plain = (float(v) for v in torch.from_numpy(theta) / scale)
    return CpuCalibration(s_flop, s_element, s_call, s_flop / s_plain if s_plain > 0 else 1.0)


def format_table(rows: list[dict]) -> str:
    """Format the rows: shape, estimates, measurements, choice and its efficiency."""
    head = (
        f"{'shape':24} {'kernel':7} {'est gemm':>9} {'est lag':>9} {'est plain':>9} "
        f"{'gemm ms':>8} {'lag ms':>8} {'plain ms':>8} {'choice':>6} {'winner':>6} {'eff':>5}"
    )
    lines = [head]
    for r in rows:
        est, meas = r["estimated_s"], r["measured_s"]
        lines.append(
            f"{str(tuple(r['shape'])):24} {str(r['kernel']):7} {est['gemm'] * 1e3:9.1f} "
            f"{est['lag'] * 1e3:9.1f} {est['plain'] * 1e3:9.1f} {meas['gemm'] * 1e3:8.1f} "
            f"{meas['lag'] * 1e3:8.1f} {meas['plain'] * 1e3:8.1f} "
            f"{r['choice']:>6} {r['winner']:>6} {r['efficiency']:5.2f}"
        )
    effs = [r["efficiency"] for r in rows]
    lines.append(
        f"choice = winner on {sum(r['choice'] == r['winner'] for r in rows)}/{len(rows)} shapes; "
        f"worst efficiency {min(effs):.2f}, geometric mean "
        f"{math.exp(sum(math.log(e) for e in effs) / len(effs)):.2f}; lag speed-up where chosen: "
        + ", ".join(
            f"{r['measured_s']['gemm'] / r['measured_s']['lag']:.1f}"
            for r in rows
            if r["choice"] == "lag"
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point; returns the rows."""
    parser = argparse.ArgumentParser(
        prog="python -m kfac_tn.benchmarks.expand_strategies", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per strategy")
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes only")
    parser.add_argument("--out", type=Path, default=None, help="write expand_strategies.json")
    parser.add_argument("--fit", action="store_true", help="fit and print a CpuCalibration")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: {args.threads} (must be >= 1)")
        torch.set_num_threads(args.threads)
    shapes = [SHAPES[i] for i in QUICK if i < len(SHAPES)] if args.quick else list(SHAPES)
    rows = []
    for shape, kernel, padding in shapes:
        rows.append(measure(shape, kernel, padding, args.repeats))
        logger.info("%s done", shape)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} cpu={capability}")
    print(format_table(rows))
    if args.fit:
        print(f"fitted for {capability}: {fit_calibration(rows)}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "expand_strategies.json").write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.out / 'expand_strategies.json'}")
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
