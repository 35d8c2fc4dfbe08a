"""Convolution layers with randomized (sampled) backpropagation for the weight gradient.

:class:`SampledConv1d`, :class:`SampledConv2d` and :class:`SampledConv3d` are drop-in
subclasses of :class:`torch.nn.Conv1d` / ``Conv2d`` / ``Conv3d``. Their forward pass is the
ordinary convolution; in training mode with ``keep_prob < 1`` the backward pass

* estimates the weight gradient without bias from a random subset of the input
  (:func:`kfac_tn.tn.sampled.sampled_conv_weight_vjp`), saving **only the kept slices** of the
  input (plus their indices and the weight) for the backward pass, so the activation memory
  held by the layer shrinks to about ``keep_prob`` of the input;
* computes the input gradient and the bias gradient exactly.

Under ``torch.autocast`` the input and parameters are cast to the autocast dtype as torch does
for convolutions (the gradients flow back to the float32 parameters through the cast).

In eval mode, with gradients disabled, with a frozen weight or with ``keep_prob == 1`` the
layers behave exactly like their torch parents. Forward hooks and tensor hooks on the output
work as usual, so curvature capture (e.g. :class:`kfac_tn.KFAC`) sees the full input and the
exact output gradient.

Use :func:`convert_sampled` to switch the convolutions of an existing model in place.

Limitations: the sampled backward is once-differentiable (no double backward through sampled
layers) and has no ``vmap`` rule; extra backward passes (e.g. KFAC's MC / type-2 Fisher passes
to the layer outputs) also evaluate the sampled weight VJP, which autograd then discards.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kfac_tn.tn.sampled import (
    Sample,
    check_sampling_args,
    draw_sample,
    gather,
    kept_conv_weight_vjp,
)
from kfac_tn.tn.spec import conv_spec

logger = logging.getLogger(__name__)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_input_vjp(
    input_shape: Sequence[int],
    weight: Tensor,
    v: Tensor,
    stride: tuple[int, ...],
    pads: tuple[tuple[int, int], ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """Exact input VJP of a zero-padded convolution, also for asymmetric padding.

    Args:
        input_shape: ``(N, C_in, *spatial)``.
        weight: ``[C_out, C_in/G, *K]``.
        v: Output gradient ``[N, C_out, *out_spatial]``.
        stride: Stride per dimension.
        pads: ``(left, right)`` padding per dimension.
        dilation: Dilation per dimension.
        groups: Number of groups.

    Returns:
        Input gradient ``[N, C_in, *spatial]``.
    """
    symmetric = all(left == right for left, right in pads)
    shape = list(input_shape)
    if not symmetric:  # differentiate w.r.t. the padded input, then crop
        shape[2:] = [s + left + right for s, (left, right) in zip(shape[2:], pads)]
    dummy = v.new_empty(1).expand(shape)
    padding = [left for left, _ in pads] if symmetric else [0] * len(pads)
    grad = torch.ops.aten.convolution_backward(
        v, dummy, weight, None, list(stride), padding, list(dilation), False,
        [0] * len(pads), groups, (True, False, False),
    )[0]  # fmt: skip
    if not symmetric:
        crop = tuple(slice(left, left + s) for s, (left, _) in zip(input_shape[2:], pads))
        grad = grad[(slice(None), slice(None), *crop)]
    return grad


class _SampledConvFunction(torch.autograd.Function):
    """Exact convolution forward; sampled weight VJP, exact input and bias VJPs backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, ...],
        padding: str | tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
        keep_prob: float,
        axis: str,
        spatial_mode: str,
        generator: torch.Generator | None,
    ) -> Tensor:
        nd = x.dim() - 2
        y = _CONV[nd](x, weight, bias, stride, padding, dilation, groups)
        spec = conv_spec(x.shape[2:], weight.shape[2:], stride, padding, dilation, groups)
        ctx.hyper = (stride, tuple((d.pad_left, d.pad_right) for d in spec.dims), dilation, groups)
        ctx.kernel_size = tuple(weight.shape[2:])
        ctx.input_shape = tuple(x.shape)
        ctx.has_bias = bias is not None
        saved: list[Tensor] = [weight] if ctx.needs_input_grad[0] else []
        ctx.sample_meta = None
        if ctx.needs_input_grad[1]:
            sample = draw_sample(
                x.shape, keep_prob, axis, spatial_mode=spatial_mode, generator=generator,
                device=x.device,
            )  # fmt: skip
            saved += [gather(x, sample), *sample.indices]
            ctx.sample_meta = (sample.axis, sample.mode, sample.keep_prob, sample.scale)
        ctx.num_weight = 1 if ctx.needs_input_grad[0] else 0
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        stride, pads, dilation, groups = ctx.hyper
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_input_vjp(ctx.input_shape, saved[0], v, stride, pads, dilation, groups)
        if ctx.needs_input_grad[1]:
            x_kept, *indices = saved[ctx.num_weight :]
            axis, mode, keep_prob, scale = ctx.sample_meta
            sample = Sample(axis, mode, keep_prob, scale, tuple(indices), ctx.input_shape)
            grad_w = kept_conv_weight_vjp(
                x_kept, sample, v, ctx.kernel_size, stride, pads, dilation, groups
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = v.sum((0, *range(2, v.dim())))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class _SampledConvMixin:
    """Shared sampling logic of the ``SampledConvNd`` layers (mixed into ``nn.ConvNd``).

    ``SampledConvNd`` takes the arguments of :class:`torch.nn.ConvNd`, plus (keyword-only):

    Args:
        keep_prob: Expected kept fraction of the input for the weight gradient, in ``(0, 1]``.
        axis: ``"spatial"`` (sample input positions) or ``"channel"`` (input channels).
        spatial_mode: ``"position"`` or ``"dims"`` (see :mod:`kfac_tn.tn.sampled`).
        generator: Random generator for the draws (global host generator when ``None``).

    Raises:
        ValueError: On a bad ``keep_prob``, ``axis`` or ``spatial_mode``.
    """

    keep_prob: float
    axis: str
    spatial_mode: str
    generator: torch.Generator | None

    def __init__(
        self,
        *args: Any,
        keep_prob: float,
        axis: str = "spatial",
        spatial_mode: str = "position",
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)  # the nn.ConvNd that follows in the MRO
        self._init_sampling(keep_prob, axis, spatial_mode, generator)

    def _init_sampling(
        self,
        keep_prob: float,
        axis: str,
        spatial_mode: str,
        generator: torch.Generator | None,
    ) -> None:
        self.keep_prob = check_sampling_args(keep_prob, axis, spatial_mode)
        self.axis = axis
        self.spatial_mode = spatial_mode
        self.generator = generator

    def _sampling_active(self, x: Tensor) -> bool:
        return (
            self.training  # type: ignore[attr-defined]
            and self.keep_prob < 1.0
            and torch.is_grad_enabled()
            and self.weight.requires_grad  # type: ignore[attr-defined]
        )

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x: [N, C_in, *spatial]`` (or unbatched ``[C_in, *spatial]``)."""
        if not self._sampling_active(x):
            return super().forward(x)  # type: ignore[misc]
        unbatched = x.dim() == len(self.kernel_size) + 1  # type: ignore[attr-defined]
        if unbatched:
            x = x.unsqueeze(0)
        padding = self.padding  # type: ignore[attr-defined]
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)  # type: ignore[attr-defined]
            padding = 0
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:  # cast like autocast does for convolutions (recorded by autograd)
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            y = _SampledConvFunction.apply(
                x, weight, bias, self.stride, padding, self.dilation, self.groups,  # type: ignore[attr-defined]
                self.keep_prob, self.axis, self.spatial_mode, self.generator,
            )  # fmt: skip
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        """Torch's conv description plus the sampling settings."""
        mode = f", spatial_mode={self.spatial_mode!r}" if self.axis == "spatial" else ""
        return (
            super().extra_repr()  # type: ignore[misc]
            + f", keep_prob={self.keep_prob}, axis={self.axis!r}{mode}"
        )


class SampledConv1d(_SampledConvMixin, nn.Conv1d):
    """1-d convolution whose weight gradient uses sampled backpropagation.

    Same arguments as :class:`torch.nn.Conv1d`, plus the keyword-only ``keep_prob``, ``axis``,
    ``spatial_mode`` and ``generator`` of :class:`_SampledConvMixin`.
    """


class SampledConv2d(_SampledConvMixin, nn.Conv2d):
    """2-d convolution whose weight gradient uses sampled backpropagation.

    Same arguments as :class:`torch.nn.Conv2d`, plus the keyword-only ``keep_prob``, ``axis``,
    ``spatial_mode`` and ``generator`` of :class:`_SampledConvMixin`.
    """


class SampledConv3d(_SampledConvMixin, nn.Conv3d):
    """3-d convolution whose weight gradient uses sampled backpropagation.

    Same arguments as :class:`torch.nn.Conv3d`, plus the keyword-only ``keep_prob``, ``axis``,
    ``spatial_mode`` and ``generator`` of :class:`_SampledConvMixin`.
    """


_SAMPLED = {nn.Conv1d: SampledConv1d, nn.Conv2d: SampledConv2d, nn.Conv3d: SampledConv3d}


def _sampled_copy(
    conv: nn.Module, keep_prob: float, axis: str, spatial_mode: str, gen: torch.Generator | None
) -> nn.Module:
    """Build a ``SampledConvNd`` sharing ``conv``'s parameters (the same ``Parameter`` objects)."""
    cls = next(s for base, s in _SAMPLED.items() if isinstance(conv, base))
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device="meta", keep_prob=keep_prob, axis=axis, spatial_mode=spatial_mode, generator=gen,
    )  # fmt: skip
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


