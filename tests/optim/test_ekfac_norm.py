"""EKFAC and norm blocks in the optimizer: accumulation, resume, faults, KL clip, settings, ResNet.

The exactness of single blocks is tested in ``tests/blocks`` (test_ekfac, test_norm); here the
optimizer-level contracts hold with them: gradient accumulation equals one large batch, a resumed
run equals the uninterrupted one bitwise, a step with non-finite values changes nothing, the KL
clip covers the norm blocks' directions, settings are validated and switch at runtime, and a
ResNet-18 (CIFAR stem, BatchNorm) trains with every preconditioner option.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP spin
# (no EKFAC with KFAC-reduce here: the conv output's per-channel normalization makes its reduce
# gradient factor vanish, and EKFAC's scalings in that degenerate eigenspace depend on the basis)
CONFIGS = [
    dict(preconditioner="kfac", norm_block="unitwise", kfac_approx="reduce"),
    dict(preconditioner="ekfac", norm_block="unitwise"),
    dict(preconditioner="ekfac", norm_block="diagonal"),
    dict(preconditioner="ekfac", norm_block="skip"),
]
IDS = ["-".join(str(v) for v in c.values()) for c in CONFIGS]
KW = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, inverse_update_period=2)


def net(batchnorm: bool = True) -> nn.Sequential:
    """Conv, norm layers (BatchNorm unless per-sample norms are needed), transposed conv, Linear.

    Sized so that no factor has a degenerate eigenspace the per-sample gradients reach (40
    samples > every ``d_A``; overlapping transposed-conv taps): there EKFAC's scalings depend on
    the arbitrary basis chosen, and runs that differ by round-off could not be compared.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4) if batchnorm else nn.InstanceNorm2d(4, affine=True),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1),
        nn.GroupNorm(1, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 6),
        nn.LayerNorm(6),
    ).double()


def batch(i: int, n: int = 40):
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 6, (n,), generator=gen)


def train(model, opt, steps: range, micro: int = 1) -> None:
    for i in steps:
        x, y = batch(i)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(model(xs), ys) / micro).backward()
        opt.step()


def curvature(opt: KFAC) -> dict[str, torch.Tensor]:
    out = {}
    for block in opt.blocks:
        state = opt.state[block.weight]
        for key in ("A", "G", "scalings"):
            if key in state:
                out[f"{block.name}.{key}"] = state[key]
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_accumulation_equals_one_large_batch(config):
    """Two micro-batches with the loss halved give the factors, scalings and steps of one batch.

    (Per-sample norms: BatchNorm's batch statistics differ between micro-batches.)
    """
    big, small = net(batchnorm=False), net(batchnorm=False)
    opt_big, opt_small = KFAC(big, **KW, **config), KFAC(small, **KW, **config)
    train(big, opt_big, range(4))
    train(small, opt_small, range(4), micro=2)
    ours, theirs = curvature(opt_small), curvature(opt_big)
    assert ours.keys() == theirs.keys()
    assert any(k.endswith("scalings") for k in ours) == (config["preconditioner"] == "ekfac")
    for key in ours:  # (atol: the reduce G of the first conv is round-off, ~1e-33)
        assert_close(ours[key], theirs[key], rtol=1e-9, atol=1e-12)
    for p, q in zip(small.parameters(), big.parameters()):
        assert_close(p, q, rtol=1e-9)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_resumed_run_equals_the_uninterrupted_one(config):
    model = net()
    opt = KFAC(model, **KW, **config)
    train(model, opt, range(3))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, range(3, 6))
    resumed = net()
    resumed.load_state_dict(saved["model"])
    opt2 = KFAC(resumed, **KW, **config)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, range(3, 6))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_dict_with_wrong_scalings_shape_is_refused():
    model = net()
    opt = KFAC(model, **KW, preconditioner="ekfac")
    train(model, opt, range(2))
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["scalings"] = saved["state"][0]["scalings"][..., :-1]
    with pytest.raises(ValueError, match=r"scalings: shape"):
        KFAC(net(), **KW, preconditioner="ekfac").load_state_dict(saved)


@pytest.mark.parametrize("config", CONFIGS[1:3], ids=IDS[1:3])
def test_steps_with_non_finite_values_change_nothing(config):
    faulty_model, clean_model = net(), net()
    faulty, clean = KFAC(faulty_model, **KW, **config), KFAC(clean_model, **KW, **config)
    for i in range(5):
        if i in (1, 3):
            x, y = batch(i)
            faulty.zero_grad()
            F.cross_entropy(faulty_model(x), y).backward()
            faulty_model[4].weight.grad[0] = float("nan")  # a norm-layer gradient
            faulty.step()
        else:
            train(faulty_model, faulty, range(i, i + 1))
            train(clean_model, clean, range(i, i + 1))
    assert faulty.stats["skipped_steps"] == 2
    for p, q in zip(faulty_model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)
    for key, value in curvature(clean).items():
        assert torch.equal(curvature(faulty)[key], value)


