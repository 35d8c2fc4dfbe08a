r"""Kronecker blocks for ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``.

Grouped convolutions (including depthwise ones, ``groups == C_in``) are block diagonal in the
exact curvature; the blocks keep one pair of factors per group,
``A: [G, C_in/G·ΠK (+1), C_in/G·ΠK (+1)]`` and ``G: [G, C_out/G, C_out/G]`` (not the coarser
"average the inputs over groups" approximation of other libraries). Input factors come from the
tensor-network engine :mod:`kfac_tn.tn` (KFAC-expand = KFC, or KFAC-reduce).

Every hyperparameter is honoured: stride, padding (ints, ``'same'``, ``'valid'``), dilation,
groups, bias, and ``padding_mode`` other than ``'zeros'`` (the captured input is padded with the
layer's own mode — exactly what the layer convolves — and the factor uses padding 0). For a
transposed convolution the output padding is read off the actual output shape, so
``forward(x, output_size=...)`` is handled too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tn import tn
from kfac_tn.blocks.base import KFACApprox, KroneckerBlock, register_block

__all__ = ["ConvBlock", "ConvTransposeBlock"]


def _batched(t: Tensor, spatial_dims: int) -> Tensor:
    """Add the batch dimension to an unbatched ``[C, *spatial]`` tensor."""
    return t[None] if t.dim() == spatial_dims + 1 else t


class _ConvBase(KroneckerBlock):
    """Shared parts of the convolution blocks."""

    def __init__(self, module: nn.modules.conv._ConvNd, name: str) -> None:
        super().__init__(module, name)
        self.groups = module.groups
        self.spatial_dims = len(module.kernel_size)

    def _grad_factor(self, g: Tensor, approx: KFACApprox, x: Tensor | None) -> Tensor:
        g = _batched(g, self.spatial_dims)
        if approx is KFACApprox.REDUCE:
            return tn.grad_reduce_factor(g, self.groups)
        return tn.grad_expand_factor(g, self.groups)

    def _bias_matrix(self, bias: Tensor) -> Tensor:
        return bias.reshape(self.groups, -1, 1)

    # per-sample parts (EKFAC): output positions of the layer are the positions S
    def _grad_rows(self, g: Tensor) -> Tensor:
        g = _batched(g, self.spatial_dims)
        return g.reshape(g.shape[0], self.groups, g.shape[1] // self.groups, -1).transpose(2, 3)

    def _grad_from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        return rows.transpose(2, 3).reshape(_batched(like, self.spatial_dims).shape)

    def _with_bias(self, per_sample: Tensor, g: Tensor) -> Tensor:
        """Append the per-sample bias gradients ``Σ_o g`` to ``[N, G, d_G, d]`` matrices."""
        if self.bias is None:
            return per_sample
        n, c = g.shape[:2]
        bias = g.reshape(n, self.groups, c // self.groups, -1).sum(-1, keepdim=True)
        return torch.cat([per_sample, bias], dim=-1)

    def _grouped_columns(self, u: Tensor) -> Tensor:
        """``[N, C·ΠK, S]`` unfolded input -> ``[N, G, S, C/G·ΠK (+1)]``."""
        n, _, positions = u.shape
        u = u.reshape(n, self.groups, -1, positions).transpose(2, 3)
        if self.bias is None:
            return u
        return torch.cat([u, u.new_ones(*u.shape[:-1], 1)], dim=-1)


@register_block(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvBlock(_ConvBase):
    """``nn.ConvNd``: weight ``[C_out, C_in/G, *K]`` viewed as ``[G, C_out/G, C_in/G·ΠK]``."""

    def _padded(self, x: Tensor) -> tuple[Tensor, object]:
        """Batched input, padded with the layer's own mode if not ``'zeros'``; its padding."""
        m = self.module
        x = _batched(x, self.spatial_dims)
        if m.padding_mode != "zeros":
            return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), 0
        return x, m.padding

    def _input_factor(self, x: Tensor, output: Tensor, approx: KFACApprox) -> tuple[Tensor, int]:
        m = self.module
        x, padding = self._padded(x)
        factor = tn.kfac_reduce_factor if approx is KFACApprox.REDUCE else tn.kfac_expand_factor
        a = factor(
            x,
            m.kernel_size,
            stride=m.stride,
            padding=padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
        )
        return a, x.shape[0]

    def input_factor_work(self, approx: KFACApprox) -> float | None:
        """Return the TN engine's modeled work of the expand factor (:func:`.tn.kfac_expand_work`).

        ``None`` for reduce and for padding modes other than zeros (the Gram formula applies).
        """
        m = self.module
        if self._seen is None or approx is KFACApprox.REDUCE or m.padding_mode != "zeros":
            return None
        shape = self._seen[0]
        shape = (1, *shape) if len(shape) == self.spatial_dims + 1 else shape
        return tn.kfac_expand_work(
            shape,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            device_type=m.weight.device.type,
        )

    def _columns(self, x: Tensor, g: Tensor) -> Tensor:
        m = self.module
        x, padding = self._padded(x)
        return self._grouped_columns(tn.unfold(x, m.kernel_size, m.dilation, padding, m.stride))

    def _per_sample_grads(self, x: Tensor, g: Tensor) -> Tensor:
        m = self.module
        x, padding = self._padded(x)
        g = _batched(g, self.spatial_dims)
        w = tn.per_sample_weight_grad(
            x, g, m.kernel_size, m.stride, padding, m.dilation, m.groups
        )  # [N, C_out, C_in/G, *K]
        n, c_out = w.shape[:2]
        return self._with_bias(w.reshape(n, self.groups, c_out // self.groups, -1), g)

    def _to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        w = weight.reshape(self.groups, weight.shape[0] // self.groups, -1)
        if bias is None:
            return w
        return _append_bias(w, self._bias_matrix(bias))

    def _from_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        shape = self.module.weight.shape
        if self.bias is None:
            return matrix.reshape(shape), None
        return matrix[..., :-1].reshape(shape), matrix[..., -1].reshape(-1)


@register_block(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeBlock(_ConvBase):
    """``nn.ConvTransposeNd``: weight ``[C_in, C_out/G, *K]`` as ``[G, C_out/G, C_in/G·ΠK]``."""

    def _input_positions(self, x_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> float:
        # the transpose-unfolded columns are taken at the input positions
        return float(math.prod(x_shape[-self.spatial_dims :]))

    def _output_padding(self, x: Tensor, output: Tensor) -> tuple[int, ...]:
        """Output padding that produced ``output`` (differs from the module's with output_size)."""
        m = self.module
        out_spatial = output.shape[-self.spatial_dims :]
        in_spatial = x.shape[-self.spatial_dims :]
        return tuple(
            o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
            for o, i, s, p, d, k in zip(
                out_spatial, in_spatial, m.stride, m.padding, m.dilation, m.kernel_size
            )
        )

    def _input_factor(self, x: Tensor, output: Tensor, approx: KFACApprox) -> tuple[Tensor, int]:
        m = self.module
        x = _batched(x, self.spatial_dims)
        factor = tn.kfac_reduce_factor if approx is KFACApprox.REDUCE else tn.kfac_expand_factor
        a = factor(
            x,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
            transpose=True,
            output_padding=self._output_padding(x, output),
        )
        return a, x.shape[0]

    def _columns(self, x: Tensor, g: Tensor) -> Tensor:
        m = self.module
        x = _batched(x, self.spatial_dims)
        u = tn.unfold_transpose(
            x,
            m.kernel_size,
            m.stride,
            m.padding,
            self._output_padding(x, g),
            m.dilation,
        )
        return self._grouped_columns(u)

    def _per_sample_grads(self, x: Tensor, g: Tensor) -> Tensor:
        m = self.module
        x, g = _batched(x, self.spatial_dims), _batched(g, self.spatial_dims)
        w = tn.per_sample_weight_grad(
            x,
            g,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            transpose=True,
            output_padding=self._output_padding(x, g),
        )  # [N, C_in, C_out/G, *K]
        n, c_in, c_out_g = w.shape[:3]
        w = w.reshape(n, self.groups, c_in // self.groups, c_out_g, -1).transpose(2, 3)
        return self._with_bias(w.reshape(n, self.groups, c_out_g, -1), g)

    def _to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        c_in, c_out_g = weight.shape[:2]
        g = self.groups
        w = weight.reshape(g, c_in // g, c_out_g, -1).transpose(1, 2).reshape(g, c_out_g, -1)
        if bias is None:
            return w
        return _append_bias(w, self._bias_matrix(bias))

    def _from_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        shape = self.module.weight.shape
        g = self.groups
        c_in, c_out_g = shape[:2]
        w = matrix[..., :-1] if self.bias is not None else matrix
        w = w.reshape(g, c_out_g, c_in // g, -1).transpose(1, 2).reshape(shape)
        return w, (None if self.bias is None else matrix[..., -1].reshape(-1))


def _append_bias(weight_matrix: Tensor, bias_matrix: Tensor) -> Tensor:
    """Append the bias column: ``[G, d_G, d], [G, d_G, 1] -> [G, d_G, d+1]``."""
    return torch.cat([weight_matrix, bias_matrix], dim=-1)
