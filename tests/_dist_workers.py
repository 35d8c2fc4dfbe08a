"""Multi-process helpers for ``tests/test_distributed.py``.

:func:`launch` starts ``world_size`` copies of this file as separate Python processes (gloo on
CPU, rendezvous through a file store, sockets on the loopback interface only) and collects what
each rank saved. Every scenario is a function ``(rank, world_size, workdir, args) -> result``;
the result is saved with ``torch.save`` to ``workdir/rank{rank}.pt`` and checked by the parent
test against references it computes itself.
"""

from __future__ import annotations

import copy
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kfac_tn.distributed import close_process_group

# ---------------------------------------------------------------- shared test data

#: (leading shape, d, dtype) of the factors the "comm" scenario reduces; d = 1 exercises the
#: unpacked path, several dtypes exercise one bucket chain per dtype.
FACTOR_SPECS: list[tuple[tuple[int, ...], int, torch.dtype]] = [
    ((), 5, torch.float64),
    ((2,), 3, torch.float64),
    ((), 1, torch.float64),
    ((), 7, torch.float32),
    ((3,), 4, torch.float64),
    ((), 2, torch.float32),
    ((), 11, torch.float64),
]
#: bucket cap of the "comm" scenario: small enough to force several buckets (in bytes: 256)
SMALL_CAP_MB = 256 / 2**20

#: layer key -> cost for the broadcast scenario
BCAST_COSTS = {"conv1": 8.0, "conv2": 5.0, "fc1": 4.0, "fc2": 3.0, "fc3": 1.0}


