"""Symbolic simplification: readable simplified networks that contract to the routine's result."""

from __future__ import annotations

import pytest
from cases import CONV_CASES, TRANSPOSE_CASES, Case
from conftest import assert_close, randn
from tn_reference import kernel

import kfac_tn.tn as tn
from kfac_tn.tn.simplify import evaluate_simplified, merge_legs, squeeze_legs

CONV = [
    c
    for c in CONV_CASES
    if c.id
    in {
        "1d_same_even",
        "2d_1x1_s2",
        "2d_patchify_nondivisible",
        "2d_down_k2s3_nondivisible",
        "2d_1x7_mixed",
        "2d_depthwise",
        "2d_groups_s2_d2_padpairs",
        "3d_mixed",
    }
]
TRANSPOSE = [c for c in TRANSPOSE_CASES if c.id in {"t1d_s2_p1_op1", "t2d_g2_op", "t3d_k2s2_p1"}]


def conv_args(case: Case, routine: str, generator):
    """(positional tensors, tensors by operand name, keyword hyperparameters) of a routine."""
    x = randn(*case.x_shape, generator=generator)
    w = randn(case.c_out, case.x_shape[1] // case.groups, *kernel(case), generator=generator)
    hyper = dict(
        stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups
    )
    y = tn.conv(x, w, **hyper, impl="standard")
    v = randn(*y.shape, generator=generator)
    if routine in ("conv", "conv_weight_jvp"):
        name = "x" if routine == "conv" else "x"
        w_name = "weight" if routine == "conv" else "weight_dot"
        return (x, w), {name: x, w_name: w}, hyper
    if routine == "conv_input_jvp":
        return (x, w), {"x_dot": x, "weight": w}, hyper
    if routine == "conv_input_vjp":
        return (v, w, case.x_shape[2:]), {"v": v, "weight": w}, hyper
    if routine in ("conv_weight_vjp", "per_sample_weight_grad"):
        return (x, v, case.kernel_size), {"x": x, "v": v}, hyper
    if routine == "kernel_unfold":
        return (w, case.x_shape[2:]), {"weight": w}, hyper
    if routine == "ggn_diagonal":
        s = randn(2, *y.shape, generator=generator)
        return (x, s, case.kernel_size), {"x": x, "s": s}, hyper
    if routine in ("kfac_expand_factor", "kfac_reduce_factor"):
        return (x, case.kernel_size), {"x": x}, hyper
    if routine in ("grad_expand_factor", "grad_reduce_factor"):
        return (v,), {"g": v}, dict(groups=case.groups)
    hyper.pop("groups")
    if routine == "unfold":
        return (
            (x, case.kernel_size),
            {"x": x},
            dict(dilation=case.dilation, padding=case.padding, stride=case.stride),
        )
    if routine == "fold":
        cols = tn.unfold(x, case.kernel_size, case.dilation, case.padding, case.stride)
        return (
            (cols, case.x_shape[2:], case.kernel_size),
            {"cols": cols},
            dict(dilation=case.dilation, padding=case.padding, stride=case.stride),
        )
    raise AssertionError(routine)


CONV_ROUTINES = [
    "conv",
    "conv_input_jvp",
    "conv_weight_jvp",
    "conv_input_vjp",
    "conv_weight_vjp",
    "per_sample_weight_grad",
    "kernel_unfold",
    "ggn_diagonal",
    "kfac_expand_factor",
    "kfac_reduce_factor",
    "grad_expand_factor",
    "grad_reduce_factor",
    "unfold",
    "fold",
]


@pytest.mark.parametrize("routine", CONV_ROUTINES)
@pytest.mark.parametrize("case", CONV, ids=[c.id for c in CONV])
def test_simplified_network_contracts_to_routine(case: Case, routine: str, generator):
    args, tensors, kwargs = conv_args(case, routine, generator)
    expr = tn.symbolic(routine, *args, simplify=True, **kwargs)
    assert not any(
        name.startswith("pi") and not name.startswith("pibar") for name, _ in expr.operands
    ), "an index pattern survived simplification"
    expected = getattr(tn, routine)(*args, **kwargs, impl="standard")
    assert_close(evaluate_simplified(expr, tensors), expected)


@pytest.mark.parametrize(
    "routine",
    [
        "conv_transpose",
        "unfold_transpose",
        "kfac_expand_factor",
        "kfac_reduce_factor",
        "per_sample_weight_grad",
    ],
)
@pytest.mark.parametrize("case", TRANSPOSE, ids=[c.id for c in TRANSPOSE])
def test_simplified_transposed_networks(case: Case, routine: str, generator):
    x = randn(*case.x_shape, generator=generator)
    w = randn(case.x_shape[1], case.c_out // case.groups, *kernel(case), generator=generator)
    if routine == "conv_transpose":
        args, tensors = (x, w), {"x": x, "weight": w}
        kwargs = dict(
            stride=case.stride,
            padding=case.padding,
            output_padding=case.output_padding,
            groups=case.groups,
            dilation=case.dilation,
        )
    elif routine == "unfold_transpose":
        args, tensors = (x, case.kernel_size), {"x": x}
        kwargs = dict(
            stride=case.stride,
            padding=case.padding,
            output_padding=case.output_padding,
            dilation=case.dilation,
        )
    elif routine == "per_sample_weight_grad":
        y = tn.conv_transpose(
            x, w, None, case.stride, case.padding, case.output_padding, case.groups, case.dilation
        )
        v = randn(*y.shape, generator=generator)
        args, tensors = (x, v, case.kernel_size), {"x": x, "v": v}
        kwargs = case.kwargs()
        kwargs.pop("kernel_size")
    else:
        args, tensors = (x, case.kernel_size), {"x": x}
        kwargs = case.kwargs()
        kwargs.pop("kernel_size")
    expr = tn.symbolic(routine, *args, simplify=True, **kwargs)
    expected = getattr(tn, routine)(*args, **kwargs, impl="standard")
    assert_close(evaluate_simplified(expr, tensors), expected)


def test_simplified_equations_are_readable():
    conv = tn.symbolic("conv", (2, 3, 8, 8), (4, 3, 3, 3), padding=1, simplify=True)
    assert conv.equation == "n c_in o0·o1 k0·k1, c_out c_in k0·k1 -> n c_out o0·o1"
    assert conv.transforms[0].startswith("x▷window: i0 -> (o0, k0) window")
    one_by_one = tn.symbolic("conv", (2, 3, 8, 8), (4, 3, 1, 1), stride=2, simplify=True)
    assert one_by_one.equation == "n c_in o0·o1, c_out c_in -> n c_out o0·o1"
    assert "strided slice" in one_by_one.transforms[0]
    reduce = tn.symbolic("kfac_reduce_factor", (2, 3, 8, 8), 3, padding=1, simplify=True)
    assert reduce.equation == (
        "n c i0 i1, k0 i0, k1 i1, n c_ i0_ i1_, k0_ i0_, k1_ i1_ -> c k0 k1 c_ k0_ k1_"
    )
    assert [name for name, _ in reduce.operands] == ["x", "pibar0", "pibar1"] * 2
    mixed = tn.symbolic("conv", (2, 3, 5, 9), (4, 3, 1, 7), padding=(0, 3), simplify=True)
    assert "i0 -> (o0, k0) reshape" in mixed.transforms[0]
    assert "i1 -> (o1, k1) window" in mixed.transforms[0]


def test_squeeze_and_merge():
    eq, sizes = squeeze_legs(
        "n g c a b, g d c a b -> n g d", {"n": 2, "g": 1, "c": 3, "a": 4, "b": 5, "d": 6}
    )
    assert eq == "n c a b, d c a b -> n d"
    eq, sizes = merge_legs(eq, sizes)
    assert eq == "n c·a·b, d c·a·b -> n d"
    assert sizes["c·a·b"] == 60
