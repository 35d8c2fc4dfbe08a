"""Peer oracles: our factors vs. curvlinops' KFACLinearOperator and BackPACK's KFLR / KFAC;
our EKFAC curvature vs. curvlinops' EKFACLinearOperator.

Scale mapping (cross-entropy, ``reduction="mean"``, one batch of ``N``):

* curvlinops (``separate_weight_and_bias=False``, ``num_data=N``; its type-2 is spelled
  ``"type-2"``): identical conventions,
  ``A_ours = A_curvlinops`` (bias-augmented, expand ``1/(N O)``, reduce ``1/N``) and
  ``G_ours = G_curvlinops`` (``N Σ g g^T`` of the mean loss's gradients).
* BackPACK (Conv/ConvTranspose; weight and bias separate) pairs an *expand*-style input factor
  ``1/N Σ_{n,o} u u^T`` (no ``1/O``, no bias entry) with a *reduce*-style gradient factor, the GGN
  w.r.t. the bias ``Σ_{m,n} (Σ_o s)(Σ_o s)^T`` (``s``: backpropagated loss-Hessian square-root
  columns of the mean loss). So ``A_ours^expand[:-1, :-1] = A_backpack / O`` (``O`` = output
  positions; for transposed convolutions the transposed conv's output positions) and
  ``G_ours^reduce = G_backpack`` (weight and bias share it).

Monte-Carlo factors (curvlinops MC, BackPACK KFAC) are compared in expectation: both sides use
200 samples on a batch of 32, and the gradient factors must agree to 15% in relative Frobenius
norm (the estimators' spread at this sample count is a few percent); input factors do not depend
on the sampling and must agree exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC

pytestmark = pytest.mark.oracle
N = 4
CLASSES = 3
MC_BATCH, MC_SAMPLES = 32, 200  # 6400 sampled label vectors per factor


def our_factors(model, x, y, **kwargs):
    opt = KFAC(model, lr=0.0, momentum=0.0, kl_clip=None, **kwargs)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # our MC / type-2 backward passes would also feed the peers' hooks on the same model
    opt.remove_hooks()
    return {b.name: (opt.state[b.weight]["A"], opt.state[b.weight]["G"]) for b in opt.blocks}


def curvlinops_factors(curvlinops, model, x, y, **kwargs):
    """curvlinops' ``KFACLinearOperator`` on one batch, Kronecker factors computed."""
    op = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(x, y)],
        separate_weight_and_bias=False,
        num_data=x.shape[0],
        check_deterministic=False,
        **kwargs,
    )
    op.compute_kronecker_factors()
    return op


def cnn2d():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, CLASSES),
    ).double()


def data2d(n: int = N):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (n,), generator=gen)


CURVLINOPS = [
    (fisher, approx) for fisher in ("empirical", "type2") for approx in ("expand", "reduce")
]


def test_type2_last_layer_gradient_factor_is_mean_loss_hessian():
    model = cnn2d()
    x, y = data2d()
    _, G = our_factors(model, x, y, fisher_type="type2")["3"]
    p = torch.softmax(model(x), dim=1).detach()
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert_close(G[0], hessians.mean(0), rtol=1e-12)


@pytest.mark.parametrize("fisher,approx", CURVLINOPS, ids=[f"{f}-{a}" for f, a in CURVLINOPS])
def test_factors_equal_curvlinops(fisher, approx):
    curvlinops = pytest.importorskip("curvlinops")
    model = cnn2d()
    x, y = data2d()
    ours = our_factors(model, x, y, fisher_type=fisher, kfac_approx=approx)
    op = curvlinops_factors(
        curvlinops,
        model,
        x,
        y,
        fisher_type={"type2": "type-2"}.get(fisher, fisher),
        kfac_approx=approx,
    )
    for name in ("0", "3"):
        A, G = ours[name]
        assert_close(A[0], op._input_covariances[name], rtol=1e-10)
        assert_close(G[0], op._gradient_covariances[name], rtol=1e-10)


def test_mc_factors_match_curvlinops_in_expectation():
    curvlinops = pytest.importorskip("curvlinops")
    model = cnn2d()
    x, y = data2d(MC_BATCH)
    samples = MC_SAMPLES
    ours = our_factors(model, x, y, fisher_type="mc", mc_samples=samples)
    op = curvlinops_factors(curvlinops, model, x, y, fisher_type="mc", mc_samples=samples)
    for name in ("0", "3"):
        A, G = ours[name]
        theirs = op._gradient_covariances[name]
        assert_close(A[0], op._input_covariances[name], rtol=1e-10)
        assert ((G[0] - theirs).norm() / theirs.norm()).item() < 0.15