def make_factors(rank: int) -> list[torch.Tensor]:
    """Random symmetric factors of one rank (deterministic in ``rank``)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for lead, d, dtype in FACTOR_SPECS:
        m = torch.randn(*lead, d, d, generator=gen, dtype=torch.float64)
        out.append((m + m.transpose(-1, -2)).to(dtype))
    return out


def make_bcast_tensors(key: str, fill_rank: int) -> list[torch.Tensor]:
    """Tensors of layer ``key``: symmetric pair + a vector, deterministic in (key, fill_rank)."""
    gen = torch.Generator().manual_seed(sum(map(ord, key)) * 31 + fill_rank)
    d = 2 + len(key)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(d + 1, generator=gen, dtype=torch.float32)
    # symmetric only up to a perturbation of the strict lower triangle (like round-off)
    noise = 1e-3 * torch.tril(torch.randn(d, d, generator=gen, dtype=torch.float64), -1)
    return [a + a.T + noise, g + g.T, v]


def transfer_payload(key: str) -> list[torch.Tensor] | None:
    """What the owner of ``key`` sends in the transfer test (None: nothing to send)."""
    if key == "fc3":
        return None
    gen = torch.Generator().manual_seed(len(key))
    return [
        torch.randn(2, len(key), generator=gen, dtype=torch.float64),
        torch.arange(5, dtype=torch.int64),
        torch.tensor([True, False]),
        torch.randn(3, generator=gen, dtype=torch.float32),
    ]


# ---------------------------------------------------------------- KFAC training problem

GLOBAL_BATCH = 12  # divisible by 2 and 3 workers
STEPS = 5
CHECKPOINT_AFTER = 3  # rank 0 saves model + optimizer after this many steps

#: (id, KFAC keyword arguments) of the training configurations compared with one process
KFAC_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("replicate-expand-empirical-eigen", dict(distributed_strategy="replicate", inversion="eigen")),
    ("shard-expand-empirical-eigen", dict(distributed_strategy="shard", inversion="eigen")),
    (
        "replicate-reduce-type2-cholesky",
        dict(
            distributed_strategy="replicate",
            kfac_approx="reduce",
            fisher_type="type2",
            inversion="cholesky",
        ),
    ),
    (
        "shard-reduce-type2-cholesky",
        dict(
            distributed_strategy="shard",
            kfac_approx="reduce",
            fisher_type="type2",
            inversion="cholesky",
        ),
    ),
    # self-tuning: every rank must take the same damping and step-scale decisions
    (
        "replicate-expand-empirical-eigen-qmodel-step",
        dict(
            distributed_strategy="replicate",
            inversion="eigen",
            step_size="qmodel",
            damping_adaptation_period=2,
        ),
    ),
    (
        "shard-expand-empirical-eigen-exact-damping",
        dict(
            distributed_strategy="shard",
            inversion="eigen",
            qmodel="exact",
            damping_adaptation_period=1,
        ),
    ),
    # EKFAC (scalings all-reduced, EKFAC inverses replicated under "shard" too) and norm blocks
    (
        "replicate-expand-empirical-ekfac-norm",
        dict(distributed_strategy="replicate", preconditioner="ekfac", norm_block="unitwise"),
    ),
    (
        "shard-expand-empirical-ekfac-norm",
        dict(distributed_strategy="shard", preconditioner="ekfac", norm_block="unitwise"),
    ),
]

KFAC_COMMON: dict[str, Any] = dict(
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-3,
    damping=1e-2,
    factor_decay=0.9,
    factor_update_period=1,
    inverse_update_period=2,
    kl_clip=1e-2,
    loss="cross_entropy",
    loss_reduction="mean",
    bucket_cap_mb=0.001,  # ~1 KiB: several buckets per step
    # exact JVPs: a difference quotient's rounding (~1e-8 of the step scale, on other sample
    # sets per rank) is above the 1e-10 the one-process comparison asks for
    qmodel_jvp="forward",
)


def make_model(name: str = "") -> torch.nn.Module:
    """Small float64 CNN: a conv, a GroupNorm, a transposed conv and a linear layer.

    (GroupNorm normalizes per sample, so data-parallel training equals one process on the global
    batch; BatchNorm's statistics would be per worker.) For the EKFAC configurations (``name``)
    no factor has a degenerate eigenspace the per-sample gradients reach — EKFAC's scalings
    there depend on round-off in the eigendecomposition, so runs could not be compared:
    overlapping transposed-conv taps, and a pooled linear input smaller than the batch.
    """
    from torch import nn

    torch.manual_seed(0)
    if "ekfac" in name:
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.GroupNorm(1, 3),
            nn.ReLU(),
            nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 5),
        ).double()
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.GroupNorm(1, 3),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 5),
    ).double()


def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global batch of ``step``: inputs ``[GLOBAL_BATCH, 2, 4, 4]``, labels in ``[0, 5)``."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)
    return x, y


def shard(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous shard of the global batch for ``rank``."""
    b = t.shape[0] // world_size
    return t[rank * b : (rank + 1) * b]


def train_steps(model, opt, steps: range, rank: int = 0, world_size: int = 1) -> None:
    """Ordinary training loop over ``steps`` (global step indices) on this rank's shard."""
    import torch.nn.functional as F

    for t in steps:
        x, y = make_batch(t)
        opt.zero_grad()
        F.cross_entropy(model(shard(x, rank, world_size)), shard(y, rank, world_size)).backward()
        opt.step()


# ---------------------------------------------------------------- scenarios


def _scenario_comm(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """Bucketed factor averaging, plain all-reduce reference, broadcasts, assignment."""
    from kfac_tn.distributed import get_communicator

    comm = get_communicator(bucket_cap_mb=SMALL_CAP_MB, strategy="replicate")
    assert comm is not None
    factors = make_factors(rank)
    for f in factors:
        comm.all_reduce_factor(f)
    pending = comm.pending_factors
    comm.wait_factors()
    # reference: plain full-matrix all-reduce on the default group
    plain = make_factors(rank)
    for p in plain:
        dist.all_reduce(p)
        p.div_(world_size)
    result: dict[str, Any] = {
        "factors": factors,
        "plain": plain,
        "pending_before_wait": pending,
        "pending_after_wait": comm.pending_factors,
        "bytes": dict(comm.bytes_communicated),
        "collectives": dict(comm.collectives),
    }
    # second round with the same shapes (signature check must not fire again)
    again = make_factors(rank)
    for f in again:
        comm.all_reduce_factor(f)
    comm.wait_factors()
    result["factors_again"] = again
    # broadcasts: owners send their values, others start with their own (wrong) values
    comm.assign(BCAST_COSTS)
    result["owners"] = comm.owners
    received = {}
    for key in BCAST_COSTS:
        tensors = make_bcast_tensors(key, fill_rank=rank)
        comm.broadcast(key, tensors[:2], symmetric=True)
        comm.broadcast(key, tensors[2:])
        received[key] = tensors
    comm.wait_broadcasts()
    result["received"] = received
    result["bytes_after_bcast"] = dict(comm.bytes_communicated)
    # point-to-point transfers from each layer's owner to the last rank
    dst = world_size - 1
    result["transferred"] = {
        key: comm.transfer(key, transfer_payload(key) if comm.is_owner(key) else None, dst)
        for key in BCAST_COSTS
    }
    # a one-rank group (every rank creates all of them: new_group is collective)
    from kfac_tn.distributed import Communicator

    singles = [dist.new_group([r]) for r in range(world_size)]
    solo = Communicator(singles[rank], bucket_cap_mb=SMALL_CAP_MB)
    solo_factors = make_factors(rank)
    for f in solo_factors:
        solo.all_reduce_factor(f)
    solo.wait_factors()
    solo.assign(BCAST_COSTS)
    solo_bcast = make_bcast_tensors("conv1", fill_rank=rank)
    solo.broadcast("conv1", solo_bcast, symmetric=False)
    solo.wait_broadcasts()
    result["solo"] = {
        "world_size": solo.world_size,
        "factors": solo_factors,
        "bcast": solo_bcast,
        "bytes": dict(solo.bytes_communicated),
        "owners": solo.owners,
    }
    return result


def _scenario_assign_mismatch(
    rank: int, world_size: int, workdir: Path, args: Sequence[str]
) -> Any:
    """Ranks pass different costs: assign() must raise CommunicationError on every rank."""
    from kfac_tn.distributed import CommunicationError, get_communicator

    comm = get_communicator()
    assert comm is not None
    try:
        comm.assign({"a": 1.0, "b": float(rank)})
    except CommunicationError as err:
        return {"error": str(err)}
    return {"error": None}


def _scenario_dead_peer(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """The last rank exits right after setup; the others must fail fast in wait_factors()."""
    from kfac_tn.distributed import CommunicationError, get_communicator

    comm = get_communicator()
    assert comm is not None
    dist.barrier()
    if rank == world_size - 1:
        os._exit(3)  # dies without any cleanup, like a crashed worker
    start = time.monotonic()
    try:
        f = torch.eye(4, dtype=torch.float64)
        comm.all_reduce_factor(f)
        comm.wait_factors()
    except CommunicationError as err:
        return {"error": str(err), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def _scenario_stalled_peer(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """The last rank stays alive but never joins the collective: the others must time out."""
    from kfac_tn.distributed import CommunicationError, get_communicator

    comm = get_communicator()
    assert comm is not None
    dist.barrier()
    if rank == world_size - 1:
        time.sleep(float(args[0]))
        os._exit(0)
    start = time.monotonic()
    try:
        f = torch.eye(4, dtype=torch.float64)
        comm.all_reduce_factor(f)
        comm.wait_factors()
    except CommunicationError as err:
        return {"error": str(err), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def _scenario_kfac(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """DDP + KFAC for every configuration in ``args`` (ids of KFAC_CONFIGS)."""
    from torch.nn.parallel import DistributedDataParallel

    from kfac_tn.optim.placement import consolidated_state_dict
    from kfac_tn.optimizer import KFAC

    configs = dict(KFAC_CONFIGS)
    configs["no-averaging"] = configs[KFAC_CONFIGS[0][0]]  # mutation: factors stay local
    out: dict[str, Any] = {}
    for name in args:
        start = time.monotonic()
        model = make_model(name)
        ddp = DistributedDataParallel(model)
        opt = KFAC(ddp, **KFAC_COMMON, **configs[name])
        if name == "no-averaging":
            opt.placement.comm.all_reduce_factor = lambda factor, **kw: None
        train_steps(ddp, opt, range(CHECKPOINT_AFTER), rank, world_size)
        # collective: owners send their inverses to rank 0 under "shard"
        opt_state = consolidated_state_dict(opt, to=0)
        checkpoint = None
        if rank == 0:
            checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt_state})
            checkpoint["plain_optimizer"] = copy.deepcopy(opt.state_dict())
        train_steps(ddp, opt, range(CHECKPOINT_AFTER, STEPS), rank, world_size)
        comm = opt.placement.comm
        out[name] = {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "checkpoint": checkpoint,
            "bytes": dict(comm.bytes_communicated),
            "owners": comm.owners,
        }
        opt.remove_hooks()
        # distributed resume: every rank loads rank 0's checkpoint and continues
        path = workdir / f"checkpoint-{name}.pt"
        if rank == 0:
            torch.save(checkpoint, path)
        dist.barrier()
        saved = torch.load(path, weights_only=False)
        model = make_model(name)
        model.load_state_dict(saved["model"])
        ddp = DistributedDataParallel(model)
        opt = KFAC(ddp, **KFAC_COMMON, **configs[name])
        opt.load_state_dict(saved["optimizer"])
        train_steps(ddp, opt, range(CHECKPOINT_AFTER, STEPS), rank, world_size)
        out[name]["resumed_params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[name]["held_inverses"] = sorted(
            b.name for b in opt.blocks if "inverse" in opt.state[b.weight]
        )
        opt.remove_hooks()
        print(f"rank {rank}: {name} took {time.monotonic() - start:.2f}s", flush=True)
    return out


class TickClock:
    """A deterministic clock: every reading is ``tick`` seconds after the previous one (a power
    of two, so sums of durations are exact and a restarted clock measures the same)."""

    def __init__(self, tick: float = 2**-10) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


BUDGET_STEPS = 10
BUDGET_CHECKPOINT = 5


def budget_kfac(model, clock=None, costs="measured"):
    """KFAC with a curvature budget, a short probe and frequent decisions (for 10 steps)."""
    from kfac_tn.optimizer import KFAC

    opt = KFAC(
        model,
        **KFAC_COMMON | dict(inverse_update_period=None),
        curvature_budget=0.2,
        budget_costs=costs,
    )
    opt.schedule.probe_start, opt.schedule.probe_steps, opt.schedule.decide_every = 1, 2, 3
    if clock is not None:
        opt.schedule.meter.clock = clock
    return opt


def _scenario_budget(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """A budget on: ranks agree with their own (real) clocks; a tick-clock run resumes exactly."""
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = budget_kfac(ddp)  # real clock: each rank measures its own times
    train_steps(ddp, opt, range(BUDGET_STEPS), rank, world_size)
    out["real"] = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "periods": copy.deepcopy(opt.state["kfac"]["schedule"]["periods"]),
    }
    opt.remove_hooks()
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = budget_kfac(ddp, costs="model")  # modeled costs: no clock at all
    train_steps(ddp, opt, range(BUDGET_STEPS), rank, world_size)
    out["model"] = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "schedule": copy.deepcopy(opt.state["kfac"]["schedule"]),
    }
    opt.remove_hooks()
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = budget_kfac(ddp, TickClock())
    train_steps(ddp, opt, range(BUDGET_CHECKPOINT), rank, world_size)
    path = workdir / "checkpoint-budget.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    train_steps(ddp, opt, range(BUDGET_CHECKPOINT, BUDGET_STEPS), rank, world_size)
    out["tick"] = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "schedule": copy.deepcopy(opt.state["kfac"]["schedule"]),
    }
    opt.remove_hooks()
    saved = torch.load(path, weights_only=False)
    model = make_model()
    model.load_state_dict(saved["model"])
    ddp = DistributedDataParallel(model)
    opt = budget_kfac(ddp, TickClock())
    opt.load_state_dict(saved["optimizer"])
    train_steps(ddp, opt, range(BUDGET_CHECKPOINT, BUDGET_STEPS), rank, world_size)
    out["resumed"] = {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "periods": copy.deepcopy(opt.state["kfac"]["schedule"]["periods"]),
    }
    opt.remove_hooks()
    return out


def _sampled_run(rank, world_size, samples, steps, checkpoint=None):
    """DDP + KFAC's default step scale with ``qmodel_samples=samples``; returns its step scales."""
    from torch.nn.parallel import DistributedDataParallel

    from kfac_tn.optimizer import KFAC

    model = make_model()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    ddp = DistributedDataParallel(model)
    # the default difference quotient; a long proposed step, so the scale is below its cap
    common = KFAC_COMMON | dict(qmodel_jvp="auto", lr=10.0, kl_clip=None)
    opt = KFAC(ddp, **common, step_size="qmodel", qmodel_samples=samples)
    if checkpoint is not None:
        opt.load_state_dict(checkpoint["optimizer"])
    scales = []
    for t in steps:
        train_steps(ddp, opt, range(t, t + 1), rank, world_size)
        scales.append(opt.state["kfac"]["step_scale"])
    return model, opt, scales


def _scenario_sampled(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """Importance-sampled step scales: ranks agree, a resumed run continues exactly."""
    out: dict[str, Any] = {}
    model, opt, out["exact_scales"] = _sampled_run(rank, world_size, None, range(STEPS))
    opt.remove_hooks()
    model, opt, scales = _sampled_run(rank, world_size, 2, range(CHECKPOINT_AFTER))
    path = workdir / "checkpoint-sampled.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    for t in range(CHECKPOINT_AFTER, STEPS):
        train_steps(opt.model, opt, range(t, t + 1), rank, world_size)
        scales.append(opt.state["kfac"]["step_scale"])
    out["scales"] = scales
    out["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt.remove_hooks()
    saved = torch.load(path, weights_only=False)
    model, opt, out["resumed_scales"] = _sampled_run(
        rank, world_size, 2, range(CHECKPOINT_AFTER, STEPS), saved
    )
    out["resumed_params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt.remove_hooks()
    return out


def _scenario_suite(rank: int, world_size: int, workdir: Path, args: Sequence[str]) -> Any:
    """Everything that runs on healthy workers, in one launch (process start-up is the cost)."""
    return {
        "comm": _scenario_comm(rank, world_size, workdir, args),
        "kfac": _scenario_kfac(
            rank, world_size, workdir, [name for name, _ in KFAC_CONFIGS] + ["no-averaging"]
        ),
        "assign_mismatch": _scenario_assign_mismatch(rank, world_size, workdir, args),
        "budget": _scenario_budget(rank, world_size, workdir, args),
        "sampled": _scenario_sampled(rank, world_size, workdir, args),
    }


SCENARIOS: dict[str, Callable[[int, int, Path, Sequence[str]], Any]] = {
    "comm": _scenario_comm,
    "assign_mismatch": _scenario_assign_mismatch,
    "dead_peer": _scenario_dead_peer,
    "stalled_peer": _scenario_stalled_peer,
    "kfac": _scenario_kfac,
    "budget": _scenario_budget,
    "sampled": _scenario_sampled,
    "suite": _scenario_suite,
}


# ---------------------------------------------------------------- launcher


def _worker_main(argv: Sequence[str]) -> None:
    scenario, rank_s, world_s, workdir_s, timeout_s, *args = argv
    rank, world_size, workdir = int(rank_s), int(world_s), Path(workdir_s)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir / 'store'}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=float(timeout_s)),
    )
    result = SCENARIOS[scenario](rank, world_size, workdir, args)
    torch.save(result, workdir / f"rank{rank}.pt")
    failed = isinstance(result, dict) and result.get("error") is not None  # a peer is gone
    close_process_group(finished=not failed)


def launch(
    scenario: str,
    world_size: int,
    workdir: Path,
    *,
    args: Sequence[str] = (),
    timeout: float = 60.0,
    collective_timeout: float = 20.0,
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` gloo processes; return per-rank dicts.

    Each dict has ``returncode``, ``output`` (stdout+stderr) and ``result`` (the saved scenario
    result or ``None``). All processes are killed after ``timeout`` seconds and an
    ``AssertionError`` with their output is raised.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                scenario,
                str(rank),
                str(world_size),
                str(workdir),
                str(collective_timeout),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    timed_out = False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                q.kill()
            out, _ = p.communicate()
        outputs.append(out)
    if timed_out:
        raise AssertionError(
            f"scenario {scenario!r} on {world_size} ranks exceeded {timeout}s:\n"
            + "\n".join(f"--- rank {r}\n{o}" for r, o in enumerate(outputs))
        )
    results = []
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        path = workdir / f"rank{rank}.pt"
        res = torch.load(path, weights_only=False) if path.exists() else None
        results.append({"returncode": p.returncode, "output": out, "result": res})
    return results


def check_ok(results: list[dict[str, Any]]) -> list[Any]:
    """Assert that every rank exited with 0 and return their results."""
    for rank, r in enumerate(results):
        assert r["returncode"] == 0 and r["result"] is not None, (
            f"rank {rank} failed (rc={r['returncode']}):\n{r['output']}"
        )
    return [r["result"] for r in results]


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
