r"""Kronecker block for ``nn.Linear``.

The input ``x: [N, *shared, D_in]`` may carry extra dimensions between the batch and the feature
dimension (sequence positions, patches, ...); they share the weight and play the role of the
``O`` output positions of a convolution: KFAC-expand averages :math:`u u^\top` over all ``N·O``
rows, KFAC-reduce averages ``u`` over the shared positions first. A 1-d input ``[D_in]`` is one
sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfac_tn import linalg
from kfac_tn.blocks.base import KFACApprox, KroneckerBlock, register_block
from kfac_tn.tn.gram import symmetric_gram

__all__ = ["LinearBlock"]


@register_block(nn.Linear)
class LinearBlock(KroneckerBlock):
    """``nn.Linear``: one group, ``d_A = D_in (+1)``, ``d_G = D_out``."""

    groups = 1
    has_gradient_rows = True

    def _input_factor(self, x: Tensor, output: Tensor, approx: KFACApprox) -> tuple[Tensor, int]:
        if x.dim() == 1:
            x = x[None]
        n = x.shape[0]
        x = x.reshape(n, -1, x.shape[-1])  # [N, O, D_in]
        if approx is KFACApprox.REDUCE:
            x = x.mean(1, keepdim=True)
        rows = x.reshape(-1, x.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        # exactly symmetric; the 1/rows scaling rides on the GEMM (no extra pass over the factor)
        return symmetric_gram(rows.T[None], 1.0 / rows.shape[0]), n

    def _grad_factor(self, g: Tensor, approx: KFACApprox, x: Tensor | None) -> Tensor:
        if g.dim() == 1:
            g = g[None]
        g = g.reshape(g.shape[0], -1, g.shape[-1])  # [N, O, D_out]
        if approx is KFACApprox.REDUCE:
            g = g.sum(1, keepdim=True)
        rows = g.reshape(-1, g.shape[-1])
        return symmetric_gram(rows.T[None])

    def gradient_rows(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(g [N·S, D_out], [x, 1] [N·S, D_in (+1)])``: the weight gradient is ``gᵀ [x, 1]``.

        ``None`` when the factored form would not pay (:func:`kfac_tn.linalg.factored_pays`).
        """
        g_rows = self._grad_rows(g).reshape(-1, g.shape[-1])
        d_a = x.shape[-1] + (self.bias is not None)
        if not linalg.factored_pays(g_rows.shape[0], g_rows.shape[1], d_a):
            return None
        return g_rows, self._columns(x, g).reshape(-1, d_a)

    def gradient_times(self, grads: list[Tensor], z: Tensor) -> Tensor:
        """``[∇W, ∇b] z`` without forming the concatenated matrix."""
        if len(grads) == 1:
            return grads[0] @ z
        return torch.addmm(grads[1][:, None] * z[-1:], grads[0], z[:-1])

    # per-sample parts (EKFAC): shared dimensions are the positions S
    def _columns(self, x: Tensor, g: Tensor) -> Tensor:
        rows = _rows(x)
        if self.bias is None:
            return rows
        return torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)

    def _grad_rows(self, g: Tensor) -> Tensor:
        return _rows(g)

    def _grad_from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        return rows.reshape(like.shape)

    def _per_sample_grads(self, x: Tensor, g: Tensor) -> Tensor:
        return _rows(g).transpose(-2, -1) @ self._columns(x, g)  # [N, 1, D_out, D_in (+1)]

    def _to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return weight[None]
        return torch.cat([weight, bias[:, None]], dim=1)[None]

    def _from_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        matrix = matrix[0]
        if self.bias is None:
            return matrix, None
        return matrix[:, :-1], matrix[:, -1]


def _rows(t: Tensor) -> Tensor:
    """``[N, *shared, D] -> [N, 1, S, D]`` (a 1-d input is one sample)."""
    if t.dim() == 1:
        t = t[None]
    return t.reshape(t.shape[0], 1, -1, t.shape[-1])
