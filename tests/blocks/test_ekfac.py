"""EKFAC through the optimizer vs the formula from torch.func per-sample gradients (float64).

For one layer of each kind (model: the layer and a fixed linear readout, mean cross-entropy),
with ``Q_A, Q_G`` the eigenvectors the block stores (checked to diagonalise its own factors) and
``M_n`` the per-sample gradients of ``ℓ_n`` from ``torch.func`` in the block's matrix layout:

* step 1 (no eigenbasis during its capture) is the KFAC step;
* step 2 captures ``s = (1/N) Σ_n (Q_Gᵀ M_n Q_A)²`` in the basis of step 1 and its update is
  ``Q_G [(Q_Gᵀ M Q_A) / (s + δ)] Q_Aᵀ``; step 3 folds its batch into the EMA;
* a basis refresh moves the scalings into the new basis (dense check of the rotation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from block_reference import (
    CLASSES,
    Readout,
    damped_kronecker_solve,
    per_sample_gradients,
    weight_matrices,
)
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC
from kfac_tn.blocks import ekfac

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP spin
DAMPING = 0.1
DECAY = 0.7


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


CASES = [
    Case("linear", lambda: nn.Linear(5, 4), (6, 5)),
    Case("linear_no_bias", lambda: nn.Linear(5, 4, bias=False), (6, 5)),
    Case("linear_shared_dims", lambda: nn.Linear(5, 3), (4, 3, 2, 5)),
    Case(
        "conv1d_s2_p1_d2_g2",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        (3, 4, 11),
    ),
    Case("conv2d_p1", lambda: nn.Conv2d(3, 4, 3, padding=1), (3, 3, 5, 4)),
    Case(
        "conv2d_same_reflect_nobias",
        lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", bias=False),
        (2, 3, 5, 5),
    ),
    Case("conv2d_depthwise", lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (2, 3, 5, 5)),
    Case(
        "conv3d_s2_p1_g2",
        lambda: nn.Conv3d(4, 4, 2, stride=2, padding=1, groups=2),
        (2, 4, 4, 3, 5),
    ),
    Case(
        "convT2d_s21_d12_op",
        lambda: nn.ConvTranspose2d(
            2, 3, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2)
        ),
        (2, 2, 4, 3),
    ),
    Case(
        "convT2d_s2_g2",
        lambda: nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2),
        (3, 4, 3, 2),
    ),
]
IDS = [c.name for c in CASES]


def setup(case: Case):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = case.make().double()
    x = torch.randn(*case.input_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        features = layer(x)[0].numel()
    model = nn.Sequential(layer, Readout(features, gen))

    def batch(step: int):
        g = torch.Generator().manual_seed(10 + step)
        xs = torch.randn(*case.input_shape, generator=g, dtype=torch.float64)
        return xs, torch.randint(0, CLASSES, (xs.shape[0],), generator=g)

    return layer, model, batch


def matrices(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Gradients in the block layout ``[G, d_G, d_A]``, or ``[N, G, d_G, d_A]`` per sample."""
    if weight.dim() == layer.weight.dim():
        return weight_matrices(layer, weight, bias)
    biases = [None] * len(weight) if bias is None else list(bias)
    return torch.stack([weight_matrices(layer, w, b) for w, b in zip(weight, biases)])


def per_sample_matrices(layer, model, x, y) -> torch.Tensor:
    grads = per_sample_gradients(model, list(layer.parameters()), x, y)
    return matrices(layer, grads[0], grads[1] if len(grads) > 1 else None)


def step(opt, model, layer, x, y) -> torch.Tensor:
    """One optimizer step; returns the update ``θ_before - θ_after`` in the block layout."""
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    deltas = [b - p.detach() for b, p in zip(before, layer.parameters())]
    return matrices(layer, deltas[0], deltas[1] if len(deltas) > 1 else None)


