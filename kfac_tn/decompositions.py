r"""Decompositions of batches of symmetric factors: batched eigh, warm-started eigenbases, Cholesky.

Every function takes a batch ``F: [B, n, n]`` of symmetric PSD factors of one shape, dtype and
device (same-shaped factors of several layers stacked, or the channel groups of one layer) and
decomposes it in one call, so that a model with many equal layers pays one launch per shape,
not one per layer. Each batch member carries its own outcome (:class:`Outcome`): the path it
took, whether the float64 retry was needed, and an error if both attempts failed. Precision:
the first attempt runs in the dtype of ``F`` (the inverse dtype); float64 only on a retry.

Paths (:class:`Path`, counted per factor by the optimizer, see ``KFAC.stats``):

* ``"eigh"`` — a full ``torch.linalg.eigh`` (eigenvalues clamped at 0);
* ``"warm"`` — the previous eigenbasis ``Q`` still diagonalises ``F``: with
  :math:`B = Q^\top F Q`, the relative off-diagonal mass
  :math:`\lVert B - \operatorname{diag} B \rVert_F / \lVert F \rVert_F` (the relative error
  of :math:`\tilde F = Q \operatorname{diag}(B) Q^\top` as an approximation of ``F``) is at most
  the tolerance; the eigenvalues are the Rayleigh quotients :math:`\operatorname{diag} B`.
  Cost: one GEMM ``F @ Q`` (the diagonal of ``B`` is read off ``Q ⊙ FQ``, and
  :math:`\lVert B \rVert_F = \lVert F \rVert_F` since ``Q`` is orthogonal), no ``eigh``;
* ``"qr"`` — accepted after one or more orthogonal (subspace) iterations
  ``Q ← qr(F Q)`` started from the previous basis (columns sorted by decreasing Rayleigh
  quotient, so the dominant directions converge first; Distributed Shampoo's
  ``QREigendecompositionConfig``); members still above the tolerance get a full ``eigh``;
* ``"cholesky"`` — the inverse of a damped factor via ``cholesky_ex`` (per-member failure
  flags, no exception) and ``cholesky_inverse``, exactly symmetric.

The off-diagonal measure uses :math:`\lVert F \rVert_F^2 - \sum_i B_{ii}^2`, accumulated in
float64; in float32 it resolves tolerances down to about ``1e-3``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_tn.enums import Choice
from kfac_tn.linalg import symmetrized

__all__ = [
    "Outcome",
    "Path",
    "cholesky_inverse_batch",
    "eigh_batch",
    "off_diagonal_ratio",
    "warm_eigh_batch",
]


class Path(Choice):
    """How one factor was decomposed."""

    EIGH = "eigh"
    WARM = "warm"
    QR = "qr"
    CHOLESKY = "cholesky"


@dataclass
class Outcome:
    """What happened to one member of a batch.

    Attributes:
        path: The path that produced its result.
        fallback: Whether the first attempt failed and the float64 retry succeeded.
        error: Why the last failed attempt failed (``None`` if the first one succeeded).
        ok: Whether a result exists (``False``: both attempts failed).
        off_diagonal: The accepted relative off-diagonal mass (``"warm"``/``"qr"``), else 0.
    """

    path: Path
    fallback: bool = False
    error: str | None = None
    ok: bool = True
    off_diagonal: float = 0.0


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _finite_members(*tensors: Tensor) -> list[bool]:
    """Per batch member: whether all its entries in every tensor are finite (one host sync)."""
    flags = torch.stack([t.isfinite().flatten(1).all(1) for t in tensors]).all(0)
    return flags.tolist()


# ------------------------------------------------------------------------------------ eigh
def _eigh(F: Tensor) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(symmetrized(F))
    return evals.clamp_min(0.0), evecs


def eigh_batch(F: Tensor, label: str = "eigen") -> tuple[Tensor, Tensor, list[Outcome]]:
    """Eigendecompose a batch in one call; failed members are retried alone, then in float64.

    Args:
        F: Symmetric factors ``[B, n, n]`` (the first attempt runs in their dtype).
        label: Name of the decomposition in error messages (``"eigen"``).

    Returns:
        ``(evals [B, n] clamped at 0, evecs [B, n, n], outcomes)`` in ``F``'s dtype,
        contiguous; members whose attempts all failed hold zeros and ``ok=False``.
    """
    dtype, size = F.dtype, F.shape[0]
    outcomes = [Outcome(Path.EIGH) for _ in range(size)]
    try:
        evals, evecs = _eigh(F)
        finite = _finite_members(evals, evecs)
        raised = False
        error = f"{label} in {dtype} gave non-finite values"
    except (torch.linalg.LinAlgError, RuntimeError) as err:  # one member may fail for all
        evals, evecs = F.new_zeros(F.shape[:-1]), torch.zeros_like(F)
        finite, raised = [False] * size, True
        error = f"{label} in {dtype} failed: {_first_line(err)}"
    for i, ok in enumerate(finite):
        if ok:
            continue
        # a member that raised inside a larger batch has not had its own attempt yet
        attempts = [dtype] if raised and size > 1 else []
        attempts += [torch.float64] if dtype != torch.float64 else []
        outcomes[i] = _retry_member(F[i], attempts, label, evals, evecs, i, error)
    return evals.contiguous(), evecs.contiguous(), outcomes


def _retry_member(
    member: Tensor,
    attempts: list[torch.dtype],
    label: str,
    evals: Tensor,
    evecs: Tensor,
    i: int,
    error: str,
) -> Outcome:
    """Decompose one member ``[n, n]`` in each dtype of ``attempts`` until one succeeds.

    The result is written into ``evals[i]``/``evecs[i]`` (zeros if every attempt fails).
    ``error`` describes the failed batch attempt.
    """
    dtype = evals.dtype
    for attempt in attempts:
        try:
            e, v = _eigh(member.to(attempt)[None])
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            error = f"{label} in {attempt} failed: {_first_line(err)}"
            continue
        if not all(_finite_members(e, v)):
            error = f"{label} in {attempt} gave non-finite values"
            continue
        evals[i], evecs[i] = e[0].to(dtype), v[0].to(dtype)
        fallback = attempt != dtype
        return Outcome(Path.EIGH, fallback=fallback, error=error if fallback else None)
    evals[i], evecs[i] = 0.0, 0.0
    return Outcome(Path.EIGH, error=error, ok=False)


# ------------------------------------------------------------------------------ warm start
def off_diagonal_ratio(F: Tensor, Q: Tensor, FQ: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Relative off-diagonal mass of :math:`Q^\top F Q` for orthogonal ``Q``, and its diagonal.

    Args:
        F: Symmetric factors ``[B, n, n]``.
        Q: Orthogonal matrices ``[B, n, n]`` (columns: the basis).
        FQ: ``F @ Q`` if already computed.

    Returns:
        ``(ratio [B] float64, rayleigh [B, n] in F's dtype)``; the ratio is 0 for a zero ``F``.
    """
    if FQ is None:
        FQ = F @ Q
    rayleigh = (Q.to(torch.float64) * FQ.to(torch.float64)).sum(-2)  # q_i^T F q_i
    total = F.to(torch.float64).square().sum((-2, -1))
    off = (total - rayleigh.square().sum(-1)).clamp_min(0.0)
    ratio = torch.where(total > 0, (off / total.clamp_min(1e-300)).sqrt(), 0.0)
    return ratio, rayleigh.to(F.dtype)


