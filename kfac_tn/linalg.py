r"""Damping and inversion of Kronecker factors, with safeguards.

A Kronecker block approximates the curvature of one layer's (grouped) weight matrix
:math:`W_g \in \mathbb{R}^{d_G \times d_A}` as :math:`A_g \otimes G_g` and preconditions the
gradient matrix :math:`M_g` (same shape as :math:`W_g`) with

* ``"eigen"`` — exact damping of the Kronecker product:
  :math:`(A \otimes G + \delta I)^{-1} \operatorname{vec}(M)
  = \operatorname{vec}\big(V_G [(V_G^\top M V_A) \oslash
  (\lambda_G \lambda_A^\top + \delta)] V_A^\top\big)`
  with :math:`A = V_A \operatorname{diag}(\lambda_A) V_A^\top`,
  :math:`G = V_G \operatorname{diag}(\lambda_G) V_G^\top`;
* ``"cholesky"`` — factored Tikhonov (π-) damping (Martens & Grosse, 2015):
  :math:`(A + \pi \sqrt{\delta} I)^{-1} \otimes (G + \tfrac{\sqrt{\delta}}{\pi} I)^{-1}` with
  :math:`\pi = \sqrt{(\operatorname{tr}(A)/d_A) / (\operatorname{tr}(G)/d_G)}`.

Safeguards: a decomposition that raises or returns non-finite values is retried in float64
(counted as a *fallback*); if that fails too, the caller keeps its last good inverse (counted as
a *failure*). Each function here works on a batch of groups ``[G, d, d]`` at once.

Representation. An inverse is an :class:`EigenInverse` or a :class:`CholeskyInverse` (named
tuples of tensors; the type says how it was computed). In optimizer state and checkpoints it is
stored as a plain list of its tensors plus the :class:`Inversion` value (``weights_only``
checkpoints cannot hold named tuples); :func:`inverse_from_tensors` turns that back into the
named tuple, and :func:`empty_inverse` allocates one to receive a broadcast.

Factored gradients. A layer whose gradient matrix is a sum of few outer products,
:math:`M = \sum_{r=1}^R g_r x_r^\top` (``nn.Linear`` with fewer batch rows than features), is
preconditioned with the Cholesky inverses as :math:`(G^{-1} [g_1 \dots g_R])([x_1 \dots x_R]^\top
A^{-1})`: :math:`R(d_A^2 + d_G^2 + d_G d_A)` multiply-adds instead of :math:`d_G d_A (d_G + d_A)`
(:func:`factored_precondition`). The optimizer takes this path only when
:func:`factored_matches` confirms that the gradient it is given *is* that sum, up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from kfac_tn.enums import Inversion

__all__ = [
    "CholeskyInverse",
    "EigenInverse",
    "Inverse",
    "Inversion",
    "InverseResult",
    "empty_inverse",
    "inverse_from_tensors",
    "inversion_of",
    "eigen_inverse",
    "cholesky_inverse",
    "compute_inverse",
    "factored_matches",
    "factored_pays",
    "factored_precondition",
    "precondition",
    "pi_damping",
    "damped",
    "symmetrized",
]


class EigenInverse(NamedTuple):
    """Eigendecompositions of both factors (damping is applied when preconditioning).

    Attributes:
        evals_a: ``[groups, d_A]``, clamped at 0.
        evecs_a: ``[groups, d_A, d_A]``.
        evals_g: ``[groups, d_G]``, clamped at 0.
        evecs_g: ``[groups, d_G, d_G]``.
    """

    evals_a: Tensor
    evecs_a: Tensor
    evals_g: Tensor
    evecs_g: Tensor


class CholeskyInverse(NamedTuple):
    """Inverses of the π-damped factors, exactly symmetric.

    Attributes:
        a_inv: ``(A + π√δ I)^{-1}``, ``[groups, d_A, d_A]``.
        g_inv: ``(G + √δ/π I)^{-1}``, ``[groups, d_G, d_G]``.
    """

    a_inv: Tensor
    g_inv: Tensor


Inverse = EigenInverse | CholeskyInverse
_TYPES: dict[Inversion, type[EigenInverse] | type[CholeskyInverse]] = {
    Inversion.EIGEN: EigenInverse,
    Inversion.CHOLESKY: CholeskyInverse,
}


def inversion_of(inverse: Inverse) -> Inversion:
    """Return how ``inverse`` was computed."""
    return Inversion.EIGEN if isinstance(inverse, EigenInverse) else Inversion.CHOLESKY


def inverse_from_tensors(tensors: Sequence[Tensor], inversion: Inversion | str) -> Inverse:
    """Rebuild the named tuple from its stored tensors (state dicts keep a plain list).

    Raises:
        ValueError: If the number of tensors does not fit ``inversion``.
    """
    cls = _TYPES[Inversion(inversion)]
    if len(tensors) != len(cls._fields):
        raise ValueError(
            f"Invalid inverse: {len(tensors)} tensors for {Inversion(inversion).value!r} "
            f"(expected {len(cls._fields)}: {', '.join(cls._fields)})"
        )
    return cls(*tensors)


def empty_inverse(
    inversion: Inversion | str,
    groups: int,
    d_a: int,
    d_g: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Inverse:
    """Zero tensors shaped like the inverse of a ``[groups, d_A, d_A] x [groups, d_G, d_G]`` block.

    Used as the receive buffers of a broadcast inverse.
    """
    kw = dict(dtype=dtype, device=device)
    if Inversion(inversion) is Inversion.EIGEN:
        return EigenInverse(
            torch.zeros(groups, d_a, **kw),
            torch.zeros(groups, d_a, d_a, **kw),
            torch.zeros(groups, d_g, **kw),
            torch.zeros(groups, d_g, d_g, **kw),
        )
    return CholeskyInverse(torch.zeros(groups, d_a, d_a, **kw), torch.zeros(groups, d_g, d_g, **kw))


@dataclass
class InverseResult:
    """Outcome of inverting one Kronecker block.

    Attributes:
        tensors: The inverse, or ``None`` when both attempts failed and the caller must keep its
            previous inverse.
        fallback: Whether the first attempt failed and the float64 retry succeeded.
        error: What went wrong in the last failed attempt (``None`` if the first succeeded); the
            caller decides whether and how often to report it (:mod:`kfac_tn.faults`).
    """

    tensors: Inverse | None
    fallback: bool = False
    error: str | None = None


def pi_damping(A: Tensor, G: Tensor) -> Tensor:
    r"""Return the ratio :math:`\pi = \sqrt{(\mathrm{tr} A / d_A) / (\mathrm{tr} G / d_G)}`.

    Args:
        A: Input factors ``[groups, d_A, d_A]``.
        G: Output-gradient factors ``[groups, d_G, d_G]``.

    Returns:
        ``[groups, 1, 1]``; 1 where a trace is not positive.
    """
    tr_a = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1)
    tr_g = torch.diagonal(G, dim1=-2, dim2=-1).mean(-1)
    valid = (tr_a > 0) & (tr_g > 0)
    ratio = torch.where(valid, tr_a / torch.where(valid, tr_g, torch.ones_like(tr_g)), 1.0)
    return ratio.clamp_min(torch.finfo(ratio.dtype).tiny).sqrt()[:, None, None]


def symmetrized(F: Tensor) -> Tensor:
    """``(F + F^T) / 2``, ``[..., d, d]``: exactly symmetric (floating-point addition commutes)."""
    return (F + F.transpose(-2, -1)).mul_(0.5)


def damped(F: Tensor, shift: Tensor | float) -> Tensor:
    """Return ``sym(F) + shift·I`` for ``F: [groups, d, d]`` (``shift``: float, ``[groups, 1, 1]``).

    (The damped factor of :func:`cholesky_inverse`; shared with the batched Cholesky path.)
    """
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    return symmetrized(F) + shift * eye


def _eigh(F: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition with eigenvalues clamped at 0 (factors are PSD)."""
    evals, evecs = torch.linalg.eigh(symmetrized(F))
    return evals.clamp_min(0.0), evecs