def basis(opt, layer, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored eigenvectors ``(Q_A, Q_G)``, checked to diagonalise the block's factors.

    (``check=False`` after a step without inverse update: the factors have moved on.)
    """
    state = opt.state[layer.weight]
    evals_a, q_a, evals_g, q_g = state["inverse"]
    for factor, q, evals in ((state["A"], q_a, evals_a), (state["G"], q_g, evals_g)):
        if check:
            scale = factor.abs().max().item()
            assert_close(factor @ q, q * evals[:, None, :], atol=1e-10 * scale)
    return q_a, q_g


def scalings_formula(m_n: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_n (Q_Gᵀ M_n Q_A)²`` for ``m_n: [N, G, d_G, d_A]``."""
    return (q_g.mT @ m_n @ q_a).square().mean(0)


def ekfac_step(m: torch.Tensor, q_a, q_g, s) -> torch.Tensor:
    return q_g @ ((q_g.mT @ m @ q_a) / (s + DAMPING)) @ q_a.mT


def make_opt(model, **kwargs):
    kw = dict(
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        damping=DAMPING,
        factor_decay=DECAY,
        damping_adaptation=False,  # the formula's damping stays DAMPING
        step_size="fixed",  # the formula's step is the preconditioned gradient itself
        curvature_budget=None,  # fixed periods: the formula updates the factors every step
    )
    kw.update(kwargs)
    return KFAC(model, preconditioner="ekfac", **kw)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ekfac_steps_equal_the_per_sample_formula(case: Case):
    layer, model, batch = setup(case)
    opt = make_opt(model, inverse_update_period=100)
    # step 1: no eigenbasis during the capture -> the scalings are λ_G λ_Aᵀ: a KFAC step
    step(opt, model, layer, *batch(1))
    state = opt.state[layer.weight]
    assert not bool(state["scalings_valid"])
    q_a, q_g = basis(opt, layer)
    # step 2: scalings from this batch's per-sample gradients in the basis of step 1
    x, y = batch(2)
    m_n = per_sample_matrices(layer, model, x, y)
    s2 = scalings_formula(m_n, q_a, q_g)
    update = step(opt, model, layer, x, y)
    assert bool(state["scalings_valid"])
    assert_close(state["scalings"], s2)
    assert_close(update, ekfac_step(m_n.mean(0), q_a, q_g, s2), rtol=1e-9)
    # step 3: the EMA with factor_decay, still in the same basis
    x, y = batch(3)
    m_n = per_sample_matrices(layer, model, x, y)
    s3 = DECAY * s2 + (1 - DECAY) * scalings_formula(m_n, q_a, q_g)
    update = step(opt, model, layer, x, y)
    assert_close(state["scalings"], s3)
    assert_close(update, ekfac_step(m_n.mean(0), q_a, q_g, s3), rtol=1e-9)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[8]], ids=[IDS[0], IDS[4], IDS[8]])
def test_first_step_is_the_kfac_step(case: Case):
    layer, model, batch = setup(case)
    opt = make_opt(model)
    x, y = batch(1)
    m = per_sample_matrices(layer, model, x, y).mean(0)
    update = step(opt, model, layer, x, y)
    state = opt.state[layer.weight]
    assert_close(update, damped_kronecker_solve(state["A"], state["G"], m, DAMPING), rtol=1e-9)


def test_refresh_rotates_the_scalings_into_the_new_basis():
    layer, model, batch = setup(CASES[4])
    opt = make_opt(model, inverse_update_period=2)  # inverses at steps 1 and 3
    for t in (1, 2):
        step(opt, model, layer, *batch(t))
    state = opt.state[layer.weight]
    old_a, old_g = (t.clone() for t in basis(opt, layer, check=False))
    s2 = state["scalings"].clone()
    x, y = batch(3)
    m_n = per_sample_matrices(layer, model, x, y)
    s_old = DECAY * s2 + (1 - DECAY) * scalings_formula(m_n, old_a, old_g)
    update = step(opt, model, layer, x, y)
    new_a, new_g = basis(opt, layer)
    expected = dense_rotation(s_old, (old_a, old_g), (new_a, new_g))
    assert_close(state["scalings"], expected)
    assert_close(update, ekfac_step(m_n.mean(0), new_a, new_g, expected), rtol=1e-9)


def dense_rotation(s, old, new) -> torch.Tensor:
    """``diag(Q_newᵀ C Q_new)`` of ``C = Q_old diag(vec s) Q_oldᵀ``, Kronecker matrices built."""
    out = []
    for j in range(s.shape[0]):
        q_old = torch.kron(old[0][j], old[1][j])  # column-stacking vec: (Q_A ⊗ Q_G)
        q_new = torch.kron(new[0][j], new[1][j])
        curvature = q_old @ torch.diag(s[j].mT.reshape(-1)) @ q_old.T
        diagonal = torch.diagonal(q_new.T @ curvature @ q_new)
        out.append(diagonal.reshape(s.shape[2], s.shape[1]).T)
    return torch.stack(out)


