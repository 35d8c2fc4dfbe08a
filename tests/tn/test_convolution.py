"""conv, conv_transpose and kernel_unfold vs torch (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import CONV_CASES, FOUR_D_CASE, FOUR_D_TRANSPOSE_CASE, TRANSPOSE_CASES, Case, ids
from conftest import assert_close, randn
from tn_reference import kernel, torch_conv, torch_conv_transpose

from kfac_tn.tn import conv, conv_transpose, kernel_unfold

IMPLS = ["tn", "tn_simplified", "standard", "auto"]
CONV = CONV_CASES + [FOUR_D_CASE]
TRANSPOSE = TRANSPOSE_CASES + [FOUR_D_TRANSPOSE_CASE]


def conv_weight(case: Case, generator) -> torch.Tensor:
    return randn(case.c_out, case.x_shape[1] // case.groups, *kernel(case), generator=generator)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV, ids=ids(CONV))
def test_conv(case: Case, impl: str, generator):
    x = randn(*case.x_shape, generator=generator)
    w = conv_weight(case, generator)
    b = randn(case.c_out, generator=generator)
    expected = torch_conv(x, w, case, b)
    actual = conv(x, w, b, case.stride, case.padding, case.dilation, case.groups, impl=impl)
    assert_close(actual, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", TRANSPOSE, ids=ids(TRANSPOSE))
def test_conv_transpose(case: Case, impl: str, generator):
    x = randn(*case.x_shape, generator=generator)
    w = randn(case.x_shape[1], case.c_out // case.groups, *kernel(case), generator=generator)
    b = randn(case.c_out, generator=generator)
    actual = conv_transpose(
        x,
        w,
        b,
        case.stride,
        case.padding,
        case.output_padding,
        case.groups,
        case.dilation,
        impl=impl,
    )
    expected = torch_conv_transpose(x, w, case).reshape(actual.shape)
    expected = expected + b.view(1, -1, *([1] * (x.ndim - 2)))
    assert_close(actual, expected)


# the dense Toeplitz matrix is large: simplification branches only (real layers: see test_conv)
SMALL = [c for c in CONV if not c.id.startswith(("resnet", "3c3d", "allcnnc", "inception"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SMALL, ids=ids(SMALL))
def test_kernel_unfold(case: Case, impl: str, generator):
    """conv(x)[n, g].flatten() == T[g] @ x[n, g].flatten() for every sample and group."""
    x = randn(*case.x_shape, generator=generator)
    w = conv_weight(case, generator)
    t = kernel_unfold(
        w, case.x_shape[2:], case.stride, case.padding, case.dilation, case.groups, impl=impl
    )
    n, g = x.shape[0], case.groups
    y = torch_conv(x, w, case).reshape(n, g, -1)
    assert_close(torch.einsum("gij,ngj->ngi", t, x.reshape(n, g, -1)), y)


def test_kernel_unfold_accepts_full_input_shape(generator):
    w = randn(4, 3, 3, 3, generator=generator)
    assert_close(kernel_unfold(w, (2, 3, 5, 5), padding=1), kernel_unfold(w, (5, 5), padding=1))


BAD = [
    ("weight_channels", dict(w_shape=(4, 2, 3, 3)), "weight"),
    (
        "groups_not_dividing_out",
        dict(w_shape=(3, 1, 3, 3), groups=3, c_in=3, c_out=3, x_c=3, bad_groups=2),
        "groups",
    ),
    ("rank_mismatch", dict(w_shape=(4, 3, 3)), "x"),
    ("stride_zero", dict(stride=0), "stride"),
    ("same_stride2", dict(padding="same", stride=2), "padding"),
    ("kernel_too_large", dict(w_shape=(4, 3, 7, 7)), "kernel_size"),
    ("bad_impl", dict(impl="einsum"), "impl"),
]


@pytest.mark.parametrize("spec,argname", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_conv_bad_arguments(spec, argname):
    x = torch.zeros(2, spec.get("x_c", 3), 5, 5)
    w = torch.zeros(*spec.get("w_shape", (4, 3, 3, 3)))
    kwargs = {k: spec[k] for k in ("stride", "padding", "impl") if k in spec}
    if "bad_groups" in spec:
        kwargs["groups"] = spec["bad_groups"]
    with pytest.raises(ValueError, match=f"Invalid {argname}"):
        conv(x, w, **kwargs)
