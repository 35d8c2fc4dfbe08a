"""symbolic(): the readable plain network of every routine, from the routine's own arguments."""

from __future__ import annotations

import pytest
from conftest import assert_close, randn

import kfac_tn.tn as tn


def test_conv_expression_is_readable_and_unpacks():
    expr = tn.symbolic("conv", (2, 4, 8, 8), (6, 2, 3, 3), stride=2, padding=1, groups=2)
    assert expr.equation == (
        "n g c_in i0 i1, k0 o0 i0, k1 o1 i1, g c_out c_in k0 k1 -> n g c_out o0 o1"
    )
    equation, operands, shape = expr
    assert equation == expr.equation
    assert operands == (
        ("x", (2, 2, 2, 8, 8)),
        ("pi0", (3, 4, 8)),
        ("pi1", (3, 4, 8)),
        ("weight", (2, 3, 2, 3, 3)),
    )
    assert shape == (2, 6, 4, 4)


def test_kfac_reduce_expression_has_private_output_legs():
    expr = tn.symbolic("kfac_reduce_factor", (2, 3, 5), 3)
    assert expr.equation == "n g c i0, k0 o0 i0, n g c_ i0_, k0_ o0_ i0_ -> g c k0 c_ k0_"
    assert expr.scale == pytest.approx(1 / (2 * 3**2))
    expand = tn.symbolic("kfac_expand_factor", (2, 3, 5), 3)
    assert expand.equation == "n g c i0, k0 o0 i0, n g c_ i0_, k0_ o0 i0_ -> g c k0 c_ k0_"
    transpose = tn.symbolic("kfac_expand_factor", (2, 3, 5), 3, stride=2, transpose=True)
    assert transpose.equation == "n g c o0, k0 o0 i0, n g c_ o0_, k0_ o0_ i0 -> g c k0 c_ k0_"


@pytest.mark.parametrize("routine", tn.ROUTINES)
def test_every_routine_has_an_expression(routine):
    """One contract for all routines: symbolic(routine, shapes..., hyperparameters)."""
    x, w, v = (2, 2, 6, 5), (4, 2, 3, 3), (2, 4, 6, 5)
    args = {
        "conv": (x, w),
        "conv_transpose": ((2, 2, 6, 5), (2, 3, 3, 3)),
        "unfold": (x, 3),
        "fold": ((2, 18, 30), (6, 5), 3),
        "unfold_transpose": (x, 3),
        "kernel_unfold": (w, (6, 5)),
        "conv_input_vjp": (v, w, (6, 5)),
        "conv_weight_vjp": (x, v, 3),
        "per_sample_weight_grad": (x, v, 3),
        "conv_input_jvp": (x, w),
        "conv_weight_jvp": (x, w),
        "kfac_expand_factor": (x, 3),
        "kfac_reduce_factor": (x, 3),
        "grad_expand_factor": (v,),
        "grad_reduce_factor": (v,),
        "ggn_diagonal": (x, (3, *v), 3),
        "hessian_diagonal_weight": (x, w, v),
        "hessian_diagonal_input": (x, w, v),
    }[routine]
    expr = (
        tn.symbolic(routine, *args, padding=1)
        if routine
        not in ("grad_expand_factor", "grad_reduce_factor", "conv_transpose", "unfold_transpose")
        else tn.symbolic(routine, *args)
    )
    lhs, rhs = expr.equation.split("->")
    assert len(lhs.split(",")) == len(expr.operands)
    for term, (_, shape) in zip(lhs.split(","), expr.operands):
        assert len(term.split()) == len(shape)
    assert len(rhs.split()) == len(expr.shape)


def test_symbolic_rejects_unknown_routine():
    with pytest.raises(ValueError, match="Invalid routine"):
        tn.symbolic("conv4", (1, 1, 3), (1, 1, 1))


def test_no_letter_cap_five_dims(generator):
    """N = 5 KFAC-reduce: 34 index names (> 26), evaluated against the simplified path."""
    x = randn(1, 2, 2, 3, 2, 2, 3, generator=generator)
    kw = dict(kernel_size=(2, 2, 1, 2, 2), padding=(0, 1, 0, 0, 1))
    expr = tn.symbolic("kfac_reduce_factor", x, **kw)
    assert len(set(expr.equation.replace(",", " ").replace("->", " ").split())) > 26
    assert_close(
        tn.kfac_reduce_factor(x, **kw, impl="tn"),
        tn.kfac_reduce_factor(x, **kw, impl="tn_simplified"),
    )
    assert_close(
        tn.kfac_expand_factor(x, **kw, impl="tn"),
        tn.kfac_expand_factor(x, **kw, impl="standard"),
    )
