"""GPU correctness: every engine routine and the optimizer on CUDA equal the CPU float64 result.

Skipped without CUDA (the default suite never needs a GPU); the lead runs it on the lent GPU
with ``scripts/gpu_checks.sh``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC, tn
from kfac_tn.nn import SampledConv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

IMPLS = ["tn", "tn_simplified", "standard", "auto"]

# (id, N, C_in, C_out, spatial, kernel, stride, padding, dilation, groups)
LAYERS = [
    ("2d_general", 2, 4, 6, (9, 8), 3, 1, 1, 1, 1),
    ("2d_dilated_grouped", 2, 4, 6, (11, 10), 3, 2, 2, 2, 2),
    ("2d_dense_patchify", 2, 3, 5, (8, 8), 4, 4, 0, 1, 1),
    ("2d_down_1x1s2", 2, 4, 4, (7, 7), 1, 2, 0, 1, 1),
    ("2d_mixed_1x7", 2, 4, 4, (9, 9), (1, 7), 1, (0, 3), 1, 1),
    ("1d_strided", 1, 3, 4, (13,), 3, 2, 1, 1, 1),
    ("3d_depthwise", 3, 4, 4, (5, 6, 5), 3, 1, "same", 1, 4),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        (a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-300)
    ).item()


def _inputs(layer, dtype, device, seed=0):
    _, n, c_in, c_out, spatial, k, s, p, d, g = layer
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, *spatial, generator=gen, dtype=torch.float64)
    ks = (k,) * n if isinstance(k, int) else k
    w = torch.randn(c_out, c_in // g, *ks, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype), dict(stride=s, padding=p, dilation=d, groups=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layer", LAYERS, ids=[case[0] for case in LAYERS])
def test_routines_on_cuda_match_cpu(layer, dtype, impl):
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    x_cpu, w_cpu, hyper = _inputs(layer, torch.float64, "cpu")
    x, w = x_cpu.to("cuda", dtype), w_cpu.to("cuda", dtype)
    ks = tuple(w.shape[2:])
    y_ref = tn.conv(x_cpu, w_cpu, **hyper, impl="standard")
    assert _rel(tn.conv(x, w, **hyper, impl=impl), y_ref) < tol
    v_cpu = torch.randn_like(y_ref)
    v = v_cpu.to("cuda", dtype)
    pairs = [
        (
            tn.conv_weight_vjp(x, v, ks, **hyper, impl=impl),
            tn.conv_weight_vjp(x_cpu, v_cpu, ks, **hyper, impl="standard"),
        ),
        (
            tn.conv_input_vjp(v, w, tuple(x.shape[2:]), **hyper, impl=impl),
            tn.conv_input_vjp(v_cpu, w_cpu, tuple(x.shape[2:]), **hyper, impl="standard"),
        ),
    ]
    for approx in (tn.kfac_expand_factor, tn.kfac_reduce_factor):
        pairs.append(
            (
                approx(x, ks, **hyper, bias=True, impl=impl),
                approx(x_cpu, ks, **hyper, bias=True, impl="standard"),
            )
        )
    for got, ref in pairs:
        assert got.device.type == "cuda"
        assert _rel(got, ref) < tol


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, stride=2, dilation=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_steps_on_cuda_match_cpu(kfac_approx):
    torch.manual_seed(0)
    model_cpu = _net().double()
    model_gpu = copy.deepcopy(model_cpu).cuda()
    hyper = dict(lr=0.1, damping=1e-2, kfac_approx=kfac_approx, inverse_update_period=2)
    opts = [KFAC(model_cpu, **hyper), KFAC(model_gpu, **hyper)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 3, 7, 7, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (8,), generator=gen)
        for model, opt, dev in zip((model_cpu, model_gpu), opts, ("cpu", "cuda")):
            opt.zero_grad()
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for p_cpu, p_gpu in zip(model_cpu.parameters(), model_gpu.parameters()):
        assert _rel(p_gpu, p_cpu) < 1e-8


def test_sampled_conv_on_cuda_keep_all_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double().cuda()
    sampled = SampledConv2d(4, 6, 3, padding=1, keep_prob=1.0).double().cuda()
    sampled.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, device="cuda")
    conv(x).square().sum().backward()
    sampled(x).square().sum().backward()
    assert _rel(sampled.weight.grad, conv.weight.grad) < 1e-12
