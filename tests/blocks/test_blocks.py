"""Kronecker blocks through the optimizer vs. independent dense references (float64, exact).

For one layer of each kind the optimizer's factors equal the factors built from autograd-Jacobian
unfolded inputs and autograd output gradients, and its first update (lr 1, no momentum, no KL
clip) equals the dense solve with ``A ⊗ G + δ I`` (``"eigen"``) or the dense π-damped Kronecker
inverse (``"cholesky"``).
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
    grad_factor,
    input_factor,
    kronecker_inverse_apply,
    weight_matrices,
)
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC, tn
from kfac_tn.blocks import (
    ConvBlock,
    ConvTransposeBlock,
    KroneckerBlock,
    LinearBlock,
    NormLayerBlock,
    block_class_for,
    register_block,
)

DAMPING = 0.1


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
    Case(
        "conv2d_s21_d21_g2",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2),
        (3, 4, 7, 6),
    ),
    Case(
        "conv2d_same_reflect_nobias",
        lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", bias=False),
        (2, 3, 5, 5),
    ),
    Case(
        "conv2d_circular",
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        (2, 2, 4, 5),
    ),
    Case("conv2d_depthwise", lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (2, 3, 5, 5)),
    Case(
        "conv3d_s2_p1_g2",
        lambda: nn.Conv3d(4, 4, 2, stride=2, padding=1, groups=2),
        (2, 4, 4, 3, 5),
    ),
    Case(
        "convT1d_s2_p1_op1_g2",
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (3, 4, 5),
    ),
    Case(
        "convT2d_s21_d12",
        lambda: nn.ConvTranspose2d(
            2, 3, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), dilation=(1, 2)
        ),
        (2, 2, 4, 3),
    ),
    Case(
        "convT3d_s2_g2_nobias",
        lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2, bias=False),
        (2, 4, 2, 3, 2),
    ),
    # large enough for the lag products of the expand factor (kfac_tn.tn.lag) on CPU
    Case("conv2d_lag_products", lambda: nn.Conv2d(16, 1, 3, padding=1), (32, 16, 16, 16)),
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
    y = torch.randint(0, CLASSES, (x.shape[0],), generator=gen)
    return layer, model, x, y


def reference_factors(layer, model, x, y, approx):
    out = layer(x)
    loss = F.cross_entropy(model[1](out), y)
    (g,) = torch.autograd.grad(loss, out)
    A = input_factor(layer, x.detach(), approx)
    # loss = (1/N) Σ ℓ_n  =>  G = (1/r) Σ g g^T with r = 1/N
    G = x.shape[0] * grad_factor(layer, g, approx)
    return A, G


def one_step(model, layer, x, y, **kwargs):
    # the exact Kronecker update, not rescaled by the quadratic model
    opt = KFAC(
        model, lr=1.0, momentum=0.0, kl_clip=None, damping=DAMPING, step_size="fixed", **kwargs
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bias = layer.bias.grad.clone() if layer.bias is not None else None
    M = weight_matrices(layer, layer.weight.grad.clone(), bias)
    before = [p.detach().clone() for p in (layer.weight, layer.bias) if p is not None]
    opt.step()
    deltas = [b - p.detach() for b, p in zip(before, (layer.weight, layer.bias))]
    update = weight_matrices(layer, deltas[0], deltas[1] if len(deltas) > 1 else None)
    return opt, M, update


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eigen_update_is_damped_kronecker_solve(case: Case, approx: str):
    layer, model, x, y = setup(case)
    A_ref, G_ref = reference_factors(layer, model, x, y, approx)
    opt, M, update = one_step(model, layer, x, y, kfac_approx=approx, inversion="eigen")
    state = opt.state[layer.weight]
    assert_close(state["A"], A_ref)
    assert_close(state["G"], G_ref)
    assert_close(update, damped_kronecker_solve(A_ref, G_ref, M, DAMPING), rtol=1e-9)


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_cholesky_update_is_pi_damped_kronecker_inverse(case: Case):
    layer, model, x, y = setup(case)
    A_ref, G_ref = reference_factors(layer, model, x, y, "expand")
    opt, M, update = one_step(model, layer, x, y, inversion="cholesky")
    pi = torch.sqrt(A_ref.diagonal(dim1=1, dim2=2).mean(1) / G_ref.diagonal(dim1=1, dim2=2).mean(1))
    eye_a = torch.eye(A_ref.shape[-1], dtype=torch.float64)
    eye_g = torch.eye(G_ref.shape[-1], dtype=torch.float64)
    root = DAMPING**0.5
    A_inv = torch.linalg.inv(A_ref + (pi * root)[:, None, None] * eye_a)
    G_inv = torch.linalg.inv(G_ref + (root / pi)[:, None, None] * eye_g)
    assert_close(update, kronecker_inverse_apply(A_inv, G_inv, M), rtol=1e-9)


REGISTRY_CASES = [
    (nn.Linear(2, 3), LinearBlock),
    (nn.Conv1d(2, 3, 1), ConvBlock),
    (nn.Conv3d(2, 3, 1), ConvBlock),
    (nn.ConvTranspose2d(2, 3, 1), ConvTransposeBlock),
    (nn.BatchNorm2d(3), NormLayerBlock),
    (nn.GroupNorm(1, 3), NormLayerBlock),
    (nn.LayerNorm(3), NormLayerBlock),
    (nn.InstanceNorm1d(3, affine=True), NormLayerBlock),
    (nn.SyncBatchNorm(3), None),  # its batch statistics span the workers
    (nn.Embedding(4, 2), None),
]


@pytest.mark.parametrize(
    "module,expected", REGISTRY_CASES, ids=[type(m).__name__ for m, _ in REGISTRY_CASES]
)
def test_registry_lookup(module, expected):
    assert block_class_for(module) is expected


def test_register_block_for_a_subclass():
    class MyLinear(nn.Linear):
        pass

    assert block_class_for(MyLinear(2, 2)) is LinearBlock  # inherited via the MRO

    @register_block(MyLinear)
    class MyBlock(LinearBlock):
        pass

    try:
        assert block_class_for(MyLinear(2, 2)) is MyBlock
        assert issubclass(MyBlock, KroneckerBlock)
    finally:
        from kfac_tn.blocks import base

        del base._REGISTRY[MyLinear]


def test_lag_case_uses_lag_products():
    """The ``conv2d_lag_products`` case above exercises the lag path (not the single GEMM)."""
    spec = tn.conv_spec((16, 16), 3, padding=1)
    assert tn.expand_strategy(spec, 32, 16, "cpu") == "lag"


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factors_and_cholesky_inverse_exactly_symmetric_under_an_asymmetric_kernel(
    case: Case, approx: str, skewed_gemms
):
    """Regression (AVX2 CI): A, G and Cholesky inverses of every block are exactly symmetric."""
    layer, model, x, y = setup(case)
    opt, _, _ = one_step(model, layer, x, y, kfac_approx=approx, inversion="cholesky")
    state = opt.state[layer.weight]
    for t in (state["A"], state["G"], *state["inverse"]):
        assert torch.equal(t, t.mT)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_gradient_times_equals_the_matrix_product(bias):
    """``LinearBlock.gradient_times`` skips forming ``[∇W, ∇b]``; same product."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=bias).double()
    block = LinearBlock(layer, "0")
    grads = [torch.randn_like(p) for p in block.params]
    z = torch.randn(5 + bias, 2, dtype=torch.float64)
    assert_close(block.gradient_times(grads, z), block.to_matrix(grads)[0] @ z, rtol=1e-14)
