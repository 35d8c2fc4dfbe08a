"""kfac_tn.optim.inverses: batched inversion equals per-factor inversion; paths are counted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC, linalg
from kfac_tn.blocks import LinearBlock
from kfac_tn.optim.hyperparams import resolve_layer_hp
from kfac_tn.optim.inverses import PATH_COUNTERS, InverseUpdater


def equal_layers() -> nn.Sequential:
    """Three same-shaped Linear layers and a grouped conv: several batches of equal shapes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
    ).double()


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, 4, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 6, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _factors_of(model, inversion, tolerance=0.0, steps=3):
    opt = KFAC(model, inversion=inversion, inverse_update_period=1, eigenbasis_tolerance=tolerance)
    train(model, opt, steps)
    return opt


@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
@pytest.mark.parametrize("tolerance", [0.0, 0.3], ids=["eigh", "warm"])
def test_batched_equals_per_factor(inversion, tolerance):
    opt = _factors_of(equal_layers(), inversion, tolerance)
    hps = opt.layer_hp()
    states = {}
    for batched in (True, False):
        state = {b.weight: copy.deepcopy(opt.state[b.weight]) for b in opt.blocks}
        InverseUpdater(batched=batched).update(opt.blocks, state, hps)
        states[batched] = state
    for block in opt.blocks:
        got, want = states[True][block.weight], states[False][block.weight]
        for g, w in zip(got["inverse"], want["inverse"]):
            assert_close(g, w, rtol=1e-12)
        assert all(got.get(k, 0) == want.get(k, 0) for k in PATH_COUNTERS)


@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_full_path_equals_compute_inverse(inversion):
    opt = _factors_of(equal_layers(), inversion)
    for block in opt.blocks:
        state = opt.state[block.weight]
        hp = opt.layer_hp()[id(block)]
        ref = linalg.compute_inverse(
            state["A"], state["G"], inversion=inversion, damping=hp.damping, dtype=hp.inverse_dtype
        )
        M = torch.randn(block.groups, *reversed(block.dims), dtype=torch.float64)
        got = linalg.precondition(M, state["inverse"], damping=hp.damping, inversion=inversion)
        want = linalg.precondition(M, ref.tensors, damping=hp.damping)
        assert_close(got, want, rtol=1e-11)


def test_paths_are_counted_per_factor_matrix():
    opt = _factors_of(equal_layers(), "eigen", tolerance=0.5, steps=4)
    stats = opt.stats
    # 5 layers (the grouped conv: 2 groups) -> 12 matrices per inverse update, 4 updates
    paths = {k: stats[k] for k in PATH_COUNTERS}
    assert sum(paths.values()) == 4 * 12
    assert paths["eigh_decompositions"] == 12  # the first update: no previous basis
    assert paths["warm_decompositions"] + paths["qr_decompositions"] > 0
    assert paths["cholesky_decompositions"] == paths["offloaded_decompositions"] == 0


def test_warm_started_training_stays_close_to_eigh():
    """A loose tolerance changes the preconditioner only by about the tolerance."""
    a, b = equal_layers(), equal_layers()
    opt_a = KFAC(a, lr=0.05, inverse_update_period=2, inversion="eigen")
    opt_b = KFAC(b, lr=0.05, inverse_update_period=2, eigenbasis_tolerance=1e-6)
    train(a, opt_a, 6)
    train(b, opt_b, 6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(q, p, rtol=1e-5)


class _OwnInverse(LinearBlock):
    """A block with its own update_inverses: inverted by its own method, not batched."""

    calls = 0

    def update_inverses(self, state, **kwargs):
        type(self).calls += 1
        return super().update_inverses(state, **kwargs)


def test_blocks_with_their_own_update_inverses_use_it():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    block = _OwnInverse(layer, "layer")
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(1, 2, 2, generator=gen, dtype=torch.float64)
    state = {"A": a @ a.mT, "G": g @ g.mT, "factors_valid": torch.tensor(True)}
    group = {
        "lr": 0.1,
        "kl_clip": None,
        "damping": 0.1,
        "factor_decay": 0.9,
        "factor_update_period": 1,
        "inverse_update_period": 1,
        "eigenbasis_tolerance": 0.0,
        "kfac_approx": "expand",
        "inversion": "eigen",
        "preconditioner": "kfac",
        "norm_block": "unitwise",
        "factor_dtype": None,
        "inverse_dtype": None,
    }
    hp = resolve_layer_hp(group, None, torch.float64)
    InverseUpdater().update([block], {layer.weight: state}, {id(block): hp})
    assert _OwnInverse.calls == 1 and "inverse" in state
    assert not any(k in state for k in PATH_COUNTERS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_accelerator_factors_pick_a_place_and_match_the_cpu(inversion):
    opt = _factors_of(equal_layers(), inversion)
    hps = opt.layer_hp()
    cpu = {b.weight: copy.deepcopy(opt.state[b.weight]) for b in opt.blocks}
    InverseUpdater().update(opt.blocks, cpu, hps)
    gpu = {b.weight: {k: _cuda(v) for k, v in opt.state[b.weight].items()} for b in opt.blocks}
    updater = InverseUpdater()
    for _ in range(2):  # the first call measures device against CPU, the second uses the choice
        updater.update(opt.blocks, gpu, hps)
    for block in opt.blocks:
        got_state, want_state = gpu[block.weight], cpu[block.weight]
        assert all(t.device.type == "cuda" for t in got_state["inverse"])
        kind, damping = want_state["inverse_kind"], hps[id(block)].damping
        M = torch.randn(block.groups, *reversed(block.dims), dtype=torch.float64)
        got = linalg.precondition(M.cuda(), got_state["inverse"], damping=damping, inversion=kind)
        want = linalg.precondition(M, want_state["inverse"], damping=damping, inversion=kind)
        assert_close(got.cpu(), want, rtol=1e-9)


def _cuda(value):
    if isinstance(value, torch.Tensor):
        return value.cuda()
    if isinstance(value, list):
        return [_cuda(v) for v in value]
    return value
