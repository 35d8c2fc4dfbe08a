r"""Scale-and-shift blocks for normalization layers: one 2×2 curvature block per channel.

A normalization layer ends in the affine map :math:`y = \gamma_c \hat x + \beta_c` of its
normalized input :math:`\hat x`, one pair :math:`(\gamma_c, \beta_c)` per channel (per
normalized feature for ``LayerNorm``). With :math:`\hat g` the gradient of the per-sample loss
:math:`\ell_n` w.r.t. the layer output, the per-sample gradients of the pair are

.. math::
    u_{n,c} = \sum_{\text{positions}} \hat g \cdot \hat x, \qquad
    v_{n,c} = \sum_{\text{positions}} \hat g,

and the block is the (exact) per-channel second moment, in the scale convention of
:mod:`kfac_tn.blocks.base` (:math:`L = r \sum_n \ell_n`):

.. math::
    F_c = r \sum_n [u_{n,c}, v_{n,c}]^\top [u_{n,c}, v_{n,c}], \qquad
    \Delta_c = (F_c + \delta I)^{-1} [\nabla_{\gamma_c} L, \nabla_{\beta_c} L]^\top

(1×1 without a bias). In the block template this is a Kronecker block per channel with
``d_G = 2`` (or 1) and ``d_A = 1``: ``G = F`` is a gradient statistic (it follows the Fisher type,
the EMA, accumulation and the distributed average of every ``G``) and ``A = 1``. Modes
(``norm_block``, per layer through ``layer_settings``): ``"unitwise"`` the 2×2 block,
``"diagonal"`` its diagonal (the off-diagonal entries are dropped when inverting), ``"skip"``
no block (momentum SGD, as for any parameter without a block).

* The blocks are always eigendecomposed (exact damping; a batched 2×2 ``eigh``), whatever
  ``inversion`` says, and EKFAC changes nothing for them (the 2×2 block is the exact second
  moment of the per-sample gradients, so its eigenbasis scalings are its eigenvalues).
* :math:`\hat x` is recomputed from the kept layer input in the backward hook (batch statistics
  for ``BatchNorm`` and ``InstanceNorm`` — the statistics used in training mode — per sample
  for ``GroupNorm`` and ``LayerNorm``).
* BatchNorm couples the samples of a batch through its statistics: the gradients reaching the
  layer are sums over samples of per-sample terms, and :math:`\hat g_n` is taken as
  :math:`g_n / r` (the backpropagated gradient at sample ``n``'s output), as for every other
  block. For :math:`\gamma, \beta` themselves the per-sample gradients are exact whenever no
  batch-coupled layer follows; the coupling through later BatchNorm layers is ignored.
* Registered: ``BatchNorm1d/2d/3d``, ``GroupNorm``, ``LayerNorm``, ``InstanceNorm1d/2d/3d``
  with affine parameters. ``SyncBatchNorm`` is not (its batch statistics span the workers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from kfac_tn.blocks.base import KFACApprox, KroneckerBlock, register_block
from kfac_tn.blocks.ekfac import EigenBasis
from kfac_tn.enums import Inversion, NormBlock, Preconditioner

__all__ = ["NormLayerBlock"]

_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


@register_block(*_NORMS)
class NormLayerBlock(KroneckerBlock):
    """Scale and shift of a norm layer: ``groups = γ.numel()``, ``d_G = 2`` (1), ``d_A = 1``."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__(module, name)
        self.groups = module.weight.numel()

    # ------------------------------------------------------------------ settings
    def uses_ekfac(self, preconditioner: Preconditioner | str) -> bool:
        """Never: EKFAC's correction of an exact 2×2 block is the identity."""
        return False

    def inversion_for(self, inversion: Inversion | str) -> Inversion:
        """Return ``"eigen"``, always (exact damping of the 2×2 blocks)."""
        return Inversion.EIGEN

    def skipped(self, norm_block: NormBlock | str) -> bool:
        """Whether ``norm_block`` is ``"skip"``."""
        return NormBlock(norm_block) is NormBlock.SKIP

    def _keeps_input(self, basis: EigenBasis | None) -> bool:
        return True  # x̂ is recomputed from it in the backward hook

    # ------------------------------------------------------------------ statistics
    def _input_factor(self, x: Tensor, output: Tensor, approx: KFACApprox) -> tuple[Tensor, int]:
        ones = x.new_ones(self.groups, 1, 1)
        return ones, self._batched(x).shape[0]

    def _grad_factor(self, g: Tensor, approx: KFACApprox, x: Tensor | None) -> Tensor:
        x, g = self._batched(x), self._batched(g)
        u = self._per_feature(g * self._normalized(x))  # [N, P]
        uu = u.square().sum(0)
        if self.bias is None:
            return uu.reshape(-1, 1, 1)
        v = self._per_feature(g)
        uv, vv = (u * v).sum(0), v.square().sum(0)
        return torch.stack([uu, uv, uv, vv], dim=-1).reshape(-1, 2, 2)  # exactly symmetric

    def inverse_inputs(
        self, state: dict, norm_block: NormBlock | str = NormBlock.UNITWISE
    ) -> tuple[Tensor, Tensor]:
        """Return ``(A, G)``; ``"diagonal"`` drops the off-diagonal of each ``[2, 2]`` ``G``."""
        G = state["G"]
        if NormBlock(norm_block) is NormBlock.DIAGONAL:
            G = torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
        return state["A"], G

    def _batched(self, t: Tensor) -> Tensor:
        """Add the batch dimension to an unbatched input (``InstanceNorm``, ``LayerNorm``)."""
        m = self.module
        if isinstance(m, _InstanceNorm) and t.dim() == m._get_no_batch_dim():
            return t[None]
        if isinstance(m, nn.LayerNorm) and t.dim() == len(m.normalized_shape):
            return t[None]
        return t

    def _per_feature(self, t: Tensor) -> Tensor:
        """Sum over the positions sharing a ``(γ, β)`` pair: ``[N, ...] -> [N, P]``."""
        n = t.shape[0]
        if isinstance(self.module, nn.LayerNorm):
            return t.reshape(n, -1, self.groups).sum(1)
        return t.reshape(n, self.groups, -1).sum(-1)

    def _normalized(self, x: Tensor) -> Tensor:
        """Return the normalized input ``x̂`` (the layer output before its affine map)."""
        m = self.module
        if isinstance(m, _BatchNorm):
            return F.batch_norm(x, None, None, training=True, momentum=0.0, eps=m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, eps=m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, eps=m.eps)
        return F.instance_norm(x, eps=m.eps)

    # ------------------------------------------------------------------ layout
    def _to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return weight.reshape(-1, 1, 1)
        return torch.stack([weight.reshape(-1), bias.reshape(-1)], dim=-1)[..., None]

    def _from_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        shape = self.module.weight.shape
        if self.bias is None:
            return matrix.reshape(shape), None
        return matrix[:, 0, 0].reshape(shape), matrix[:, 1, 0].reshape(shape)
