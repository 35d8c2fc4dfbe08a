"""unfold, fold and unfold_transpose vs loop references, F.unfold / F.fold and adjointness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import CONV_CASES, FOUR_D_CASE, FOUR_D_TRANSPOSE_CASE, TRANSPOSE_CASES, Case, ids
from conftest import assert_close, randn
from tn_reference import unfold as ref_unfold
from tn_reference import unfold_transpose as ref_unfold_transpose

from kfac_tn.tn import fold, unfold, unfold_transpose

IMPLS = ["tn", "tn_simplified", "standard", "auto"]
# unfold / fold have no groups: use the ungrouped geometry of every conv case
CONV = CONV_CASES + [FOUR_D_CASE]
TRANSPOSE = TRANSPOSE_CASES + [FOUR_D_TRANSPOSE_CASE]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV, ids=ids(CONV))
def test_unfold(case: Case, impl: str, generator):
    x = randn(*case.x_shape, generator=generator)
    actual = unfold(x, case.kernel_size, case.dilation, case.padding, case.stride, impl=impl)
    assert_close(actual, ref_unfold(x, case.kernel_size, case.stride, case.padding, case.dilation))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV, ids=ids(CONV))
def test_fold_is_adjoint_of_unfold(case: Case, impl: str, generator):
    """fold(cols) equals the VJP of the loop-reference unfold (its adjoint), via autograd."""
    x = randn(*case.x_shape, generator=generator, requires_grad=True)
    u = ref_unfold(x, case.kernel_size, case.stride, case.padding, case.dilation)
    cols = randn(*u.shape, generator=generator)
    (expected,) = torch.autograd.grad(u, x, cols)
    actual = fold(
        cols,
        case.x_shape[2:],
        case.kernel_size,
        case.dilation,
        case.padding,
        case.stride,
        impl=impl,
    )
    assert_close(actual, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_fold_matches_torch_2d(impl, generator):
    cols = randn(2, 3 * 6, 5 * 4, generator=generator)
    expected = F.fold(cols, (9, 7), (2, 3), dilation=(2, 1), padding=1, stride=(2, 2))
    actual = fold(cols, (9, 7), (2, 3), dilation=(2, 1), padding=1, stride=(2, 2), impl=impl)
    assert_close(actual, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", TRANSPOSE, ids=ids(TRANSPOSE))
def test_unfold_transpose(case: Case, impl: str, generator):
    x = randn(*case.x_shape, generator=generator)
    hyper = (case.kernel_size, case.stride, case.padding, case.output_padding, case.dilation)
    assert_close(unfold_transpose(x, *hyper, impl=impl), ref_unfold_transpose(x, *hyper))


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=ids(TRANSPOSE_CASES))
def test_unfold_transpose_is_adjoint_of_associated_unfold(case: Case, generator):
    """<unfold_assoc(z), V> == <z, unfold_transpose(V)> with the associated conv's unfold.

    The associated convolution maps the transposed convolution's output size I back to O;
    its unfold (loop reference, trimmed to the O used positions) is the adjoint per tap.
    """
    x = randn(*case.x_shape, generator=generator)
    hyper = (case.kernel_size, case.stride, case.padding, case.output_padding, case.dilation)
    ut = unfold_transpose(x, *hyper)  # [N, C·ΠK, ΠI]
    n, c = x.shape[:2]
    spatial_i = None
    nd = x.ndim - 2
    from tn_reference import expand

    k, s, p = expand(case.kernel_size, nd), expand(case.stride, nd), expand(case.padding, nd)
    d, op = expand(case.dilation, nd), expand(case.output_padding, nd)
    spatial_i = [
        (x.shape[2 + j] - 1) * s[j] - 2 * p[j] + d[j] * (k[j] - 1) + 1 + op[j] for j in range(nd)
    ]
    z = randn(n, c, *spatial_i, generator=generator)
    u = ref_unfold(z, k, s, p, d)  # associated conv's unfold, [N, C·ΠK, ΠO_assoc]
    o_assoc = [(spatial_i[j] + 2 * p[j] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j in range(nd)]
    u = u.reshape(n, -1, *o_assoc)[(slice(None), slice(None), *(slice(0, o) for o in x.shape[2:]))]
    xk = x.reshape(n, c, 1, *x.shape[2:]).expand(n, c, u.shape[1] // c, *x.shape[2:])
    lhs = (u.reshape(n, c, -1, *x.shape[2:]) * xk).sum()
    # <z, unfold_transpose(x)> summed over taps (x fed to every tap)
    rhs = (ut.reshape(n, c, -1, *spatial_i) * z.unsqueeze(2)).sum()
    assert_close(lhs, rhs)


def test_fold_bad_cols():
    with pytest.raises(ValueError, match="Invalid cols"):
        fold(torch.zeros(2, 7, 9), (4, 4), 2)
    with pytest.raises(ValueError, match="Invalid cols"):
        fold(torch.zeros(2, 8), (4, 4), 2)
    with pytest.raises(ValueError, match="Invalid output_size"):
        fold(torch.zeros(2, 8, 9), (4, 4, 4, 4, 4), (2, 2))
