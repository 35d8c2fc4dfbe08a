"""Benchmark a full training step: KFAC vs SGD and Adam (and curvlinops / BackPACK if installed).

Run ``python -m kfac_tn.benchmarks.step [--models 3c3d resnet18] [--batch-size 128] [--steps 20]
[--device cpu|cuda] [--threads T] [--inversion auto|eigen|cholesky] [--budget B | --no-budget]
[--eigenbasis-tolerance TAU] [--approx reduce expand] [--quick] [--out DIR]``.

A step is: forward, backward (with KFAC's capture hooks: input factors in the forward hooks,
gradient factors in the output-gradient hooks), then ``optimizer.step()``. KFAC runs in two
modes per approximation: fixed periods ``1/10`` (factors every step, inverses every 10 steps,
each layer on its own staggered phase) and ``curvature_budget=B`` (periods chosen per layer by
the optimizer's cost model after the first step; with ``budget_costs="measured"`` the warm-up
also covers its probe, so the timed steps use the chosen periods either way). Each step
is timed phase by phase with device synchronisation, and the
optimizers' steps are interleaved (step ``i`` of every optimizer back to back) so that load
changes on a shared machine hit all of them alike. After the warm-up the ``--steps`` timed steps
amortise the inversions as in training. Reported phases (seconds, mean over the timed steps):
``forward``, ``backward``, ``step``, ``total``, ``step_max`` (the slowest step phase: a spike
measure), and for KFAC the curvature work inside them, read from the optimizer's own phase timer
(:class:`kfac_tn.optim.schedule.CostMeter`, on for every timed step here): ``factors`` (capture
hooks and the factor EMA), ``inverses`` (decompositions) and ``fixed`` (preconditioning and the
finiteness checks), and apart from them ``tuning``: the self-tuning's quadratic-model terms and
loss evaluations (the step scale's JVP every step, the damping's loss every
``damping_adaptation_period`` steps, on the JVP's samples when it drew a sub-batch).
``--inversion auto`` (the default) is KFAC's own default (``inversion=None``: Cholesky for
KFAC layers). ``paths`` counts the decompositions per path during the timed steps (``eigh``,
``warm``, ``qr``, ``cholesky``; see :mod:`kfac_tn.optim.inverses`) and the layer steps
preconditioned in factored form (``factored``, :mod:`kfac_tn.optim.factored`), and
``periods`` holds the budget's chosen ``[factor, inverse]`` period per layer.
``peak_mem_bytes`` is the peak torch allocation during one further step (CUDA:
``max_memory_allocated``; CPU: the profiler's allocator events).

Variant rows: ``no-tuning`` for every approximation and mode (``step_size="fixed"``,
``damping_adaptation=False``: the curvature work alone, what the periods and the budget control);
for KFAC-expand (or, with ``--approx reduce``, KFAC-reduce) with fixed periods ``ekfac``
(``preconditioner="ekfac"``: per-sample gradients projected into the eigenbasis on every factor
step, eigen or auto inversion only) and, for models
with norm layers, ``no-norm`` (``norm_block="skip"``: the norm layers' scale and shift get
momentum SGD instead of the default 2×2 unitwise blocks, so its negative extra cost is what the
norm blocks cost) and ``qmodel-32`` (``qmodel_samples=32``: the self-tuning's JVP on half the
default's 64 samples, so its ``tuning`` column against the plain row's is what that option
saves). Each variant row also gets ``extra_vs_kfac_s``, its phase times minus those
of the plain row of its approximation and mode.

Comparison rows (when the packages import): ``curvlinops`` builds a ``KFACLinearOperator`` on the
batch every step (its own forward and backward), ``backpack`` runs the backward under its
``KFAC`` extension (one MC sample); both then use the same damped eigen inversion every 10 steps,
preconditioning, KL clipping and momentum-SGD update as ours, so the rows differ only in how
factors are computed.

Results go to stdout as two tables and, with ``--out DIR``, to ``DIR/results.json`` (one row per
model × optimizer × mode × variant: model, optimizer, kfac_approx, mode, variant, batch_size,
device, threads, time_s{phase}, curvature_s{part}, tuning_s, paths, periods, ratio_to_sgd,
peak_mem_bytes, and extra_vs_kfac_s for variants).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC, linalg
from kfac_tn.benchmarks._timing import measure_memory, synchronize
from kfac_tn.enums import BudgetCosts
from kfac_tn.optim.inverses import PATH_COUNTERS
from kfac_tn.optim.schedule import CURVATURE_KINDS, PROBE_START, PROBE_STEPS, TUNING

logger = logging.getLogger(__name__)

MODELS = ("3c3d", "resnet18", "resnet50")
INVERSE_PERIOD = 10
VARIANTS: dict[str, dict[str, str | bool]] = {
    "no-tuning": dict(step_size="fixed", damping_adaptation=False),
    "ekfac": dict(preconditioner="ekfac"),
    "no-norm": dict(norm_block="skip"),
    "qmodel-32": dict(qmodel_samples=32),
}
"""KFAC settings of the variant rows (on top of the row of their approximation and mode)."""
INVERSIONS = {"auto": None, "eigen": "eigen", "cholesky": "cholesky"}
"""``--inversion`` choices: KFAC's ``inversion`` (``auto``: its default)."""
DEFAULT_BUDGET: float = inspect.signature(KFAC).parameters["curvature_budget"].default
"""The budget rows' ``curvature_budget`` (KFAC's default) unless ``--budget``/``--no-budget``
says otherwise."""
_PARTS = (*CURVATURE_KINDS, TUNING)