def warm_eigh_batch(
    F: Tensor,
    Q: Tensor,
    *,
    tolerance: float,
    iterations: int,
    label: str = "eigen",
) -> tuple[Tensor, Tensor, list[Outcome]]:
    """Eigenbases from the previous ones where they still fit, a full ``eigh`` elsewhere.

    Args:
        F: Symmetric factors ``[B, n, n]``.
        Q: The previous eigenbases ``[B, n, n]`` (orthogonal, same dtype as ``F``).
        tolerance: Largest accepted relative off-diagonal mass, in ``[0, 1]`` (0: a member is
            kept only if ``Q`` diagonalises ``F`` exactly).
        iterations: Orthogonal iterations tried on the members the previous basis misses
            (``>= 0``) before a full ``eigh``.
        label: Name of the decomposition in error messages.

    Returns:
        ``(evals [B, n] clamped at 0, evecs [B, n, n], outcomes)``, contiguous.
    """
    F = symmetrized(F)
    FQ = F @ Q
    ratio, rayleigh = off_diagonal_ratio(F, Q, FQ)
    evals, evecs = rayleigh.clamp_min(0.0), Q.clone()
    ratios = ratio.tolist()
    outcomes: list[Outcome | None] = [
        Outcome(Path.WARM, off_diagonal=r) if r <= tolerance else None for r in ratios
    ]
    todo = [i for i, o in enumerate(outcomes) if o is None]
    for _ in range(iterations):
        if not todo:
            break
        idx = torch.tensor(todo, device=F.device)
        sub, order = FQ[idx], rayleigh[idx].argsort(dim=-1, descending=True)
        try:
            basis = torch.linalg.qr(sub.gather(-1, order[:, None, :].expand_as(sub))).Q
        except (torch.linalg.LinAlgError, RuntimeError):  # left to the full eigh below
            break
        FQ_new = F[idx] @ basis
        ratio_new, rayleigh_new = off_diagonal_ratio(F[idx], basis, FQ_new)
        finite = _finite_members(basis, rayleigh_new)
        keep = [finite[j] and r <= tolerance for j, r in enumerate(ratio_new.tolist())]
        for j, (i, r) in enumerate(zip(todo, ratio_new.tolist())):
            if keep[j]:
                outcomes[i] = Outcome(Path.QR, off_diagonal=r)
        hit = torch.tensor([j for j, k in enumerate(keep) if k], dtype=torch.long)
        miss = torch.tensor([j for j, k in enumerate(keep) if not k], dtype=torch.long)
        hit, miss = hit.to(F.device), miss.to(F.device)
        evals[idx[hit]] = rayleigh_new[hit].clamp_min(0.0)
        evecs[idx[hit]] = basis[hit]
        FQ[idx[miss]], rayleigh[idx[miss]] = FQ_new[miss], rayleigh_new[miss]  # go on from there
        todo = [i for j, i in enumerate(todo) if not keep[j]]
    if todo:
        idx = torch.tensor(todo, device=F.device)
        e, v, full = eigh_batch(F[idx], label)
        evals[idx], evecs[idx] = e, v
        for i, outcome in zip(todo, full):
            outcomes[i] = outcome
    return evals.contiguous(), evecs.contiguous(), [o for o in outcomes if o is not None]


