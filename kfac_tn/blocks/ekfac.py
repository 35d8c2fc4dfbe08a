r"""Eigenvalue-corrected KFAC (EKFAC, George et al., NeurIPS 2018): scalings in the eigenbasis.

A Kronecker block with factors :math:`A = Q_A \Lambda_A Q_A^\top`, :math:`G = Q_G \Lambda_G
Q_G^\top` approximates the curvature of the loss :math:`L = r \sum_n \ell_n` in the Kronecker
eigenbasis :math:`Q_A \otimes Q_G` by the diagonal :math:`\lambda_G \lambda_A^\top`. EKFAC keeps
the basis and re-estimates the diagonal from per-sample gradients :math:`M_n` of
:math:`\ell_n` in the block's matrix layout ``[groups, d_G, d_A]`` (bias column included):

.. math::
    s = r \sum_n \big(Q_G^\top M_n Q_A\big)^{\odot 2}, \qquad
    \Delta = Q_G \big[(Q_G^\top M Q_A) \oslash (s + \delta)\big] Q_A^\top,

with damping :math:`\delta` and the (mini-batch) gradient :math:`M`. ``s`` is the second
moment of the per-sample gradients in the eigenbasis, the best diagonal there (George et al.).

Weight sharing. :math:`M_n = \sum_o \hat g_{n,o} u_{n,o}^\top` is the true per-sample gradient,
summed over the positions that share the weight (see :mod:`kfac_tn.tn.per_sample`), for
KFAC-expand and KFAC-reduce alike: ``kfac_approx`` only chooses the basis (as in curvlinops'
``EKFACLinearOperator``).

Schedule (the optimizer's). The scalings are captured on factor-update steps during the
backward pass, in the basis of the last inverse update (the capture plan carries it, so no
statistic waits for the step), and folded into an EMA with ``factor_decay``; the basis is
refreshed on inverse updates. A refresh carries the EMA over: the old EKFAC curvature
:math:`(Q^{old}) \operatorname{diag}(s) (Q^{old})^\top`, restricted to the diagonal of the new
basis, is :math:`(R_G \odot R_G)\, s\, (R_A \odot R_A)^\top` with :math:`R = Q^{new\top}
Q^{old}` (:func:`rotate_scalings`; exact when the basis only permutes or flips). Before the
first captured scalings — right after the first inverse update, or after the factors were
reset — the scalings are the Kronecker eigenvalues :math:`\lambda_G \lambda_A^\top`
(:func:`kronecker_scalings`, so that step is a KFAC step) and the first captured batch replaces
them (as the first batch replaces the factors).

Degenerate eigenspaces. Where a factor has a repeated eigenvalue that the per-sample gradients
reach — rank-deficient factors (fewer samples than ``d_A`` since the EMA started), symmetric
layers (a transposed convolution with ``kernel_size == stride`` sees every input once per tap,
so its input factor has the same block for every tap: repeated eigenvalues), a vanishing
KFAC-reduce gradient factor (a convolution followed by a per-channel normalization) — the
eigenbasis inside that space is arbitrary, and so are the scalings there: two runs that differ
by round-off may precondition those directions differently. This holds for every EKFAC
implementation; the damping bounds the effect.

Cost of the statistic, per sample with ``S`` shared positions (:func:`scaling_paths` picks the
cheaper side for each rotation): the per-sample gradients ``S·d_G·d_A``, the left rotation
``min(S·d_G², d_G²·d_A)`` (on the output gradients or on ``M_n``) and the right rotation
``min(S·d_A², d_G·d_A²)`` (on the unfolded input or on ``M_n``). Without sharing (``S = 1``)
:math:`s = r \sum_n (Q_G^\top g_n)^2 \big((Q_A^\top u_n)^2\big)^\top` needs no per-sample
gradient at all. Samples are processed in chunks so that the per-sample tensors of one chunk
stay below a byte budget; the full ``[N, d_G, d_A]`` is never built for large layers. The
Monte-Carlo and type-2 Fisher compute the statistic once per backward pass (``mc_samples`` or
``C`` times).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "EigenBasis",
    "PerSampleLayer",
    "ekfac_precondition",
    "kronecker_scalings",
    "rotate_scalings",
    "scaling_paths",
    "scalings",
]

EigenBasis = tuple[Tensor, Tensor]
"""``(Q_A [groups, d_A, d_A], Q_G [groups, d_G, d_G])``, the eigenvectors of a block's factors."""


class PerSampleLayer(Protocol):
    """What :func:`scalings` needs of a block (all tensors in the factor dtype, batched)."""

    def _columns(self, x: Tensor, g: Tensor) -> Tensor:
        """Unfolded, bias-augmented inputs ``[N, groups, S, d_A]``."""

    def _grad_rows(self, g: Tensor) -> Tensor:
        """Output gradients as rows ``[N, groups, S, d_G]``."""

    def _grad_from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        """Invert :meth:`_grad_rows`: rows back into the layout of ``like``."""

    def _per_sample_grads(self, x: Tensor, g: Tensor) -> Tensor:
        """Per-sample gradients ``[N, groups, d_G, d_A]`` (bias column included)."""


def scaling_paths(positions: int, d_g: int, d_a: int) -> tuple[bool, bool]:
    """Where to rotate: ``(left_early, right_early)``.

    ``left_early``: rotate the output gradients (``S·d_G²`` per sample) rather than ``M_n``
    (``d_G²·d_A``); ``right_early``: rotate the unfolded input (``S·d_A²``) rather than ``M_n``
    (``d_G·d_A²``).

    Args:
        positions: Shared positions per sample ``S``.
        d_g: Rows of the block matrix.
        d_a: Columns of the block matrix.

    Returns:
        The two choices.
    """
    return positions < d_a, positions < d_g