def test_kl_clip_covers_the_norm_blocks():
    """``ν = min(1, sqrt(κ / (η² Σ_blocks <Δ, ∇>)))`` over all blocks, norm blocks included."""
    lr, kappa = 0.5, 1e-4
    runs = {}
    for clip in (None, kappa):
        model = net()
        opt = KFAC(
            model, lr=lr, momentum=0.0, kl_clip=clip, norm_block="unitwise", step_size="fixed"
        )
        x, y = batch(0)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        before = copy.deepcopy(model.state_dict())
        opt.step()
        runs[clip] = {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}
    delta = runs[None]
    vg = sum((delta[n] * grads[n]).sum() for n in delta) * lr**2
    nu = min(1.0, math.sqrt(kappa / vg.item()))
    assert nu < 0.5  # the clip is active
    for name, d in runs[kappa].items():
        assert_close(d, nu * delta[name], rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(preconditioner="shampoo"), "Invalid preconditioner value: 'shampoo'"),
        (dict(norm_block="full"), "Invalid norm_block value: 'full'"),
        (dict(preconditioner="ekfac", inversion="cholesky"), "'ekfac' needs inversion='eigen'"),
        (
            dict(inversion="cholesky", layer_settings={"0": {"preconditioner": "ekfac"}}),
            "'ekfac' needs inversion='eigen'",
        ),
        (
            dict(layer_settings={"0": {"preconditioner": "ekfac", "inversion": "cholesky"}}),
            "for '0': 'ekfac' needs inversion='eigen'",
        ),
    ],
    ids=["preconditioner", "norm_block", "ekfac-cholesky", "override-vs-group", "override"],
)
def test_invalid_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFAC(net(), **kwargs)


def test_preconditioner_and_norm_block_switch_at_runtime():
    model = net()
    opt = KFAC(model, **KW, preconditioner="ekfac", norm_block="unitwise")
    train(model, opt, range(2))
    weight = model[0].weight
    assert "scalings" in opt.state[weight]
    opt.param_groups[0]["preconditioner"] = "kfac"
    opt.param_groups[0]["norm_block"] = "skip"
    norm = model[1].weight
    momentum = opt.state[norm]["momentum_buffer"].clone()
    x, y = batch(2)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = norm.grad.clone()
    before = norm.detach().clone()
    opt.step()
    assert "scalings" not in opt.state[weight]  # the stale EKFAC inverse was recomputed at once
    sgd = KW["momentum"] * momentum + grad + KW["weight_decay"] * before
    assert_close(before - norm.detach(), KW["lr"] * sgd)  # momentum SGD for the norm layer
    opt.param_groups[0]["preconditioner"] = "ekfac"
    train(model, opt, range(3, 5))
    assert "scalings" in opt.state[weight]


# ------------------------------------------------------------------------ ResNet-18, CIFAR stem
def resnet18_cifar(width: float = 1 / 8, classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem (3×3 stride-1 conv, no max-pool), narrowed."""
    from torchvision.models import resnet

    def w(c: int) -> int:
        return max(1, round(c * width))

    class Narrow(resnet.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage: start from the narrowed stem
                self.inplanes = w(64)
            return super()._make_layer(block, w(planes), blocks, stride, dilate)

    torch.manual_seed(0)
    model = Narrow(resnet.BasicBlock, [2, 2, 2, 2], num_classes=classes)
    model.conv1 = nn.Conv2d(3, w(64), 3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(w(64))
    model.maxpool = nn.Identity()
    model.fc = nn.Linear(w(512), classes)
    return model


def fit_resnet(steps: int, **config) -> tuple[list[float], KFAC]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    model = resnet18_cifar()
    opt = KFAC(model, lr=0.1, damping=1e-2, inverse_update_period=4, **config)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def test_resnet18_trains_with_ekfac_and_unitwise_norm_blocks():
    losses, opt = fit_resnet(6, preconditioner="ekfac", norm_block="unitwise")
    assert len(opt.blocks) == 21 + 20  # 20 convs + fc, 20 BatchNorms
    assert losses[-1] < 0.5 * losses[0]
    assert opt.stats["skipped_steps"] == 0


RESNET_CONFIGS = [
    dict(preconditioner=p, norm_block=n)
    for p in ("kfac", "ekfac")
    for n in ("unitwise", "diagonal", "skip")
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    RESNET_CONFIGS,
    ids=[f"{c['preconditioner']}-{c['norm_block']}" for c in RESNET_CONFIGS],
)
def test_resnet18_trains_with_every_preconditioner_option(config):
    losses, opt = fit_resnet(12, **config)
    assert losses[-1] < 0.2 * losses[0]
    assert all(math.isfinite(v) for v in losses)
