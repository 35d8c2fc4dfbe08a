"""Tests of ``python -m kfac_tn.benchmarks.distributed``: the traffic bound and a smoke run."""

from __future__ import annotations

import json

import pytest

from kfac_tn.benchmarks import distributed as bench

BOUND_CASES = [
    # (method, warmup, steps, period, expected bound): factors 100 B, inverses 1000 B, grads 10 B
    ("kfac-replicate", 3, 20, 10, 100 + 1000 * 2 / 20),  # inverse steps 10 and 20
    ("kfac-replicate", 0, 4, 2, 100 + 1000 * 2 / 4),  # steps 0 and 2
    ("kfac-replicate", 1, 1, 10, 100),  # step 1: no inverse
    ("kfac-shard", 3, 20, 10, 100 + 10),  # preconditioned gradients every step
]


@pytest.mark.parametrize(
    "method,warmup,steps,period,expected",
    BOUND_CASES,
    ids=["replicate-20-steps", "replicate-quick", "replicate-no-inverse-step", "shard"],
)
def test_bound(method, warmup, steps, period, expected):
    row = {"method": method, "factor_upper_bytes": 100, "inverse_bytes": 1000, "grad_bytes": 10}
    assert bench._bound(row, steps, period, warmup) == pytest.approx(expected)


def test_table_lists_every_row():
    rows = [
        {"W": 1, "method": "sgd", "step_ms": 10.0, "ddp_B": 2**20, "vs_sgd": 1.0},
        {
            "W": 1,
            "method": "kfac-shard",
            "step_ms": 25.0,
            "vs_sgd": 2.5,
            "wait_ms": 3.5,
            "ddp_B": 2**20,
            "factors_B": 3 * 2**20,
            "gradients_B": 2**20,
            "bound_B": 4 * 2**20,
            "ok": "yes",
        },
    ]
    lines = bench._table(rows).splitlines()
    assert len(lines) == 4
    assert lines[3].split() == [
        "1", "kfac-shard", "25.0", "2.50", "3.5", "1.00M", "3.00M", "0", "1.00M", "4.00M", "yes"
    ]  # fmt: skip


def test_invalid_arguments():
    with pytest.raises(ValueError, match="--steps: 0"):
        bench.main(["--procs", "1", "--steps", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--methods", "adam"])


@pytest.mark.slow
def test_quick_run_one_and_two_processes(tmp_path):
    out = tmp_path / "results.json"
    rows = bench.main(["--procs", "1", "2", "--quick", "--out", str(out)])
    assert {(r["W"], r["method"]) for r in rows} == {(w, m) for w in (1, 2) for m in bench.METHODS}
    for r in rows:
        assert r["step_ms"] > 0 and r["ddp_B"] == r["grad_bytes"]  # DDP sends every gradient
        assert 0 <= r["wait_ms"] < r["step_ms"]
        if r["method"] != "sgd":
            assert r["ok"] == "yes"
            if r["W"] == 1:  # nothing to average or share
                assert r["factors_B"] == r["inverses_B"] == r["gradients_B"] == 0
                continue
            assert r["factors_B"] == r["factor_upper_bytes"]  # factors every step, triangles
            if r["method"] == "kfac-shard":
                assert r["inverses_B"] == 0 and r["gradients_B"] == r["grad_bytes"]
            else:
                assert r["gradients_B"] == 0 and r["inverses_B"] > 0
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["config"]["quick"] is True
