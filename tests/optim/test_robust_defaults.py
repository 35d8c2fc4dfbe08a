"""Regression (#11): with its defaults KFAC trains the digits CNN at any learning rate over two
decades, with the usual weight decay — no divergence, no collapse (accuracy falling late)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kfac_tn import KFAC

EPOCHS = 3


def _train_digits(lr: float, weight_decay: float) -> tuple[list[float], dict]:
    from kfac_tn.training.data import load_digits_tensors
    from kfac_tn.training.models import DigitsCNN

    x_train, y_train, x_test, y_test = load_digits_tensors()
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = KFAC(model, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    accuracies = []
    for _ in range(EPOCHS):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(y_train), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            assert math.isfinite(loss.item())
        with torch.no_grad():
            accuracies.append((model(x_test).argmax(1) == y_test).double().mean().item())
    return accuracies, opt.stats


def _check(accuracies: list[float], stats: dict) -> None:
    assert stats["skipped_steps"] == 0
    assert accuracies[-1] >= 0.95, accuracies
    assert all(b >= a - 0.03 for a, b in zip(accuracies, accuracies[1:])), accuracies


def test_defaults_with_weight_decay(one_thread):
    _check(*_train_digits(0.1, 5e-4))


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [5e-4, 0.0], ids=["wd", "no_wd"])
@pytest.mark.parametrize("lr", [0.01, 0.05, 0.3, 1.0], ids=lambda lr: f"lr{lr}")
def test_defaults_over_two_decades_of_learning_rates(lr, weight_decay, one_thread):
    _check(*_train_digits(lr, weight_decay))
