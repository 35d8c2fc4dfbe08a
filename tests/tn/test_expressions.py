"""Plain networks evaluated from cached plans: nothing is re-planned, every impl validated."""

from __future__ import annotations

import pytest
import torch
from conftest import randn

import kfac_tn.tn as tn
from kfac_tn.tn import einsum as tn_einsum
from kfac_tn.tn import expressions, patterns
from kfac_tn.tn.cost import _choose


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
