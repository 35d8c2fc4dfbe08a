"""The sub-batch estimator benchmark: its error formulas on cases with known answers, and a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kfac_tn.benchmarks import qmodel_sampling
from kfac_tn.optim.qmodel import inclusion_probabilities


def test_constant_curvature_has_no_uniform_error():
    errors = qmodel_sampling.relative_errors(torch.ones(8, dtype=torch.float64), torch.rand(8), 3)
    assert errors["uniform"] == pytest.approx(0.0, abs=1e-12)


def test_curvature_proportional_to_the_inclusion_probabilities_has_no_importance_error():
    """Horvitz-Thompson is exact for c ∝ pi: every draw sums to the total."""
    traces = torch.tensor([5.0, 0.1, 0.0, 2.0, 1.0, 0.3], dtype=torch.float64)
    c = inclusion_probabilities(traces, 3)
    errors = qmodel_sampling.relative_errors(c, traces, 3)
    assert errors["importance"] == pytest.approx(0.0, abs=1e-12)
    assert errors["uniform"] > 0.1


def test_uniform_error_is_the_sampling_without_replacement_variance():
    """Against enumeration: all 15 subsets of 2 of 6, each scaled by 6/2."""
    c = torch.tensor([0.5, 2.0, 0.1, 1.5, 3.0, 0.9], dtype=torch.float64)
    subsets = torch.combinations(torch.arange(6), 2)
    estimates = c[subsets].sum(1) * 3
    expected = math.sqrt(float(((estimates - c.sum()) ** 2).mean())) / float(c.sum())
    errors = qmodel_sampling.relative_errors(c, torch.ones(6), 2)
    assert errors["uniform"] == pytest.approx(expected, rel=1e-12)


def test_run_writes_rows_and_summary(tmp_path, capsys, one_thread):
    summary = qmodel_sampling.main(
        "--tasks digits --batch-size 64 --samples 16 --epochs 1 --every 10 --out".split()
        + [str(tmp_path)]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == summary
    assert {r["estimator"] for r in summary} == {"uniform", "importance"}
    assert all(r["steps"] == 2 and 0 <= r["median"] <= r["p90"] <= r["max"] for r in summary)
    assert "importance" in capsys.readouterr().out
