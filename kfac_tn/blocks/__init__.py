"""Kronecker-factored curvature blocks, one class per layer kind, and a ``type -> block`` registry.

Registered: ``nn.Linear`` (:class:`LinearBlock`), ``nn.Conv1d/2d/3d`` (:class:`ConvBlock`),
``nn.ConvTranspose1d/2d/3d`` (:class:`ConvTransposeBlock`). Register more with
:func:`register_block`. Parameters of other modules (norm layers, embeddings, ...) are not
preconditioned; the optimizer trains them with its plain momentum-SGD update.
"""

from kfac_tn.blocks.base import (
    KFACApprox,
    KroneckerBlock,
    block_class_for,
    register_block,
    registered_types,
)
from kfac_tn.blocks.conv import ConvBlock, ConvTransposeBlock
from kfac_tn.blocks.linear import LinearBlock

__all__ = [
    "ConvBlock",
    "ConvTransposeBlock",
    "KFACApprox",
    "KroneckerBlock",
    "LinearBlock",
    "block_class_for",
    "register_block",
    "registered_types",
]
