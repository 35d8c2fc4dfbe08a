"""Input/weight VJPs vs autograd and JVPs vs torch.func.jvp (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import CONV_CASES, FOUR_D_CASE, Case, ids
from conftest import assert_close, randn
from tn_reference import kernel, torch_conv

from kfac_tn.tn import conv_input_jvp, conv_input_vjp, conv_weight_jvp, conv_weight_vjp

IMPLS = ["tn", "tn_simplified", "standard", "auto"]
CASES = CONV_CASES + [FOUR_D_CASE]


def setup(case: Case, generator):
    x = randn(*case.x_shape, generator=generator, requires_grad=True)
    w = randn(
        case.c_out,
        case.x_shape[1] // case.groups,
        *kernel(case),
        generator=generator,
        requires_grad=True,
    )
    y = torch_conv(x, w, case)  # torch's conv (loop-reference unfold for N = 4)
    v = randn(*y.shape, generator=generator)
    return x, w, y, v


def hyper(case: Case) -> dict:
    return dict(
        stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_conv_input_vjp(case: Case, impl: str, generator):
    x, w, y, v = setup(case, generator)
    (expected,) = torch.autograd.grad(y, x, v)
    actual = conv_input_vjp(v, w.detach(), case.x_shape[2:], **hyper(case), impl=impl)
    assert_close(actual, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_conv_weight_vjp(case: Case, impl: str, generator):
    x, w, y, v = setup(case, generator)
    (expected,) = torch.autograd.grad(y, w, v)
    actual = conv_weight_vjp(x.detach(), v, case.kernel_size, **hyper(case), impl=impl)
    assert_close(actual, expected)


@pytest.mark.parametrize("impl", ["tn", "auto"])  # the JVPs are conv(); impls covered there
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_conv_jvps(case: Case, impl: str, generator):
    x, w, _, _ = setup(case, generator)
    x, w = x.detach(), w.detach()
    x_dot, w_dot = torch.randn_like(x), torch.randn_like(w)
    _, expected_x = torch.func.jvp(lambda xx: torch_conv(xx, w, case), (x,), (x_dot,))
    _, expected_w = torch.func.jvp(lambda ww: torch_conv(x, ww, case), (w,), (w_dot,))
    assert_close(conv_input_jvp(x_dot, w, **hyper(case), impl=impl), expected_x)
    assert_close(conv_weight_jvp(x, w_dot, **hyper(case), impl=impl), expected_w)


def test_input_vjp_accepts_full_input_shape(generator):
    w = randn(4, 3, 3, 3, generator=generator)
    v = randn(2, 4, 5, 5, generator=generator)
    assert_close(
        conv_input_vjp(v, w, (2, 3, 5, 5), padding=1), conv_input_vjp(v, w, (5, 5), padding=1)
    )


BAD = [
    (
        "input_vjp_v_channels",
        lambda: conv_input_vjp(torch.zeros(2, 3, 5, 5), torch.zeros(4, 3, 3, 3), (5, 5), padding=1),
        "v",
    ),
    (
        "input_vjp_v_spatial",
        lambda: conv_input_vjp(torch.zeros(2, 4, 4, 5), torch.zeros(4, 3, 3, 3), (5, 5), padding=1),
        "v",
    ),
    (
        "input_vjp_input_size",
        lambda: conv_input_vjp(
            torch.zeros(2, 4, 5, 5), torch.zeros(4, 3, 3, 3), (5, 5, 5), padding=1
        ),
        "input_size",
    ),
    (
        "weight_vjp_v_shape",
        lambda: conv_weight_vjp(torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 5, 5), 3),
        "v",
    ),
    (
        "weight_vjp_groups",
        lambda: conv_weight_vjp(torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 3, 3), 3, groups=2),
        "groups",
    ),
    (
        "weight_vjp_impl",
        lambda: conv_weight_vjp(torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 3, 3), 3, impl="x"),
        "impl",
    ),
]


@pytest.mark.parametrize("call,argname", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments(call, argname):
    with pytest.raises(ValueError, match=f"Invalid {argname}"):
        call()
