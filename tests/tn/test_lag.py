"""Lag products of the KFAC-expand Gram (stride-1 convolutions) vs the unfold reference."""

from __future__ import annotations

import pytest
import torch
from cases import CONV_CASES, FOUR_D_CASE, Case, ids
from conftest import assert_close, randn
from tn_reference import kfac_expand

from kfac_tn import tn
from kfac_tn.tn._common import make_spec, prod
from kfac_tn.tn.cost import CALIBRATIONS
from kfac_tn.tn.lag import lag_cost, lag_expand_gram, lag_plan, segments

STRIDE_ONE = [
    c for c in CONV_CASES if c.stride == 1 or (isinstance(c.stride, tuple) and set(c.stride) == {1})
]
EXTRA = [
    # windows with gaps (O < D): positions no kernel tap reads
    Case("1d_gaps_k3_d4", (2, 3, 10), 3, dilation=4),
    Case("2d_gaps_mixed", (2, 2, 9, 6), (3, 2), dilation=(3, 1), padding=(1, 0)),
    # whole segments inside the padding are skipped
    Case("2d_pad_wider_than_input", (2, 2, 2, 3), 3, padding=2),
    Case("2d_asym_pad_pairs_d3", (2, 3, 4, 4), 3, padding=((3, 0), (0, 4)), dilation=3),
    Case("1d_k1", (3, 5, 7), 1),
    Case("2d_k5_g3", (2, 6, 7, 8), 5, padding=2, groups=3),
    Case("3d_k3_same_d2", (2, 2, 5, 4, 6), 3, padding="same", dilation=(2, 1, 1)),
    Case("2d_3c3d_conv2_shape", (3, 5, 14, 14), 3),
    Case("2d_3c3d_conv3_shape", (3, 6, 6, 6), 3, padding=1),
]
CASES = STRIDE_ONE + EXTRA + [Case("4d_stride1", (1, 2, 3, 4, 3, 3), (2, 1, 2, 3), padding=1)]


def _spec(case: Case):
    return make_spec(
        case.x_shape[2:],
        case.kernel_size,
        case.stride,
        case.padding,
        case.dilation,
        case.groups,
    )


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_lag_expand_gram_matches_unfold(case: Case, generator):
    x = randn(*case.x_shape, generator=generator)
    spec = _spec(case)
    scale = case.x_shape[0] * prod(spec.out_spatial)
    actual = lag_expand_gram(x, spec, case.groups)
    assert_close(actual, kfac_expand(x, case) * scale)
    assert torch.equal(actual, actual.mT), "not exactly symmetric"


def test_stride_one_cases_exist():
    """The shared cases include enough stride-1 layers (padding, dilation, groups, 'same')."""
    assert len(STRIDE_ONE) >= 10


@pytest.mark.parametrize(
    "case",
    [c for c in CONV_CASES if c not in STRIDE_ONE] + [FOUR_D_CASE],
    ids=ids([c for c in CONV_CASES if c not in STRIDE_ONE]) + ["4d"],
)
def test_no_plan_with_stride(case: Case):
    assert lag_plan(_spec(case)) is None
    with pytest.raises(ValueError, match="needs stride 1"):
        lag_expand_gram(torch.zeros(case.x_shape), _spec(case), case.groups)


def test_no_plan_for_transposed():
    spec = tn.conv_transpose_spec((4, 4), 3, padding=1)
    assert lag_plan(spec) is None


def test_segments_of_valid_3x3():
    """3x3 valid on 14 (3c3d conv2): 2 edge segments per side plus the middle [2, 12)."""
    (dim,) = make_spec((14,), 3).dims
    got = [(s.start, s.stop, s.k_first, s.k_last) for s in segments(dim)]
    assert got == [(0, 1, 0, 0), (1, 2, 0, 1), (2, 12, 0, 2), (12, 13, 1, 2), (13, 14, 2, 2)]


def test_segments_skip_padding():
    (dim,) = make_spec((6,), 3, padding=1).dims
    assert [(s.start, s.stop) for s in segments(dim)] == [(1, 2), (2, 6), (6, 7)]


def test_lag_products_cost_less_than_the_gram():
    """3x3 'same' on 32x32, C=64: the lag products need < 30% of the Gram's FLOPs."""
    spec = make_spec((32, 32), 3, padding=1)
    lag = lag_cost(lag_plan(spec), batch=128, channels=64, groups=1)
    d = 64 * 9
    gram = 2 * d * d * 128 * 32 * 32
    assert lag["flops"] < 0.3 * gram
    # half of the 25 lags (13) per middle cell: 2 rectangles of lags there
    assert lag["calls"] == 18


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_factor_uses_lag_where_faster(bias: bool, generator):
    """3c3d's conv2 at batch 128: the cost model picks lag products; the factor is exact."""
    spec = make_spec((14, 14), 3)
    for calibration in CALIBRATIONS.values():
        assert tn.expand_strategy(spec, 128, 64, "cpu", calibration=calibration) == "lag"
    assert tn.expand_strategy(spec, 128, 64, "cuda") == "gemm"
    x = randn(128, 64, 14, 14, generator=generator)
    case = Case("3c3d_conv2", (128, 64, 14, 14), 3)
    actual = tn.kfac_expand_factor(x, 3, bias=bias, impl="tn_simplified")
    assert_close(actual, kfac_expand(x, case, bias=bias))


def test_lag_low_precision_close_to_float64(generator):
    x = randn(4, 8, 9, 9, generator=generator)
    spec = make_spec((9, 9), 3, padding=1)
    expected = lag_expand_gram(x, spec, 1)
    actual = lag_expand_gram(x.float(), spec, 1)
    assert actual.dtype == torch.float32
    assert_close(actual.double(), expected, rtol=1e-5)


def test_scale_and_strided_out(generator):
    """``scale`` and a strided ``out`` (the top-left block of a bias-augmented buffer)."""
    x = randn(3, 4, 7, 6, generator=generator)
    spec = make_spec((7, 6), 3, padding=1, groups=2)
    expected = 0.25 * lag_expand_gram(x, spec, 2)
    buf = torch.full((2, 19, 19), float("nan"), dtype=torch.float64)
    returned = lag_expand_gram(x, spec, 2, scale=0.25, out=buf[:, :18, :18])
    assert returned.data_ptr() == buf.data_ptr()
    assert_close(buf[:, :18, :18], expected)
    assert torch.isnan(buf[:, 18]).all() and torch.isnan(buf[:, :18, 18]).all()  # untouched
    with pytest.raises(ValueError, match="Invalid out"):
        lag_expand_gram(x, spec, 2, out=torch.empty(2, 18, 17, dtype=torch.float64))
