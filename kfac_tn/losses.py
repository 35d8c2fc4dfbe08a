r"""Loss-side pieces of the Fisher approximations: reduction scale and sampled output gradients.

For a model output ``f: [N, *]`` and the per-sample loss :math:`\ell_n`, the Fisher / GGN of the
loss w.r.t. ``f_n`` is :math:`\mathbb{E}_{\hat y \sim p(\cdot|f_n)}[\hat g \hat g^\top]` with
:math:`\hat g = \nabla_{f_n} \ell_n(f_n, \hat y)`, and equals the loss Hessian :math:`H_n` for
both supported losses:

* ``cross_entropy`` (``f: [N, C]`` logits, :math:`p = \mathrm{softmax}(f_n)`):
  :math:`\hat g = p - e_{\hat y}`, :math:`\hat y \sim \mathrm{Cat}(p)`;
  :math:`H_n = \mathrm{diag}(p) - p p^\top = \sum_c s_c s_c^\top` with
  :math:`s_c = \sqrt{p_c}(e_c - p)` (type-2 columns).
* ``mse`` (:math:`\ell_n = \sum_j (f_{n,j} - y_{n,j})^2`, torch's ``mse_loss`` up to its reduction):
  :math:`\hat g = \sqrt{2}\,\varepsilon` with :math:`\varepsilon \sim \mathcal{N}(0, I)`;
  :math:`H_n = 2 I = \sum_j (\sqrt2 e_j)(\sqrt2 e_j)^\top`.

The generators below yield these vectors for the whole batch, one backward pass each: Monte-Carlo
samples (``"mc"``) or the columns of the Hessian square root (``"type2"``, ``C`` backward passes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kfac_tn.enums import FisherType, LossReduction, LossType

__all__ = [
    "FisherType",
    "LossReduction",
    "LossType",
    "hessian_quadratic",
    "hessian_traces",
    "loss_value",
    "output_gradients",
    "recovered_targets",
    "reduction_scale",
]


def reduction_scale(
    loss: LossType, reduction: LossReduction, samples: int, entries_per_sample: int | None
) -> float:
    r"""Return the factor ``r`` in :math:`L = r \sum_n \ell_n`.

    Args:
        loss: The loss function.
        reduction: ``"mean"`` or ``"sum"``.
        samples: Number of samples ``N`` the statistics cover.
        entries_per_sample: Output entries per sample (needed for ``mse`` with ``"mean"``,
            which torch averages over all entries).

    Returns:
        ``1/N`` (cross-entropy, mean), ``1/(N·C)`` (MSE, mean) or ``1`` (sum).

    Raises:
        ValueError: If ``mse``/``"mean"`` is requested without ``entries_per_sample``.
    """
    if reduction is LossReduction.SUM:
        return 1.0
    if loss is LossType.CROSS_ENTROPY:
        return 1.0 / samples
    if entries_per_sample is None:
        raise ValueError(
            "Invalid model output for loss='mse' with loss_reduction='mean': the optimizer needs a "
            "tensor model output to know the number of entries per sample"
        )
    return 1.0 / (samples * entries_per_sample)


def output_gradients(
    output: Tensor, loss: LossType, fisher: FisherType, mc_samples: int
) -> Iterator[Tensor]:
    """Yield per-sample-loss output gradients, one batch tensor per backward pass.

    Args:
        output: Model output, ``[N, C]`` logits for cross-entropy, ``[N, *]`` for MSE. Only its
            values are used (detached).
        loss: The loss function.
        fisher: ``"mc"`` (``mc_samples`` draws) or ``"type2"`` (Hessian square-root columns).
        mc_samples: Number of Monte-Carlo draws.

    Yields:
        Tensors shaped and typed like ``output``.

    Raises:
        ValueError: If the output shape does not suit the loss, or ``fisher`` is ``"empirical"``.
    """
    if fisher is FisherType.EMPIRICAL:
        raise ValueError("Invalid fisher_type: 'empirical' uses the real loss's gradients")
    f = output.detach()
    if loss is LossType.CROSS_ENTROPY:
        if f.dim() != 2:
            raise ValueError(
                f"Invalid model output shape {tuple(f.shape)} for loss='cross_entropy' with "
                f"fisher_type='{fisher.value}' (expected [batch, classes] logits)"
            )
        p = torch.softmax(f.to(torch.promote_types(f.dtype, torch.float32)), dim=1)
        if fisher is FisherType.MC:
            for _ in range(mc_samples):
                y = torch.multinomial(p, 1).squeeze(1)
                g = p.clone()
                g[torch.arange(p.shape[0], device=p.device), y] -= 1.0
                yield g.to(f.dtype)
        else:
            root = p.sqrt()
            for c in range(p.shape[1]):
                g = -p * root[:, c : c + 1]
                g[:, c] += root[:, c]
                yield g.to(f.dtype)
        return
    # mse
    if f.dim() < 1:
        raise ValueError(f"Invalid model output shape {tuple(f.shape)} for loss='mse'")
    if fisher is FisherType.MC:
        for _ in range(mc_samples):
            yield (2.0**0.5) * torch.randn_like(f)
    else:
        flat = f.reshape(f.shape[0], -1)
        for j in range(flat.shape[1]):
            g = torch.zeros_like(flat)
            g[:, j] = 2.0**0.5
            yield g.reshape(f.shape)


def recovered_targets(output: Tensor, output_grad: Tensor, loss: LossType, r: float) -> Tensor:
    r"""Recover the targets that, with ``output``, give the gradient ``output_grad`` of :math:`L`.

    With :math:`L = r \sum_n \ell_n`: cross-entropy has
    :math:`\partial L / \partial f_n = r(\mathrm{softmax}(f_n) - y_n)`, so
    :math:`y_n = \mathrm{softmax}(f_n) - g_n / r` (soft targets; one-hot labels and label
    smoothing are special cases); MSE has :math:`\partial L / \partial f = 2r(f - y)`, so
    :math:`y = f - g / (2r)`. This lets the optimizer re-evaluate the loss of a batch at other
    parameters without the user's loss function (used by the damping adaptation).

    Args:
        output: Model output ``[N, C]`` (cross-entropy) or ``[N, *]`` (MSE), detached.
        output_grad: Gradient of the loss w.r.t. ``output`` (same shape; unscaled).
        loss: The loss function.
        r: The reduction scale (:func:`reduction_scale` over the whole step's samples).

    Returns:
        Targets shaped like ``output``, in float64.
    """
    f, g = output.detach().double(), output_grad.detach().double()
    if loss is LossType.CROSS_ENTROPY:
        return torch.softmax(f, dim=-1) - g / r
    return f - g / (2.0 * r)


def loss_value(
    output: Tensor, targets: Tensor, loss: LossType, r: float, weight: Tensor | None = None
) -> Tensor:
    r"""Return :math:`r \sum_n w_n \ell_n(f_n, y_n)` in float64 (soft-target CE or squared error).

    Args:
        output: Model output ``[N, C]`` / ``[N, *]``.
        targets: Targets shaped like ``output`` (e.g. from :func:`recovered_targets`).
        loss: The loss function.
        r: The reduction scale.
        weight: Per-sample weights :math:`w_n` ``[N]`` (``None``: all 1).

    Returns:
        A float64 scalar tensor.
    """
    f = output.detach().double()
    if loss is LossType.CROSS_ENTROPY:
        terms = -targets * torch.log_softmax(f, dim=-1)
    else:
        terms = (f - targets).square()
    if weight is None:
        return r * terms.sum()
    per_sample = terms.reshape(terms.shape[0], -1).sum(1)
    return r * (weight.to(per_sample) * per_sample).sum()


def hessian_quadratic(output: Tensor, v: Tensor, loss: LossType, r: float) -> Tensor:
    r"""Return :math:`v^\top H v`, :math:`H` the Hessian of :math:`L = r\sum_n \ell_n` in ``f``.

    Cross-entropy: :math:`r \sum_n (\sum_c p_{n,c} v_{n,c}^2 - (\sum_c p_{n,c} v_{n,c})^2)`,
    :math:`p_n = \mathrm{softmax}(f_n)`; MSE: :math:`2 r \lVert v \rVert^2`. With :math:`v = J
    \Delta` this is the GGN quadratic form :math:`\Delta^\top G \Delta`.

    Args:
        output: Model output (only cross-entropy uses its values).
        v: A tangent of the output, same shape.
        loss: The loss function.
        r: The reduction scale.

    Returns:
        A float64 scalar tensor (``>= 0``).
    """
    v = v.detach().double()
    if loss is LossType.CROSS_ENTROPY:
        p = torch.softmax(output.detach().double(), dim=-1)
        pv = (p * v).sum(-1)
        return r * ((p * v.square()).sum() - pv.square().sum())
    return 2.0 * r * v.square().sum()


def hessian_traces(output: Tensor, loss: LossType) -> Tensor:
    r"""Per-sample trace of the loss Hessian in the output, up to a factor common to all samples.

    Cross-entropy: :math:`\operatorname{tr} H_n / r = \sum (1 - \lVert p \rVert^2)` over the
    sample's output positions (:math:`p = \mathrm{softmax}` over the last dimension; near 0 for
    a confident prediction, so it says which samples carry the curvature); MSE: the sample's
    output entries (:math:`\operatorname{tr} H_n / (2r)`, the same for every sample).

    Args:
        output: Model output ``[N, ..., C]`` (detached; a 0-d output is one sample).
        loss: The loss function.

    Returns:
        ``[N]`` float64, ``>= 0``.
    """
    f = output.detach().double().reshape(1, -1) if output.dim() == 0 else output.detach().double()
    if loss is LossType.CROSS_ENTROPY:
        p = torch.softmax(f, dim=-1)
        per_position = 1.0 - p.square().sum(-1)
        return per_position.reshape(f.shape[0], -1).sum(1).clamp_min(0.0)
    return torch.full((f.shape[0],), float(f[0].numel()), dtype=torch.float64, device=f.device)
