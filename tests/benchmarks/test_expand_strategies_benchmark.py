"""The expand-strategy benchmark runs end to end on small shapes and writes well-formed rows."""

from __future__ import annotations

import json

import pytest

from kfac_tn.benchmarks import expand_strategies


def test_expand_strategies_benchmark_writes_rows(tmp_path, capsys, monkeypatch):
    shapes = (((4, 8, 9, 9), 3, 1), ((3, 2, 7), 5, 0))
    monkeypatch.setattr(expand_strategies, "SHAPES", shapes)
    rows = expand_strategies.main(["--repeats", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "expand_strategies.json").read_text()) == rows
    assert [tuple(r["shape"]) for r in rows] == [s[0] for s in shapes]
    for row in rows:
        assert row["rel_err"] < 1e-5  # both strategies compute the same factor
        assert row["choice"] in ("gemm", "lag") and row["winner"] in ("gemm", "lag")
        assert 0 < row["efficiency"] <= 1
        assert set(row["measured_s"]) == set(row["estimated_s"]) == {"gemm", "lag"}
    out = capsys.readouterr().out
    assert "choice = winner on" in out


def test_expand_strategies_rejects_bad_threads():
    with pytest.raises(SystemExit):
        expand_strategies.main(["--threads", "0"])
