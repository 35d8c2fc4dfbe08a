"""KFAC factors of the TN engine vs explicit unfold-based formulas (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import CONV_CASES, FOUR_D_CASE, FOUR_D_TRANSPOSE_CASE, TRANSPOSE_CASES, Case, ids
from conftest import assert_close, randn
from tn_reference import kfac_expand, kfac_reduce, unfold

from kfac_tn.tn import (
    grad_expand_factor,
    grad_reduce_factor,
    kfac_expand_factor,
    kfac_reduce_factor,
)

IMPLS = ["tn", "tn_simplified", "standard", "auto"]
ALL = CONV_CASES + TRANSPOSE_CASES


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_kfac_expand_factor(case: Case, bias: bool, impl: str, generator):
    x = randn(*case.x_shape, generator=generator)
    actual = kfac_expand_factor(x, **case.kwargs(), bias=bias, impl=impl)
    assert_close(actual, kfac_expand(x, case, bias=bias))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_kfac_reduce_factor(case: Case, bias: bool, impl: str, generator):
    x = randn(*case.x_shape, generator=generator)
    actual = kfac_reduce_factor(x, **case.kwargs(), bias=bias, impl=impl)
    assert_close(actual, kfac_reduce(x, case, bias=bias))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [FOUR_D_CASE, FOUR_D_TRANSPOSE_CASE], ids=["4d", "t4d"])
def test_factors_4d(case: Case, impl: str, generator):
    """N = 4 (no torch conv4d, no letter cap): both factors vs the slow loop reference."""
    x = randn(*case.x_shape, generator=generator)
    assert_close(kfac_expand_factor(x, **case.kwargs(), impl=impl), kfac_expand(x, case))
    assert_close(kfac_reduce_factor(x, **case.kwargs(), impl=impl), kfac_reduce(x, case))


def test_reference_unfold_matches_torch(generator):
    """The test reference itself agrees with F.unfold (2-d), so both references are anchored."""
    x = randn(2, 3, 7, 6, generator=generator)
    for kw in [dict(kernel=3, stride=2, padding=1, dilation=2), dict(kernel=(2, 3))]:
        expected = F.unfold(
            x, kw["kernel"], kw.get("dilation", 1), kw.get("padding", 0), kw.get("stride", 1)
        )
        assert_close(unfold(x, **kw), expected)


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=ids(TRANSPOSE_CASES))
def test_transpose_factor_rows_match_conv_transpose_weight(case: Case, generator):
    """Rows (c_in, k) pair with the documented flattening of the ConvTranspose weight.

    autograd's weight gradient of ``F.conv_transposeNd`` reshaped as documented equals
    ``Σ_{n,i} g u^T`` with the transpose-unfolded columns u; the expand factor built from
    the same columns is then exactly the one KFAC needs for that weight matrix.
    """
    nd = len(case.x_shape) - 2
    x = randn(*case.x_shape, generator=generator)
    c_in, g = case.x_shape[1], case.groups
    k = (case.kernel_size,) * nd if isinstance(case.kernel_size, int) else case.kernel_size
    w = randn(c_in, case.c_out // g, *k, generator=generator, requires_grad=True)
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    y = conv_t(x, w, None, case.stride, case.padding, case.output_padding, g, case.dilation)
    grad_out = randn(*y.shape, generator=generator)
    (gw,) = torch.autograd.grad(y, w, grad_out)
    gw_mat = gw.reshape(g, c_in // g, case.c_out // g, -1).transpose(1, 2)
    gw_mat = gw_mat.reshape(g, case.c_out // g, -1)  # documented weight flattening
    from tn_reference import columns

    u = columns(x, case)  # [N, G, C_in/G·ΠK, ΠI]
    go = grad_out.reshape(x.shape[0], g, case.c_out // g, -1)
    assert_close(gw_mat, torch.einsum("ngcl,ngdl->gcd", go, u))


GRAD_SHAPES = [
    ((2, 4, 5), 1),
    ((2, 6, 3, 4), 3),
    ((3, 4, 2, 2, 3), 2),
    ((2, 2, 1, 2, 1, 2), 1),
    # fewer positions than channels per group: the Gram of the copied [C, N·O] matrix
    ((3, 8, 2), 1),
    ((2, 12, 2, 1), 2),
]
GRAD_IDS = ["1d", "2d_g3", "3d_g2", "4d", "1d_few_positions", "2d_g2_few_positions"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,groups", GRAD_SHAPES, ids=GRAD_IDS)
def test_grad_factors(shape, groups, impl, generator):
    g = randn(*shape, generator=generator)
    n, c = shape[:2]
    gv = g.reshape(n, groups, c // groups, -1)
    expected_expand = torch.stack(
        [sum(gv[i, j] @ gv[i, j].T for i in range(n)) for j in range(groups)]
    )
    s = gv.sum(-1)
    expected_reduce = torch.stack(
        [sum(torch.outer(s[i, j], s[i, j]) for i in range(n)) for j in range(groups)]
    )
    actual = grad_expand_factor(g, groups, impl=impl)
    assert_close(actual, expected_expand)
    if impl in ("tn_simplified", "auto"):
        assert torch.equal(actual, actual.transpose(1, 2)), "not exactly symmetric"
    assert_close(grad_reduce_factor(g, groups, impl=impl), expected_reduce)


BAD = [
    ("stride_zero", dict(kernel_size=3, stride=0), "stride"),
    ("stride_negative", dict(kernel_size=3, stride=(1, -1)), "stride"),
    ("groups_not_dividing", dict(kernel_size=3, groups=2), "groups"),
    ("same_with_stride", dict(kernel_size=3, stride=2, padding="same"), "padding"),
    ("kernel_rank", dict(kernel_size=(3, 3, 3)), "x"),
    ("kernel_too_large", dict(kernel_size=9, padding=1), "kernel_size"),
    ("bad_padding_string", dict(kernel_size=3, padding="full"), "padding"),
    ("output_padding_without_transpose", dict(kernel_size=3, output_padding=1), "output_padding"),
    (
        "output_padding_too_large",
        dict(kernel_size=3, transpose=True, output_padding=1),
        "output_padding",
    ),
    ("bad_impl", dict(kernel_size=3, impl="fast"), "impl"),
]


@pytest.mark.parametrize("fn", [kfac_expand_factor, kfac_reduce_factor], ids=["expand", "reduce"])
@pytest.mark.parametrize("kwargs,argname", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_hyperparameters(fn, kwargs, argname):
    x = torch.zeros(2, 3, 6, 6)
    with pytest.raises(ValueError, match=f"Invalid {argname}"):
        fn(x, **kwargs)


def test_bad_input_rank():
    with pytest.raises(ValueError, match="Invalid x"):
        kfac_reduce_factor(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="Invalid g"):
        grad_expand_factor(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Invalid groups"):
        grad_reduce_factor(torch.zeros(2, 3, 4), groups=2)


@pytest.mark.parametrize(
    "fn,arg,name",
    [
        (lambda t: kfac_expand_factor(t, 3, padding=1), torch.zeros(0, 3, 6, 6), "x"),
        (lambda t: kfac_reduce_factor(t, 3, padding=1), torch.zeros(0, 3, 6, 6), "x"),
        (grad_expand_factor, torch.zeros(0, 4, 6, 6), "g"),
        (grad_reduce_factor, torch.zeros(0, 4, 6, 6), "g"),
    ],
    ids=["kfac_expand", "kfac_reduce", "grad_expand", "grad_reduce"],
)
def test_empty_batch_is_rejected(fn, arg, name):
    """Regression: an empty batch raised ZeroDivisionError or a reshape error."""
    with pytest.raises(ValueError, match=f"Invalid {name}: .* holds no samples"):
        fn(arg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fn", [kfac_expand_factor, kfac_reduce_factor], ids=["expand", "reduce"])
def test_factors_non_contiguous_and_float32(fn, impl, generator):
    """channels_last / sliced inputs (strided views use the real strides) and float32."""
    case = Case("nc", (2, 4, 9, 8), 3, stride=2, padding=1, groups=2)
    x = randn(2, 4, 9, 8, generator=generator)
    expected = kfac_expand(x, case) if fn is kfac_expand_factor else kfac_reduce(x, case)
    channels_last = x.to(memory_format=torch.channels_last)
    assert_close(fn(channels_last, **case.kwargs(), impl=impl), expected)
    wide = randn(2, 4, 9, 16, generator=generator)
    wide[..., ::2] = x
    assert_close(fn(wide[..., ::2], **case.kwargs(), impl=impl), expected)
    x32 = fn(x.float(), **case.kwargs(), impl=impl)
    assert x32.dtype == torch.float32
    assert_close(x32, expected, rtol=1e-5)


def test_expand_factor_wide_layer_uses_blocks(generator):
    """D = 64·9 = 576 >= 512: the block-triangular Gram path, vs the loop reference."""
    case = Case("wide", (1, 64, 4, 4), 3, padding=1)
    x = randn(*case.x_shape, generator=generator)
    out = kfac_expand_factor(x, **case.kwargs(), impl="tn_simplified")
    assert_close(out, kfac_expand(x, case))
    assert torch.equal(out, out.transpose(1, 2))


SYMMETRIC_IMPLS = ["tn", "tn_simplified", "auto"]
SYMMETRY_CASES = [
    Case("3x3_same", (3, 4, 6, 6), 3, padding=1),
    Case("1x1_s2_g2", (2, 4, 6, 6), 1, stride=2, groups=2),
    Case("wide_576", (1, 64, 4, 4), 3, padding=1),
]


@pytest.mark.parametrize("impl", SYMMETRIC_IMPLS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", SYMMETRY_CASES, ids=ids(SYMMETRY_CASES))
def test_input_factors_exactly_symmetric_under_an_asymmetric_kernel(
    case: Case, bias: bool, impl: str, skewed_gemms, generator
):
    """Regression (AVX2 CI): symmetry by construction, not by the GEMM kernel's rounding."""
    x = randn(*case.x_shape, generator=generator)
    for fn in (kfac_expand_factor, kfac_reduce_factor):
        out = fn(x, **case.kwargs(), bias=bias, impl=impl)
        assert torch.equal(out, out.mT), f"{fn.__name__} not exactly symmetric"


@pytest.mark.parametrize("impl", SYMMETRIC_IMPLS)
@pytest.mark.parametrize("shape,groups", GRAD_SHAPES, ids=GRAD_IDS)
def test_grad_factors_exactly_symmetric_under_an_asymmetric_kernel(
    shape, groups, impl, skewed_gemms, generator
):
    g = randn(*shape, generator=generator)
    for fn in (grad_expand_factor, grad_reduce_factor):
        out = fn(g, groups, impl=impl)
        assert torch.equal(out, out.mT), f"{fn.__name__} not exactly symmetric"
