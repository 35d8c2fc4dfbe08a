"""Symbolic expressions (readable, uniform contract) and plan caching."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randn

import kfac_tn.tn as tn
from kfac_tn.tn import einsum as tn_einsum
from kfac_tn.tn import expressions, patterns
from kfac_tn.tn.cost import _choose


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


def test_plans_are_cached(generator):
    """The second call with the same shapes re-plans nothing: spec, expression, Π, path."""
    x = randn(2, 3, 7, 6, generator=generator)
    kw = dict(kernel_size=3, stride=2, padding=1)
    tn.kfac_reduce_factor(x, **kw, impl="tn")
    tn.kfac_reduce_factor(x, **kw, impl="auto")
    caches = [
        expressions.routine_expression,
        tn_einsum._expression,
        patterns._cached_pattern,
        patterns._cached_summed,
        _choose,
    ]
    before = [c.cache_info() for c in caches]
    tn.kfac_reduce_factor(torch.randn_like(x), **kw, impl="tn")
    tn.kfac_reduce_factor(torch.randn_like(x), **kw, impl="auto")
    after = [c.cache_info() for c in caches]
    for cache, b, a in zip(caches, before, after):
        assert a.misses == b.misses, f"{cache.__wrapped__.__name__} re-planned"
    assert after[0].hits > before[0].hits  # expression looked up
    assert after[1].hits > before[1].hits  # contraction path looked up
    assert after[4].hits > before[4].hits  # auto choice looked up


def test_choose_impl_public():
    spec = tn.conv_spec((8, 8), 3, padding=1)
    assert tn.choose_impl("reduce", spec, 2, 3, torch.float32, "cpu") == "tn_simplified"
    assert tn.choose_impl("expand", spec, 2, 3, torch.float32, "cpu") == "tn_simplified"
    # InceptionV3's 7x1 on 17x17: correlating before applying Π needs ~0.4x the GEMM's FLOPs;
    # on CPU the lag products need ~0.14x (measured 70 ms tn, 30 ms lag, one thread)
    inception = tn.conv_spec((17, 17), (7, 1), padding=(3, 0))
    assert tn.choose_impl("expand", inception, 32, 128, torch.float32, "cuda") == "tn"
    assert tn.choose_impl("expand", inception, 32, 128, torch.float32, "cpu") == "tn_simplified"
    assert tn.expand_strategy(inception, 32, 128, "cpu") == "lag"
    assert tn.expand_strategy(inception, 32, 128, "cuda") == "gemm"
    with pytest.raises(ValueError, match="Invalid kind"):
        tn.choose_impl("kfc", spec, 2, 3, torch.float32, "cpu")


def _all_routine_calls():
    x, w, v = torch.zeros(2, 2, 6, 5), torch.zeros(4, 2, 3, 3), torch.zeros(2, 4, 4, 3)
    return {
        "conv": lambda impl: tn.conv(x, w, impl=impl),
        "conv_transpose": lambda impl: tn.conv_transpose(x, torch.zeros(2, 3, 3, 3), impl=impl),
        "unfold": lambda impl: tn.unfold(x, 3, impl=impl),
        "fold": lambda impl: tn.fold(torch.zeros(2, 18, 12), (6, 5), 3, impl=impl),
        "unfold_transpose": lambda impl: tn.unfold_transpose(x, 3, impl=impl),
        "kernel_unfold": lambda impl: tn.kernel_unfold(w, (6, 5), impl=impl),
        "conv_input_vjp": lambda impl: tn.conv_input_vjp(v, w, (6, 5), impl=impl),
        "conv_weight_vjp": lambda impl: tn.conv_weight_vjp(x, v, 3, impl=impl),
        "conv_input_jvp": lambda impl: tn.conv_input_jvp(x, w, impl=impl),
        "conv_weight_jvp": lambda impl: tn.conv_weight_jvp(x, w, impl=impl),
        "kfac_expand_factor": lambda impl: tn.kfac_expand_factor(x, 3, impl=impl),
        "kfac_reduce_factor": lambda impl: tn.kfac_reduce_factor(x, 3, impl=impl),
        "grad_expand_factor": lambda impl: tn.grad_expand_factor(v, impl=impl),
        "grad_reduce_factor": lambda impl: tn.grad_reduce_factor(v, impl=impl),
        "ggn_diagonal": lambda impl: tn.ggn_diagonal(x, v[None], 3, impl=impl),
        "hessian_diagonal": lambda impl: tn.hessian_diagonal(x, w, v, impl=impl),
    }


@pytest.mark.parametrize("routine", sorted(_all_routine_calls()))
def test_every_routine_validates_impl(routine):
    call = _all_routine_calls()[routine]
    for impl in tn.IMPLS:
        call(impl)
    with pytest.raises(ValueError, match="Invalid impl: 'fast'"):
        call("fast")


def test_routine_plans_are_cached(generator):
    """conv / unfold / VJPs validate once per shapes and hyperparameters (lists allowed)."""
    from kfac_tn.tn.convolution import _conv_plan
    from kfac_tn.tn.derivatives import _input_vjp_plan, _weight_vjp_plan
    from kfac_tn.tn.unfolding import _unfold_plan

    x, w = randn(2, 3, 6, 6, generator=generator), randn(4, 3, 3, 3, generator=generator)
    v = randn(2, 4, 3, 3, generator=generator)
    calls = [
        (_conv_plan, lambda: tn.conv(x, w, stride=[2, 2], padding=1)),
        (_unfold_plan, lambda: tn.unfold(x, 3, padding=1, stride=2)),
        (_input_vjp_plan, lambda: tn.conv_input_vjp(v, w, x.shape, stride=2, padding=1)),
        (_weight_vjp_plan, lambda: tn.conv_weight_vjp(x, v, 3, stride=2, padding=1)),
    ]
    for plan, call in calls:
        call()
        before = plan.cache_info()
        call()
        after = plan.cache_info()
        assert after.misses == before.misses and after.hits == before.hits + 1, plan.__name__