def test_rotation_is_exact_for_a_permuted_and_flipped_basis(generator):
    q_a = torch.linalg.qr(torch.randn(2, 4, 4, generator=generator, dtype=torch.float64))[0]
    q_g = torch.linalg.qr(torch.randn(2, 3, 3, generator=generator, dtype=torch.float64))[0]
    s = torch.rand(2, 3, 4, generator=generator, dtype=torch.float64)
    perm_a, perm_g = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 0])
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    new = (q_a[:, :, perm_a] * signs, -q_g[:, :, perm_g])
    rotated = ekfac.rotate_scalings(s, (q_a, q_g), new)
    assert_close(rotated, s[:, perm_g][:, :, perm_a])
    random_new = tuple(
        torch.linalg.qr(torch.randn(q.shape, generator=generator, dtype=torch.float64))[0]
        for q in (q_a, q_g)
    )
    assert_close(
        ekfac.rotate_scalings(s, (q_a, q_g), random_new),
        dense_rotation(s, (q_a, q_g), random_new),
    )


PATHS = [(le, re) for le in (False, True) for re in (False, True)]


@pytest.mark.parametrize(
    "case", [CASES[2], CASES[3], CASES[5], CASES[9]], ids=[IDS[2], IDS[3], IDS[5], IDS[9]]
)
def test_every_rotation_path_and_chunking_give_the_same_scalings(case: Case, monkeypatch):
    layer, model, batch = setup(case)
    opt = make_opt(model, inverse_update_period=100)
    step(opt, model, layer, *batch(1))
    q_a, q_g = basis(opt, layer)
    x, y = batch(2)
    expected = scalings_formula(per_sample_matrices(layer, model, x, y), q_a, q_g)
    block = opt.blocks[0]
    for paths in PATHS:
        monkeypatch.setattr(ekfac, "scaling_paths", lambda *_, paths=paths: paths)
        opt.zero_grad()
        out = layer(x)
        (g,) = torch.autograd.grad(F.cross_entropy(model[1](out), y), out)
        # budget of 1 byte: one sample per chunk
        got = ekfac.scalings(block, x, g * x.shape[0], (q_a, q_g), budget=1) / x.shape[0]
        assert_close(got, expected, rtol=1e-10)


def test_type2_scalings_without_sharing_are_the_hessian_quadratic_forms():
    """``S = 1``: ``s_ij = (1/N) Σ_n (q_iᵀ R H_n Rᵀ q_i) ((Q_Aᵀ u_n)_j)²`` for any Hessian root."""
    layer, model, batch = setup(CASES[0])
    opt = make_opt(model, fisher_type="type2", inverse_update_period=100)
    step(opt, model, layer, *batch(1))
    q_a, q_g = basis(opt, layer)
    x, y = batch(2)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
    r = model[1].R
    left = torch.einsum("di,dk,nkl,el,ei->ni", q_g[0], r, hessians, r, q_g[0])
    u = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) @ q_a[0]
    expected = (left.mT @ u.square() / x.shape[0])[None]
    step(opt, model, layer, x, y)
    assert_close(opt.state[layer.weight]["scalings"], expected)


def test_quadratic_model_uses_the_ekfac_curvature(generator):
    """The Kronecker quadratic model (self-tuning) of an EKFAC block is ``vec(Δ)ᵀ C vec(Δ)`` with
    ``C = (Q_A ⊗ Q_G) diag(vec s) (Q_A ⊗ Q_G)ᵀ``, not ``A ⊗ G``."""
    from kfac_tn.optim.qmodel import kronecker_curvature

    layer, model, batch = setup(CASES[6])  # depthwise: several groups
    opt = make_opt(model)
    for t in (1, 2):
        step(opt, model, layer, *batch(t))
    state = opt.state[layer.weight]
    q_a, q_g = basis(opt, layer, check=False)
    deltas = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in layer.parameters()]
    m = matrices(layer, *deltas)
    expected = 0.0
    for j in range(m.shape[0]):
        q = torch.kron(q_a[j], q_g[j])
        v = m[j].mT.reshape(-1)
        expected += v @ q @ torch.diag(state["scalings"][j].mT.reshape(-1)) @ q.T @ v
    steps = {id(p): d for p, d in zip(layer.parameters(), deltas)}
    assert_close(kronecker_curvature(opt.blocks, opt.state, steps), expected)
