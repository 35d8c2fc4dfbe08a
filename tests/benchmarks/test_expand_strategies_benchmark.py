"""The expand-strategy benchmark runs end to end on small shapes and writes well-formed rows."""

from __future__ import annotations

import json

import pytest

from kfac_tn.benchmarks import expand_strategies
from kfac_tn.tn.cost import CpuCalibration, estimated_seconds


def test_expand_strategies_benchmark_writes_rows(tmp_path, capsys, monkeypatch):
    shapes = (((4, 8, 9, 9), 3, 1), ((3, 2, 7), 5, 0))
    monkeypatch.setattr(expand_strategies, "SHAPES", shapes)
    rows = expand_strategies.main(["--repeats", "1", "--out", str(tmp_path), "--fit"])
    assert json.loads((tmp_path / "expand_strategies.json").read_text()) == rows
    assert [tuple(r["shape"]) for r in rows] == [s[0] for s in shapes]
    for row in rows:
        assert row["rel_err"] < 1e-5  # both strategies compute the same factor
        strategies = ("gemm", "lag", "plain")
        assert row["choice"] in strategies and row["winner"] in strategies
        assert 0 < row["efficiency"] <= 1
        assert set(row["measured_s"]) == set(row["estimated_s"]) == set(strategies)
    out = capsys.readouterr().out
    assert "choice = winner on" in out
    assert "fitted for " in out and "CpuCalibration(" in out


def test_fit_recovers_the_constants_of_synthetic_times():
    """Times generated from known constants give those constants back."""
    truth = CpuCalibration(1.1e-11, 6e-10, 4e-5, 0.6)
    rows = []
    for k in range(6):
        gemm = {"flops": 1e8 * (k + 1), "elements": 1e5 * (7 - k), "calls": 1.0}
        lag = {"flops": 3e7 * (k + 2), "elements": 2e5 * (k + 1), "calls": 5.0 + 3 * k}
        plain = {"flops": 5e7 * (k + 1), "elements": 4e5 * (6 - k), "calls": 2.0 + k}
        row = {"gemm_flops": gemm["flops"], "gemm_elements": gemm["elements"], "lag": lag}
        row["plain"] = {**plain, "largest": 0.0}
        row["measured_s"] = {
            "gemm": estimated_seconds(**gemm, calibration=truth),
            "lag": estimated_seconds(**lag, calibration=truth),
            "plain": estimated_seconds(
                plain["flops"] / truth.plain_rate, plain["elements"], plain["calls"], truth
            ),
        }
        rows.append(row)
    fitted = expand_strategies.fit_calibration(rows)
    for name in ("seconds_per_flop", "seconds_per_element", "seconds_per_call", "plain_rate"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name


def test_expand_strategies_rejects_bad_threads():
    with pytest.raises(SystemExit):
        expand_strategies.main(["--threads", "0"])
