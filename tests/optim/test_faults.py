"""Fault injection: non-finite inputs, losses, gradients, factors and decompositions.

A step whose gradients or statistics are not all finite changes nothing but the skip counter, so
a run with faulty batches injected equals, bitwise, the run in which they never happened. A
non-finite factor is reset and rebuilt from the next finite batch; a failing decomposition is
retried in float64 and otherwise the last good inverse is kept. Every case ends with finite
state and the documented counters.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()


def batch(i: int):
    gen = torch.Generator().manual_seed(i)
    return torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=gen
    )


def clean_step(model, opt, i):
    x, y = batch(i)
    opt.zero_grad()
    F.cross_entropy(model(x.to(model[0].weight.dtype)), y).backward()
    opt.step()


def nan_input(model, opt, i):
    x, y = batch(i)
    x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def inf_loss(model, opt, i):
    x, y = batch(i)
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * float("inf")).backward()
    opt.step()


def nan_in_one_gradient_element(model, opt, i):
    x, y = batch(i)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[0, 0, 0, 0] = float("nan")
    opt.step()


def inf_in_a_bias_gradient(model, opt, i):
    x, y = batch(i)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[5].bias.grad[1] = float("inf")
    opt.step()


@dataclass(frozen=True)
class Fault:
    name: str
    step: Callable
    fisher_type: str = "empirical"


SKIPPED_FAULTS = [
    Fault("nan_input", nan_input),
    Fault("inf_loss", inf_loss),
    Fault("nan_gradient_element", nan_in_one_gradient_element),
    Fault("inf_bias_gradient", inf_in_a_bias_gradient),
    Fault("nan_input_type2", nan_input, "type2"),
]
KW = dict(lr=0.05, weight_decay=5e-4, inverse_update_period=2, curvature_budget=None)


def state_equal(a: KFAC, b: KFAC) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    if sa.keys() - {"kfac"} != sb.keys() - {"kfac"}:
        return False
    for key in sa.keys() - {"kfac"}:
        for name, value in sa[key].items():
            other = sb[key][name]
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other):
                    return False
            elif isinstance(value, list):
                if not all(torch.equal(u, v) for u, v in zip(value, other)):
                    return False
            elif value != other:
                return False
    return True


@pytest.mark.parametrize("fault", SKIPPED_FAULTS, ids=[f.name for f in SKIPPED_FAULTS])
def test_run_with_faulty_batches_equals_run_without_them(fault: Fault):
    faulty_model, clean_model = net(), net()
    faulty = KFAC(faulty_model, fisher_type=fault.fisher_type, **KW)
    clean = KFAC(clean_model, fisher_type=fault.fisher_type, **KW)
    for i in range(6):
        if i in (0, 3, 4):  # a fault on the very first step, and two in a row
            fault.step(faulty_model, faulty, i)
        else:
            clean_step(faulty_model, faulty, i)
            clean_step(clean_model, clean, i)
    for p, q in zip(faulty_model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)
    assert state_equal(faulty, clean)
    stats = faulty.stats
    assert stats["skipped_steps"] == 3
    assert {k: v for k, v in stats.items() if k != "skipped_steps"} == {
        k: v for k, v in clean.stats.items() if k != "skipped_steps"
    }
    assert all(torch.isfinite(p).all() for p in faulty_model.parameters())


def test_skipped_steps_are_logged_with_counts_not_every_step(caplog):
    model = net()
    opt = KFAC(model, **KW)
    with caplog.at_level(logging.WARNING, logger="kfac_tn"):
        for i in range(20):
            inf_loss(model, opt, i)
    lines = [r.getMessage() for r in caplog.records if "skipped a step" in r.getMessage()]
    assert len(lines) == 5  # counts 1, 2, 4, 8, 16
    assert "(16 so far" in lines[-1]
    assert opt.stats["skipped_steps"] == 20


def test_non_finite_factor_is_reset_and_rebuilt_from_the_next_batch():
    model = net()
    opt = KFAC(model, **KW)
    for i in range(2):
        clean_step(model, opt, i)
    state = opt.state[model[2].weight]
    state["A"][0, 0, 0] = float("nan")  # e.g. a corrupted buffer
    clean_step(model, opt, 2)  # inverse step: the NaN factor is found and reset
    assert opt.stats["invalid_factors"] == 1
    assert "inverse" not in state and not bool(state["factors_valid"])
    fresh = copy.deepcopy(model)
    clean_step(model, opt, 3)  # rebuilt from this batch alone, inverse recomputed
    assert bool(state["factors_valid"]) and "inverse" in state
    assert torch.isfinite(state["A"]).all() and torch.isfinite(state["G"]).all()
    ref = KFAC(fresh, **KW)
    clean_step(fresh, ref, 3)
    # the rebuilt factor is that batch's factor (weight 1), not an EMA with the NaN
    assert torch.allclose(state["A"], ref.state[fresh[2].weight]["A"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _failing_eigh(fail_dtypes: tuple[torch.dtype, ...], mode: str):
    real = torch.linalg.eigh

    def eigh(a, *args, **kwargs):
        if a.dtype in fail_dtypes:
            if mode == "raise":
                raise torch.linalg.LinAlgError("linalg.eigh: failed to converge (injected)")
            evals, evecs = real(a, *args, **kwargs)
            return evals * float("nan"), evecs
        return real(a, *args, **kwargs)

    return eigh


EIGH_FAULTS = [
    ("float32_raises", (torch.float32,), "raise", "fallback_inversions"),
    ("float32_nan", (torch.float32,), "nan", "fallback_inversions"),
    ("both_raise", (torch.float32, torch.float64), "raise", "failed_inversions"),
    ("both_nan", (torch.float32, torch.float64), "nan", "failed_inversions"),
]


@pytest.mark.parametrize(
    "fail_dtypes,mode,counter", [c[1:] for c in EIGH_FAULTS], ids=[c[0] for c in EIGH_FAULTS]
)
def test_failing_eigh_is_retried_or_the_last_inverse_kept(
    fail_dtypes, mode, counter, monkeypatch, caplog
):
    model = net().float()
    opt = KFAC(model, lr=0.05, inverse_update_period=1, inversion="eigen")
    clean_step(model, opt, 0)  # a good first inverse
    good = [t.clone() for t in opt.state[model[0].weight]["inverse"]]
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(fail_dtypes, mode))
    with caplog.at_level(logging.WARNING, logger="kfac_tn"):
        for i in range(1, 9):
            clean_step(model, opt, i)
    assert opt.stats[counter] == 8 * 3  # 8 steps, 3 layers
    per_layer = [r.getMessage() for r in caplog.records if "Layer 0:" in r.getMessage()]
    assert len(per_layer) == 4  # counts 1, 2, 4, 8 — one line per layer and count, no flood
    state = opt.state[model[0].weight]
    assert all(torch.isfinite(t).all() for t in state["inverse"])
    if counter == "failed_inversions":
        assert all(torch.equal(t, u) for t, u in zip(state["inverse"], good))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _failing_cholesky(fail_dtypes: tuple[torch.dtype, ...]):
    real = torch.linalg.cholesky_ex

    def cholesky_ex(a, *args, **kwargs):
        L, info = real(a, *args, **kwargs)
        return (L, torch.ones_like(info)) if a.dtype in fail_dtypes else (L, info)

    return cholesky_ex


CHOLESKY_FAULTS = [
    ("float32_fails", (torch.float32,), "fallback_inversions"),
    ("both_fail", (torch.float32, torch.float64), "failed_inversions"),
]


@pytest.mark.parametrize(
    "fail_dtypes,counter", [c[1:] for c in CHOLESKY_FAULTS], ids=[c[0] for c in CHOLESKY_FAULTS]
)
def test_failing_cholesky_is_retried_or_the_last_inverse_kept(fail_dtypes, counter, monkeypatch):
    """Cholesky is the default inversion: a factor it cannot factorise is retried in float64,
    else the layer keeps its last good inverse; nothing non-finite reaches the parameters."""
    model = net().float()
    opt = KFAC(model, lr=0.05, inverse_update_period=1)
    clean_step(model, opt, 0)  # a good first inverse
    assert opt.stats["cholesky_decompositions"] > 0 and opt.stats["eigh_decompositions"] == 0
    good = [t.clone() for t in opt.state[model[0].weight]["inverse"]]
    monkeypatch.setattr(torch.linalg, "cholesky_ex", _failing_cholesky(fail_dtypes))
    for i in range(1, 5):
        clean_step(model, opt, i)
    assert opt.stats[counter] == 4 * 3  # 4 steps, 3 layers
    state = opt.state[model[0].weight]
    assert all(torch.isfinite(t).all() for t in state["inverse"])
    if counter == "failed_inversions":
        assert all(torch.equal(t, u) for t, u in zip(state["inverse"], good))
    assert all(torch.isfinite(p).all() for p in model.parameters())


EMPTY_BATCH_CASES = [
    dict(fisher_type="empirical", kfac_approx="expand"),
    dict(fisher_type="empirical", kfac_approx="reduce"),
    dict(fisher_type="mc", kfac_approx="expand"),
    dict(fisher_type="type2", kfac_approx="reduce"),
]


def _factors(opt: KFAC) -> dict[str, torch.Tensor]:
    return {
        f"{i}{k}": v.clone()
        for i, s in enumerate(opt.state.values())
        for k, v in s.items()
        if k in ("A", "G") and isinstance(v, torch.Tensor)
    }


@pytest.mark.parametrize("first", [True, False], ids=["first_step", "later_step"])
@pytest.mark.parametrize(
    "case",
    EMPTY_BATCH_CASES,
    ids=[f"{c['fisher_type']}-{c['kfac_approx']}" for c in EMPTY_BATCH_CASES],
)
def test_empty_batch_step_keeps_the_curvature_and_training_goes_on(case, first):
    """Regression: an empty batch raised in the capture hooks (ZeroDivisionError, IndexError)."""
    model = net()
    opt = KFAC(model, **{**KW, "inverse_update_period": 1}, **case)
    if not first:
        clean_step(model, opt, 0)
    before, counts = _factors(opt), opt.stats.get("factor_updates")
    x, y = batch(1)
    opt.zero_grad()
    F.cross_entropy(model(x[:0]), y[:0], reduction="sum").backward()
    opt.step()
    after = _factors(opt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert opt.stats.get("factor_updates") == counts
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for i in range(2, 4):
        clean_step(model, opt, i)
    assert _factors(opt) and all(torch.isfinite(v).all() for v in _factors(opt).values())


def test_empty_batch_raises_in_a_distributed_run():
    from kfac_tn.optim.statistics import _empty

    assert not _empty(torch.zeros(2, 3), comm=object())
    assert _empty(torch.zeros(0, 3), comm=None)
    with pytest.raises(RuntimeError, match="no samples on this rank"):
        _empty(torch.zeros(0, 3), comm=object())