def build(name: str) -> nn.Module:
    """Benchmark model for CIFAR-10-shaped inputs (3×32×32, 10 classes).

    Args:
        name: ``"3c3d"`` (DeepOBS), ``"resnet18"`` or ``"resnet50"`` (torchvision, CIFAR stem:
            3×3 stride-1 first convolution, no max-pool).

    Returns:
        The model (float32, CPU).

    Raises:
        ValueError: For an unknown name.
    """
    if name == "3c3d":
        from kfac_tn.training.models import Net3c3d

        return Net3c3d(3, 32, 10)
    if name in ("resnet18", "resnet50"):
        import torchvision.models

        model = getattr(torchvision.models, name)(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    raise ValueError(f"Invalid model: {name!r} (allowed: {', '.join(MODELS)})")


# ----------------------------------------------------------------------------- peer baselines
class _PeerKFAC:
    """KFAC from a peer library's factors, with our inversion, preconditioning and update.

    Args:
        model: The model.
        factors: ``(x, y) -> {module: (A, G)}`` computing factors with the peer library,
            including its own forward/backward pass; the gradients are left in ``.grad``.
        lr, momentum, damping: As in :class:`kfac_tn.KFAC`.
    """

    def __init__(self, model, factors, lr=0.01, momentum=0.9, damping=1e-3) -> None:
        self.model, self.factors = model, factors
        self.lr, self.momentum, self.damping = lr, momentum, damping
        self.step_count = 0
        self.inverses: dict[nn.Module, list[torch.Tensor]] = {}
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.enable_grad():
            factors = self.factors(x, y)
        with torch.no_grad():
            if self.step_count % INVERSE_PERIOD == 0:
                for module, (A, G) in factors.items():
                    result = linalg.compute_inverse(
                        A[None], G[None], inversion="eigen", damping=self.damping, dtype=A.dtype
                    )
                    if result.tensors is not None:
                        self.inverses[module] = result.tensors
            directions = {}
            for module, inverse in self.inverses.items():
                w, b = module.weight, getattr(module, "bias", None)
                m = w.grad.reshape(w.shape[0], -1)
                if b is not None and inverse[0].shape[-1] == m.shape[1] + 1:
                    m = torch.cat([m, b.grad[:, None]], dim=1)
                out = linalg.precondition(
                    m[None], inverse, inversion="eigen", damping=self.damping
                )[0]
                directions[w] = out[:, : w[0].numel()].reshape(w.shape)
                if b is not None and out.shape[1] > w[0].numel():
                    directions[b] = out[:, -1]
            # KL clipping as in kfac_tn.KFAC (kl_clip 1e-3), so both runs stay finite
            if directions:
                vg = sum((d * p.grad).sum() for p, d in directions.items()) * self.lr**2
                nu = (1e-3 / vg.abs().clamp_min(1e-30)).sqrt().clamp(max=1.0)
                directions = {p: d * nu for p, d in directions.items()}
            for p in self.model.parameters():
                if p.grad is None:
                    continue
                d = directions.get(p, p.grad)
                buf = self.buffers.get(p)
                buf = self.buffers[p] = (
                    d.clone() if buf is None else buf.mul_(self.momentum).add_(d)
                )
                p.add_(buf, alpha=-self.lr)
        self.step_count += 1


def _curvlinops_factory(model: nn.Module, approx: str):
    from curvlinops import KFACLinearOperator

    supported = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    params = [p for m in supported for p in m.parameters()]
    names = {m: n for n, m in model.named_modules()}

    def factors(x, y):
        model.zero_grad()
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            params,
            [(x, y)],
            fisher_type="empirical",
            kfac_approx=approx,
            separate_weight_and_bias=False,
            num_data=x.shape[0],
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        with torch.enable_grad():  # curvlinops does not leave gradients: one more backward
            F.cross_entropy(model(x), y).backward()
        return {
            m: (op._input_covariances[names[m]], op._gradient_covariances[names[m]])
            for m in supported
            if names[m] in op._input_covariances
        }

    return factors


def _backpack_factory(model: nn.Module):
    import backpack
    from backpack.extensions import KFAC as BackpackKFAC

    if hasattr(model, "features") and hasattr(model, "classifier"):  # 3c3d: BackPACK needs a
        model = nn.Sequential(*model.features, *model.classifier)  # Sequential (same parameters)
        model = backpack.extend(model)
    else:  # the converter would build a new module graph; not comparable step for step
        raise ValueError("the BackPACK row supports the sequential 3c3d model only")
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    supported = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def factors(x, y):
        model.zero_grad()
        with backpack.backpack(BackpackKFAC(mc_samples=1)):
            loss_fn(model(x), y).backward()
        out = {}
        for m in supported:
            G, A = m.weight.kfac
            out[m] = (A, G)
        return out

    return factors


# ----------------------------------------------------------------------------- timing
class _Runner:
    """One optimizer on its own copy of the model: ``step()`` runs and times one training step.

    ``mode`` is ``None`` (SGD, Adam, peers), ``"fixed"`` (KFAC, periods 1/10) or ``"budget"``
    (KFAC with ``curvature_budget``).
    """

    def __init__(
        self,
        name: str,
        model_name: str,
        approx: str | None,
        batch_size: int,
        device: str,
        inversion: str = "auto",
        mode: str | None = None,
        budget: float | None = None,
        tolerance: float | None = None,
        variant: str | None = None,
    ) -> None:
        self.meta = {
            "model": model_name,
            "optimizer": name,
            "kfac_approx": approx,
            "mode": None if mode is None else ("1/10" if mode == "fixed" else f"budget {budget:g}"),
            "inversion": inversion if name == "kfac" else None,
            "batch_size": batch_size,
            "device": str(device),
            "variant": variant,
        }
        self.mode = mode
        self.records: list[dict[str, float]] = []
        self.one_step, self.opt = _make_step(
            name,
            model_name,
            approx,
            batch_size,
            device,
            inversion,
            mode,
            budget,
            tolerance,
            VARIANTS[variant] if variant else None,
        )
        self._paths_before: dict[str, int] = {}

    def warm_up(self) -> None:
        """Untimed steps: the first (factors, inverses, plan caches), and the budget's probe.

        Only ``budget_costs="measured"`` probes (its plan comes after :data:`PROBE_STEPS`
        sampled steps); the modeled plan is chosen after the first step.
        """
        measured = (
            isinstance(self.opt, KFAC)
            and self.opt.defaults["budget_costs"] == BudgetCosts.MEASURED.value
        )
        extra = PROBE_START + PROBE_STEPS if self.mode == "budget" and measured else 0
        for _ in range(1 + extra):
            self.one_step()
        if isinstance(self.opt, KFAC):
            self._paths_before = _paths(self.opt)

    def step(self) -> None:
        self.records.append(self.one_step())

    def row(self, device: str) -> dict:
        """Mean phase times over the recorded steps, plus peak memory of one more step."""
        records = self.records
        phases = {k: statistics.fmean(r[k] for r in records) for k in ("forward", "backward")}
        phases.update({k: statistics.fmean(r[k] for r in records) for k in ("step", "total")})
        phases["step_max"] = max(r["step"] for r in records)
        extra: dict = {}
        if isinstance(self.opt, KFAC):
            extra["curvature_s"] = {
                part: statistics.fmean(r.get(part, 0.0) for r in records)
                for part in CURVATURE_KINDS
            }
            extra["tuning_s"] = statistics.fmean(r.get(TUNING, 0.0) for r in records)
            after = _paths(self.opt)
            extra["paths"] = {k: after[k] - self._paths_before.get(k, 0) for k in after}
            chosen = self.opt.state.get("kfac", {}).get("schedule", {}).get("periods", {})
            extra["periods"] = {k: list(v) for k, v in chosen.items()}
        memory = measure_memory(self.one_step, device)
        return {
            **self.meta,
            "threads": torch.get_num_threads(),
            "steps": len(records),
            "time_s": phases,
            **extra,
            "peak_mem_bytes": memory.peak_bytes,
        }


def _paths(opt: KFAC) -> dict[str, int]:
    """Decompositions per path, and layer steps preconditioned in factored form."""
    stats = opt.stats
    paths = {k.removesuffix("_decompositions"): stats[k] for k in PATH_COUNTERS}
    paths["factored"] = stats["factored_preconditionings"]
    return paths


def _make_step(
    name: str,
    model_name: str,
    approx: str | None,
    batch_size: int,
    device: str,
    inversion: str,
    mode: str | None = None,
    budget: float | None = None,
    tolerance: float | None = None,
    extra: dict[str, str] | None = None,
) -> tuple[Callable[[], dict[str, float]], object]:
    """Build model, batch and optimizer; return a function timing one step, and the optimizer."""
    torch.manual_seed(0)
    model = build(model_name).to(device)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    peer = None
    opt: torch.optim.Optimizer | None = None
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif name == "kfac":
        periods = (1, INVERSE_PERIOD) if mode != "budget" else (None, None)
        opt = KFAC(
            model,
            lr=0.01,
            kfac_approx=approx,
            inversion=INVERSIONS[inversion],
            factor_update_period=periods[0],
            inverse_update_period=periods[1],
            curvature_budget=budget if mode == "budget" else None,
            **({} if tolerance is None else {"eigenbasis_tolerance": tolerance}),
            **(extra or {}),
        )
    elif name == "curvlinops":
        peer = _PeerKFAC(model, _curvlinops_factory(model, approx))
    elif name == "backpack":
        peer = _PeerKFAC(model, _backpack_factory(model))
    else:
        raise ValueError(f"Invalid optimizer: {name!r}")
    meter = opt.schedule.meter if isinstance(opt, KFAC) else None

    def one_step() -> dict[str, float]:
        synchronize(device)
        t0 = time.perf_counter()
        if peer is not None:  # the peers' factor computation includes forward and backward
            peer.step(x, y)
            synchronize(device)
            t = time.perf_counter() - t0
            return {"forward": 0.0, "backward": 0.0, "step": t, "total": t}
        if meter is not None:
            meter.active = True  # the optimizer's phase timer on every timed step
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        opt.step()
        synchronize(device)
        t3 = time.perf_counter()
        out = {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2, "total": t3 - t0}
        if meter is not None:
            spans = meter.last if opt.schedule.measuring else meter.take()
            for part in _PARTS:
                out[part] = sum(v for (kind, _), v in spans.items() if kind == part)
        return out

    return one_step, (peer if peer is not None else opt)


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run(
    models,
    batch_size: int,
    steps: int,
    device: str,
    peers: bool = True,
    inversion: str = "auto",
    budget: float | None = DEFAULT_BUDGET,
    tolerance: float | None = None,
    approxes: tuple[str, ...] = ("reduce", "expand"),
) -> list[dict]:
    """Run all optimizers on all models; adds ``ratio_to_sgd`` to every row.

    Args:
        models: Model names (:data:`MODELS`).
        batch_size: Batch size.
        steps: Timed steps.
        device: ``"cpu"`` or ``"cuda"``.
        peers: Add the curvlinops / BackPACK rows when they import.
        inversion: A key of :data:`INVERSIONS` (``"auto"``: KFAC's default).
        budget: ``curvature_budget`` of the budget rows (``None``: no budget rows).
        tolerance: KFAC's ``eigenbasis_tolerance`` (``None``: the optimizer's default).
        approxes: KFAC approximations to run.

    Returns:
        One row per model × optimizer × mode.
    """
    rows = []
    for model_name in models:
        configs = [("sgd", None, None, None), ("adam", None, None, None)]
        modes = ("fixed",) if budget is None else ("fixed", "budget")
        configs += [("kfac", approx, mode, None) for mode in modes for approx in approxes]
        configs += [("kfac", approx, mode, "no-tuning") for mode in modes for approx in approxes]
        # the variants against KFAC-expand, or the one approximation asked for
        variant_approx = "expand" if "expand" in approxes else approxes[0]
        configs += [("kfac", variant_approx, "fixed", v) for v in _variants(model_name, inversion)]
        if peers and _available("curvlinops"):
            configs += [("curvlinops", "reduce", None, None), ("curvlinops", "expand", None, None)]
        if peers and _available("backpack"):
            configs += [("backpack", "expand", None, None)]
        runners = []
        for name, approx, mode, variant in configs:
            try:
                runner = _Runner(
                    name,
                    model_name,
                    approx,
                    batch_size,
                    device,
                    inversion,
                    mode,
                    budget,
                    tolerance,
                    variant,
                )
                runner.warm_up()
            except Exception as err:  # a peer library failing must not stop the benchmark
                if name in ("curvlinops", "backpack"):
                    logger.warning("%s on %s failed: %s", name, model_name, err)
                    continue
                raise
            runners.append(runner)
        # interleaved: step i of every optimizer runs back to back, so load drifts on a shared
        # machine hit all of them alike
        for i in range(steps):
            for runner in runners:
                runner.step()
            logger.info("%s: step %d/%d", model_name, i + 1, steps)
        model_rows = [runner.row(device) for runner in runners]
        for row in model_rows:
            logger.info(
                "%s %s %s %s: %.4f s/step",
                model_name,
                row["optimizer"],
                row["kfac_approx"] or "",
                row["mode"] or "",
                row["time_s"]["total"],
            )
        sgd = next(r["time_s"]["total"] for r in model_rows if r["optimizer"] == "sgd")
        for row in model_rows:
            row["ratio_to_sgd"] = row["time_s"]["total"] / sgd
        _add_extra_cost(model_rows)
        rows += model_rows
    return rows


def _variants(model_name: str, inversion: str) -> list[str]:
    """Variant rows that apply: EKFAC needs eigendecompositions, norm blocks norm layers."""
    has_norm = any(
        isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for m in build(model_name).modules()
    )
    out = ["ekfac"] if INVERSIONS[inversion] != "cholesky" else []
    out += ["qmodel-32"]
    return out + ["no-norm"] if has_norm else out


def _add_extra_cost(rows: list[dict]) -> None:
    """``extra_vs_kfac_s``: a variant row's phase times minus those of its plain KFAC row.

    The plain row is the one of the same approximation and mode without a variant.
    """
    plain = {
        (r["kfac_approx"], r["mode"]): r
        for r in rows
        if r["optimizer"] == "kfac" and not r.get("variant")
    }
    for row in rows:
        base = plain.get((row["kfac_approx"], row["mode"]))
        if row.get("variant") and base is not None:
            times, ref = row["time_s"], base["time_s"]
            row["extra_vs_kfac_s"] = {k: times[k] - ref[k] for k in times if k in ref}


def format_table(rows: list[dict]) -> str:
    """Human-readable summary of the result rows, then KFAC's curvature breakdown."""
    lines = [
        f"threads={rows[0]['threads'] if rows else '-'}",
        f"{'model':9} {'optimizer':11} {'approx':7} {'mode':11} {'variant':10} {'fwd':>8} "
        f"{'bwd':>8} {'step':>8} {'total':>8} {'x SGD':>6} {'max step':>8} {'peak MiB':>9}",
    ]
    for r in rows:
        t = r["time_s"]
        lines.append(
            f"{r['model']:9} {r['optimizer']:11} {r['kfac_approx'] or '':7} {r['mode'] or '':11} "
            f"{r.get('variant') or '':10} {t['forward']:8.4f} {t['backward']:8.4f} "
            f"{t['step']:8.4f} {t['total']:8.4f} {r['ratio_to_sgd']:6.2f} {t['step_max']:8.4f} "
            f"{r['peak_mem_bytes'] / 2**20:9.1f}"
        )
    kfac = [r for r in rows if "curvature_s" in r]
    if kfac:
        lines.append("")
        lines.append(
            f"{'model':9} {'approx':7} {'mode':11} {'variant':10} {'factors':>8} {'inverses':>8} "
            f"{'fixed':>8} {'tuning':>8}  "
            "paths (timed steps)           periods factor/inverse"
        )
        for r in kfac:
            c = r["curvature_s"]
            paths = " ".join(f"{k}={v}" for k, v in r["paths"].items() if v)
            periods = " ".join(f"{f}/{i}" for f, i in r["periods"].values()) or "1/10"
            lines.append(
                f"{r['model']:9} {r['kfac_approx']:7} {r['mode']:11} {r.get('variant') or '':10} "
                f"{c['factor']:8.4f} {c['inverse']:8.4f} {c['fixed']:8.4f} {r['tuning_s']:8.4f}  "
                f"{paths or '-':28} {periods}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (multiple of 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-peers", action="store_true", help="skip curvlinops/BackPACK rows")
    parser.add_argument("--inversion", default="auto", choices=tuple(INVERSIONS))
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help="curvature_budget of the budget rows"
    )
    parser.add_argument("--no-budget", action="store_true", help="skip the budget rows")
    parser.add_argument(
        "--eigenbasis-tolerance", type=float, default=None, help="KFAC eigenbasis_tolerance"
    )
    parser.add_argument(
        "--approx", nargs="+", default=["reduce", "expand"], choices=("reduce", "expand")
    )
    parser.add_argument("--quick", action="store_true", help="3c3d only, 10 steps, no peers")
    parser.add_argument("--out", type=Path, default=None, help="write DIR/results.json")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"Invalid --batch-size: {args.batch_size} (must be >= 1)")
    if args.steps < 1:
        parser.error(f"Invalid --steps: {args.steps} (must be >= 1)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models, steps, peers = args.models, args.steps, not args.no_peers
    if args.quick:
        models, steps, peers = ["3c3d"], 10, False
    if not 0 < args.budget < 1:
        parser.error(f"Invalid --budget: {args.budget} (must be in (0, 1))")
    budget = None if args.no_budget else args.budget
    rows = run(
        models,
        args.batch_size,
        steps,
        args.device,
        peers,
        args.inversion,
        budget,
        args.eigenbasis_tolerance,
        tuple(args.approx),
    )
    print(format_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
