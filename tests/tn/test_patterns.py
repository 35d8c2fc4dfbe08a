"""Index patterns Π vs a loop-built reference; Π̄ sums; caching."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from tn_reference import pattern

from kfac_tn.tn import conv_spec, conv_transpose_spec, index_pattern
from kfac_tn.tn.patterns import cached_index_pattern, cached_summed_index_pattern

SPECS = [
    ("k3_p1", conv_spec((7,), 3, padding=1)),
    ("k4_s2_d2_asym", conv_spec((11,), 4, stride=2, dilation=2, padding=((2, 1),))),
    ("same_even", conv_spec((6,), 4, padding="same")),
    ("down_nondivisible", conv_spec((10,), 2, stride=3)),
    ("transpose_op", conv_transpose_spec((4,), 3, stride=2, padding=1, output_padding=1)),
]


@pytest.mark.parametrize("spec", [s[1] for s in SPECS], ids=[s[0] for s in SPECS])
def test_pattern_matches_loop_reference(spec):
    (d,) = spec.dims
    pi = index_pattern(d, dtype=torch.float64)
    assert_close(pi, pattern(d.in_size, d.out_size, d.kernel, d.stride, d.dilation, d.pad_left))
    assert_close(cached_summed_index_pattern(d, torch.float64, "cpu"), pi.sum(1))
    assert_close(cached_summed_index_pattern(d, torch.float64, "cpu", over="i"), pi.sum(2))
    # each (k, o) hits at most one i, each (o, i) at most one k (why diagonals are exact)
    assert pi.sum(2).max() <= 1 and pi.sum(0).max() <= 1


def test_cached_pattern_is_shared_and_index_pattern_a_copy():
    (d,) = conv_spec((7,), 3, padding=1).dims
    a = cached_index_pattern(d, torch.float32, torch.device("cpu"))
    assert a is cached_index_pattern(d, torch.float32, torch.device("cpu"))
    assert index_pattern(d) is not a


def test_summed_pattern_rejects_bad_leg():
    (d,) = conv_spec((7,), 3).dims
    with pytest.raises(ValueError, match="Invalid over"):
        cached_summed_index_pattern(d, torch.float32, "cpu", over="k")
