"""kfac_tn.decompositions: batched eigh with retries, warm-started eigenbases, batched Cholesky.

Float64 throughout; a warm-started eigenbasis is checked against its defining property (the
reconstruction error is the accepted off-diagonal mass, at most the tolerance) and against
``torch.linalg.eigh``'s eigenvalues.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from kfac_tn import decompositions as dec
from kfac_tn.decompositions import Path


def spd(n: int, gen: torch.Generator, decay: float = 0.7, batch: int = 1) -> torch.Tensor:
    """``[batch, n, n]`` SPD matrices with eigenvalues ``decay**k`` (well separated)."""
    q = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64)).Q
    evals = decay ** torch.arange(n, dtype=torch.float64)
    return dec.symmetrized(q @ (evals[:, None] * q.transpose(-2, -1)))


def reconstruct(evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    return evecs @ (evals[..., :, None] * evecs.transpose(-2, -1))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_off_diagonal_ratio_is_the_reconstruction_error():
    gen = torch.Generator().manual_seed(0)
    F = spd(6, gen)
    Q = torch.linalg.qr(torch.randn(1, 6, 6, generator=gen, dtype=torch.float64)).Q
    ratio, rayleigh = dec.off_diagonal_ratio(F, Q)
    B = Q.transpose(-2, -1) @ F @ Q
    off = (B - torch.diag_embed(torch.diagonal(B, dim1=-2, dim2=-1))).norm() / F.norm()
    assert ratio.item() == pytest.approx(off.item(), rel=1e-10)
    assert_close(rayleigh, torch.diagonal(B, dim1=-2, dim2=-1))
    assert rel_error(reconstruct(rayleigh, Q), F) == pytest.approx(off.item(), rel=1e-10)


def test_batched_eigh_equals_per_factor_eigh():
    gen = torch.Generator().manual_seed(1)
    F = torch.cat([spd(5, gen) for _ in range(4)])
    evals, evecs, outcomes = dec.eigh_batch(F)
    assert [o.path for o in outcomes] == [Path.EIGH] * 4 and all(o.ok for o in outcomes)
    for i in range(4):
        e, _ = torch.linalg.eigh(F[i])
        assert_close(evals[i], e.clamp_min(0.0))
        assert_close(reconstruct(evals[i], evecs[i]), F[i])


WARM_CASES = [
    # (id, perturbation of the factor, tolerance, iterations, expected path)
    ("unchanged", 0.0, 1e-3, 1, Path.WARM),
    ("small-change", 1e-4, 1e-2, 1, Path.WARM),
    ("zero-tolerance", 1e-4, 0.0, 1, Path.EIGH),
    ("qr-fixes-it", 3e-2, 1e-2, 1, Path.QR),
    ("no-iterations", 3e-2, 1e-2, 0, Path.EIGH),
    ("large-change", 1.0, 1e-3, 1, Path.EIGH),
]


@pytest.mark.parametrize(
    "perturbation,tolerance,iterations,path",
    [c[1:] for c in WARM_CASES],
    ids=[c[0] for c in WARM_CASES],
)
def test_warm_start_equals_eigh_within_tolerance_or_falls_back(
    perturbation, tolerance, iterations, path
):
    gen = torch.Generator().manual_seed(2)
    old = spd(8, gen)
    _, basis = torch.linalg.eigh(old)
    noise = torch.randn(1, 8, 8, generator=gen, dtype=torch.float64)
    noise = dec.symmetrized(noise @ noise.transpose(-2, -1))  # PSD: no eigenvalue is clamped
    new = dec.symmetrized(old + perturbation * old.norm() / noise.norm() * noise)
    evals, evecs, outcomes = dec.warm_eigh_batch(
        new, basis, tolerance=tolerance, iterations=iterations
    )
    (outcome,) = outcomes
    assert outcome.path is path and outcome.ok
    error = rel_error(reconstruct(evals, evecs), new)
    if path is Path.EIGH:
        reference_evals, _ = torch.linalg.eigh(new)
        assert_close(evals, reference_evals.clamp_min(0.0))
        assert error < 1e-12
    else:  # the reconstruction error is the accepted off-diagonal mass, within the tolerance
        # (the mass comes from ||F||^2 - sum diag^2: resolution ~sqrt(eps) = 1.5e-8 in float64)
        assert error == pytest.approx(outcome.off_diagonal, rel=1e-6, abs=1e-7)
        assert error <= tolerance
        reference = torch.linalg.eigvalsh(new).sort().values
        assert_close(evals.sort().values, reference.clamp_min(0.0), atol=tolerance * new.norm())
    assert_close(evecs.transpose(-2, -1) @ evecs, torch.eye(8, dtype=torch.float64)[None])


def test_warm_start_decides_per_member_of_a_batch():
    gen = torch.Generator().manual_seed(3)
    old = torch.cat([spd(6, gen) for _ in range(3)])
    _, basis = torch.linalg.eigh(old)
    new = old.clone()
    new[1] = spd(6, gen)  # only the middle member changed completely
    evals, evecs, outcomes = dec.warm_eigh_batch(new, basis, tolerance=1e-3, iterations=1)
    assert [o.path for o in outcomes] == [Path.WARM, Path.EIGH, Path.WARM]
    for i in range(3):
        assert rel_error(reconstruct(evals[i], evecs[i]), new[i]) < 1e-12


def test_failed_eigh_member_is_retried_in_float64(monkeypatch):
    real = torch.linalg.eigh

    def eigh(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    gen = torch.Generator().manual_seed(4)
    F = torch.cat([spd(4, gen) for _ in range(2)]).float()
    evals, evecs, outcomes = dec.eigh_batch(F)
    assert all(o.fallback and o.ok and "float32 failed" in o.error for o in outcomes)
    assert evals.dtype == torch.float32
    for i in range(2):
        assert rel_error(reconstruct(evals[i], evecs[i]).double(), F[i].double()) < 1e-5


def test_non_finite_member_fails_alone():
    gen = torch.Generator().manual_seed(5)
    F = torch.cat([spd(4, gen) for _ in range(3)])
    F[1, 0, 0] = float("nan")
    evals, evecs, outcomes = dec.eigh_batch(F)
    assert [o.ok for o in outcomes] == [True, False, True]
    assert torch.equal(evals[1], torch.zeros(4, dtype=torch.float64))
    assert rel_error(reconstruct(evals[2], evecs[2]), F[2]) < 1e-12


def test_batched_cholesky_inverse_and_per_member_failure():
    gen = torch.Generator().manual_seed(6)
    F = torch.cat([spd(5, gen) for _ in range(3)])
    F[2] = -F[2]  # negative definite: Cholesky fails for this member only
    inv, outcomes = dec.cholesky_inverse_batch(F)
    assert [o.ok for o in outcomes] == [True, True, False]
    assert all(o.path is Path.CHOLESKY for o in outcomes)
    assert "not positive definite" in outcomes[2].error
    for i in range(2):
        assert_close(inv[i] @ F[i], torch.eye(5, dtype=torch.float64), atol=1e-10)
        assert torch.equal(inv[i], inv[i].T)  # exactly symmetric
