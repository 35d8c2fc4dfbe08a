"""Per-sample weight gradients vs torch.func per-sample gradients (float64, exact)."""

from __future__ import annotations

import pytest
import torch
from cases import (
    CONV_CASES,
    FOUR_D_CASE,
    FOUR_D_TRANSPOSE_CASE,
    TRANSPOSE_CASES,
    Case,
    ids,
)
from conftest import assert_close, randn
from tn_reference import kernel, torch_conv, torch_conv_transpose

from kfac_tn.tn import conv_weight_vjp, per_sample_weight_grad

IMPLS = ["tn", "tn_simplified", "standard", "auto"]
CASES = CONV_CASES + [FOUR_D_CASE] + TRANSPOSE_CASES + [FOUR_D_TRANSPOSE_CASE]


def weight_shape(case: Case) -> tuple[int, ...]:
    c_in = case.x_shape[1]
    if case.transpose:
        return (c_in, case.c_out // case.groups, *kernel(case))
    return (case.c_out, c_in // case.groups, *kernel(case))


def layer(x: torch.Tensor, w: torch.Tensor, case: Case) -> torch.Tensor:
    return torch_conv_transpose(x, w, case) if case.transpose else torch_conv(x, w, case)


def torch_func_per_sample(x, w, v, case: Case) -> torch.Tensor:
    """``∇_W <layer(x_n), v_n>`` for every ``n`` by ``vmap(grad(...))``: ``[N, *W.shape]``."""

    def inner(weight, xn, vn):
        return (layer(xn[None], weight, case) * vn[None]).sum()

    return torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))(w, x, v)


def hyper(case: Case) -> dict:
    kw = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    if case.transpose:
        kw.update(transpose=True, output_padding=case.output_padding)
    return kw


def setup(case: Case, generator):
    x = randn(*case.x_shape, generator=generator)
    w = randn(*weight_shape(case), generator=generator)
    v = randn(*layer(x, w, case).shape, generator=generator)
    return x, w, v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_per_sample_weight_grad_equals_torch_func(case: Case, impl: str, generator):
    x, w, v = setup(case, generator)
    actual = per_sample_weight_grad(x, v, case.kernel_size, **hyper(case), impl=impl)
    assert_close(actual, torch_func_per_sample(x, w, v, case))


@pytest.mark.parametrize("case", CONV_CASES[:6], ids=ids(CONV_CASES[:6]))
def test_sum_over_samples_is_the_weight_vjp(case: Case, generator):
    x, _, v = setup(case, generator)
    per_sample = per_sample_weight_grad(x, v, case.kernel_size, **hyper(case))
    assert_close(per_sample.sum(0), conv_weight_vjp(x, v, case.kernel_size, **hyper(case)))


BAD = [
    (
        "v_spatial",
        lambda: per_sample_weight_grad(torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 5, 5), 3),
        "v",
    ),
    (
        "v_batch",
        lambda: per_sample_weight_grad(torch.zeros(2, 3, 5, 5), torch.zeros(3, 4, 3, 3), 3),
        "v",
    ),
    (
        "transpose_v_spatial",
        lambda: per_sample_weight_grad(
            torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), 3, transpose=True
        ),
        "v",
    ),
    (
        "groups",
        lambda: per_sample_weight_grad(torch.zeros(2, 3, 5), torch.zeros(2, 4, 3), 3, groups=2),
        "groups",
    ),
    (
        "impl",
        lambda: per_sample_weight_grad(torch.zeros(2, 3, 5), torch.zeros(2, 4, 3), 3, impl="x"),
        "impl",
    ),
]


@pytest.mark.parametrize("call,argname", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments(call, argname):
    with pytest.raises(ValueError, match=f"Invalid {argname}"):
        call()