# -------------------------------------------------------------------------------- Cholesky
def cholesky_inverse_batch(F: Tensor, label: str = "cholesky") -> tuple[Tensor, list[Outcome]]:
    """Invert a batch of damped (positive definite) factors, retrying failures in float64.

    Args:
        F: Damped symmetric factors ``[B, n, n]``.
        label: Name of the decomposition in error messages.

    Returns:
        ``(inverses [B, n, n] exactly symmetric, contiguous, outcomes)``; members whose both
        attempts failed hold zeros and ``ok=False``.
    """
    dtype = F.dtype
    out = torch.zeros_like(F)
    outcomes = [Outcome(Path.CHOLESKY) for _ in range(F.shape[0])]
    attempts = [dtype] if dtype == torch.float64 else [dtype, torch.float64]
    todo = list(range(F.shape[0]))
    errors: dict[int, str] = {}
    for k, attempt in enumerate(attempts):
        if not todo:
            break
        idx = torch.tensor(todo, device=F.device)
        sym = symmetrized(F[idx].to(attempt))
        L, info = torch.linalg.cholesky_ex(sym)
        inv = symmetrized(torch.cholesky_inverse(L))
        good = [int(code) == 0 for code in info.tolist()]
        finite = _finite_members(inv)
        still = []
        for j, i in enumerate(todo):
            if good[j] and finite[j]:
                out[i] = inv[j].to(dtype)
                outcomes[i] = Outcome(Path.CHOLESKY, fallback=k > 0, error=errors.get(i))
            else:
                reason = "not positive definite" if not good[j] else "non-finite values"
                errors[i] = f"{label} in {attempt} failed: {reason}"
                still.append(i)
        todo = still
    for i in todo:
        outcomes[i] = Outcome(Path.CHOLESKY, error=errors.get(i), ok=False)
    return out.contiguous(), outcomes
