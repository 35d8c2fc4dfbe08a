"""Damping and inversion: dense float64 references, float64 retry, last-good-inverse fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from kfac_tn import linalg
from kfac_tn.blocks import LinearBlock


def psd(groups: int, d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(groups, d, rank or d + 2, generator=gen, dtype=torch.float64)
    return x @ x.transpose(1, 2) / x.shape[-1]


def dense(A, G, M, damping):
    out = []
    for a, g, m in zip(A, G, M):
        K = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
        out.append(torch.linalg.solve(K, m.T.reshape(-1)).reshape(a.shape[0], g.shape[0]).T)
    return torch.stack(out)


SHAPES = [(1, 3, 2, None), (3, 4, 5, None), (2, 5, 3, 2)]  # groups, d_A, d_G, rank of A
SHAPE_IDS = ["1group", "3groups", "rank_deficient_A"]


@pytest.mark.parametrize("groups,d_a,d_g,rank", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("damping", [1e-3, 1.0], ids=["damping1e-3", "damping1"])
def test_eigen_precondition_is_exact_damped_solve(groups, d_a, d_g, rank, damping):
    gen = torch.Generator().manual_seed(0)
    A, G = psd(groups, d_a, gen, rank), psd(groups, d_g, gen)
    M = torch.randn(groups, d_g, d_a, generator=gen, dtype=torch.float64)
    inv = linalg.compute_inverse(A, G, inversion="eigen", damping=damping, dtype=torch.float64)
    assert not inv.fallback
    out = linalg.precondition(M, inv.tensors, inversion="eigen", damping=damping)
    assert_close(out, dense(A, G, M, damping), rtol=1e-9)


@pytest.mark.parametrize("groups,d_a,d_g,rank", SHAPES, ids=SHAPE_IDS)
def test_cholesky_precondition_is_pi_damped_kronecker_inverse(groups, d_a, d_g, rank):
    gen = torch.Generator().manual_seed(1)
    A, G = psd(groups, d_a, gen, rank), 3.0 * psd(groups, d_g, gen)
    M = torch.randn(groups, d_g, d_a, generator=gen, dtype=torch.float64)
    damping = 0.01
    inv = linalg.compute_inverse(A, G, inversion="cholesky", damping=damping, dtype=torch.float64)
    out = linalg.precondition(M, inv.tensors, inversion="cholesky", damping=damping)
    for g in range(groups):
        pi = ((A[g].trace() / d_a) / (G[g].trace() / d_g)).sqrt()
        a = A[g] + pi * damping**0.5 * torch.eye(d_a, dtype=torch.float64)
        gg = G[g] + damping**0.5 / pi * torch.eye(d_g, dtype=torch.float64)
        expected = torch.linalg.solve(gg, M[g]) @ torch.linalg.inv(a)
        assert_close(out[g], expected, rtol=1e-9)


def test_pi_damping_handles_zero_trace():
    A = torch.zeros(1, 2, 2, dtype=torch.float64)
    G = torch.eye(3, dtype=torch.float64)[None]
    assert torch.equal(linalg.pi_damping(A, G), torch.ones(1, 1, 1, dtype=torch.float64))


def test_eigh_failure_in_float32_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh

    def eigh(x):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(x)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    gen = torch.Generator().manual_seed(2)
    A, G = psd(1, 3, gen).float(), psd(1, 2, gen).float()
    inv = linalg.compute_inverse(A, G, inversion="eigen", damping=0.1, dtype=torch.float32)
    assert inv.fallback and inv.tensors is not None
    assert all(t.dtype == torch.float32 for t in inv.tensors)


@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_non_finite_factors_fail_without_raising(inversion):
    A = torch.full((1, 2, 2), float("nan"), dtype=torch.float32)
    G = torch.eye(2)[None]
    inv = linalg.compute_inverse(A, G, inversion=inversion, damping=0.1, dtype=torch.float32)
    assert inv.tensors is None


def test_indefinite_factor_fails_cholesky():
    A = torch.diag(torch.tensor([1.0, -5.0], dtype=torch.float64))[None]
    G = torch.eye(2, dtype=torch.float64)[None]
    inv = linalg.compute_inverse(A, G, inversion="cholesky", damping=1e-4, dtype=torch.float64)
    assert inv.tensors is None


def _block_with_state():
    layer = torch.nn.Linear(3, 2).double()
    block = LinearBlock(layer, "layer")
    return block, {}


def test_block_keeps_last_good_inverse_and_counts_failures():
    block, state = _block_with_state()
    gen = torch.Generator().manual_seed(3)
    state["A"], state["G"] = psd(1, 4, gen), psd(1, 2, gen)
    state["factors_valid"] = torch.tensor(True)
    good = block.update_inverses(state, inversion="eigen", damping=0.1, dtype=torch.float64)
    assert good is not None
    state["A"] = torch.full_like(state["A"], float("nan"))
    assert block.update_inverses(state, inversion="eigen", damping=0.1, dtype=torch.float64) is None
    assert state["inverse"] is good
    assert (state["inverse_updates"], state["failed_inversions"]) == (2, 1)


def test_block_ema_and_non_finite_statistics_are_skipped():
    block, state = _block_with_state()
    gen = torch.Generator().manual_seed(4)
    a1, g1 = psd(1, 4, gen), psd(1, 2, gen)
    block.add_statistics(a1.clone(), 2, {"G": g1})  # mean form over 2 samples
    block.update_factors(state, decay=0.9, grad_scale=3.0)
    assert_close(state["A"], a1)
    assert_close(state["G"], 3.0 * g1)
    a2, g2 = psd(1, 4, gen), psd(1, 2, gen)
    block.add_statistics(a2, 1, {"G": g2})
    block.update_factors(state, decay=0.9, grad_scale=1.0)
    assert_close(state["A"], 0.9 * a1 + 0.1 * a2)
    assert_close(state["G"], 0.9 * 3.0 * g1 + 0.1 * g2)
    before = (state["A"].clone(), state["G"].clone())
    block.add_statistics(a2, 1, {"G": torch.full_like(g2, float("inf"))})
    block.update_factors(state, decay=0.9, grad_scale=1.0)
    assert torch.equal(state["A"], before[0]) and torch.equal(state["G"], before[1])
    assert int(state["skipped_factor_updates"]) == 1
    assert not block.has_statistics


def test_block_accumulated_passes_weighted_by_samples():
    """Two passes before one update: input means weighted by sample counts, gradients summed."""
    block, state = _block_with_state()
    gen = torch.Generator().manual_seed(5)
    a1, a2, g1, g2 = psd(1, 4, gen), psd(1, 4, gen), psd(1, 2, gen), psd(1, 2, gen)
    block.add_statistics(a1.clone(), 3, {"G": g1.clone()})
    block.add_statistics(a2.clone(), 1, {"G": g2.clone()})
    block.update_factors(state, decay=0.9, grad_scale=0.5)
    assert_close(state["A"], (3 * a1 + a2) / 4)
    assert_close(state["G"], 0.5 * (g1 + g2))


# ---------------------------------------------------------------------- factored gradients
FACTORED = [(5, 7, 3), (12, 4, 20), (1, 9, 9)]  # d_G, d_A, rows R
FACTORED_IDS = ["fewer_rows", "more_rows", "one_row"]


def _factored_problem(d_g: int, d_a: int, rows: int):
    gen = torch.Generator().manual_seed(3)
    g_rows = torch.randn(rows, d_g, generator=gen, dtype=torch.float64)
    x_rows = torch.randn(rows, d_a, generator=gen, dtype=torch.float64)
    probes = torch.randn(d_a, linalg.FACTORED_PROBES, generator=gen, dtype=torch.float64)
    return g_rows, x_rows, probes, gen


@pytest.mark.parametrize("d_g,d_a,rows", FACTORED, ids=FACTORED_IDS)
def test_factored_precondition_equals_the_dense_product(d_g, d_a, rows):
    g_rows, x_rows, _, gen = _factored_problem(d_g, d_a, rows)
    A, G = psd(1, d_a, gen), psd(1, d_g, gen)
    inv = linalg.compute_inverse(A, G, inversion="cholesky", damping=1e-2, dtype=torch.float64)
    inverse = linalg.inverse_from_tensors(inv.tensors, "cholesky")
    want = linalg.precondition((g_rows.T @ x_rows)[None], inverse, damping=1e-2)
    assert_close(linalg.factored_precondition(g_rows, x_rows, inverse), want, rtol=1e-12)


def _changed(m: torch.Tensor, index: tuple[int, int], value: float) -> torch.Tensor:
    out = m.clone()
    out[index] = value
    return out


# how the gradient differs from the rows' sum -> whether factored_matches accepts it
CHANGES = {
    "unchanged": (lambda m: m, True),
    "rounded_to_float32": (lambda m: m.float().double(), False),
    "scaled_by_1+1e-9": (lambda m: m * (1 + 1e-9), False),
    "weight_decay_term": (lambda m: m + 1e-6 * torch.ones_like(m), False),
    "one_entry_changed": (lambda m: _changed(m, (0, 1), m[0, 1] + 1e-8), False),
    "nan_entry": (lambda m: _changed(m, (0, 0), float("nan")), False),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
@pytest.mark.parametrize("d_g,d_a,rows", FACTORED, ids=FACTORED_IDS)
def test_factored_matches_accepts_only_the_rows_sum(d_g, d_a, rows, change):
    g_rows, x_rows, probes, _ = _factored_problem(d_g, d_a, rows)
    modify, accepted = CHANGES[change]
    matrix = modify(g_rows.T @ x_rows)
    assert bool(linalg.factored_matches(matrix @ probes, g_rows, x_rows, probes)) is accepted


def test_factored_matches_accepts_a_summation_in_another_order():
    """Float32 rounding of a different summation order (batches of rows) is accepted."""
    gen = torch.Generator().manual_seed(0)
    g_rows, x_rows = torch.randn(128, 64, generator=gen), torch.randn(128, 300, generator=gen)
    matrix = sum(g_rows[i : i + 16].T @ x_rows[i : i + 16] for i in range(0, 128, 16))
    probes = torch.randn(300, linalg.FACTORED_PROBES, generator=gen)
    assert bool(linalg.factored_matches(matrix @ probes, g_rows, x_rows, probes))


@pytest.mark.parametrize(
    "rows,d_g,d_a,pays",
    [(128, 512, 1153, True), (128, 10, 257, False), (1000, 512, 513, False), (1, 3, 3, True)],
    ids=["3c3d_fc1", "narrow_output", "many_rows", "one_row"],
)
def test_factored_pays_when_fewer_multiply_adds(rows, d_g, d_a, pays):
    assert linalg.factored_pays(rows, d_g, d_a) is pays
