"""The step benchmark runs end to end on a tiny batch and writes well-formed rows."""

from __future__ import annotations

import json

import pytest
from torch import nn

from kfac_tn.benchmarks import step


def tiny(name: str) -> nn.Module:
    """Stand-in for the benchmark models (the machinery is under test, not 3c3d's speed)."""
    assert name == "3c3d"
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )


def test_step_benchmark_writes_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(step, "build", tiny)
    rows = step.main(
        "--models 3c3d --batch-size 2 --steps 2 --no-peers --inversion cholesky --out".split()
        + [str(tmp_path)]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == rows
    budget = f"budget {step.DEFAULT_BUDGET:g}"
    plain = [("reduce", "1/10"), ("expand", "1/10"), ("reduce", budget), ("expand", budget)]
    assert [(r["optimizer"], r["kfac_approx"], r["mode"], r["variant"]) for r in rows] == [
        ("sgd", None, None, None),
        ("adam", None, None, None),
        *[("kfac", approx, mode, None) for approx, mode in plain],
        *[("kfac", approx, mode, "no-tuning") for approx, mode in plain],
        ("kfac", "expand", "1/10", "qmodel-32"),
    ]
    for row in rows:
        assert row["model"] == "3c3d" and row["batch_size"] == 2 and row["device"] == "cpu"
        assert row["inversion"] == ("cholesky" if row["optimizer"] == "kfac" else None)
        times = row["time_s"]
        assert times["total"] == pytest.approx(times["forward"] + times["backward"] + times["step"])
        assert times["step_max"] >= times["step"]
        assert row["peak_mem_bytes"] > 0
    assert rows[0]["ratio_to_sgd"] == 1.0
    for row in rows[2:]:
        parts = row["curvature_s"]
        assert set(parts) == {"factor", "inverse", "fixed"} and parts["fixed"] > 0
        # within the step phase: inverses and fixed work; factors also run in the hooks
        assert parts["inverse"] + parts["fixed"] <= row["time_s"]["step"]
        assert set(row["paths"]) == {"eigh", "warm", "qr", "cholesky", "offloaded", "factored"}
    # the self-tuning's stages are timed apart, and only where it is on
    assert all(r["tuning_s"] > 0 for r in rows[2:6])
    assert all(r["tuning_s"] == 0 for r in rows[6:10])
    assert rows[10]["tuning_s"] > 0  # qmodel-32: the self-tuning on, on fewer samples
    for row, plain_row in zip(rows[6:10], rows[2:6]):  # against the plain row of its mode
        extra = row["extra_vs_kfac_s"]["total"]
        assert extra == pytest.approx(row["time_s"]["total"] - plain_row["time_s"]["total"])
    # budget rows: the probe ran in the warm-up, a plan exists for both layers
    assert set(rows[4]["periods"]) == {"0", "3"} and not rows[2]["periods"]
    out = capsys.readouterr().out
    assert "x SGD" in out and "paths (timed steps)" in out


def test_budget_rows_can_be_left_out(monkeypatch):
    monkeypatch.setattr(step, "build", tiny)
    rows = step.main("--models 3c3d --batch-size 2 --steps 1 --no-peers --no-budget".split())
    assert [r["mode"] for r in rows if not r["variant"]] == [None, None, "1/10", "1/10"]
    assert [r["mode"] for r in rows if r["variant"] == "no-tuning"] == ["1/10", "1/10"]


def test_variant_rows_follow_a_single_approximation(monkeypatch):
    """Regression: with ``--approx reduce`` the variant rows still ran KFAC-expand, which had no
    plain row to compare with (no ``extra_vs_kfac_s``)."""
    monkeypatch.setattr(step, "build", tiny)
    argv = "--models 3c3d --batch-size 2 --steps 1 --no-peers --no-budget --approx reduce"
    rows = step.main(argv.split())
    variants = [r for r in rows if r["variant"] not in (None, "no-tuning")]
    assert variants and all(r["kfac_approx"] == "reduce" for r in variants)
    assert all("extra_vs_kfac_s" in r for r in variants)


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="Invalid model: 'vgg'"):
        step.build("vgg")


def tiny_with_norm(name: str) -> nn.Module:
    assert name == "resnet18"
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def test_variant_rows_report_their_extra_cost(monkeypatch):
    monkeypatch.setattr(step, "build", tiny_with_norm)
    rows = step.main("--models resnet18 --batch-size 2 --steps 2 --no-peers".split())
    variants = {r["variant"]: r for r in rows if r["optimizer"] == "kfac"}
    assert set(variants) == {None, "ekfac", "no-norm", "no-tuning", "qmodel-32"}
    base = next(
        r
        for r in rows
        if r["kfac_approx"] == "expand" and r["mode"] == "1/10" and r["variant"] is None
    )
    for name in ("ekfac", "no-norm", "qmodel-32"):
        row = variants[name]
        assert row["kfac_approx"] == "expand"
        extra = row["extra_vs_kfac_s"]
        assert extra["step"] == pytest.approx(row["time_s"]["step"] - base["time_s"]["step"])
    assert "extra_vs_kfac_s" not in base


def test_peer_rows_run(monkeypatch):
    """Regression: the peer rows failed ("local variable 'opt'") and were silently left out."""
    pytest.importorskip("curvlinops")
    monkeypatch.setattr(step, "build", tiny)
    rows = step.main("--models 3c3d --batch-size 2 --steps 1 --no-budget --approx reduce".split())
    peers = [(r["optimizer"], r["kfac_approx"]) for r in rows if r["mode"] is None]
    assert ("curvlinops", "reduce") in peers and ("curvlinops", "expand") in peers
