"""Tensor-network engine: convolution routines as simplified, cached einsum contractions.

Pure functions on tensors (no ``nn.Module``), N-d (N = 1, 2, 3 and beyond), with batch,
channel groups, stride, padding (int, tuple, (left, right) pairs, ``'same'``, ``'valid'``),
dilation, bias and output padding.  Every routine takes ``impl=``:

* ``"tn"``: the plain tensor network (data operands and index patterns Π) contracted along a
  cached opt_einsum path (see :func:`symbolic` for the network of any call);
* ``"tn_simplified"``: the simplified network: Π contractions become strided views of the
  padded input (dense dimensions reshapes, down-sampling dimensions strided slices, others
  overlapping strided windows), KFAC-reduce sums each Π over its private output leg first;
* ``"standard"``: torch's own kernels, or unfold followed by matmul / mean (curvlinops,
  BackPACK);
* ``"auto"`` (default): the faster of these per call shape (never torch's kernel's loser).

Routines::

    conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
    conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1)
    unfold(x, kernel_size, dilation=1, padding=0, stride=1)                -> [N, C·ΠK, ΠO]
    fold(cols, output_size, kernel_size, dilation=1, padding=0, stride=1)  -> [N, C, *I]
    unfold_transpose(x, kernel_size, stride=1, padding=0, output_padding=0, dilation=1)
    kernel_unfold(weight, input_size, stride=1, padding=0, dilation=1, groups=1)
    conv_input_vjp(v, weight, input_size, stride=1, padding=0, dilation=1, groups=1)
    conv_weight_vjp(x, v, kernel_size, stride=1, padding=0, dilation=1, groups=1)
    per_sample_weight_grad(x, v, kernel_size, stride=1, padding=0, dilation=1, groups=1, *,
                           transpose=False, output_padding=0)   -> [N, *weight.shape]
    conv_input_jvp(x_dot, weight, stride=1, padding=0, dilation=1, groups=1)
    conv_weight_jvp(x, weight_dot, stride=1, padding=0, dilation=1, groups=1)
    kfac_expand_factor(x, kernel_size, stride=1, padding=0, dilation=1, groups=1, *, bias=False,
                       transpose=False, output_padding=0)                  -> [G, D(+1), D(+1)]
    kfac_reduce_factor(...same...)
    grad_expand_factor(g, groups=1), grad_reduce_factor(g, groups=1)      -> [G, C/G, C/G]
    ggn_diagonal(x, s, kernel_size, stride=1, padding=0, dilation=1, groups=1)
    hessian_diagonal(x, weight, h, stride=1, padding=0, dilation=1, groups=1)
    symbolic(routine, *args, simplify=False, **kwargs) -> Expression (equation, operands, shape)

``symbolic`` shows the plain network of any call (``impl="tn"`` contracts exactly that) or,
with ``simplify=True``, the simplified one (:mod:`kfac_tn.tn.simplify`: Π replaced by strided
windows / ``Π̄`` / place / fold transforms, size-1 legs squeezed, parallel legs merged).
Plans are cached per shapes and hyperparameters (spec, expressions, index patterns, opt_einsum
paths, ``auto`` choices; all ``functools.lru_cache``), so a repeated call re-plans nothing.
:func:`choose_impl` exposes the ``auto`` cost model of the KFAC factors and
:func:`expand_strategy` the simplified KFAC-expand strategy (one Gram GEMM, or the lag products
of stride-1 convolutions, :mod:`kfac_tn.tn.lag`).

Modules, from the ground up (each imports only modules of the rows above it)::

    spec, einsum, gram        hyperparameters; named-index einsum; exactly symmetric Grams
    patterns, views, _common  Π tensors; strided views / writes; argument checks, index names
    expressions               Expression, evaluate (impl="tn"), routine_expression (cache)
    networks, lag             the plain network of every routine; lag products (KFAC-expand)
    simplify                  Simplification rules: the simplified networks (inspection)
    convolution, unfolding    routines; unfolding also owns the standard unfold
    derivatives, cost         VJPs / JVPs; cost models of impl="auto" and the expand strategy
    kfac, diagonal, sampled   KFAC factors; curvature diagonals; sampled weight VJPs
    per_sample                per-sample weight gradients (EKFAC)
    symbolic                  REGISTRY (one Routine record per routine) and symbolic()
"""

from kfac_tn.tn._common import IMPLS
from kfac_tn.tn.convolution import conv, conv_transpose, kernel_unfold
from kfac_tn.tn.cost import choose_impl, expand_strategy
from kfac_tn.tn.derivatives import conv_input_jvp, conv_input_vjp, conv_weight_jvp, conv_weight_vjp
from kfac_tn.tn.diagonal import ggn_diagonal, hessian_diagonal
from kfac_tn.tn.expressions import Expression
from kfac_tn.tn.kfac import (
    grad_expand_factor,
    grad_reduce_factor,
    kfac_expand_factor,
    kfac_expand_work,
    kfac_reduce_factor,
)
from kfac_tn.tn.patterns import index_pattern
from kfac_tn.tn.per_sample import per_sample_weight_grad
from kfac_tn.tn.sampled import sampled_conv_weight_vjp
from kfac_tn.tn.spec import ConvSpec, DimCategory, DimSpec, conv_spec, conv_transpose_spec
from kfac_tn.tn.symbolic import ROUTINES, symbolic
from kfac_tn.tn.unfolding import fold, unfold, unfold_transpose

__all__ = [
    "sampled_conv_weight_vjp",
    "IMPLS",
    "ROUTINES",
    "ConvSpec",
    "DimCategory",
    "DimSpec",
    "Expression",
    "choose_impl",
    "conv",
    "conv_input_jvp",
    "conv_input_vjp",
    "conv_spec",
    "conv_transpose",
    "conv_transpose_spec",
    "conv_weight_jvp",
    "conv_weight_vjp",
    "expand_strategy",
    "fold",
    "ggn_diagonal",
    "grad_expand_factor",
    "grad_reduce_factor",
    "hessian_diagonal",
    "index_pattern",
    "kernel_unfold",
    "kfac_expand_factor",
    "kfac_expand_work",
    "kfac_reduce_factor",
    "per_sample_weight_grad",
    "symbolic",
    "unfold",
    "unfold_transpose",
]
