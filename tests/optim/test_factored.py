"""Factored gradients: dense layers preconditioned from their outer products equal the dense path.

Every scenario runs twice from the same start, once as shipped and once with the factored path
switched off (``linalg.factored_pays`` patched to ``False``), and compares the parameters; the
scenarios where the gradient is not the captured rows' sum must not take the factored path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC, linalg

STEPS = 3
FIXED = dict(
    step_size="fixed",
    damping_adaptation=False,
    kl_clip=None,
    curvature_budget=None,
    inverse_update_period=1,
)


def mlp(bias: bool = True) -> nn.Sequential:
    """Two layers that pay (8 rows, 48x41 and 40x49 gradients) and a narrow one that does not."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(40, 48, bias=bias),
        nn.ReLU(),
        nn.Linear(48, 40, bias=bias),
        nn.ReLU(),
        nn.Linear(40, 3, bias=bias),
    ).double()


def batch(i: int, n: int = 8, shape: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(n, *shape, 40, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out.mean(1) if out.dim() == 3 else out, y)


def plain(model, opt, i):
    opt.zero_grad()
    loss_of(model, *batch(i)).backward()
    opt.step()


def accumulated_passes(model, opt, i):
    opt.zero_grad()
    x, y = batch(i)
    for part in (slice(0, 3), slice(3, 8)):
        (loss_of(model, x[part], y[part]) * 0.5).backward()
    opt.step()


def zero_grad_between_passes(model, opt, i):
    opt.zero_grad()
    loss_of(model, *batch(100 + i)).backward()
    opt.zero_grad()  # the first pass's rows go with its gradients
    loss_of(model, *batch(i)).backward()
    opt.step()


def shared_dimension(model, opt, i):
    opt.zero_grad()
    loss_of(model, *batch(i, n=2, shape=(3,))).backward()  # 6 rows
    opt.step()


def layer_called_twice(model, opt, i):
    """The first layer applied to two halves in one forward: two passes' rows per step."""
    opt.zero_grad()
    x, y = batch(i)
    hidden = torch.cat([model[0](x[:3]), model[0](x[3:])])
    F.cross_entropy(model[1:](hidden), y).backward()
    opt.step()


def clipped(model, opt, i):
    opt.zero_grad()
    loss_of(model, *batch(i)).backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-2)
    opt.step()


def l2_term_in_loss(model, opt, i):
    opt.zero_grad()
    l2 = sum((p**2).sum() for p in model.parameters())
    (loss_of(model, *batch(i)) + 1e-4 * l2).backward()
    opt.step()


def first_layer_gradient_edited(model, opt, i):
    opt.zero_grad()
    loss_of(model, *batch(i)).backward()
    model[0].weight.grad.add_(1e-7)
    opt.step()


def grad_scaler(model, opt, i):
    opt.zero_grad()
    opt.grad_scaler.scale(loss_of(model, *batch(i))).backward()
    opt.grad_scaler.step(opt)
    opt.grad_scaler.update()


@dataclass(frozen=True)
class Scenario:
    name: str
    step: Callable
    factored_per_step: int  # layer steps taking the factored path, after the first step
    settings: dict | None = None
    bias: bool = True


SCENARIOS = [
    Scenario("plain", plain, 2),
    Scenario("no_bias", plain, 2, bias=False),
    Scenario("accumulated_passes", accumulated_passes, 2),
    Scenario("zero_grad_between_passes", zero_grad_between_passes, 2),
    Scenario("shared_dimension", shared_dimension, 2),
    Scenario("layer_called_twice", layer_called_twice, 2),
    Scenario("grad_scaler", grad_scaler, 2),
    Scenario("default_settings", plain, 2, settings={}),  # the budget: factor period > 1
    Scenario("clipped", clipped, 0),
    Scenario("l2_term_in_loss", l2_term_in_loss, 0),
    Scenario("first_layer_gradient_edited", first_layer_gradient_edited, 1),
    Scenario("mc_fisher", plain, 0, settings={**FIXED, "fisher_type": "mc"}),
    Scenario("eigen_inversion", plain, 0, settings={**FIXED, "inversion": "eigen"}),
]


def run(scenario: Scenario, factored: bool, monkeypatch) -> tuple[nn.Module, KFAC]:
    model = mlp(scenario.bias)
    settings = FIXED if scenario.settings is None else scenario.settings
    scaler = None
    if scenario.step is grad_scaler:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = KFAC(model, lr=0.1, grad_scaler=scaler, **settings)
    with monkeypatch.context() as patch:
        if not factored:
            patch.setattr(linalg, "factored_pays", lambda *args: False)
        for i in range(STEPS):
            scenario.step(model, opt, i)
    return model, opt


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_factored_path_equals_dense_path(scenario: Scenario, monkeypatch):
    model, opt = run(scenario, True, monkeypatch)
    ref, ref_opt = run(scenario, False, monkeypatch)
    # the first step has no inverse yet; every later one preconditions
    assert opt.stats["factored_preconditionings"] == scenario.factored_per_step * (STEPS - 1)
    assert ref_opt.stats["factored_preconditionings"] == 0
    # the self-tuning's float64 difference quotient (step 5e-9) amplifies rounding ~1e8-fold
    rtol = 1e-12 if scenario.settings is None else 1e-6
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p, q, rtol=rtol)


def test_factored_path_in_float32_is_taken_and_close():
    """Genuine float32 gradients pass the check (its tolerance is rounding-sized)."""
    model = mlp().float()
    opt = KFAC(model, lr=0.1, **FIXED)
    ref = copy.deepcopy(model)
    ref_opt = KFAC(ref, lr=0.1, **FIXED)
    for i in range(STEPS):
        x, y = batch(i)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(m, x.float(), y).backward()
        opt.step()
        # the reference: the same optimizer, its rows dropped before the step
        ref_opt.statistics.take_gradient_rows()
        ref_opt.step()
    assert opt.stats["factored_preconditionings"] == 2 * (STEPS - 1)
    assert ref_opt.stats["factored_preconditionings"] == 0
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p, q, rtol=1e-5)


def test_bf16_autocast_keeps_no_rows():
    model = mlp().float()
    opt = KFAC(model, lr=0.1, **FIXED)
    for i in range(STEPS):
        x, y = batch(i)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x.float(), y)
        loss.backward()
        opt.step()
    assert opt.stats["factored_preconditionings"] == 0


def test_resume_with_factored_path_is_bitwise_exact():
    """Rows are per step, not state: 2 steps, save, load into a fresh optimizer, 2 more."""
    model = mlp()
    opt = KFAC(model, lr=0.1)
    for i in range(4):
        plain(model, opt, i)
    resumed = mlp()
    first = KFAC(resumed, lr=0.1)
    for i in range(2):
        plain(resumed, first, i)
    second = KFAC(resumed, lr=0.1)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for i in range(2, 4):
        plain(resumed, second, i)
    assert opt.stats["factored_preconditionings"] > 0
    assert second.stats["factored_preconditionings"] == opt.stats["factored_preconditionings"]
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
