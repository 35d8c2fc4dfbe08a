"""Scale-and-shift blocks of norm layers vs dense per-channel references (float64, exact).

The reference builds the per-sample gradients of ``(γ, β)`` with ``torch.func`` (a Jacobian of
the per-sample losses of the whole batch, so BatchNorm uses the batch's statistics), the
per-channel block ``F_c = r Σ_n [∂ℓ_n/∂γ_c, ∂ℓ_n/∂β_c]ᵀ[...]`` and solves ``(F_c + δI) Δ = ∇``
per channel with ``torch.linalg.solve``; the type-2 block is the per-channel 2×2 diagonal block
of the exact GGN ``Σ_n J_nᵀ H_n J_n / N``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from block_reference import CLASSES, Readout, per_sample_gradients
from conftest import assert_close
from torch import nn
from torch.func import functional_call, jacrev, replace_all_batch_norm_modules_

from kfac_tn import KFAC

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP spin
DAMPING = 0.1


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


CASES = [
    Case("batchnorm1d", lambda: nn.BatchNorm1d(4), (6, 4)),
    Case("batchnorm1d_sequence", lambda: nn.BatchNorm1d(3), (5, 3, 4)),
    Case("batchnorm2d", lambda: nn.BatchNorm2d(3), (5, 3, 4, 3)),
    Case("batchnorm3d", lambda: nn.BatchNorm3d(2), (4, 2, 3, 2, 3)),
    Case("groupnorm", lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
    Case("layernorm", lambda: nn.LayerNorm(5), (6, 5)),
    Case("layernorm_2d_shape_sequence", lambda: nn.LayerNorm((3, 2)), (4, 5, 3, 2)),
    Case("layernorm_no_bias", lambda: nn.LayerNorm(5, bias=False), (6, 3, 5)),
    Case("instancenorm1d", lambda: nn.InstanceNorm1d(3, affine=True), (5, 3, 6)),
    Case("instancenorm2d", lambda: nn.InstanceNorm2d(3, affine=True), (5, 3, 4, 4)),
]
IDS = [c.name for c in CASES]


def setup(case: Case):
    gen = torch.Generator().manual_seed(0)
    layer = case.make().double()
    with torch.no_grad():  # away from the (γ, β) = (1, 0) initialisation
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(*case.input_shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        features = layer(x)[0].numel()
    model = nn.Sequential(layer, Readout(features, gen))
    y = torch.randint(0, CLASSES, (x.shape[0],), generator=gen)
    return layer, model, x, y


def pairs(layer: nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[..., *γ.shape]`` per parameter -> ``[..., P, 1 or 2]`` (γ, β per channel)."""
    p, nd = layer.weight.numel(), layer.weight.dim()
    return torch.stack([t.reshape(*t.shape[: t.dim() - nd], p) for t in tensors], -1)


def empirical_blocks(layer, model, x, y) -> torch.Tensor:
    """``F_c = (1/N) Σ_n j_n j_nᵀ`` from per-sample gradients, ``[P, d, d]``."""
    j = pairs(layer, per_sample_gradients(model, list(layer.parameters()), x, y))  # [N, P, d]
    return torch.einsum("npi,npj->pij", j, j) / x.shape[0]


def type2_blocks(layer, model, x, y) -> torch.Tensor:
    """Per-channel diagonal blocks of the exact GGN ``(1/N) Σ_n J_nᵀ H_n J_n``, ``[P, d, d]``."""
    params = list(layer.parameters())
    names = [n for n, _ in model.named_parameters()]
    model = replace_all_batch_norm_modules_(copy.deepcopy(model))  # batch statistics only
    buffers = dict(model.named_buffers())

    def logits(*values):
        return functional_call(model, {**buffers, **dict(zip(names, values))}, (x,))

    out = logits(*(p.detach() for p in params))
    jac = pairs(layer, jacrev(logits, argnums=tuple(range(len(params))))(*params))  # [N,C,P,d]
    prob = torch.softmax(out, dim=1).detach()
    hess = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # [N, C, C]
    return torch.einsum("ncpi,ncm,nmpj->pij", jac, hess, jac) / x.shape[0]


