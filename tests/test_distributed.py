"""Tests of kfac_tn.distributed: communicator unit tests in-process and with 2-3 gloo workers.

Multi-process cases start separate Python processes (see ``tests/_dist_workers.py``) on the
loopback interface with bounded collective timeouts; each ``launch`` is killed after its
``timeout``. References (averages, owners' values) are computed here in the parent process.
"""

from __future__ import annotations

import itertools

import _dist_workers as workers
import pytest
import torch

from kfac_tn.distributed import (
    STRATEGIES,
    assign_by_cost,
    get_communicator,
    packed_size,
)

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


# ---------------------------------------------------------------- multi-process


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def comm_run(request, tmp_path_factory):
    world_size = request.param
    results = workers.check_ok(
        workers.launch("comm", world_size, tmp_path_factory.mktemp(f"comm{world_size}"))
    )
    return world_size, results


def test_factor_average_matches_reference(comm_run):
    world_size, results = comm_run
    inputs = [workers.make_factors(r) for r in range(world_size)]
    for i, (lead, d, dtype) in enumerate(workers.FACTOR_SPECS):
        expected = sum(inp[i].double() for inp in inputs) / world_size
        tol = 1e-13 if dtype == torch.float64 else 1e-5
        for rank, res in enumerate(results):
            for name in ("factors", "factors_again", "plain"):
                got = res[name][i]
                assert got.dtype == dtype and got.shape == (*lead, d, d)
                torch.testing.assert_close(
                    got.double(), expected, rtol=tol, atol=tol, msg=f"{name} {i} rank {rank}"
                )
            # the bucketed result is exactly symmetric and equals the plain all-reduce
            assert torch.equal(res["factors"][i], res["factors"][i].transpose(-1, -2))
            torch.testing.assert_close(res["factors"][i], res["plain"][i], rtol=tol, atol=tol)


def test_factor_traffic_is_upper_triangles_in_several_buckets(comm_run):
    world_size, results = comm_run
    expected = 0
    for lead, d, dtype in workers.FACTOR_SPECS:
        shape = (*lead, d, d)
        expected += packed_size(shape) * torch.empty((), dtype=dtype).element_size()
    full = sum(
        torch.Size((*lead, d, d)).numel() * torch.empty((), dtype=dtype).element_size()
        for lead, d, dtype in workers.FACTOR_SPECS
    )
    assert expected < full
    for res in results:
        assert res["bytes"] == {"factors": expected, "inverses": 0, "gradients": 0}
        # cap 256 B, packed bytes in queue order: f64 120, 96, 8 | f32 112 | f64 240 | f32 12 |
        # f64 528 -> f64 buckets [120+96+8], [240], [528 alone, over the cap]; f32 [112+12]
        assert res["collectives"]["factors"] == 4
        assert res["pending_before_wait"] and not res["pending_after_wait"]


def test_owners_and_broadcasts(comm_run):
    world_size, results = comm_run
    owners = assign_by_cost(workers.BCAST_COSTS, world_size)
    expected_bytes = 0
    for key in workers.BCAST_COSTS:
        src = owners[key]
        sent = workers.make_bcast_tensors(key, fill_rank=src)
        expected_bytes += sum(
            packed_size(t.shape, symmetric=(i < 2)) * t.element_size() for i, t in enumerate(sent)
        )
        for rank, res in enumerate(results):
            assert res["owners"] == owners
            for got, want in zip(res["received"][key], sent):
                assert torch.equal(got, want), f"layer {key} on rank {rank} (owner {src})"
    for res in results:
        assert res["bytes_after_bcast"]["inverses"] == expected_bytes
        assert res["bytes_after_bcast"]["gradients"] == 0


def test_assign_with_different_costs_raises_on_every_rank(tmp_path):
    results = workers.check_ok(workers.launch("assign_mismatch", 2, tmp_path))
    for res in results:
        assert res["error"] is not None and "disagree on the layer costs" in res["error"]


def test_dead_worker_makes_survivor_raise_fast(tmp_path):
    results = workers.launch("dead_peer", 2, tmp_path, timeout=40.0, collective_timeout=3.0)
    assert results[1]["returncode"] == 3
    survivor = results[0]
    assert survivor["returncode"] == 0, survivor["output"]
    res = survivor["result"]
    assert res["error"] is not None, "survivor did not notice the dead peer"
    assert "factor all-reduce failed on rank 0 of 2" in res["error"]
    assert res["elapsed"] < 3.0 + 5.0


def test_stalled_worker_makes_survivor_time_out(tmp_path):
    timeout = 2.0
    results = workers.launch(
        "stalled_peer", 2, tmp_path, args=["6"], timeout=40.0, collective_timeout=timeout
    )
    survivor = results[0]
    assert survivor["returncode"] == 0, survivor["output"]
    res = survivor["result"]
    assert res["error"] is not None, "survivor did not time out"
    assert "failed on rank 0 of 2" in res["error"]
    assert timeout - 0.5 <= res["elapsed"] < timeout + 3.0
