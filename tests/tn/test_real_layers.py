"""The engine on the conv layers of the paper's CNNs (extracted from the models), batch 2.

DeepOBS nets (3c3d, 2c2d, All-CNN-C) run by default; the ImageNet nets (torchvision) are
``slow``.  Float64, every routine of the KFAC path vs torch / F.unfold-based formulas.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, randn

import kfac_tn.tn as tn

layers_mod = pytest.importorskip("kfac_tn.benchmarks.layers")


def _layers(nets):
    try:
        return layers_mod.benchmark_layers(nets)
    except ImportError as err:  # torchvision missing
        pytest.skip(str(err))


def _check_layer(layer, generator):
    n = 2
    x = randn(n, layer.in_channels, *layer.input_spatial, generator=generator)
    w = randn(
        layer.out_channels,
        layer.in_channels // layer.groups,
        *layer.kernel_size,
        generator=generator,
    )
    hyper = dict(
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
    )
    y = F.conv2d(x, w, None, **hyper)
    assert_close(tn.conv(x, w, **hyper), y)
    v = randn(*y.shape, generator=generator)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(F.conv2d(xr, wr, None, **hyper), (xr, wr), v)
    assert_close(tn.conv_input_vjp(v, w, x.shape, **hyper), gx)
    assert_close(tn.conv_weight_vjp(x, v, layer.kernel_size, **hyper), gw)
    u = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    u = u.reshape(n, layer.groups, -1, u.shape[-1])
    if layer.bias:
        u = torch.cat([u, torch.ones_like(u[:, :, :1])], 2)
    expand = torch.einsum("ngdl,ngel->gde", u, u) / (n * u.shape[-1])
    ubar = u.mean(-1)
    reduce = torch.einsum("ngd,nge->gde", ubar, ubar) / n
    kw = dict(**hyper, bias=layer.bias)
    for impl in ("auto", "tn_simplified"):
        assert_close(tn.kfac_expand_factor(x, layer.kernel_size, **kw, impl=impl), expand)
        assert_close(tn.kfac_reduce_factor(x, layer.kernel_size, **kw, impl=impl), reduce)


DEEPOBS = ["3c3d", "2c2d", pytest.param("all_cnn_c", marks=pytest.mark.slow)]


@pytest.mark.parametrize("net", DEEPOBS)
def test_deepobs_layers(net, generator):
    for layer in _layers([net]):
        _check_layer(layer, generator)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["resnet18", "inception_v3", "mobilenet_v2", "alexnet"])
def test_imagenet_layers(net, generator):
    for layer in _layers([net]):
        _check_layer(layer, generator)
