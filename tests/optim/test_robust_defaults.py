"""Regression (#11): with its defaults KFAC trains the digits CNN at any learning rate over two
decades, with the usual weight decay — no divergence, no collapse (accuracy falling late).

The training loop and the rule are :mod:`kfac_tn.benchmarks.robustness`'s, which runs the same
grid over more seeds (``python -m kfac_tn.benchmarks.robustness``); these tests use seed 0.
"""

from __future__ import annotations

import pytest

from kfac_tn.benchmarks.robustness import train_digits, violations


def _check(accuracies: list[float], stats: dict) -> None:
    assert not violations(accuracies, stats["skipped_steps"]), accuracies


def test_defaults_with_weight_decay(one_thread):
    _check(*train_digits(0.1, 5e-4))


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [5e-4, 0.0], ids=["wd", "no_wd"])
@pytest.mark.parametrize("lr", [0.01, 0.05, 0.3, 1.0], ids=lambda lr: f"lr{lr}")
def test_defaults_over_two_decades_of_learning_rates(lr, weight_decay, one_thread):
    _check(*train_digits(lr, weight_decay))


def test_defaults_on_the_data_order_that_dipped(one_thread):
    """Regression: with the exact curvature on the first 32 of the 64 samples (the earlier
    default of ``qmodel_samples``) seed 4 dipped from 0.950 to 0.911 in epoch 2 at the README's
    lr, and at every other lr of the grid; on all samples the drop is under 0.02."""
    _check(*train_digits(0.05, 5e-4, seed=4))


@pytest.mark.parametrize("seed", [5, 8], ids=["seed5_avx512_plan", "seed8_avx2_plan"])
def test_defaults_on_the_data_orders_that_dipped_with_budget_0_3(seed, one_thread):
    """Regression: with ``curvature_budget=0.3`` and the difference-quotient JVP (one forward
    pass instead of three: a smaller step for the budget to take 30% of) the plan updated the
    convolutions' factors only every 4-6 steps. At lr 0.01 without weight decay seed 5 then
    fell from 0.981 to 0.950 in epoch 2 with the AVX-512 plan, seed 8 from 0.992 to 0.958 in
    epoch 3 with the AVX2 plan (``ATEN_CPU_CAPABILITY=avx2``); each case fails with 0.3 on its
    plan. The default 0.4 takes the plan forward mode took at 0.3 again."""
    _check(*train_digits(0.01, 0.0, seed=seed))