def _backpack_cases():
    return [
        (
            "conv1d_s2_p1_d2",
            lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2),
            (N, 2, 9),
        ),
        ("conv3d_s2_p1", lambda: nn.Conv3d(2, 2, 2, stride=2, padding=1), (N, 2, 3, 4, 3)),
        # output_padding = 0: BackPACK's unfold_by_conv_transpose hard-codes output_padding=0
        # and drops the extra output positions (ours are checked against an autograd-Jacobian
        # reference with output_padding in tests/blocks/test_blocks.py)
        (
            "convT1d_s2_p1",
            lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1),
            (N, 2, 4),
        ),
        (
            "convT2d_s2_d2",
            lambda: nn.ConvTranspose2d(2, 2, 2, stride=2, dilation=2),
            (N, 2, 3, 2),
        ),
        ("convT3d_s1_p1", lambda: nn.ConvTranspose3d(2, 2, 3, padding=1), (N, 2, 2, 3, 2)),
    ]


BACKPACK = _backpack_cases()


def _backpack_model(make, shape, n=N):
    shape = (n, *shape[1:])
    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        out = layer(torch.zeros(*shape, dtype=torch.float64))
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(out[0].numel(), CLASSES)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (shape[0],), generator=gen)
    positions = math.prod(out.shape[2:])
    return model, x, y, positions


def _backpack_factors(model, x, y, extension, attr):
    backpack = pytest.importorskip("backpack")
    ext_model = backpack.extend(model)
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    ext_model.zero_grad()
    with backpack.backpack(extension):
        loss_fn(ext_model(x), y).backward()
    layer = model[0]
    G_w, A_w = getattr(layer.weight, attr)
    (G_b,) = getattr(layer.bias, attr)
    return G_w, A_w, G_b


@pytest.mark.parametrize("name,make,shape", BACKPACK, ids=[c[0] for c in BACKPACK])
def test_type2_factors_equal_backpack_kflr(name, make, shape):
    backpack = pytest.importorskip("backpack")
    model, x, y, positions = _backpack_model(make, shape)
    G_w, A_w, G_b = _backpack_factors(model, x, y, backpack.extensions.KFLR(), "kflr")
    A, _ = our_factors(model, x, y, fisher_type="type2")["0"]
    _, G = our_factors(model, x, y, fisher_type="type2", kfac_approx="reduce")["0"]
    assert_close(A[0, :-1, :-1], A_w / positions, rtol=1e-10)
    assert_close(G[0], G_w, rtol=1e-10)
    assert_close(G[0], G_b, rtol=1e-10)


@pytest.mark.parametrize("name,make,shape", BACKPACK[:2], ids=[c[0] for c in BACKPACK[:2]])
def test_mc_factors_match_backpack_kfac_in_expectation(name, make, shape):
    backpack = pytest.importorskip("backpack")
    model, x, y, positions = _backpack_model(make, shape, MC_BATCH)
    samples = MC_SAMPLES
    G_w, A_w, _ = _backpack_factors(
        model, x, y, backpack.extensions.KFAC(mc_samples=samples), "kfac"
    )
    A, _ = our_factors(model, x, y, fisher_type="mc", mc_samples=samples)["0"]
    _, G = our_factors(model, x, y, fisher_type="mc", mc_samples=samples, kfac_approx="reduce")["0"]
    assert_close(A[0, :-1, :-1], A_w / positions, rtol=1e-10)
    assert ((G[0] - G_w).norm() / G_w.norm()).item() < 0.15


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_curvature_equals_curvlinops(approx):
    """Two steps on one batch with ``factor_decay=0`` and ``lr=0``: basis and scalings are those
    of the batch, as curvlinops computes them; compare ``Q diag(s) Qᵀ v`` for random ``v``.

    Where the per-sample gradients reach a degenerate eigenspace of a factor, the scalings
    depend on the (arbitrary) basis chosen in it; so 32 samples (KFAC-reduce's input factor has
    rank <= N) and no padding (a padded stride-2 convolution sums the same inputs into two taps,
    which makes its KFAC-reduce input factor singular for any N).
    """
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, CLASSES)
    ).double()
    x, y = data2d(32)
    opt = KFAC(
        model,
        lr=0.0,
        momentum=0.0,
        kl_clip=None,
        factor_decay=0.0,
        kfac_approx=approx,
        preconditioner="ekfac",
        inverse_update_period=100,
        curvature_budget=None,  # factors every step, as the reference
    )
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.remove_hooks()
    op = curvlinops.EKFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(x, y)],
        fisher_type="empirical",
        kfac_approx=approx,
        separate_weight_and_bias=False,
        num_data=x.shape[0],
        check_deterministic=False,
    )
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    theirs = op @ v
    params = list(model.parameters())
    for block in opt.blocks:
        state = opt.state[block.weight]
        _, q_a, _, q_g = state["inverse"]
        i = next(j for j, p in enumerate(params) if p is block.weight)
        m = torch.cat([v[i].reshape(v[i].shape[0], -1), v[i + 1][:, None]], dim=1)[None]
        ours = q_g @ (state["scalings"] * (q_g.mT @ m @ q_a)) @ q_a.mT
        expected = torch.cat([theirs[i].reshape(ours.shape[1], -1), theirs[i + 1][:, None]], 1)
        assert_close(ours[0], expected, rtol=1e-9)