def chunk_size(
    samples: int, positions: int, d_g: int, d_a: int, groups: int, itemsize: int, budget: int
) -> int:
    """Count the samples per chunk that keep one chunk's per-sample tensors below ``budget``.

    Args:
        samples: Samples ``N``.
        positions: Shared positions per sample ``S``.
        d_g: Rows of the block matrix.
        d_a: Columns of the block matrix.
        groups: Channel groups.
        itemsize: Bytes per entry.
        budget: Byte budget.

    Returns:
        An int in ``[1, samples]``.
    """
    per_sample = itemsize * groups * (2 * d_g * d_a + 2 * positions * (d_a + d_g))
    return max(1, min(samples, budget // max(per_sample, 1)))


def scalings(layer: PerSampleLayer, x: Tensor, g: Tensor, basis: EigenBasis, budget: int) -> Tensor:
    r"""Unscaled EKFAC statistic :math:`\sum_n (Q_G^\top M_n Q_A)^2` of one backward pass.

    ``M_n`` are the per-sample gradients of whatever loss ``g`` is the output gradient of (the
    caller applies the scale ``r``, as for the factor ``G``).

    Args:
        layer: The block (see :class:`PerSampleLayer`).
        x: Layer input, batched (factor dtype).
        g: Gradient w.r.t. the layer output, batched (factor dtype).
        basis: ``(Q_A, Q_G)``.
        budget: Bytes of per-sample tensors per chunk of samples.

    Returns:
        ``[groups, d_G, d_A]``.
    """
    q_a, q_g = (q.to(g.dtype) for q in basis)
    rows = layer._grad_rows(g)  # [N, G, S, d_G] (a view where possible)
    n, groups, positions, d_g = rows.shape
    d_a = q_a.shape[-1]
    if positions == 1:  # no sharing: M_n has rank one, its square is an outer product
        g_rot = (rows @ q_g).square_()
        u_rot = (layer._columns(x, g) @ q_a).square_()
        return torch.einsum("ngsi,ngsj->gij", g_rot, u_rot)
    left_early, right_early = scaling_paths(positions, d_g, d_a)
    step = chunk_size(n, positions, d_g, d_a, groups, g.element_size(), budget)
    total = g.new_zeros(groups, d_g, d_a)
    for start in range(0, n, step):
        xc, gc = x[start : start + step], g[start : start + step]
        r = layer._grad_rows(gc)
        if left_early:
            r = r @ q_g
        if right_early:
            m = r.transpose(-2, -1) @ (layer._columns(xc, gc) @ q_a)
        else:
            m = layer._per_sample_grads(xc, layer._grad_from_rows(r, gc)) @ q_a
        if not left_early:
            m = q_g.transpose(-2, -1) @ m
        total += m.square_().sum(0)
    return total


def kronecker_scalings(evals_a: Tensor, evals_g: Tensor) -> Tensor:
    r"""KFAC's diagonal in its eigenbasis, :math:`\lambda_G \lambda_A^\top`.

    Args:
        evals_a: ``[groups, d_A]``.
        evals_g: ``[groups, d_G]``.

    Returns:
        ``[groups, d_G, d_A]``.
    """
    return evals_g[:, :, None] * evals_a[:, None, :]


def rotate_scalings(s: Tensor, old: EigenBasis, new: EigenBasis) -> Tensor:
    r"""Diagonal in the ``new`` basis of the EKFAC curvature with scalings ``s`` in ``old``.

    :math:`(R_G \odot R_G)\, s\, (R_A \odot R_A)^\top` with :math:`R = Q^{new\top} Q^{old}`
    (module docstring).

    Args:
        s: Scalings ``[groups, d_G, d_A]`` in the ``old`` basis.
        old: ``(Q_A, Q_G)`` that ``s`` belongs to.
        new: The new ``(Q_A, Q_G)``.

    Returns:
        ``[groups, d_G, d_A]``, in the dtype of ``new``.
    """
    (old_a, old_g), (new_a, new_g) = old, new
    r_a = (new_a.transpose(-2, -1) @ old_a.to(new_a.dtype)).square_()
    r_g = (new_g.transpose(-2, -1) @ old_g.to(new_g.dtype)).square_()
    return r_g @ s.to(new_a.dtype) @ r_a.transpose(-2, -1)


def ekfac_precondition(M: Tensor, basis: EigenBasis, s: Tensor, *, damping: float) -> Tensor:
    r"""Apply :math:`Q_G [(Q_G^\top M Q_A) \oslash (s + \delta)] Q_A^\top`.

    Args:
        M: Gradient matrices ``[groups, d_G, d_A]``.
        basis: ``(Q_A, Q_G)``.
        s: Scalings ``[groups, d_G, d_A]``.
        damping: Damping ``δ``.

    Returns:
        ``[groups, d_G, d_A]`` in ``M``'s dtype (computed in the basis' dtype).
    """
    q_a, q_g = basis
    m = M.to(q_a.dtype)
    rotated = q_g.transpose(-2, -1) @ m @ q_a  # a fresh tensor: divide in place
    rotated.div_(s.to(q_a.dtype) + damping)
    return (q_g @ rotated @ q_a.transpose(-2, -1)).to(M.dtype)
