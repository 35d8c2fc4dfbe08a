"""Tests of kfac_tn.distributed: communicator unit tests in-process and with 2-3 gloo workers.

Multi-process cases start separate Python processes (see ``tests/_dist_workers.py``) on the
loopback interface with bounded collective timeouts; each ``launch`` is killed after its
``timeout``. References (averages, owners' values) are computed here in the parent process.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys

import _dist_workers as workers
import pytest
import torch

from kfac_tn.distributed import (
    STRATEGIES,
    assign_by_cost,
    close_process_group,
    get_communicator,
    init_process_group_from_env,
    packed_size,
)
from kfac_tn.optimizer import KFAC

WORLD_SIZES = [2, 3]


# ---------------------------------------------------------------- single-process units


def test_get_communicator_without_init_returns_none():
    assert not torch.distributed.is_initialized()
    assert get_communicator() is None
    for strategy in STRATEGIES:
        assert get_communicator(strategy=strategy) is None


def test_get_communicator_invalid_strategy_raises():
    with pytest.raises(ValueError, match="strategy.*'bogus'.*replicate, shard"):
        get_communicator(strategy="bogus")


@pytest.mark.parametrize(
    "finished,calls",
    [(True, ["barrier", "collect", "destroy"]), (False, ["collect", "destroy"])],
    ids=["finished-waits-for-peers", "failed-does-not-wait"],
)
def test_close_process_group_order(monkeypatch, finished, calls):
    """Regression: ranks tore gloo down without waiting for each other and one aborted (SIGABRT,
    3 of 10 two-rank ``kfac-tn train distributed=ddp`` runs); a finished rank waits first."""
    import kfac_tn.distributed as kd

    seen: list[str] = []
    monkeypatch.setattr(kd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(kd.dist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(kd.gc, "collect", lambda: seen.append("collect"))
    monkeypatch.setattr(kd.dist, "destroy_process_group", lambda: seen.append("destroy"))
    close_process_group(finished=finished)
    assert seen == calls


def test_close_process_group_survives_a_failed_barrier(monkeypatch, caplog):
    import kfac_tn.distributed as kd

    def barrier() -> None:
        raise RuntimeError("Connection closed by peer")

    destroyed: list[bool] = []
    monkeypatch.setattr(kd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(kd.dist, "barrier", barrier)
    monkeypatch.setattr(kd.dist, "destroy_process_group", lambda: destroyed.append(True))
    close_process_group(finished=True)
    assert destroyed == [True]
    assert "did not reach the final barrier" in caplog.text


def test_close_process_group_without_init_does_nothing():
    assert not torch.distributed.is_initialized()
    close_process_group(finished=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="mpi"), "backend: 'mpi'.*auto, gloo, nccl"),
        (dict(timeout_s=0.0), "timeout_s: 0.0"),
        (dict(), r"Missing environment variables \['RANK', 'WORLD_SIZE'\].*torchrun"),
    ],
    ids=["backend", "timeout", "no-torchrun-env"],
)
def test_init_process_group_from_env_invalid(monkeypatch, kwargs, match):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=match):
        init_process_group_from_env(**kwargs)
    assert not torch.distributed.is_initialized()


PACKED_CASES = [
    # (shape, symmetric, expected)
    ((5, 5), True, 15),
    ((3, 4, 4), True, 30),
    ((1, 1), True, 1),
    ((2, 1, 1), True, 2),
    ((5, 5), False, 25),
    ((7,), False, 7),
]


@pytest.mark.parametrize(
    "shape,symmetric,expected", PACKED_CASES, ids=[f"{s}-sym{y}" for s, y, _ in PACKED_CASES]
)
def test_packed_size(shape, symmetric, expected):
    assert packed_size(shape, symmetric) == expected


def _brute_force_makespan(costs: dict[str, float], world_size: int) -> float:
    keys = list(costs)
    best = float("inf")
    for choice in itertools.product(range(world_size), repeat=len(keys)):
        loads = [0.0] * world_size
        for k, r in zip(keys, choice):
            loads[r] += costs[k]
        best = min(best, max(loads))
    return best


ASSIGN_CASES = {
    "one-big-many-small": {"a": 100.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0},
    "equal": {"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0},
    "3c3d-like": {
        "conv1": 75.0**3 + 64.0**3,
        "conv2": 577.0**3 + 96.0**3,
        "conv3": 865.0**3 + 128.0**3,
        "fc1": 1153.0**3 + 512.0**3,
        "fc2": 513.0**3 + 256.0**3,
        "fc3": 257.0**3 + 10.0**3,
    },
    "lpt-classic": {"a": 5.0, "b": 5.0, "c": 4.0, "d": 4.0, "e": 3.0, "f": 3.0, "g": 3.0},
}


@pytest.mark.parametrize("world_size", [1, 2, 3], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("name", list(ASSIGN_CASES))
def test_assign_by_cost_lpt_bound_and_determinism(name, world_size):
    costs = ASSIGN_CASES[name]
    owners = assign_by_cost(costs, world_size)
    assert set(owners) == set(costs)
    assert all(0 <= r < world_size for r in owners.values())
    # independent of the dict's insertion order
    assert assign_by_cost(dict(reversed(list(costs.items()))), world_size) == owners
    loads = [0.0] * world_size
    for k, r in owners.items():
        loads[r] += costs[k]
    optimum = _brute_force_makespan(costs, world_size)
    assert max(loads) <= 4.0 / 3.0 * optimum + 1e-9
    if len(costs) >= world_size:  # nobody idles when there is enough work
        assert all(load > 0 for load in loads)


def test_assign_by_cost_biggest_layer_alone():
    owners = assign_by_cost(ASSIGN_CASES["one-big-many-small"], 2)
    assert [k for k, r in owners.items() if r == owners["a"]] == ["a"]


@pytest.mark.parametrize(
    "costs,world_size,match",
    [
        ({"a": -1.0}, 2, "cost for key 'a'"),
        ({"a": float("nan")}, 2, "cost for key 'a'"),
        ({"a": float("inf")}, 2, "cost for key 'a'"),
        ({"a": 1.0}, 0, "world_size: 0"),
    ],
    ids=["negative", "nan", "inf", "no-ranks"],
)
def test_assign_by_cost_invalid(costs, world_size, match):
    with pytest.raises(ValueError, match=match):
        assign_by_cost(costs, world_size)


# ---------------------------------------------------------------- multi-process: healthy workers


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def suite(request, tmp_path_factory):
    """One launch per world size runs every healthy-worker scenario (start-up dominates)."""
    world_size = request.param
    results = workers.check_ok(
        workers.launch(
            "suite", world_size, tmp_path_factory.mktemp(f"suite{world_size}"), timeout=240.0
        )
    )
    return world_size, results


def test_factor_average_matches_reference(suite):
    world_size, results = suite
    inputs = [workers.make_factors(r) for r in range(world_size)]
    for i, (lead, d, dtype) in enumerate(workers.FACTOR_SPECS):
        expected = sum(inp[i].double() for inp in inputs) / world_size
        tol = 1e-13 if dtype == torch.float64 else 1e-5
        for rank, res in enumerate(r["comm"] for r in results):
            for name in ("factors", "factors_again", "plain"):
                got = res[name][i]
                assert got.dtype == dtype and got.shape == (*lead, d, d)
                torch.testing.assert_close(
                    got.double(), expected, rtol=tol, atol=tol, msg=f"{name} {i} rank {rank}"
                )
            # the bucketed result is exactly symmetric and equals the plain all-reduce
            assert torch.equal(res["factors"][i], res["factors"][i].transpose(-1, -2))
            torch.testing.assert_close(res["factors"][i], res["plain"][i], rtol=tol, atol=tol)


def test_factor_traffic_is_upper_triangles_in_several_buckets(suite):
    _, results = suite
    expected = 0
    for lead, d, dtype in workers.FACTOR_SPECS:
        shape = (*lead, d, d)
        expected += packed_size(shape) * torch.empty((), dtype=dtype).element_size()
    full = sum(
        torch.Size((*lead, d, d)).numel() * torch.empty((), dtype=dtype).element_size()
        for lead, d, dtype in workers.FACTOR_SPECS
    )
    assert expected < full
    for res in (r["comm"] for r in results):
        assert res["bytes"] == {"factors": expected, "inverses": 0, "gradients": 0, "checkpoint": 0}
        # cap 256 B, packed bytes in queue order: f64 120, 96, 8 | f32 112 | f64 240 | f32 12 |
        # f64 528 -> f64 buckets [120+96+8], [240], [528 alone, over the cap]; f32 [112+12]
        assert res["collectives"]["factors"] == 4
        assert res["pending_before_wait"] and not res["pending_after_wait"]


def test_owners_and_broadcasts(suite):
    world_size, results = suite
    owners = assign_by_cost(workers.BCAST_COSTS, world_size)
    expected_bytes = 0
    for key in workers.BCAST_COSTS:
        src = owners[key]
        sent = workers.make_bcast_tensors(key, fill_rank=src)
        expected_bytes += sum(
            packed_size(t.shape, symmetric=(i < 2)) * t.element_size() for i, t in enumerate(sent)
        )
        # symmetric=True: the owner's upper triangle, mirrored, on every rank (owner included)
        want = [torch.triu(m) + torch.triu(m, 1).T for m in sent[:2]] + sent[2:]
        assert not torch.equal(want[0], sent[0])  # the perturbation is really mirrored away
        for rank, res in enumerate(r["comm"] for r in results):
            assert res["owners"] == owners
            for got, w in zip(res["received"][key], want):
                assert torch.equal(got, w), f"layer {key} on rank {rank} (owner {src})"
    for res in (r["comm"] for r in results):
        assert res["bytes_after_bcast"]["inverses"] == expected_bytes
        assert res["bytes_after_bcast"]["gradients"] == 0


def test_one_rank_group_sends_nothing(suite):
    world_size, results = suite
    for rank, res in enumerate(r["comm"]["solo"] for r in results):
        assert res["world_size"] == 1
        assert all(v == 0 for v in res["bytes"].values())
        assert set(res["owners"].values()) == {0}
        for got, want in zip(res["factors"], workers.make_factors(rank)):
            assert torch.equal(got, want)
        for got, want in zip(res["bcast"], workers.make_bcast_tensors("conv1", fill_rank=rank)):
            assert torch.equal(got, want)


def test_transfer_to_last_rank(suite):
    world_size, results = suite
    owners = assign_by_cost(workers.BCAST_COSTS, world_size)
    dst = world_size - 1
    for key in workers.BCAST_COSTS:
        sent = workers.transfer_payload(key)
        for rank, res in enumerate(r["comm"] for r in results):
            got = res["transferred"][key]
            if rank in (dst, owners[key]) and sent is not None:
                assert len(got) == len(sent)
                for g, s in zip(got, sent):
                    assert g.dtype == s.dtype and torch.equal(g, s), f"{key} on rank {rank}"
            else:
                assert got is None, f"{key} on rank {rank}"


def test_assign_with_different_costs_raises_on_every_rank(suite):
    _, results = suite
    for res in results:
        error = res["assign_mismatch"]["error"]
        assert error is not None and "disagree on the layer costs" in error


KFAC_IDS = [name for name, _ in workers.KFAC_CONFIGS]


@functools.cache
def _reference_params(name: str) -> dict:
    """Parameters after STEPS steps of one process on the global batches."""
    model, _ = _single_process(name, range(workers.STEPS))
    return model.state_dict()


def _single_process(name: str, steps: range, checkpoint: dict | None = None):
    config = dict(workers.KFAC_CONFIGS)[name]
    model = workers.make_model(name)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    opt = KFAC(model, **workers.KFAC_COMMON, **config)
    if checkpoint is not None:
        opt.load_state_dict(checkpoint["optimizer"])
    workers.train_steps(model, opt, steps)
    return model, opt


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", KFAC_IDS)
def test_kfac_matches_one_process_on_global_batch(suite, name):
    _, results = suite
    reference = _reference_params(name)
    initial = workers.make_model(name).state_dict()
    assert _max_diff(reference, initial) > 1e-3  # the parameters really moved
    for rank, res in enumerate(results):
        params = res["kfac"][name]["params"]
        assert _max_diff(params, reference) < 1e-10, f"rank {rank}"
        assert _max_diff(params, results[0]["kfac"][name]["params"]) == 0.0, f"rank {rank}"


@pytest.mark.parametrize(
    "pair",
    [KFAC_IDS[0:2], KFAC_IDS[2:4], [n for n in KFAC_IDS if n.endswith("ekfac-norm")]],
    ids=["expand-empirical-eigen", "reduce-type2-chol", "ekfac-norm"],
)
def test_strategies_give_same_parameters(suite, pair):
    _, results = suite
    replicate, shard = (results[0]["kfac"][n]["params"] for n in pair)
    assert _max_diff(replicate, shard) < 1e-12


def test_without_factor_averaging_the_comparison_fails(suite):
    """Mutation check: workers that skip the factor all-reduce miss the reference.

    (They still agree with each other: under "replicate" every rank uses the inverse its owner
    computed from the owner's local factors.)
    """
    world_size, results = suite
    reference = _reference_params(KFAC_IDS[0])
    for res in results:
        assert _max_diff(res["kfac"]["no-averaging"]["params"], reference) > 1e-6


@pytest.mark.parametrize("name", KFAC_IDS)
def test_checkpoint_resumes_in_one_process(suite, name):
    _, results = suite
    res = results[0]["kfac"][name]
    checkpoint = res["checkpoint"]
    owners = res["owners"]
    assert set(owners.values()) - {0}, "some layer must live on another rank"
    model, _ = _single_process(name, range(workers.CHECKPOINT_AFTER, workers.STEPS), checkpoint)
    assert _max_diff(model.state_dict(), res["params"]) < 1e-10
    # rank 0's plain state_dict lacks the inverses of layers it does not own under "shard"
    names = [n for n, _ in workers.make_model(name).named_modules() if n]
    kfac_layers = [n for n in names if f"module.{n}" in owners]
    plain = checkpoint["plain_optimizer"]["state"]
    full = checkpoint["optimizer"]["state"]
    param_names = [n for n, _ in workers.make_model(name).named_parameters()]
    everywhere = _replicated_layers(name)
    for layer in kfac_layers:
        index = param_names.index(f"{layer}.weight")
        assert "inverse" in full[index]
        owned = owners[f"module.{layer}"] == 0
        if name.startswith("shard") and not owned and f"module.{layer}" not in everywhere:
            assert "inverse" not in plain[index]
        else:
            assert "inverse" in plain[index]


@pytest.mark.parametrize("name", KFAC_IDS)
def test_checkpoint_resumes_distributed(suite, name):
    """Rank 0's checkpoint loaded by every rank continues exactly like the uninterrupted run."""
    _, results = suite
    owners = results[0]["kfac"][name]["owners"]
    for rank, res in enumerate(r["kfac"][name] for r in results):
        assert _max_diff(res["resumed_params"], res["params"]) < 1e-12, f"rank {rank}"
        # "shard": a rank keeps only its own layers' inverses, even after loading all of them
        held = set(res["held_inverses"])
        if name.startswith("shard"):
            owned = {k for k, r in owners.items() if r == rank}
            assert held == owned | _replicated_layers(name), f"rank {rank}"
        else:
            assert held == set(owners), f"rank {rank}"


def _replicated_layers(name: str) -> set[str]:
    """Layers whose inverses every rank holds under "shard": the EKFAC ones."""
    _, opt = _single_process(name, range(0))
    pre = dict(workers.KFAC_CONFIGS)[name].get("preconditioner", "kfac")
    return {f"module.{b.name}" for b in opt.blocks if b.uses_ekfac(pre)}


def _statistic_bytes(name: str) -> dict[str, int]:
    """Bytes of one step's traffic implied by the configuration's blocks (float64).

    Returns:
        ``tri``: upper triangles of A and G per layer; ``eig``: eigen inverses (eigenvalues and
        full eigenvectors); ``chol``: upper triangles of the Cholesky inverses; ``params``:
        block parameters; ``scalings``: the EKFAC scalings; each over all blocks, and with
        ``ekfac_`` over the EKFAC blocks only.
    """
    _, opt = _single_process(name, range(0))
    pre = dict(workers.KFAC_CONFIGS)[name].get("preconditioner", "kfac")
    out = dict.fromkeys(("tri", "eig", "chol", "params", "scalings"), 0)
    out.update({f"ekfac_{k}": 0 for k in list(out)})
    for block in opt.blocks:
        d_a, d_g = block.dims
        g = block.groups
        sizes = {
            "tri": g * (d_a * (d_a + 1) // 2 + d_g * (d_g + 1) // 2),
            "eig": g * (d_a + d_a * d_a + d_g + d_g * d_g),
            "chol": g * (d_a * (d_a + 1) // 2 + d_g * (d_g + 1) // 2),  # symmetric: triangles
            "params": sum(p.numel() for p in block.params),
            "scalings": g * d_g * d_a if block.uses_ekfac(pre) else 0,
        }
        for key, size in sizes.items():
            out[key] += 8 * size
            if block.uses_ekfac(pre):
                out[f"ekfac_{key}"] += 8 * size
    return out


def _inverse_bytes(name: str, ekfac_only: bool = False) -> int:
    """Bytes of the inverse broadcasts (and EKFAC scalings) over STEPS steps.

    Each layer is inverted at step 0 and then on its staggered phase; ``ekfac_only`` counts the
    EKFAC layers only (the ones "shard" replicates).
    """
    _, opt = _single_process(name, range(0))
    pre = dict(workers.KFAC_CONFIGS)[name].get("preconditioner", "kfac")
    period = workers.KFAC_COMMON["inverse_update_period"]
    phases = opt.schedule.phases({b.name: period for b in opt.blocks})
    total = 0
    for block in opt.blocks:
        ekfac = block.uses_ekfac(pre)
        if ekfac_only and not ekfac:
            continue
        d_a, d_g = block.dims
        g = block.groups
        cholesky = "cholesky" in name and block.inversion_for("cholesky").value == "cholesky"
        size = (  # norm blocks are always eigen-inverted
            g * (d_a * (d_a + 1) // 2 + d_g * (d_g + 1) // 2)
            if cholesky
            else g * (d_a + d_a * d_a + d_g + d_g * d_g)
        )
        size += g * d_g * d_a if ekfac else 0
        steps = [0] + [t for t in range(1, workers.STEPS) if (t + phases[block.name]) % period == 0]
        total += 8 * size * len(steps)
    return total


@pytest.mark.parametrize("name", KFAC_IDS)
def test_kfac_traffic(suite, name):
    """Factors: upper triangles every step (EKFAC scalings from the second step: the first has no
    eigenbasis yet); inverses (and scalings) on inverse steps; or gradients every step."""
    _, results = suite
    b = _statistic_bytes(name)
    for res in results:
        sent = res["kfac"][name]["bytes"]
        assert sent["factors"] == workers.STEPS * b["tri"] + (workers.STEPS - 1) * b["scalings"]
        if name.startswith("replicate"):
            assert sent["inverses"] == _inverse_bytes(name)
            assert sent["gradients"] == 0
        else:  # EKFAC layers are replicated; the others send preconditioned gradients
            assert sent["inverses"] == _inverse_bytes(name, ekfac_only=True)
            assert sent["gradients"] == workers.STEPS * (b["params"] - b["ekfac_params"])


def test_budget_ranks_agree_and_resume_exactly(suite):
    """With a curvature budget the ranks take the same decisions (rank 0's agreed estimates),
    so their parameters stay bitwise equal even with each rank's own clock; with a
    deterministic clock a resumed run takes the same decisions and continues like the
    uninterrupted one (to 1e-12 as without a budget: DDP's gradient buckets of the first step
    after a restart differ from the rebuilt ones, which changes the round-off)."""
    _, results = suite
    first = results[0]["budget"]
    for rank, res in enumerate(r["budget"] for r in results):
        assert res["real"]["periods"] == first["real"]["periods"], f"rank {rank}"
        assert _max_diff(res["real"]["params"], first["real"]["params"]) == 0.0, f"rank {rank}"
        assert res["resumed"]["periods"] == res["tick"]["schedule"]["periods"], f"rank {rank}"
        assert _max_diff(res["resumed"]["params"], res["tick"]["params"]) < 1e-12, f"rank {rank}"
        assert res["model"]["schedule"] == first["model"]["schedule"], f"rank {rank}"
        assert _max_diff(res["model"]["params"], first["model"]["params"]) == 0.0, f"rank {rank}"
    assert first["model"]["schedule"]["decisions"] == 1  # modeled costs: one decision, step 1
    schedule = first["tick"]["schedule"]
    assert schedule["step"] == workers.BUDGET_STEPS and schedule["next_decision"] == 12
    assert _max_diff(first["tick"]["params"], workers.make_model().state_dict()) > 1e-3


def test_sampled_step_scales_agree_across_ranks_and_resume_exactly(suite):
    """The step scale's sub-batch is drawn per rank with the same offset (from the step count),
    and the estimates are averaged: every rank takes the same scale, and a resumed run draws
    the same samples as the uninterrupted one (to DDP's restart round-off, which the
    difference quotient's JVP and the long steps here magnify to ~1e-9)."""
    _, results = suite
    first = results[0]["sampled"]
    assert first["scales"] != first["exact_scales"]  # 2 samples of each rank's batch: an estimate
    assert all(0 < a <= 1 for a in first["scales"])
    for rank, res in enumerate(r["sampled"] for r in results):
        assert res["scales"] == first["scales"], f"rank {rank}"
        assert _max_diff(res["params"], first["params"]) == 0.0, f"rank {rank}"
        after = workers.STEPS - workers.CHECKPOINT_AFTER
        assert res["resumed_scales"] == pytest.approx(res["scales"][-after:], rel=1e-8)
        assert _max_diff(res["resumed_params"], res["params"]) < 1e-8, f"rank {rank}"


# ---------------------------------------------------------------- multi-process: failures


def test_dead_worker_makes_survivor_raise_fast(tmp_path):
    results = workers.launch("dead_peer", 2, tmp_path, timeout=60.0, collective_timeout=3.0)
    assert results[1]["returncode"] == 3
    survivor = results[0]
    assert survivor["returncode"] == 0, survivor["output"]
    res = survivor["result"]
    assert res["error"] is not None, "survivor did not notice the dead peer"
    assert "factor all-reduce failed on rank 0 of 2" in res["error"]
    assert res["elapsed"] < 3.0 + 5.0


@pytest.mark.slow
def test_stalled_worker_makes_survivor_time_out(tmp_path):
    timeout = 2.0
    results = workers.launch(
        "stalled_peer", 2, tmp_path, args=["6"], timeout=60.0, collective_timeout=timeout
    )
    survivor = results[0]
    assert survivor["returncode"] == 0, survivor["output"]
    res = survivor["result"]
    assert res["error"] is not None, "survivor did not time out"
    assert "failed on rank 0 of 2" in res["error"]
    assert timeout - 0.5 <= res["elapsed"] < timeout + 3.0


# ---------------------------------------------------------------- end to end: torchrun + train


def _torchrun_train(args: list[str], tmp_path, name: str) -> None:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "kfac_tn", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_torchrun_train_resumes_exactly(tmp_path, strategy):
    """``torchrun -m kfac_tn train CONFIG distributed=ddp``: stop + resume == uninterrupted."""
    common = [
        "configs/digits_kfac.yaml",
        "distributed=ddp",
        "epochs=2",
        "data.limit_batches=6",
        f"out_dir={tmp_path}",
        "quiet=true",
        "dist_timeout_s=60",
        f"optimizer.distributed_strategy={strategy}",
        "optimizer.inverse_update_period=4",  # epoch 2 starts between two inverse steps
    ]
    _torchrun_train([*common, "run_name=full"], tmp_path, "uninterrupted run")
    _torchrun_train([*common, "run_name=part", "--stop-after", "1"], tmp_path, "first half")
    _torchrun_train(["--resume", str(tmp_path / "part")], tmp_path, "resumed half")
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(full) == len(part) == 2
    for a, b in zip(full, part):
        ra, rb = json.loads(a), json.loads(b)
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert ra[key] == rb[key], (key, ra, rb)
