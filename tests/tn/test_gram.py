"""Exactly symmetric Grams by construction (kfac_tn.tn.gram), whatever the GEMM kernel rounds."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randn

from kfac_tn.tn.gram import mirror_upper_, symmetric_gram

MIRROR_SHAPES = [(5, 5), (3, 300, 300), (2, 2, 513, 513), (1, 1)]


@pytest.mark.parametrize("shape", MIRROR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mirror_upper_is_symmetric_and_keeps_the_upper_triangle(shape, generator):
    m = randn(*shape, generator=generator)
    upper = m.triu().clone()
    out = mirror_upper_(m)
    assert out is m
    assert torch.equal(out, out.mT)
    assert torch.equal(out.triu(), upper)


@pytest.mark.parametrize(
    "shape", [(2, 700, 5), (1, 2100, 3), (3, 40, 7)], ids=["3blocks", "4blocks", "small"]
)
def test_symmetric_gram(shape, generator):
    flat = randn(*shape, generator=generator)
    out = symmetric_gram(flat)
    assert_close(out, torch.einsum("gdl,gel->gde", flat, flat))
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize(
    "shape", [(2, 700, 5), (1, 2100, 3), (3, 40, 7)], ids=["3blocks", "4blocks", "small"]
)
def test_symmetric_gram_under_an_asymmetric_kernel(shape, skewed_gemms, generator):
    """Regression (AVX2 CI): the Gram was symmetric only if the kernel rounded both halves alike."""
    flat = randn(*shape, generator=generator)
    out = symmetric_gram(flat, alpha=0.5)
    assert_close(out, 0.5 * torch.einsum("gdl,gel->gde", flat, flat))
    assert torch.equal(out, out.mT)


def test_symmetric_gram_non_contiguous_operand(generator):
    rows = randn(30, 9, generator=generator)
    out = symmetric_gram(rows.T[None])
    assert_close(out[0], rows.T @ rows)
    assert torch.equal(out, out.mT)
