"""Kronecker-factored curvature blocks, one class per layer kind, and a ``type -> block`` registry.

Registered: ``nn.Linear`` (:class:`LinearBlock`), ``nn.Conv1d/2d/3d`` (:class:`ConvBlock`),
``nn.ConvTranspose1d/2d/3d`` (:class:`ConvTransposeBlock`), and the scale and shift of
``nn.BatchNorm1d/2d/3d``, ``nn.GroupNorm``, ``nn.LayerNorm``, ``nn.InstanceNorm1d/2d/3d``
(:class:`NormLayerBlock`, 2×2 per channel; see :mod:`.norm`). Register more with
:func:`register_block`. EKFAC (rescaling in the Kronecker eigenbasis): :mod:`.ekfac`.
Parameters of other modules (embeddings, ...) are not preconditioned; the optimizer trains them
with its plain momentum-SGD update.
"""

from kfac_tn.blocks.base import (
    STATISTICS,
    EigenBasis,
    Forward,
    KFACApprox,
    KroneckerBlock,
    block_class_for,
    register_block,
    registered_types,
)
from kfac_tn.blocks.conv import ConvBlock, ConvTransposeBlock
from kfac_tn.blocks.linear import LinearBlock
from kfac_tn.blocks.norm import NormLayerBlock

__all__ = [
    "STATISTICS",
    "ConvBlock",
    "EigenBasis",
    "Forward",
    "ConvTransposeBlock",
    "KFACApprox",
    "KroneckerBlock",
    "LinearBlock",
    "NormLayerBlock",
    "block_class_for",
    "register_block",
    "registered_types",
]