def _all_finite(tensors: list[Tensor]) -> bool:
    """One host sync for all tensors of a block (only on inverse-update steps)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def eigen_inverse(A: Tensor, G: Tensor) -> EigenInverse:
    """Eigendecompose both factors.

    Args:
        A: ``[groups, d_A, d_A]``.
        G: ``[groups, d_G, d_G]``.

    Returns:
        The :class:`EigenInverse`, in the dtype of the inputs.

    Raises:
        torch.linalg.LinAlgError: If a decomposition does not converge.
    """
    return EigenInverse(*_eigh(A), *_eigh(G))


def cholesky_inverse(A: Tensor, G: Tensor, damping: float) -> CholeskyInverse:
    """Invert the π-damped factors via Cholesky.

    Args:
        A: ``[groups, d_A, d_A]``.
        G: ``[groups, d_G, d_G]``.
        damping: The damping ``δ > 0`` of the Kronecker product.

    Returns:
        The :class:`CholeskyInverse`, exactly symmetric by construction.

    Raises:
        torch.linalg.LinAlgError: If a damped factor is not positive definite.
    """
    pi = pi_damping(A, G)
    root = damping**0.5
    a_damped = damped(A, pi * root)
    g_damped = damped(G, root / pi)
    return CholeskyInverse(
        symmetrized(torch.cholesky_inverse(torch.linalg.cholesky(a_damped))),
        symmetrized(torch.cholesky_inverse(torch.linalg.cholesky(g_damped))),
    )


def compute_inverse(
    A: Tensor, G: Tensor, *, inversion: Inversion | str, damping: float, dtype: torch.dtype
) -> InverseResult:
    """Invert a Kronecker block in ``dtype``, retrying in float64 on failure.

    The eigendecomposition does not depend on the damping (it is applied in
    :func:`precondition`), so damping changes between inverse updates take effect at once for
    ``"eigen"``; ``"cholesky"`` bakes the damping in.

    Args:
        A: Input factors ``[groups, d_A, d_A]``.
        G: Output-gradient factors ``[groups, d_G, d_G]``.
        inversion: ``"eigen"`` or ``"cholesky"``.
        damping: Damping ``δ`` (used by ``"cholesky"``).
        dtype: Precision of the first attempt and of the returned tensors.

    Returns:
        The :class:`InverseResult`; ``tensors is None`` if both attempts failed.
    """
    inversion = Inversion(inversion)
    attempts = [dtype] if dtype == torch.float64 else [dtype, torch.float64]
    error = None
    for i, attempt_dtype in enumerate(attempts):
        a, g = A.to(attempt_dtype), G.to(attempt_dtype)
        try:
            if inversion is Inversion.EIGEN:
                out = eigen_inverse(a, g)
            else:
                out = cholesky_inverse(a, g, damping)
        except (torch.linalg.LinAlgError, RuntimeError) as err:
            error = f"{inversion.value} in {attempt_dtype} failed: {_first_line(err)}"
            continue
        if not _all_finite(out):
            error = f"{inversion.value} in {attempt_dtype} gave non-finite values"
            continue
        # contiguous: eigh/cholesky_inverse return column-major matrices, and a rank that
        # receives a broadcast inverse holds a contiguous copy; the same layout everywhere keeps
        # data-parallel replicas bitwise identical (matmul round-off depends on the layout)
        tensors = type(out)(*(t.to(dtype).contiguous() for t in out))
        return InverseResult(tensors, fallback=i > 0, error=error)
    return InverseResult(None, error=error)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def precondition(
    M: Tensor, inverse: Inverse, *, damping: float, inversion: Inversion | str | None = None
) -> Tensor:
    r"""Apply the damped inverse Kronecker block to gradient matrices.

    Args:
        M: Gradient matrices ``[groups, d_G, d_A]``.
        inverse: Output of :func:`compute_inverse` for the same block (or its stored tensor
            list, then with ``inversion``).
        damping: Damping ``δ`` (used by ``"eigen"``; ``"cholesky"`` has it baked in).
        inversion: The inversion that produced ``inverse`` (checked if given).

    Returns:
        ``[groups, d_G, d_A]``: :math:`(A \otimes G + \delta I)^{-1}` applied (``"eigen"``) or
        the π-damped Kronecker inverse applied (``"cholesky"``), in ``M``'s dtype.

    Raises:
        ValueError: If ``inversion`` does not match ``inverse``, or is missing for a plain list.
    """
    if not isinstance(inverse, (EigenInverse, CholeskyInverse)):  # stored form: a plain list
        if inversion is None:
            raise ValueError("Invalid inverse: a plain tensor list needs inversion=")
        inverse = inverse_from_tensors(inverse, inversion)
    kind = inversion_of(inverse)
    if inversion is not None and Inversion(inversion) is not kind:
        raise ValueError(f"Invalid inversion: {inversion!r} for an inverse of kind {kind.value!r}")
    dtype = inverse[0].dtype
    m = M.to(dtype)
    if kind is Inversion.EIGEN:
        evals_a, evecs_a, evals_g, evecs_g = inverse
        rotated = evecs_g.transpose(-2, -1) @ m @ evecs_a  # a fresh tensor: divide in place
        denominator = evals_g[:, :, None] * evals_a[:, None, :]
        rotated.div_(denominator.add_(damping))
        out = evecs_g @ rotated @ evecs_a.transpose(-2, -1)
    else:
        a_inv, g_inv = inverse
        out = g_inv @ m @ a_inv
    return out.to(M.dtype)


FACTORED_TOLERANCE = 2.0
r"""Tolerance of :func:`factored_matches`, in units of :math:`\sqrt{R + d_A}\,\varepsilon` times
the magnitude :math:`|g|^\top |x| |z|` of the products (typical rounding of the two ways of
forming :math:`Mz` grows like :math:`\sqrt{R + d_A}`; the worst case is
:math:`2(R + d_A)\varepsilon`). Genuine gradients pass with a wide margin: on 3c3d's two dense
layers (float32, batch 128, 30 steps) the largest residual was 0.028 of the tolerance. A gradient
changed by more than that (weight decay added to the loss, clipping, a second loss term) takes
the dense path; a change below it is below the rounding of the gradient itself."""

FACTORED_PROBES = 2
"""Number of fixed probe vectors ``z`` :func:`factored_matches` compares ``M z`` along."""


def factored_pays(rows: int, d_g: int, d_a: int) -> bool:
    r"""Whether :func:`factored_precondition` needs fewer multiply-adds than the dense product.

    Args:
        rows: Number ``R`` of outer products in the gradient.
        d_g: Rows of the gradient matrix.
        d_a: Its columns.

    Returns:
        ``R (d_A² + d_G² + 2 d_G d_A) < d_G d_A (d_G + d_A)`` (the factored path and its check
        against the dense product). On 3c3d's 1153x512 dense layer at batch 128 the factored
        path takes 7.9 ms with its check against 24 ms (1 thread, AVX-512 CPU).
    """
    return rows * (d_a * d_a + d_g * d_g + 2 * d_g * d_a) < d_g * d_a * (d_g + d_a)


def factored_matches(product: Tensor, g_rows: Tensor, x_rows: Tensor, probes: Tensor) -> Tensor:
    r"""Whether :math:`M z` equals :math:`(\sum_r g_r x_r^\top) z` up to rounding.

    Compares ``product`` :math:`= M z` (the gradient matrix times the probe vectors) with
    :math:`G^\top (X z)` (a few matrix-vector products instead of forming the sum), element by
    element, against :data:`FACTORED_TOLERANCE` times the magnitude :math:`|G|^\top (|X| |z|)`.

    Args:
        product: :math:`M z` ``[d_G, k]``, for the gradient matrix ``M [d_G, d_A]``.
        g_rows: ``G`` ``[R, d_G]``.
        x_rows: ``X`` ``[R, d_A]``.
        probes: ``z`` ``[d_A, k]`` (fixed; same dtype and device as ``M``).

    Returns:
        A 0-dim bool tensor (no host synchronisation); ``False`` if anything is not finite.
    """
    xz = x_rows @ probes
    residual = product - g_rows.T @ xz
    magnitude = g_rows.abs().T @ (x_rows.abs() @ probes.abs())
    eps = torch.finfo(product.dtype).eps
    tol = FACTORED_TOLERANCE * math.sqrt(x_rows.shape[0] + x_rows.shape[1]) * eps
    return (residual.abs() <= tol * magnitude).all()


def factored_precondition(g_rows: Tensor, x_rows: Tensor, inverse: CholeskyInverse) -> Tensor:
    r"""Apply a one-group Cholesky inverse to the gradient :math:`\sum_r g_r x_r^\top`.

    Args:
        g_rows: ``[R, d_G]``.
        x_rows: ``[R, d_A]``.
        inverse: The block's :class:`CholeskyInverse` (one group).

    Returns:
        ``[1, d_G, d_A]``: :math:`(G^{-1} G_{rows}^\top)(X_{rows} A^{-1})`, equal to
        ``precondition(M, inverse)`` for that ``M`` up to rounding, in the inverse's dtype.
    """
    a_inv, g_inv = inverse
    dtype = a_inv.dtype
    left = g_inv[0] @ g_rows.to(dtype).T  # [d_G, R]
    right = x_rows.to(dtype) @ a_inv[0]  # [R, d_A]
    return (left @ right)[None]
