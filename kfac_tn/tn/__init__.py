"""Tensor-network engine: convolution routines as simplified, cached einsum contractions.

Pure functions on tensors, no ``nn.Module``.
"""

from kfac_tn.tn.kfac import (
    grad_expand_factor,
    grad_reduce_factor,
    kfac_expand_factor,
    kfac_reduce_factor,
)
from kfac_tn.tn.patterns import index_pattern
from kfac_tn.tn.spec import ConvSpec, DimCategory, DimSpec, conv_spec, conv_transpose_spec

__all__ = [
    "ConvSpec",
    "DimCategory",
    "DimSpec",
    "conv_spec",
    "conv_transpose_spec",
    "grad_expand_factor",
    "grad_reduce_factor",
    "index_pattern",
    "kfac_expand_factor",
    "kfac_reduce_factor",
]
