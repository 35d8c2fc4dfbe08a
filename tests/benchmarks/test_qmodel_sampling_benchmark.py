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


ZONE_CASES = [  # rho, the LM rule's decision
    ("bad", 0.1, -1),
    ("fine", 0.5, 0),
    ("good", 0.9, 1),
    ("overshoot", -math.inf, -1),
    ("no_information", math.nan, 0),
]


@pytest.mark.parametrize("rho,zone", [c[1:] for c in ZONE_CASES], ids=[c[0] for c in ZONE_CASES])
def test_lm_zone(rho, zone):
    assert qmodel_sampling.lm_zone(rho) == zone


def test_rho_summary_counts_alike_decisions_and_gaps():
    rows = [
        dict(task="t", step=0, rho_batch=0.8, rho_sub=0.9),
        dict(task="t", step=5, rho_batch=0.7, rho_sub=0.8),  # keep vs lower
        dict(task="t", step=10, rho_batch=math.nan, rho_sub=0.5),
    ]
    (summary,) = qmodel_sampling.summarise_rhos(rows)
    assert summary["steps"] == 3 and summary["alike"] == 2
    assert summary["median"] == pytest.approx(0.1) and summary["max"] == pytest.approx(0.1)


def test_run_takes_both_rhos_on_sub_batch_damping_steps(one_thread):
    """Batch 128 > the default 64 samples: every damping step (0, 5, 10) gives a pair."""
    rhos = []
    qmodel_sampling.run_task("digits", 128, [64], 1, 100, rhos)
    assert [r["step"] for r in rhos] == [0, 5, 10]
    assert all(math.isfinite(r["rho_batch"]) and math.isfinite(r["rho_sub"]) for r in rhos)
