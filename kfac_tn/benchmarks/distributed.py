"""Data-parallel KFAC vs DDP + SGD: step time and bytes communicated per step.

Run ``python -m kfac_tn.benchmarks.distributed [--procs 1 2 4] [--quick] [--out DIR/results.json]``.
For every process count ``W`` and method (``sgd``: DDP + SGD with momentum; ``kfac-replicate`` and
``kfac-shard``: DDP + :class:`kfac_tn.optimizer.KFAC` with that ``distributed_strategy``) it starts
``W`` worker processes (gloo on CPU, NCCL with ``--device cuda``, one GPU per process), trains the
3c3d CNN (CIFAR-10 shapes, synthetic data, ``--batch-per-worker`` samples per worker) for
``--warmup`` untimed and ``--steps`` timed steps and reports, per step:

* ``step_ms``: wall time of a step (forward, backward, optimizer), the slowest rank's mean;
* ``wait_ms``: host time per step spent in the communicator's ``wait_factors`` /
  ``wait_broadcasts`` (slowest rank): KFAC communication not hidden behind computation, plus
  waiting for slower ranks (e.g. an owner still inverting its layers on an inverse step);
  meaningful on CPU/gloo (with NCCL a wait only orders CUDA streams);
* ``ddp_B``: payload bytes of DDP's gradient all-reduce (counted by a DDP communication hook);
* ``factors_B`` / ``inverses_B`` / ``gradients_B``: payload bytes of KFAC's collectives
  (:attr:`kfac_tn.distributed.Communicator.bytes_communicated`), averaged over the timed steps
  (inverses are broadcast every ``--inverse-period`` steps);
* ``bound_B``: the traffic KFAC may send on top of DDP, derived independently from the factor and
  inverse shapes: upper triangles of all factors per factor step, plus the inverses on inverse
  steps (``replicate``) or one copy of the gradients per step (``shard``). ``ok`` checks that
  the measured KFAC traffic is at most this bound.

Payload bytes are the sizes of the buffers handed to the collectives, identical on every rank; a
ring all-reduce moves ``2 (W - 1) / W`` times its payload over each link. With ``W = 1`` KFAC's
communicator sends nothing (DDP still runs its one-rank all-reduce).

On a CPU-only machine every worker gets ``max(1, cores // W)`` intra-op threads (reported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kfac_tn.distributed import close_process_group

log = logging.getLogger(__name__)

METHODS = ("sgd", "kfac-replicate", "kfac-shard")
_MODULE = "kfac_tn.benchmarks.distributed"  # workers run this module in worker mode


# ---------------------------------------------------------------- worker side


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ddp_counting_hook(counter: dict[str, int]):
    """DDP communication hook: plain averaging all-reduce that counts its payload bytes."""

    # no annotations: DDP compares them with dist.GradBucket, and this module's are strings
    def hook(state, bucket):  # noqa: ANN001, ANN202
        buffer = bucket.buffer()
        counter["bytes"] += buffer.numel() * buffer.element_size()
        world = dist.get_world_size()
        work = dist.all_reduce(buffer, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))

    return hook


def _time_waits(comm: Any, waited: dict[str, float]) -> None:
    """Accumulate the host time spent in the communicator's waits into ``waited["s"]``.

    This is the communication KFAC did *not* overlap with computation (on CPU/gloo; with NCCL the
    waits only enqueue stream dependencies, so the figure is not meaningful there).
    """
    for name in ("wait_factors", "wait_broadcasts"):
        original = getattr(comm, name)

        def timed(original=original) -> None:
            start = time.perf_counter()
            original()
            waited["s"] += time.perf_counter() - start

        setattr(comm, name, timed)


def _factor_and_inverse_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Upper-triangle bytes of all factors and bytes of all held inverses, from the state."""
    from kfac_tn.distributed import packed_size

    factor_bytes = inverse_bytes = 0
    for state in optimizer.state.values():
        for name in ("A", "G"):
            t = state.get(name)
            if isinstance(t, torch.Tensor):
                factor_bytes += packed_size(t.shape) * t.element_size()
        inv = state.get("inverse")
        if inv is not None:
            inverse_bytes += sum(t.numel() * t.element_size() for t in inv)
    return factor_bytes, inverse_bytes


