"""Tests for kfac_tn.benchmarks.sampled_backprop: measurement helpers and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn.benchmarks.sampled_backprop import (
    conv_weight_grads_and_saved_bytes,
    gradient_error,
    main,
)
from kfac_tn.nn import MaskReLU, convert_sampled
from kfac_tn.tn.sampled import draw_sample


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2),
        nn.Flatten(),
        nn.LazyLinear(5),
    ).double()


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 9, 9, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3])


def test_exact_grads_and_saved_bytes_match_autograd():
    net, (x, y) = _net(), _batch()
    net(x)  # materialise the lazy layer
    grads, saved, network = conv_weight_grads_and_saved_bytes(net, x, y)
    convs = [net[0], net[2]]
    expected = torch.autograd.grad(F.cross_entropy(net(x), y), [c.weight for c in convs])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # torch's convolutions save their full inputs: x and the ReLU output
    assert saved == (x.numel() + net[:2](x).numel()) * 8
    assert network > saved  # plus what the ReLU, the linear layer and the loss save


def test_saved_bytes_of_sampled_convs_are_the_kept_slices():
    net, (x, y) = _net(), _batch()
    net(x)
    _, _, exact_network = conv_weight_grads_and_saved_bytes(net, x, y)
    convert_sampled(net, 0.5, "spatial", generator=torch.Generator().manual_seed(3))
    _, saved, network = conv_weight_grads_and_saved_bytes(net, x, y)
    gen = torch.Generator().manual_seed(3)  # replay the two draws, in forward order
    s1 = draw_sample(x.shape, 0.5, generator=gen)
    s2 = draw_sample(net[:2](x).shape, 0.5, generator=gen)
    expected = sum(
        s.kept_fraction * torch.Size(s.input_shape).numel() * 8 + s.indices[0].numel() * 8
        for s in (s1, s2)
    )
    assert saved == pytest.approx(expected)
    # network level: x is no longer saved, the ReLU output (input of conv 2) still is, and the
    # kept slices come on top
    assert network == exact_network - x.numel() * 8 + saved


def test_gradient_error_channel_half_is_exactly_one_and_keep_all_is_zero():
    """At p=0.5 every channel's gradient is either doubled or dropped: relative error 1."""
    net, (x, y) = _net(), _batch()
    net(x)
    series = {"channel": ("channel", "position"), "spatial": ("spatial", "position")}
    points = gradient_error(net, {"toy": (x, y)}, [1.0, 0.5], series, draws=3)
    by_key = {(p.series, p.keep_prob): p for p in points}
    assert by_key["channel", 0.5].rel_error_mean == pytest.approx(1.0, abs=1e-12)
    assert by_key["channel", 0.5].rel_error_std == pytest.approx(0.0, abs=1e-12)
    for label in series:
        assert by_key[label, 1.0].rel_error_mean == 0.0
        assert by_key[label, 1.0].memory_saved == 0.0
        assert 0.0 < by_key[label, 0.5].memory_saved < 1.0
    assert 0.0 < by_key["spatial", 0.5].rel_error_mean
    assert by_key["channel", 0.5].rel_error_theory == pytest.approx(1.0)
    assert by_key["spatial", 1.0].rel_error_theory == 0.0
    assert len(by_key["spatial", 0.5].layer_rel_error_mean) == 2


def test_gradient_error_needs_two_draws():
    net, (x, y) = _net(), _batch()
    with pytest.raises(ValueError, match="Invalid draws"):
        gradient_error(net, {"toy": (x, y)}, [0.5], {"c": ("channel", "position")}, draws=1)


def test_network_memory_with_mask_relu():
    """Standard ReLUs keep conv inputs alive (negative saving); MaskReLU makes it positive."""
    net, (x, y) = _net(), _batch()
    net(x)
    (point,) = gradient_error(
        net, {"toy": (x, y)}, [0.25], {"spatial": ("spatial", "position")}, draws=2
    )
    assert point.network_memory_saved < 0.0 < point.network_memory_saved_mask_relu
    assert all(type(m) is not MaskReLU for m in net.modules())  # the model itself is untouched


def test_position_error_terms_give_the_exact_expected_error():
    """The derived RMS error of spatial sampling matches a many-draw Monte-Carlo estimate."""
    net, (x, y) = _net(), _batch()
    net(x)
    keep_prob, draws = 0.5, 100
    points = gradient_error(
        net, {"toy": (x, y)}, [keep_prob], {"spatial": ("spatial", "position")}, draws=draws
    )
    (point,) = points
    # E[err²] estimated from `draws` draws: allow 20% on the mean square (loose MC tolerance)
    assert point.rel_error_rms**2 == pytest.approx(point.rel_error_theory**2, rel=0.2)
    # the model is left exact
    assert all(getattr(m, "keep_prob", 1.0) == 1.0 for m in net.modules())


def test_main_tiny_run_writes_results_and_plots(tmp_path):
    argv = [
        "--out", str(tmp_path), "--width", "0.05", "--batch-size", "2", "--draws", "2",
        "--epochs", "1", "--train-size", "96", "--keep-probs", "0.75", "0.25",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:  # one thread: tiny convolutions suffer from OpenMP spinning on a busy machine
        assert main([*argv, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    points = results["gradient_error"]
    assert len(points) == 2 * 3 * 2  # data sets x series x keep_probs
    for p in points:
        assert p["rel_error_mean"] > 0.0
        assert abs(p["memory_saved"] - (1 - p["keep_prob"])) < 0.35
    assert set(results["training"]) == {
        "exact", "spatial p=0.5", "spatial (per dim) p=0.5", "channel p=0.5"
    }  # fmt: skip
    for curve in results["training"].values():
        assert len(curve["test_accuracy"]) == 1 and 0.0 <= curve["test_accuracy"][0] <= 1.0
    assert (tmp_path / "error_vs_memory.png").stat().st_size > 0
    assert (tmp_path / "training.png").stat().st_size > 0
