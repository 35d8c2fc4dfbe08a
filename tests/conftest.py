"""Shared test helpers: float64 tensors and one ``assert_close`` that reports mismatches."""

from __future__ import annotations

import pytest
import torch

RTOL = 1e-10


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = 0.0
):
    """Assert equal shapes and ``max|a - e| <= atol + rtol · max|e|`` (relative to the scale of e).

    On failure the message shows the shapes, the largest absolute and relative deviation and
    where it occurs.
    """
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}"
    )
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if expected.numel() == 0:
        return
    diff = (actual - expected).abs()
    scale = expected.abs().max().item()
    worst = diff.max().item()
    bound = atol + rtol * scale
    if not worst <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"max |actual - expected| = {worst:.3e} > {bound:.3e} (rtol={rtol}, atol={atol}, "
            f"max|expected| = {scale:.3e}); worst at {idx}: actual {actual[idx].item():.12e}, "
            f"expected {expected[idx].item():.12e}"
        )


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models on a shared 2-core CPU: no OpenMP spin)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator for reproducible float64 test tensors."""
    return torch.Generator().manual_seed(0)


def randn(*shape: int, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Float64 standard normal tensor (seeded through ``generator`` when given)."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64, **kwargs)


def _skew_lower(fn):
    """Wrap a GEMM so that square results get their strict lower triangle moved by one ulp.

    It plays a BLAS kernel whose two triangles of ``X @ X^T`` round differently (AVX2 CPUs do):
    a result that is symmetric only by the kernel's luck fails under it, one that is symmetric
    by construction does not.
    """

    def skewed(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.dim() >= 2 and out.shape[-1] == out.shape[-2] and out.is_floating_point():
            lower = torch.ones(out.shape[-2:], dtype=torch.bool, device=out.device).tril(-1)
            out.copy_(torch.where(lower, torch.nextafter(out, out + 1), out))
        return out

    return skewed


@pytest.fixture
def skewed_gemms(monkeypatch):
    """``torch.bmm`` / ``baddbmm`` / ``mm`` / ``addmm`` / ``cholesky_inverse`` whose square
    results are not exactly symmetric."""
    for name in ("bmm", "baddbmm", "mm", "addmm", "cholesky_inverse"):
        monkeypatch.setattr(torch, name, _skew_lower(getattr(torch, name)))
