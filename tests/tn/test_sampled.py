"""Tests for kfac_tn.tn.sampled: exactness at keep_prob=1, unbiasedness, gathering, errors.

References are independent of the package: torch autograd through ``F.convNd`` (float64), and
per-unit gradient contributions from autograd on masked inputs for the exact variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kfac_tn.tn.sampled import (
    Sample,
    draw_sample,
    gather,
    kept_conv_weight_vjp,
    position_contribution_norms,
    sampled_conv_weight_vjp,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MODES = [("spatial", "position"), ("spatial", "dims"), ("channel", "position")]
MODE_IDS = ["spatial-position", "spatial-dims", "channel"]


@dataclass(frozen=True)
class Case:
    """A convolution problem: input spatial size, channels and hyperparameters."""

    spatial: tuple[int, ...]
    c_in: int
    c_out: int
    kernel: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: int | str | tuple = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    batch: int = 2

    @property
    def id(self) -> str:
        return (
            f"{len(self.spatial)}d-I{'x'.join(map(str, self.spatial))}-C{self.c_in}to{self.c_out}"
            f"-K{self.kernel}-S{self.stride}-P{self.padding}-D{self.dilation}-G{self.groups}"
        ).replace(" ", "")

    def tensors(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input x, weight w and a random output gradient v (float64)."""
        gen = torch.Generator().manual_seed(seed)
        nd = len(self.spatial)
        kernel = (self.kernel,) * nd if isinstance(self.kernel, int) else self.kernel
        x = torch.randn(self.batch, self.c_in, *self.spatial, generator=gen, dtype=torch.float64)
        w = torch.randn(
            self.c_out, self.c_in // self.groups, *kernel, generator=gen, dtype=torch.float64
        )
        y = self.conv(x, w)
        v = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        return x, w, v

    def conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if isinstance(padding, tuple) and isinstance(padding[0], tuple):  # (left, right) pairs
            x = F.pad(x, [p for pair in reversed(padding) for p in pair])
            padding = 0
        return CONV[len(self.spatial)](x, w, None, self.stride, padding, self.dilation, self.groups)

    def exact_weight_vjp(self, x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.conv(x, w), w, v)
        return grad

    def kwargs(self) -> dict:
        return dict(
            kernel_size=self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )


GRID = [
    Case((9,), 3, 4, 3),
    Case((10,), 4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
    Case((8,), 4, 4, 2, padding="same", dilation=3, groups=4),  # depthwise, asymmetric 'same'
    Case((9,), 2, 3, 4, stride=3, padding=((2, 1),)),
    Case((7, 6), 3, 4, 3, padding=1),
    Case((8, 9), 4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    Case((6, 7), 4, 8, 3, padding="same", dilation=2, groups=4),  # depthwise multiplier 2
    Case((8, 8), 2, 3, 2, stride=2),  # dense (patchify)
    Case((9, 9), 2, 3, 1, stride=3),  # down-sampling
    Case((7, 8), 6, 4, (2, 3), padding="same", groups=2),
    Case((5, 4, 6), 2, 3, 2, padding=1, stride=(1, 2, 1)),
    Case((5, 5, 5), 4, 4, 3, padding="same", dilation=(1, 2, 1), groups=2),
    Case((4, 6, 5), 3, 6, (1, 3, 2), stride=(2, 1, 2), groups=3),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, label: str) -> None:
    err = (actual - expected).abs()
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    assert err.max() <= atol, (
        f"{label}: max abs error {err.max():.3e} > {atol:.1e} at index "
        f"{tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))}"
    )


@pytest.mark.parametrize("axis,mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_keep_all_equals_exact_vjp(case: Case, axis: str, mode: str):
    x, w, v = case.tensors()
    exact = case.exact_weight_vjp(x, w, v)
    est = sampled_conv_weight_vjp(
        x, v, **case.kwargs(), keep_prob=1.0, axis=axis, spatial_mode=mode
    )
    assert_close(est, exact, 1e-12, case.id)


@pytest.mark.parametrize("axis,mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_sampled_shape_and_support(case: Case, axis: str, mode: str):
    """At keep_prob < 1 the estimate has the weight's shape and vanishes outside the draw."""
    x, w, v = case.tensors()
    gen = torch.Generator().manual_seed(1)
    sample = draw_sample(x.shape, 0.5, axis, spatial_mode=mode, generator=gen)
    est = kept_conv_weight_vjp(gather(x, sample), sample, v, **case.kwargs())
    assert est.shape == w.shape
    # independent check: exact VJP of the input masked to the kept slices, rescaled
    mask = _mask(sample)
    expected = case.exact_weight_vjp(x * mask, w, v) * sample.scale
    assert_close(est, expected, 1e-12, case.id)


def _mask(sample: Sample) -> torch.Tensor:
    """Dense 0/1 mask of the kept entries (test reference only), broadcastable to x."""
    n, c, *spatial = sample.input_shape
    if sample.mode == "channel":
        m = torch.zeros(c, dtype=torch.float64)
        m[sample.indices[0]] = 1
        return m.view(1, c, *([1] * len(spatial)))
    if sample.mode == "position":
        m = torch.zeros(math.prod(spatial), dtype=torch.float64)
        m[sample.indices[0]] = 1
        return m.view(1, 1, *spatial)
    m = torch.ones((), dtype=torch.float64)
    for d, (idx, size) in enumerate(zip(sample.indices, spatial)):
        md = torch.zeros(size, dtype=torch.float64)
        md[idx] = 1
        m = m.unsqueeze(-1) * md.view(*([1] * d), size)
    return m.view(1, 1, *spatial)


# --- unbiasedness with the exact variance -------------------------------------------------


def _unit_contributions(case: Case, x, w, v, mode: str) -> torch.Tensor:
    """Gradient contribution of every sampling unit, ``[*units, *w.shape]``.

    ``position``/``dims``: one unit per spatial position (units shaped like the spatial grid);
    ``channel``: one unit per input channel.
    """
    n, c, *spatial = x.shape
    if mode == "channel":
        units = []
        for ch in range(c):
            m = torch.zeros(1, c, *([1] * len(spatial)), dtype=x.dtype)
            m[0, ch] = 1
            units.append(case.exact_weight_vjp(x * m, w, v))
        return torch.stack(units)
    units = []
    for pos in range(math.prod(spatial)):
        m = torch.zeros(math.prod(spatial), dtype=x.dtype)
        m[pos] = 1
        units.append(case.exact_weight_vjp(x * m.view(1, 1, *spatial), w, v))
    return torch.stack(units).view(*spatial, *w.shape)


def _exact_variance(contrib: torch.Tensor, keep_probs: list[float]) -> torch.Tensor:
    r"""Element-wise variance of :math:`\hat g = \sum_a (\prod_d z^{(d)}_{a_d}/p_d) T_a`.

    With independent ``z^{(d)}_a ~ Bernoulli(p_d)`` (one factor per unit axis of ``contrib``),
    ``E[ĝ²] = Σ_{a,a'} Π_d C_d[a_d, a'_d] T_a T_{a'}`` with ``C_d = 1 + (1/p_d - 1) I``.
    """
    nu = len(keep_probs)
    ct = contrib
    for d, p in enumerate(keep_probs):
        size = contrib.shape[d]
        c = torch.ones(size, size, dtype=contrib.dtype) + (1 / p - 1) * torch.eye(
            size, dtype=contrib.dtype
        )
        ct = torch.movedim(torch.tensordot(c, ct, dims=([1], [d])), 0, d)
    second_moment = (contrib * ct).flatten(0, nu - 1).sum(0)
    mean = contrib.flatten(0, nu - 1).sum(0)
    return second_moment - mean**2


UNBIASED = [
    Case((6,), 3, 2, 3, padding=1, stride=2),
    Case((5, 4), 2, 3, 2, padding="same", groups=1),
    Case((4, 5), 4, 4, 3, padding=1, dilation=(1, 2), groups=2),
    Case((3, 3, 4), 2, 2, 2, stride=(1, 1, 2), padding=1),
]


def _mean_and_var(case: Case, mode: str, axis: str, keep_prob: float, draws: int):
    x, w, v = case.tensors(seed=3)
    exact = case.exact_weight_vjp(x, w, v)
    nd = len(case.spatial)
    contrib = _unit_contributions(case, x, w, v, "channel" if axis == "channel" else mode)
    if axis == "channel" or mode == "position":
        flat = contrib.flatten(0, contrib.dim() - w.dim() - 1)
        var = _exact_variance(flat, [keep_prob])
    else:
        var = _exact_variance(contrib, [keep_prob ** (1 / nd)] * nd)
    # the unit contributions must add up to the exact gradient
    assert_close(contrib.flatten(0, contrib.dim() - w.dim() - 1).sum(0), exact, 1e-11, "sum")
    gen = torch.Generator().manual_seed(1234)
    draws_ = torch.stack(
        [
            sampled_conv_weight_vjp(
                x,
                v,
                **case.kwargs(),
                keep_prob=keep_prob,
                axis=axis,
                spatial_mode=mode,
                generator=gen,
            )  # fmt: skip
            for _ in range(draws)
        ]
    )
    return exact, var, draws_


def _within_bound(mean, exact, var, draws: int, z: float = 5.0) -> tuple[bool, bool]:
    std_err = (var.clamp_min(0) / draws).sqrt()
    elementwise = bool(((mean - exact).abs() <= z * std_err + 1e-10).all())
    in_norm = bool((mean - exact).pow(2).sum() <= z**2 * std_err.pow(2).sum() + 1e-20)
    return elementwise, in_norm


@pytest.mark.parametrize("keep_prob", [0.5, 0.2], ids=["p0.5", "p0.2"])
@pytest.mark.parametrize("axis,mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", UNBIASED, ids=[c.id for c in UNBIASED])
def test_unbiased_within_derived_bound(case: Case, axis: str, mode: str, keep_prob: float):
    draws = 400
    exact, var, samples = _mean_and_var(case, mode, axis, keep_prob, draws)
    mean = samples.mean(0)
    elementwise, in_norm = _within_bound(mean, exact, var, draws)
    assert elementwise, (
        f"mean deviates by more than 5 standard errors: {(mean - exact).abs().max()}"
    )
    assert in_norm
    # the empirical variance matches the derived one (total over elements, loose MC bound)
    emp = samples.var(0).sum()
    assert 0.75 * var.sum() <= emp <= 1.3 * var.sum(), f"empirical {emp:.4g} vs {var.sum():.4g}"
    # the check has power: an estimator without the 1/p rescaling is flagged as biased
    biased = mean * keep_prob
    assert not all(_within_bound(biased, exact, var * keep_prob**2, draws))


@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_position_contribution_norms_match_per_position_autograd(case: Case):
    x, w, v = case.tensors()
    contrib = _unit_contributions(case, x, w, v, "position")  # [*spatial, *w.shape]
    expected = contrib.flatten(len(case.spatial)).pow(2).sum(-1)
    # a small chunk size exercises the chunking
    norms = position_contribution_norms(x, v, **case.kwargs(), chunk_numel=100)
    assert_close(norms, expected, 1e-10 * expected.max().item(), case.id)


def test_expected_squared_error_formula_for_position_mode():
    """E‖ĝ - g‖² = (1-p)/p Σ_i ‖T_i‖² (matches the variance-derived total of the test above)."""
    case, keep_prob = UNBIASED[1], 0.3
    x, w, v = case.tensors(seed=3)
    contrib = _unit_contributions(case, x, w, v, "position").flatten(0, 1)
    total_var = _exact_variance(contrib, [keep_prob]).sum()
    norms = position_contribution_norms(x, v, **case.kwargs())
    torch.testing.assert_close(norms.sum() * (1 - keep_prob) / keep_prob, total_var)


# --- gathering --------------------------------------------------------------------------


@pytest.mark.parametrize("axis,mode", MODES, ids=MODE_IDS)
def test_gather_keeps_only_kept_entries(axis: str, mode: str):
    x = torch.randn(3, 8, 16, 12, dtype=torch.float64)
    sizes = {}
    for keep_prob in (1.0, 0.5, 0.1):
        fractions = []
        for seed in range(20):
            gen = torch.Generator().manual_seed(seed)
            sample = draw_sample(x.shape, keep_prob, axis, spatial_mode=mode, generator=gen)
            kept = gather(x, sample)
            assert tuple(kept.shape) == sample.kept_shape()
            assert math.isclose(kept.numel() / x.numel(), sample.kept_fraction)
            fractions.append(sample.kept_fraction)
            # kept values are exactly the selected entries
            if sample.mode == "position":
                expected = x.flatten(2)[:, :, sample.indices[0]]
            elif sample.mode == "dims":
                expected = x[:, :, sample.indices[0]][:, :, :, sample.indices[1]]
            else:
                expected = x[:, sample.indices[0]]
            assert torch.equal(kept, expected)
            for idx in sample.indices:
                assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())
        sizes[keep_prob] = sum(fractions) / len(fractions)
    assert sizes[1.0] == 1.0
    # the stored fraction scales with keep_prob (binomial tolerance over 20 draws)
    assert abs(sizes[0.5] - 0.5) < 0.1 and abs(sizes[0.1] - 0.1) < 0.06


def test_empty_draw_gives_zero_gradient():
    case = GRID[4]
    x, w, v = case.tensors()
    for axis, mode in MODES:
        est = sampled_conv_weight_vjp(
            x, v, **case.kwargs(), keep_prob=1e-12, axis=axis, spatial_mode=mode
        )
        assert est.shape == w.shape and bool((est == 0).all())


def test_generator_makes_draws_reproducible():
    case = GRID[5]
    x, _, v = case.tensors()
    a, b = (
        sampled_conv_weight_vjp(
            x, v, **case.kwargs(), keep_prob=0.3, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    )
    c = sampled_conv_weight_vjp(
        x, v, **case.kwargs(), keep_prob=0.3, generator=torch.Generator().manual_seed(8)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_float32_matches_float64():
    case = GRID[6]
    x, w, v = case.tensors()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for axis, mode in MODES:
        kw = dict(keep_prob=0.4, axis=axis, spatial_mode=mode)
        e64 = sampled_conv_weight_vjp(x, v, **case.kwargs(), **kw, generator=gen())
        e32 = sampled_conv_weight_vjp(x.float(), v.float(), **case.kwargs(), **kw, generator=gen())
        assert e32.dtype == torch.float32
        assert_close(e32.double(), e64, 1e-4 * e64.abs().max().item(), f"{axis}-{mode}")


def test_matches_tn_engine_weight_vjp_when_available():
    tn = pytest.importorskip("kfac_tn.tn")
    if not hasattr(tn, "conv_weight_vjp"):
        pytest.skip("kfac_tn.tn.conv_weight_vjp not available yet")
    case = GRID[6]
    x, w, v = case.tensors()
    reference = tn.conv_weight_vjp(x, v, **case.kwargs())
    est = sampled_conv_weight_vjp(x, v, **case.kwargs(), keep_prob=1.0)
    assert_close(est, reference.reshape(est.shape), 1e-12, case.id)


# --- validation ---------------------------------------------------------------------------

BAD_ARGS = [
    (dict(keep_prob=0.0), "keep_prob"),
    (dict(keep_prob=1.5), "keep_prob"),
    (dict(keep_prob=-0.2), "keep_prob"),
    (dict(keep_prob=True), "keep_prob"),
    (dict(keep_prob="0.5"), "keep_prob"),
    (dict(keep_prob=float("nan")), "keep_prob"),
    (dict(keep_prob=0.5, axis="batch"), "axis"),
    (dict(keep_prob=0.5, spatial_mode="rows"), "spatial_mode"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGS, ids=[f"{n}={k}" for k, n in BAD_ARGS])
def test_invalid_arguments_raise(kwargs: dict, name: str):
    case = GRID[4]
    x, _, v = case.tensors()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        sampled_conv_weight_vjp(x, v, **case.kwargs(), **kwargs)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        draw_sample(x.shape, **kwargs)


def test_inconsistent_shapes_raise():
    case = GRID[4]
    x, _, v = case.tensors()
    with pytest.raises(ValueError, match="Invalid v"):
        sampled_conv_weight_vjp(x, v[..., :-1], **case.kwargs(), keep_prob=0.5)
    with pytest.raises(ValueError, match="Invalid groups"):
        sampled_conv_weight_vjp(x, v, **{**case.kwargs(), "groups": 2}, keep_prob=0.5)
    with pytest.raises(ValueError, match="Invalid x"):
        sampled_conv_weight_vjp(x[0, 0], v, **case.kwargs(), keep_prob=0.5)
    sample = draw_sample(x.shape, 0.5)
    with pytest.raises(ValueError, match="Invalid x"):
        gather(x[:1], sample)
    with pytest.raises(ValueError, match="Invalid x_kept"):
        kept_conv_weight_vjp(x, sample, v, **case.kwargs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("axis,mode", MODES, ids=MODE_IDS)
def test_cuda_matches_cpu(axis: str, mode: str):
    case = GRID[9]
    x, _, v = case.tensors()
    out = []
    for device in ("cpu", "cuda"):
        out.append(
            sampled_conv_weight_vjp(
                x.to(device), v.to(device), **case.kwargs(), keep_prob=0.5, axis=axis,
                spatial_mode=mode, generator=torch.Generator().manual_seed(2),
            ).cpu()
        )  # fmt: skip
    assert_close(out[1], out[0], 1e-10, f"{axis}-{mode}")


def _conv4d(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dilation: int):
    """Reference 4-d convolution from 3-d ones: a sum over the taps of the last dimension."""
    x = F.pad(x, (padding, padding))
    size, kernel = x.shape[-1], w.shape[-1]
    out = 1 + (size - dilation * (kernel - 1) - 1) // stride
    return torch.stack(
        [
            sum(
                F.conv3d(
                    x[..., stride * o + dilation * k], w[..., k], None, stride, padding, dilation
                )  # fmt: skip
                for k in range(kernel)
            )
            for o in range(out)
        ],
        dim=-1,
    )


@pytest.mark.parametrize("axis,mode", MODES, ids=MODE_IDS)
def test_four_dimensional_convolution(axis: str, mode: str):
    """N = 4 (no torch reference kernel): keep_prob=1 equals autograd through a conv4d."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 3, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 3, 2, 2, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = _conv4d(x, w, stride=2, padding=1, dilation=1)
    v = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (exact,) = torch.autograd.grad(y, w, v)
    est = sampled_conv_weight_vjp(
        x, v, (2, 2, 2, 3), 2, 1, keep_prob=1.0, axis=axis, spatial_mode=mode
    )
    assert_close(est, exact, 1e-12, f"4d-{axis}-{mode}")
    est = sampled_conv_weight_vjp(
        x, v, (2, 2, 2, 3), 2, 1, keep_prob=0.5, axis=axis, spatial_mode=mode,
        generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    assert est.shape == exact.shape and torch.isfinite(est).all()