def one_step(model, layer, x, y, **kwargs):
    """One KFAC step (lr 1, no momentum, no KL clip): ``(optimizer, [∇γ, ∇β], update)``."""
    opt = KFAC(
        model,
        lr=1.0,
        momentum=0.0,
        kl_clip=None,
        damping=DAMPING,
        damping_adaptation=False,
        step_size="fixed",
        **kwargs,
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    update = [b - p.detach() for b, p in zip(before, layer.parameters())]
    return opt, pairs(layer, grads), pairs(layer, update)


def solve(blocks: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    return torch.linalg.solve(blocks + DAMPING * eye, grads[..., None])[..., 0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unitwise_update_is_the_damped_per_channel_solve(case: Case):
    layer, model, x, y = setup(case)
    blocks = empirical_blocks(layer, model, x, y)
    opt, grads, update = one_step(model, layer, x, y, norm_block="unitwise")
    assert len(opt.blocks) == 1
    assert_close(opt.state[layer.weight]["G"], blocks)
    assert_close(update, solve(blocks, grads), rtol=1e-9)


@pytest.mark.parametrize("case", CASES[2:7], ids=IDS[2:7])
def test_diagonal_update_divides_by_the_damped_diagonal(case: Case):
    layer, model, x, y = setup(case)
    blocks = empirical_blocks(layer, model, x, y)
    _, grads, update = one_step(model, layer, x, y, norm_block="diagonal")
    diagonal = torch.diagonal(blocks, dim1=-2, dim2=-1)
    assert_close(update, grads / (diagonal + DAMPING), rtol=1e-9)


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[6]], ids=[IDS[2], IDS[4], IDS[6]])
def test_type2_block_is_the_per_channel_ggn_block(case: Case):
    layer, model, x, y = setup(case)
    blocks = type2_blocks(layer, model, x, y)
    opt, grads, update = one_step(model, layer, x, y, norm_block="unitwise", fisher_type="type2")
    assert_close(opt.state[layer.weight]["G"], blocks, rtol=1e-9)
    assert_close(update, solve(blocks, grads), rtol=1e-8)


@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_blocks_are_eigendecomposed_whatever_the_inversion(inversion: str):
    """Exact damping of the 2×2 blocks; ``"cholesky"`` (π-damping) applies to Kronecker blocks."""
    layer, model, x, y = setup(CASES[2])
    blocks = empirical_blocks(layer, model, x, y)
    opt, grads, update = one_step(model, layer, x, y, norm_block="unitwise", inversion=inversion)
    assert opt.state[layer.weight]["inverse_kind"] == "eigen"
    assert_close(update, solve(blocks, grads), rtol=1e-9)


def test_skip_is_exactly_momentum_sgd():
    """``norm_block="skip"``: no block, the update of ``torch.optim.SGD``."""
    layer, model, x, y = setup(CASES[2])
    twin = nn.Sequential(setup(CASES[2])[0], model[1])
    kfac = KFAC(
        model, lr=0.1, momentum=0.9, weight_decay=1e-2, norm_block="skip", step_size="fixed"
    )
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    assert kfac.blocks == []
    for _ in range(3):
        for opt, net in ((kfac, model), (sgd, twin)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, rtol=1e-14)  # (KFAC applies -lr·d as one add: last-bit rounding)


def test_only_norm_layers_and_one_linear_all_get_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(6),
        nn.LayerNorm(6),
        nn.Linear(6, 8),
        nn.Unflatten(1, (4, 2)),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, affine=True),
        nn.Flatten(),
    ).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(0, 8, (5,))
    opt = KFAC(model, lr=0.1, norm_block="unitwise")
    assert sorted(b.name for b in opt.blocks) == ["0", "1", "2", "4", "5"]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all("inverse" in opt.state[b.weight] for b in opt.blocks)
    assert opt.stats["skipped_steps"] == 0


def test_layer_settings_choose_the_mode_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3), nn.LayerNorm(3)
    ).double()
    opt = KFAC(model, norm_block="unitwise", layer_settings={"3": {"norm_block": "skip"}})
    assert [b.name for b in opt.blocks] == ["0", "1", "2"]
    opt = KFAC(model, norm_block="skip", layer_settings={"1": {"norm_block": "diagonal"}})
    assert [b.name for b in opt.blocks] == ["0", "1", "2"]
    assert [b.name for b in KFAC(model).blocks] == ["0", "1", "2", "3"]  # default: unitwise