def convert_sampled(
    model: nn.Module,
    keep_prob: float,
    axis: str = "spatial",
    layers: str | Sequence[str] = "*",
    *,
    spatial_mode: str = "position",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace ``nn.Conv1d/2d/3d`` layers in place by their sampled counterparts.

    The new layers share the original ``Parameter`` objects, so optimizers already holding
    them keep working. Hooks registered on the replaced modules are not carried over: create
    curvature optimizers (e.g. :class:`kfac_tn.KFAC`) after converting. Layers that already
    are sampled are updated to the new settings.

    Args:
        model: The model (modified in place; if it is itself a convolution, a new module is
            returned).
        keep_prob: Expected kept input fraction for the weight gradients, in ``(0, 1]``.
        axis: ``"spatial"`` or ``"channel"``.
        layers: fnmatch pattern(s) on the qualified module names (``""`` is the root).
        spatial_mode: ``"position"`` or ``"dims"``.
        generator: Random generator shared by all converted layers.

    Returns:
        The model with the matching convolutions replaced.

    Raises:
        ValueError: On a bad ``keep_prob``, ``axis`` or ``spatial_mode``.
    """
    check_sampling_args(keep_prob, axis, spatial_mode)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    replaced = 0
    for name, module in list(model.named_modules()):
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if isinstance(module, _SampledConvMixin):
            module._init_sampling(keep_prob, axis, spatial_mode, generator)
            replaced += 1
            continue
        if not any(isinstance(module, base) for base in _SAMPLED):
            continue
        new = _sampled_copy(module, keep_prob, axis, spatial_mode, generator)
        replaced += 1
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    logger.debug("convert_sampled: %d convolution(s) use keep_prob=%s", replaced, keep_prob)
    return model


class _MaskReLUFunction(torch.autograd.Function):
    """ReLU that saves a boolean mask (1 byte per entry) instead of its output."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.relu(x)
        ctx.save_for_backward(y > 0)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (mask,) = ctx.saved_tensors
        return grad * mask


class MaskReLU(nn.ReLU):
    """ReLU whose backward keeps a boolean mask instead of the output.

    ``torch.relu`` saves its output for the backward pass. In front of a sampled convolution
    that output is the convolution's input, so it stays alive in full and sampling frees
    nothing. This ReLU stores one byte per entry instead (a quarter of float32), so that only
    the mask and the convolution's kept slices remain. Forward values and gradients equal
    ``nn.ReLU``'s (the derivative at 0 is 0, as in torch).

    Raises:
        ValueError: If constructed with ``inplace=True`` (not supported).
    """

    def __init__(self, inplace: bool = False) -> None:
        if inplace:
            raise ValueError("Invalid inplace: True (MaskReLU does not support inplace)")
        super().__init__(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the ReLU to ``x`` (any shape)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaskReLUFunction.apply(x)
        return torch.relu(x)


def convert_mask_relu(model: nn.Module, layers: str | Sequence[str] = "*") -> nn.Module:
    """Replace ``nn.ReLU`` modules (matching fnmatch ``layers``) by :class:`MaskReLU` in place.

    Args:
        model: The model (modified in place; a bare ``nn.ReLU`` root is returned replaced).
        layers: fnmatch pattern(s) on the qualified module names.

    Returns:
        The model.
    """
    patterns = [layers] if isinstance(layers, str) else list(layers)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.ReLU or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        new = MaskReLU()
        new.train(module.training)
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model
