"""One rule per hyperparameter: accepted values, messages, layer settings, resolution."""

from __future__ import annotations

import math

import pytest
import torch

from kfac_tn.enums import KFACApprox
from kfac_tn.optim import hyperparams
from kfac_tn.optim.hyperparams import RULES, layer_settings_problems, problems, resolve_layer_hp

# key, accepted values, rejected values, the rule's "allowed" text
RULE_CASES = [
    ("lr", [0, 0.1, 10], [-0.1, math.inf, math.nan, True, "1"], ">= 0"),
    ("momentum", [0.0, 0.99], [1.0, -0.1], "[0, 1)"),
    ("damping", [1e-8, 3], [0.0, -1.0, math.inf], "> 0"),
    ("factor_update_period", [1, 7, 3.0], [0, 2.5, math.inf], "an int >= 1"),
    ("kl_clip", [None, 1e-3], [0.0, math.inf], "> 0 or null"),
    ("kfac_approx", ["expand", KFACApprox.REDUCE], ["both", 1], "'expand', 'reduce'"),
    ("nesterov", [True, False], [1, "yes"], "True, False"),
    ("factor_dtype", [None, torch.float64, torch.bfloat16], [torch.int64, "float32"], "None, "),
    ("bucket_cap_mb", [0.5, 25], [0, math.inf], "> 0"),
]


@pytest.mark.parametrize("key,good,bad,allowed", RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_rule_accepts_and_rejects(key, good, bad, allowed):
    rule = RULES[key]
    assert all(rule.accepts(v) for v in good)
    assert not any(rule.accepts(v) for v in bad)
    assert rule.allowed.startswith(allowed)


def test_problems_lists_every_invalid_value_and_the_nesterov_rule():
    found = problems({"lr": -1, "damping": 0, "momentum": 0.0, "nesterov": True, "bogus": 1})
    assert [(p.key, p.reason) for p in found] == [
        ("lr", "out of range"),
        ("damping", "out of range"),
        ("nesterov", "needs momentum > 0"),
    ]


def test_layer_settings_problems_name_the_pattern():
    found = layer_settings_problems(
        {"a*": {"damping": -1, "lr": 1}, "b": "freeze", "c": "skip", "d": {"inversion": "svd"}}
    )
    assert [(p.pattern, p.key, p.reason) for p in found] == [
        ("a*", "lr", "unknown key"),
        ("a*", "damping", "out of range"),
        ("b", "", "not an override"),
        ("d", "inversion", "out of range"),
    ]


def test_layer_damping_must_be_a_number():
    """``damping: None`` means "by step_size" for a group; a layer override must be a number."""
    found = layer_settings_problems({"conv*": {"damping": None}})
    assert [(p.pattern, p.key, p.reason) for p in found] == [("conv*", "damping", "not a number")]


def test_validate_layer_settings_normalises_choices():
    out = hyperparams.validate_layer_settings(
        {"x": {"kfac_approx": KFACApprox.REDUCE}, "y": "skip"}
    )
    assert out == {"x": {"kfac_approx": "reduce"}, "y": "skip"}


def test_resolve_layer_hp_applies_the_override_and_the_half_precision_default():
    group = {
        "lr": 0.1,
        "kl_clip": None,
        **{k: None for k in hyperparams.LAYER_KEYS},
        "damping": 1e-3,
        "factor_decay": 0.95,
        "factor_update_period": 1,
        "inverse_update_period": 10,
        "eigenbasis_tolerance": 0.0,
        "kfac_approx": "expand",
        "inversion": "eigen",
        "preconditioner": "kfac",
        "norm_block": "unitwise",
    }
    hp = resolve_layer_hp(group, {"damping": 0.5, "kfac_approx": "reduce"}, torch.bfloat16)
    assert (hp.damping, hp.kfac_approx, hp.factor_dtype) == (0.5, KFACApprox.REDUCE, torch.float32)
    assert hp.inverse_dtype == torch.float32
    assert resolve_layer_hp(group, None, torch.float64).factor_dtype == torch.float64


# (id, the layer's inversion, preconditioner, eigenbasis_tolerance, resolved inversion)
AUTO_INVERSION_CASES = [
    ("default-kfac", None, "kfac", 0.0, "cholesky"),
    ("default-ekfac", None, "ekfac", 0.0, "eigen"),
    ("default-warm-start", None, "kfac", 1e-3, "eigen"),
    ("explicit-eigen", "eigen", "kfac", 0.0, "eigen"),
    ("explicit-cholesky", "cholesky", "kfac", 1e-3, "cholesky"),
]


@pytest.mark.parametrize(
    "inversion,preconditioner,tolerance,expected",
    [c[1:] for c in AUTO_INVERSION_CASES],
    ids=[c[0] for c in AUTO_INVERSION_CASES],
)
def test_auto_inversion(inversion, preconditioner, tolerance, expected):
    values = {
        "inversion": inversion,
        "preconditioner": preconditioner,
        "eigenbasis_tolerance": tolerance,
    }
    assert hyperparams.auto_inversion(values).value == expected


def test_default_inversion_follows_each_layers_preconditioner():
    """With ``inversion=None`` a layer set to EKFAC is eigen-inverted and the others Cholesky
    (an explicit ``inversion="cholesky"`` with EKFAC stays an error)."""
    from kfac_tn import KFAC

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = KFAC(model, layer_settings={"2": {"preconditioner": "ekfac"}})
    hp = opt.layer_hp()
    assert [hp[id(b)].inversion.value for b in opt.blocks] == ["cholesky", "eigen"]
    with pytest.raises(ValueError, match="needs inversion='eigen'"):
        KFAC(model, inversion="cholesky", preconditioner="ekfac")
