"""The robustness benchmark: the grid's rule as data, and a one-run grid end to end."""

from __future__ import annotations

import json

import pytest

from kfac_tn.benchmarks import robustness

# (id, test accuracies per epoch, skipped steps, expected reasons)
RULE_CASES = [
    ("passes", (0.93, 0.97, 0.98), 0, []),
    ("drop-within-bound", (0.96, 0.94, 0.97), 0, []),
    ("drop-too-large", (0.95, 0.906, 0.956), 0, ["drop 0.044 > 0.03"]),
    ("final-too-low", (0.93, 0.96, 0.944), 0, ["final 0.944 < 0.95"]),
    ("skipped-steps", (0.93, 0.97, 0.98), 2, ["2 skipped steps"]),
]


@pytest.mark.parametrize(
    "accuracies,skipped,expected", [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES]
)
def test_violations(accuracies, skipped, expected):
    assert robustness.violations(accuracies, skipped) == expected


def test_batch_size_sets_the_steps_per_epoch(one_thread):
    """1437 training images: 12 steps per epoch at batch 128 (the last one 29 samples)."""
    _, stats = robustness.train_digits(0.05, 5e-4, epochs=1, batch_size=128)
    assert stats["steps"] == 12


def test_one_run_grid_end_to_end(tmp_path, capsys, one_thread):
    argv = ["--seeds", "1", "--lrs", "0.05", "--weight-decays", "5e-4", "--epochs", "1"]
    argv += ["--variant", 'fixed={"step_size": "fixed"}', "--out", str(tmp_path)]
    runs = robustness.main(argv)
    assert [(r.variant, r.lr, r.seed, len(r.accuracies)) for r in runs] == [
        ("kfac", 0.05, 0, 1),
        ("fixed", 0.05, 0, 1),
    ]
    assert all(0.5 < r.accuracies[0] <= 1.0 for r in runs)  # one epoch learns the digits
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert [s["variant"] for s in saved] == ["kfac", "fixed"]
    out = capsys.readouterr().out
    assert "variant | runs | fail" in out and "fixed | 1 |" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0"],
        ["--batch-size", "0"],
        ["--variant", "bad"],
        ["--variant", "x=[1]"],
        ["--no-defaults"],
    ],
)
def test_bad_arguments_are_rejected(argv):
    with pytest.raises(SystemExit):
        robustness.main(argv)
