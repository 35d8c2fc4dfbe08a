"""KFAC equals the exact GGN where the identity holds, and MC Fisher -> type-2 in expectation.

Exact-GGN cases (float64, type-2 Fisher; the GGN is ``J^T H J`` from ``torch.func``):

* deep linear network, batch size 1, cross-entropy or MSE: every layer's block
  ``a a^T ⊗ (W_{>l}^T H W_{>l})`` is a Kronecker product, so KFAC-expand is exact;
* a linear layer with weight sharing whose loss is applied at every shared position
  ("expand setting", MSE, any batch size): the loss Hessian is a multiple of the identity at every
  position, so KFAC-expand is exact (this checks the ``1/(N·C)`` scale of torch's MSE 'mean');
* "reduce setting" (the shared positions are averaged before the loss; Linear with a mean over the
  sequence, Conv2d with global average pooling), batch size 1: KFAC-reduce is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn
from torch.func import functional_call, hessian, jacrev

from kfac_tn import KFAC


def as_matrix(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m = weight.reshape(weight.shape[0], -1)
    return m if bias is None else torch.cat([m, bias[:, None]], dim=1)


def exact_ggn_block(model, layer, x, loss_fn) -> torch.Tensor:
    """GGN of ``loss_fn(model(x))`` w.r.t. ``vec([W | b])`` (column stacking), from torch.func."""
    names = {id(p): n for n, p in model.named_parameters()}
    w_name, b_name = (
        names[id(layer.weight)],
        names.get(id(layer.bias)) if layer.bias is not None else None,
    )
    params = {n: p.detach() for n, p in model.named_parameters()}
    m0 = as_matrix(layer, layer.weight.detach(), None if b_name is None else layer.bias.detach())
    d_g, d_a = m0.shape

    def f(v: torch.Tensor) -> torch.Tensor:
        m = v.reshape(d_a, d_g).T
        new = dict(params)
        if b_name is None:
            new[w_name] = m.reshape(layer.weight.shape)
        else:
            new[w_name] = m[:, :-1].reshape(layer.weight.shape)
            new[b_name] = m[:, -1]
        return functional_call(model, new, (x,))

    v0 = m0.T.reshape(-1)
    out = f(v0)
    J = jacrev(f)(v0).reshape(out.numel(), -1)
    H = hessian(lambda o: loss_fn(o.reshape(out.shape)))(out.reshape(-1))
    return J.T @ H @ J


def kfac_block(opt, layer) -> torch.Tensor:
    state = opt.state[layer.weight]
    return torch.kron(state["A"][0], state["G"][0])


def run_one_step(model, x, loss_fn, **kwargs):
    opt = KFAC(model, lr=0.0, momentum=0.0, kl_clip=None, **kwargs)
    opt.zero_grad()
    loss_fn(model(x)).backward()
    opt.step()
    return opt


class MeanOverSequence(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _deep_linear(gen):
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 3)).double()


def _y(gen, *shape, classes=None):
    if classes is not None:
        return torch.randint(0, classes, shape, generator=gen)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


EXACT_CASES = [
    # id, model factory, input shape, loss name, reduction, target shape/classes, approx, layers
    ("deep_linear_ce_n1", _deep_linear, (1, 4), "cross_entropy", "mean", 3, "expand", [0, 1, 2]),
    ("deep_linear_mse_n1", _deep_linear, (1, 4), "mse", "mean", (1, 3), "expand", [0, 1, 2]),
    ("deep_linear_mse_sum_n1", _deep_linear, (1, 4), "mse", "sum", (1, 3), "expand", [0, 2]),
    (
        "linear_shared_mse_expand_n3",
        lambda g: nn.Sequential(nn.Linear(4, 3)).double(),
        (3, 5, 4),
        "mse",
        "mean",
        (3, 5, 3),
        "expand",
        [0],
    ),
    (
        "linear_mean_seq_ce_reduce_n1",
        lambda g: nn.Sequential(nn.Linear(4, 3), MeanOverSequence()).double(),
        (1, 6, 4),
        "cross_entropy",
        "mean",
        3,
        "reduce",
        [0],
    ),
    (
        "conv2d_gap_ce_reduce_n1",
        lambda g: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        ).double(),
        (1, 2, 5, 6),
        "cross_entropy",
        "mean",
        3,
        "reduce",
        [0],
    ),
]


@pytest.mark.parametrize(
    "name,factory,shape,loss,reduction,target,approx,layers",
    EXACT_CASES,
    ids=[c[0] for c in EXACT_CASES],
)
def test_type2_kfac_equals_exact_ggn(name, factory, shape, loss, reduction, target, approx, layers):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = factory(gen)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        y = _y(gen, shape[0], classes=target)

        def loss_fn(out):
            return F.cross_entropy(out, y, reduction=reduction)
    else:
        y = _y(gen, *target)

        def loss_fn(out):
            return F.mse_loss(out, y, reduction=reduction)

    opt = run_one_step(
        model,
        x,
        loss_fn,
        fisher_type="type2",
        loss=loss,
        loss_reduction=reduction,
        kfac_approx=approx,
    )
    linear_layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    for index in layers:
        layer = linear_layers[index]
        assert_close(kfac_block(opt, layer), exact_ggn_block(model, layer, x, loss_fn), rtol=1e-9)


MC_CASES = [("cross_entropy", 4), ("mse", (6, 3))]


@pytest.mark.parametrize("loss,target", MC_CASES, ids=[c[0] for c in MC_CASES])
def test_mc_fisher_converges_to_type2(loss, target):
    """MC is unbiased: with S samples the relative error of G is O(1/sqrt(S)); 4000 samples, 10%."""
    gen = torch.Generator().manual_seed(2)

    def factory():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3 if loss == "mse" else 4))

    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = _y(gen, 6, classes=target) if loss == "cross_entropy" else _y(gen, *target)
    fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    factors = {}
    for fisher, samples in (("type2", 1), ("mc", 4000)):
        torch.manual_seed(3)
        model = factory().double()
        opt = run_one_step(
            model, x, lambda o: fn(o, y), fisher_type=fisher, mc_samples=samples, loss=loss
        )
        factors[fisher] = [opt.state[m.weight]["G"] for m in model if isinstance(m, nn.Linear)]
        factors[fisher + "_A"] = [
            opt.state[m.weight]["A"] for m in model if isinstance(m, nn.Linear)
        ]
    for g_mc, g_t2 in zip(factors["mc"], factors["type2"]):
        assert ((g_mc - g_t2).norm() / g_t2.norm()).item() < 0.1
    for a_mc, a_t2 in zip(factors["mc_A"], factors["type2_A"]):
        assert_close(a_mc, a_t2)