def _worker(args: argparse.Namespace) -> None:
    from kfac_tn.training.models import Net3c3d

    rank, world = args.worker_rank, args.world_size
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        backend,
        init_method=f"file://{args.store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    torch.manual_seed(0)
    model = Net3c3d(in_channels=3, image_size=32, num_classes=10).to(device)
    ddp_counter = {"bytes": 0}
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[rank] if device.type == "cuda" else None
    )
    ddp.register_comm_hook(None, _ddp_counting_hook(ddp_counter))
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch_per_worker, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_per_worker,), generator=gen).to(device)
    comm = None
    waited = {"s": 0.0}
    if args.method == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    else:
        from kfac_tn.optimizer import KFAC

        opt = KFAC(
            ddp,
            lr=0.01,
            momentum=0.9,
            damping=1e-3,
            factor_update_period=1,
            inverse_update_period=args.inverse_period,
            kfac_approx=args.approx,
            distributed_strategy=args.method.split("-", 1)[1],
            bucket_cap_mb=args.bucket_cap_mb,
        )
        comm = opt.placement.comm if hasattr(opt, "placement") else None
        if comm is None:
            raise RuntimeError("KFAC created no communicator although torch.distributed is up")
        _time_waits(comm, waited)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    _synchronize(device)
    dist.barrier()
    kfac_before = dict(comm.bytes_communicated) if comm is not None else {}
    ddp_before = ddp_counter["bytes"]
    waited["s"] = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    slowest = torch.tensor([elapsed, waited["s"]], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    result: dict[str, Any] = {
        "step_ms": 1e3 * float(slowest[0]) / args.steps,
        "wait_ms": 1e3 * float(slowest[1]) / args.steps,
        "ddp_B": (ddp_counter["bytes"] - ddp_before) / args.steps,
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if comm is not None:
        for kind, total in comm.bytes_communicated.items():
            result[f"{kind}_B"] = (total - kfac_before[kind]) / args.steps
        factor_bytes, inverse_bytes = _factor_and_inverse_bytes(opt)
        # inverse bytes only count on the owner under "shard": sum over ranks gives all of them
        held = torch.tensor([inverse_bytes], dtype=torch.float64, device=device)
        if args.method == "kfac-shard":
            dist.all_reduce(held)
        result["factor_upper_bytes"] = factor_bytes
        result["inverse_bytes"] = float(held) if args.method == "kfac-shard" else inverse_bytes
        result["inverse_bytes_held"] = inverse_bytes
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    close_process_group(finished=True)


# ---------------------------------------------------------------- parent side


def _run_config(
    method: str, world: int, args: argparse.Namespace, threads: int
) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory(prefix="kfac_tn_dist_bench_") as tmp:
        store, result = Path(tmp) / "store", Path(tmp) / "result.json"
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        env["OMP_NUM_THREADS"] = str(threads)
        common = [
            "--world-size", str(world), "--method", method, "--store", str(store),
            "--result", str(result), "--threads", str(threads), "--device", args.device,
            "--batch-per-worker", str(args.batch_per_worker), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--inverse-period", str(args.inverse_period),
            "--approx", args.approx, "--timeout", str(args.timeout),
            "--bucket-cap-mb", str(args.bucket_cap_mb),
        ]  # fmt: skip
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", _MODULE, "--worker-rank", str(rank), *common],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(world)
        ]
        outputs = []
        deadline = time.monotonic() + args.timeout * 4 + 60 * (args.steps + args.warmup)
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                out, _ = p.communicate()
            outputs.append(out)
        if any(p.returncode != 0 for p in procs) or not result.exists():
            log.error(
                "%s on %d processes failed:\n%s",
                method,
                world,
                "\n".join(f"--- rank {r} (rc {p.returncode})\n{o}" for r, (p, o) in
                          enumerate(zip(procs, outputs))),
            )  # fmt: skip
            return None
        return json.loads(result.read_text())


def _bound(row: dict[str, Any], steps: int, inverse_period: int, warmup: int) -> float:
    """KFAC traffic allowed per step on top of DDP (see the module docstring)."""
    inverse_steps = sum(
        1 for t in range(warmup, warmup + steps) if t % inverse_period == 0
    )  # steps counted from 0, inverses on multiples of the period
    bound = float(row["factor_upper_bytes"])
    if row["method"] == "kfac-replicate":
        bound += row["inverse_bytes"] * inverse_steps / steps
    else:
        bound += row["grad_bytes"]
    return bound


def _format_bytes(b: float) -> str:
    return f"{b / 2**20:.2f}M" if b else "0"


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'W':>2} {'method':<15} {'step_ms':>9} {'vs_sgd':>7} {'wait_ms':>8} {'ddp_B':>9} "
        f"{'factors_B':>10} "
        f"{'inverses_B':>10} {'grads_B':>9} {'bound_B':>9} {'ok':>3}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        vs_sgd = r.get("vs_sgd", float("nan"))
        sent = [_format_bytes(r.get(k, 0)) for k in ("factors_B", "inverses_B", "gradients_B")]
        lines.append(
            f"{r['W']:>2} {r['method']:<15} {r['step_ms']:>9.1f} {vs_sgd:>7.2f} "
            f"{r.get('wait_ms', 0.0):>8.1f} "
            f"{_format_bytes(r['ddp_B']):>9} {sent[0]:>10} {sent[1]:>10} {sent[2]:>9} "
            f"{_format_bytes(r.get('bound_B', 0)):>9} {r.get('ok', ''):>3}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run all configurations and return one row per (process count, method)."""
    cores = os.cpu_count() or 1
    rows = []
    for world in args.procs:
        if args.device == "cuda" and world > torch.cuda.device_count():
            log.warning("skipping W=%d: only %d GPUs", world, torch.cuda.device_count())
            continue
        threads = args.threads or max(1, cores // world)
        sgd_ms = None
        for method in args.methods:
            log.info("running %s on %d process(es), %d thread(s) each", method, world, threads)
            res = _run_config(method, world, args, threads)
            if res is None:
                continue
            row = {"W": world, "method": method, "threads": threads, **res}
            if method == "sgd":
                sgd_ms = row["step_ms"]
            if sgd_ms:
                row["vs_sgd"] = row["step_ms"] / sgd_ms
            if method != "sgd":
                kfac = sum(row.get(f"{k}_B", 0.0) for k in ("factors", "inverses", "gradients"))
                row["kfac_B"] = kfac
                row["bound_B"] = _bound(row, args.steps, args.inverse_period, args.warmup)
                row["ok"] = "yes" if kfac <= row["bound_B"] else "NO"
            rows.append(row)
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kfac_tn.benchmarks.distributed", description=__doc__.split("\n")[0]
    )
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch-per-worker", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps")
    p.add_argument("--inverse-period", type=int, default=10)
    p.add_argument("--approx", choices=("expand", "reduce"), default="reduce")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="KFAC factor bucket size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="threads per worker (0: cores // W)")
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout in s")
    p.add_argument("--quick", action="store_true", help="few steps, small batch (smoke run)")
    p.add_argument("--out", type=Path, default=None, help="write rows as JSON to this file")
    # internal: worker mode
    p.add_argument("--worker-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--method", default="sgd", help=argparse.SUPPRESS)
    p.add_argument("--store", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    """Command-line entry point; returns the rows (``None`` in worker mode)."""
    args = _parser().parse_args(argv)
    if args.worker_rank is not None:
        _worker(args)
        return None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.steps, args.warmup, args.inverse_period = 4, 2, 2
        args.batch_per_worker = min(args.batch_per_worker, 8)
    if any(w < 1 for w in args.procs):
        raise ValueError(f"Invalid --procs: {args.procs} (each >= 1)")
    for name in ("batch_per_worker", "steps", "inverse_period"):
        if getattr(args, name) < 1:
            raise ValueError(f"Invalid --{name.replace('_', '-')}: {getattr(args, name)} (>= 1)")
    rows = run(args)
    print(_table(rows))
    print(
        f"(3c3d, batch {args.batch_per_worker}/worker, {args.steps} timed steps, inverses every "
        f"{args.inverse_period}, KFAC-{args.approx}, buckets {args.bucket_cap_mb:g} MiB, device "
        f"{args.device}; bytes are per-step payloads, M = MiB)"
    )
    bad = [f"W={r['W']} {r['method']}" for r in rows if r.get("ok") == "NO"]
    if bad:
        log.error("KFAC traffic above the bound for: %s", ", ".join(bad))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        internal = {"worker_rank", "world_size", "method", "store", "result"}
        meta = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in internal
        }
        meta.update(torch=torch.__version__, cpu_count=os.cpu_count())
        if args.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name()
        args.out.write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    _rows = main()
    sys.exit(1 if _rows and any(r.get("ok") == "NO" for r in _rows) else 0)
