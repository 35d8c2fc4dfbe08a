"""GGN diagonal vs per-sample autograd; Hessian diagonals vs dense Jacobians (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import CONV_CASES, FOUR_D_CASE, Case, ids
from conftest import assert_close, randn
from tn_reference import kernel, torch_conv

from kfac_tn.tn import ggn_diagonal, hessian_diagonal

IMPLS = ["tn", "tn_simplified", "standard", "auto"]
# a representative subset keeps the dense-Jacobian tests fast
SUBSET = [
    c
    for c in CONV_CASES
    if c.id
    in {
        "1d_s2_p2_d2_g2",
        "1d_same_even",
        "2d_3x3_p1",
        "2d_1x1_s2",
        "2d_patchify_nondivisible",
        "2d_down_k2s3_nondivisible",
        "2d_1x7_mixed",
        "2d_depthwise",
        "2d_groups_s2_d2_padpairs",
        "2d_same_asym_dil",
        "3d_mixed",
        "resnet18_stem_7x7s2p3",
    }
] + [FOUR_D_CASE]


def hyper(case: Case) -> dict:
    return dict(
        stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SUBSET, ids=ids(SUBSET))
def test_ggn_diagonal(case: Case, impl: str, generator):
    """Σ_{m,n} (J_W^T s[m,n])², with each J_W^T s[m,n] from autograd on sample n alone."""
    x = randn(*case.x_shape, generator=generator)
    w = randn(
        case.c_out,
        case.x_shape[1] // case.groups,
        *kernel(case),
        generator=generator,
        requires_grad=True,
    )
    n = x.shape[0]
    y_shape = torch_conv(x, w, case).shape
    m = 3
    s = randn(m, *y_shape, generator=generator)
    expected = torch.zeros_like(w)
    for i in range(n):
        yi = torch_conv(x[i : i + 1], w, case)
        for j in range(m):
            (gw,) = torch.autograd.grad(yi, w, s[j, i : i + 1], retain_graph=True)
            expected += gw.square()
    actual = ggn_diagonal(x, s, case.kernel_size, **hyper(case), impl=impl)
    assert_close(actual, expected)


PULLBACK = [c for c in SUBSET if c.id not in {"resnet18_stem_7x7s2p3", "4d", "2d_depthwise"}]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PULLBACK, ids=ids(PULLBACK))
def test_hessian_diagonal_is_exact_diagonal_of_pullback(case: Case, impl: str, generator):
    """diag(J^T diag(h) J) for J the dense Jacobian w.r.t. the weight and w.r.t. the input.

    h has mixed signs (a Hessian diagonal need not be PSD); the identity is exact.
    """
    x = randn(*case.x_shape, generator=generator)
    w = randn(case.c_out, case.x_shape[1] // case.groups, *kernel(case), generator=generator)
    y = torch_conv(x, w, case)
    h = randn(*y.shape, generator=generator)
    jw = torch.func.jacrev(lambda ww: torch_conv(x, ww, case))(w)
    jx = torch.func.jacrev(lambda xx: torch_conv(xx, w, case))(x)
    jw = jw.reshape(y.numel(), w.numel())
    jx = jx.reshape(y.numel(), x.numel())
    hf = h.reshape(-1, 1)
    expected_w = (jw * hf * jw).sum(0).reshape(w.shape)
    expected_x = (jx * hf * jx).sum(0).reshape(x.shape)
    actual_w, actual_x = hessian_diagonal(x, w, h, **hyper(case), impl=impl)
    assert_close(actual_w, expected_w)
    assert_close(actual_x, expected_x)


def test_hessian_diagonal_matches_exact_loss_hessian(generator):
    """With ℓ = Σ h ⊙ y² / 2 (output Hessian diag(h)), the returned diagonals are the exact
    diagonals of the loss Hessian w.r.t. the weight and w.r.t. the input (autograd hessian)."""
    from cases import Case

    case = Case("h", (1, 2, 4, 3), 3, stride=(2, 1), padding=1, groups=2)
    x = randn(*case.x_shape, generator=generator)
    w = randn(4, 1, 3, 3, generator=generator)
    h = randn(*torch_conv(x, w, case).shape, generator=generator)
    hw = torch.func.hessian(lambda ww: (h * torch_conv(x, ww, case) ** 2).sum() / 2)(w)
    hx = torch.func.hessian(lambda xx: (h * torch_conv(xx, w, case) ** 2).sum() / 2)(x)
    dw, dx = hessian_diagonal(x, w, h, stride=(2, 1), padding=1, groups=2)
    assert_close(dw, hw.reshape(w.numel(), w.numel()).diagonal().reshape(w.shape))
    assert_close(dx, hx.reshape(x.numel(), x.numel()).diagonal().reshape(x.shape))


def test_bad_shapes():
    x = torch.zeros(2, 3, 5, 5)
    with pytest.raises(ValueError, match="Invalid s"):
        ggn_diagonal(x, torch.zeros(2, 4, 3, 3), 3)  # missing M
    with pytest.raises(ValueError, match="Invalid h"):
        hessian_diagonal(x, torch.zeros(4, 3, 3, 3), torch.zeros(2, 4, 5, 5))
