"""A state dict is checked completely before anything is loaded; a refusal changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC


def net(width: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 25, 3)
    ).double()


def trained(model: nn.Module, **kw) -> KFAC:
    opt = KFAC(model, lr=0.05, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _sgd_state(model):
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 2, 5, 5, dtype=torch.float64)).sum().backward()
    sgd.step()
    return sgd.state_dict()


def _other_width(model):
    return trained(net(width=6)).state_dict()


def _negative_lr(model):
    sd = copy.deepcopy(trained(copy.deepcopy(model)).state_dict())
    sd["param_groups"][0]["lr"] = -1.0
    return sd


def _nan_factor(model):
    sd = copy.deepcopy(trained(copy.deepcopy(model)).state_dict())
    sd["state"][0]["A"][0, 0, 0] = float("nan")
    return sd


def _bad_inverse_kind(model):
    sd = copy.deepcopy(trained(copy.deepcopy(model)).state_dict())
    sd["state"][0]["inverse_kind"] = "svd"
    return sd


def _missing_groups(model):
    return {"state": {}, "param_groups": []}


BAD = [  # name, make a bad state dict from the model, message fragment
    ("sgd_state_dict", _sgd_state, "param_groups[0]: lacks 'damping'"),
    ("other_width", _other_width, "layer '0'"),
    ("negative_lr", _negative_lr, "param_groups[0].lr: -1.0 is out of range"),
    ("nan_factor", _nan_factor, "state[0] (layer '0').A: has non-finite values"),
    ("bad_inverse_kind", _bad_inverse_kind, "inverse_kind: 'svd'"),
    ("no_groups", _missing_groups, "param_groups: 0 groups"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_state_dict_is_refused_and_changes_nothing(make, message):
    """Regression (#10): KFAC.load_state_dict(sgd.state_dict()) broke every later step."""
    model = net()
    opt = trained(model)
    bad = make(copy.deepcopy(model))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="Invalid state_dict") as err:
        opt.load_state_dict(bad)
    assert message in str(err.value)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, entry in before["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][key][name], value)
    # and it still trains
    x, y = torch.randn(8, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_state_dict_of_an_older_release_loads():
    """Groups without the whole-optimizer settings (stored since this release) still load."""
    model = net()
    opt = trained(model)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("fisher_type", "mc_samples", "loss", "loss_reduction", "layer_settings"):
            group.pop(key)
    other = KFAC(copy.deepcopy(model), lr=0.05)
    other.load_state_dict(sd)
    assert other.param_groups[0]["fisher_type"] == "empirical"
