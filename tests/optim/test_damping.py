"""Self-tuning: the Levenberg–Marquardt rule, the quadratic-model step scale, and both through
the optimizer (damping up after bad steps, down after good ones; resume; robustness)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC
from kfac_tn.optim.damping import levenberg_marquardt, optimal_scale, reduction_ratio

LM_CASES = [  # rho, expected factor on the damping (omega = 0.5)
    ("good", 0.9, 0.5),
    ("fine", 0.5, 1.0),
    ("bad", 0.1, 2.0),
    ("worse", -3.0, 2.0),
    ("overshoot", -math.inf, 2.0),
    ("no_information", math.nan, 1.0),
]


@pytest.mark.parametrize("rho,factor", [c[1:] for c in LM_CASES], ids=[c[0] for c in LM_CASES])
def test_levenberg_marquardt_rule(rho, factor):
    new = levenberg_marquardt(1e-2, rho, omega=0.5, min_damping=1e-8, max_damping=1.0)
    assert new == pytest.approx(1e-2 * factor)


def test_levenberg_marquardt_clamps():
    assert levenberg_marquardt(0.8, -1.0, omega=0.5, min_damping=1e-3, max_damping=1.0) == 1.0
    assert levenberg_marquardt(1.5e-3, 1.0, omega=0.5, min_damping=1e-3, max_damping=1.0) == 1e-3


RATIO_CASES = [  # actual, predicted, expected
    ("descent", -1.0, -2.0, 0.5),
    ("increase_predicted", 0.5, 0.2, -math.inf),
    ("zero_prediction", 0.0, 0.0, math.nan),
    ("non_finite", math.inf, -1.0, math.nan),
]


@pytest.mark.parametrize(
    "actual,predicted,expected", [c[1:] for c in RATIO_CASES], ids=[c[0] for c in RATIO_CASES]
)
def test_reduction_ratio(actual, predicted, expected):
    rho = reduction_ratio(actual, predicted)
    assert (math.isnan(rho) and math.isnan(expected)) or rho == expected


SCALE_CASES = [  # linear, curvature, max, expected
    ("interior", -2.0, 8.0, 1.0, 0.25),
    ("capped", -2.0, 1.0, 1.0, 1.0),
    ("ascent", 1.0, 1.0, 1.0, 0.0),
    ("flat_descent", -1.0, 0.0, 2.0, 2.0),
]


@pytest.mark.parametrize(
    "linear,curvature,cap,expected", [c[1:] for c in SCALE_CASES], ids=[c[0] for c in SCALE_CASES]
)
def test_optimal_scale(linear, curvature, cap, expected):
    assert optimal_scale(linear, curvature, cap) == expected


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)
    ).double()


def batch(i: int):
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(32, 1, 6, 6, generator=gen, dtype=torch.float64)
    return x, (x.flatten(1)[:, :5].sum(0) * 0 + x.flatten(1)[:, :5]).argmax(1)


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_damping_rises_after_bad_steps():
    """Far too long steps (fixed step size, tiny damping, large lr): the damping grows."""
    model = cnn()
    opt = KFAC(
        model, lr=3.0, step_size="fixed", kl_clip=None, damping=1e-4, damping_adaptation_period=1
    )
    train(model, opt, 6)
    trace = opt.stats
    assert trace["damping_adaptations"] == 6
    assert trace["damping"][0] > 1e-4 / 0.9**5  # grew at least five times


def _losses(**kwargs) -> tuple[list[float], KFAC]:
    model = cnn()
    opt = KFAC(model, lr=3.0, kl_clip=None, damping_adaptation=False, **kwargs)
    losses = []
    for i in range(8):
        x, y = batch(i)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def test_step_scale_shrinks_overlong_steps_and_stays_bounded():
    """lr 3 without KL clip diverges with fixed steps; the quadratic-model scale keeps it sane."""
    fixed, _ = _losses(step_size="fixed")
    assert not all(math.isfinite(v) and v < 10 for v in fixed)
    scaled, opt = _losses(step_size="qmodel", damping_adaptation_period=1)
    assert all(math.isfinite(v) and v < 10 for v in scaled)  # chance level is ln 5 = 1.6
    assert 0.0 <= opt.stats["step_scale"] < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"step_size": "qmodel"}, {"qmodel": "exact", "damping_adaptation_period": 2}],
    ids=["defaults", "qmodel_step", "exact_qmodel"],
)
def test_resume_with_self_tuning_is_exact(kwargs):
    model = cnn()
    opt = KFAC(model, lr=0.1, **kwargs)
    train(model, opt, 3)
    resumed = copy.deepcopy(model)
    opt2 = KFAC(resumed, lr=0.1, **kwargs)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 6, start=3)
    train(resumed, opt2, 6, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert opt.param_groups[0]["damping"] == opt2.param_groups[0]["damping"]
    assert opt.stats["damping_adaptations"] == opt2.stats["damping_adaptations"] > 1


def test_layer_with_fixed_damping_keeps_it_while_the_group_adapts():
    model = cnn()
    opt = KFAC(
        model,
        lr=3.0,
        kl_clip=None,
        damping_adaptation_period=1,
        min_damping=1e-8,
        layer_settings={"3": {"damping": 0.5}},
    )
    train(model, opt, 3)
    hp = opt.layer_hp()
    assert hp[id(opt.blocks[1])].damping == 0.5
    assert hp[id(opt.blocks[0])].damping == opt.param_groups[0]["damping"] != 1e-4  # moved


START_CASES = [  # (id, constructor kwargs, expected start damping = floor)
    ("qmodel-default", {}, 1e-4),
    ("fixed-default", {"step_size": "fixed"}, 1e-3),
    ("qmodel-explicit", {"damping": 3e-3}, 3e-3),
    ("fixed-explicit", {"step_size": "fixed", "damping": 1e-2}, 1e-2),
]


@pytest.mark.parametrize(
    "kwargs,expected", [c[1:] for c in START_CASES], ids=[c[0] for c in START_CASES]
)
def test_start_damping_follows_the_step_size(kwargs, expected):
    """``damping=None`` (the default) starts at 1e-4 with qmodel steps, 1e-3 with fixed ones.

    Regression: 1e-4 with ``step_size="fixed"`` collapsed the digits CNN (0.34 test accuracy after
    2 epochs; end to end in ``tests/benchmarks/test_robustness_benchmark.py``).
    """
    model = cnn()
    params = list(model.parameters())
    opt = KFAC(model, params[:2], **kwargs)
    opt.add_param_group({"params": params[2:]})  # a later group resolves the same way
    assert opt.defaults["damping"] == kwargs.get("damping")
    for group in opt.param_groups:
        assert group["damping"] == group["min_damping"] == expected


def test_invalid_self_tuning_settings_are_rejected():
    with pytest.raises(ValueError, match="Invalid max_damping value: 1e-07"):
        KFAC(cnn(), min_damping=1e-6, max_damping=1e-7)
    with pytest.raises(ValueError, match="Invalid step_size value: 'auto'"):
        KFAC(cnn(), step_size="auto")
    with pytest.raises(ValueError, match="Invalid damping_adaptation_decay value: 1.0"):
        KFAC(cnn(), damping_adaptation_decay=1.0)
