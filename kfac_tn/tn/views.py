"""Strided views and writes: the tensor-level form of the symbolic simplification.

After zero padding, the contraction of one spatial leg ``i`` with its index pattern
``Π[k, o, i]`` is the strided view ``x_pad[S·o + D·k]`` with legs ``(o, k)`` (no copy):

* **window** (:func:`patch_view`): the unfolded input as a view.  Dense (``K = S``) and
  down-sampling (``S > K``) dimensions are special cases of it (a reshape and a strided slice).
* **place** (:func:`scatter_patches`, :func:`scatter_kernel`): ``out_pad[k, S·o + D·k] = x[o]``
  writes a transposed unfold (or the Toeplitz matrix of a kernel) through one strided view of
  a zero buffer; for fixed ``k`` no two ``o`` meet.
* **fold** (:func:`fold_patches`): the adjoint of the window, one strided accumulation per
  kernel tap (taps may overlap).

:mod:`kfac_tn.tn.simplify` names these transforms on the symbolic networks; the routines'
``impl="tn_simplified"`` paths run them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from kfac_tn.tn.spec import ConvSpec, DimSpec

__all__ = ["fold_patches", "pad", "patch_view", "scatter_kernel", "scatter_patches"]


def pad(x: torch.Tensor, dims: Sequence[DimSpec]) -> torch.Tensor:
    """Zero-pad the trailing spatial dimensions of ``x`` by each dimension's ``(P_l, P_r)``.

    Args:
        x: ``[*lead, I_1, ..., I_N]``.
        dims: One :class:`~kfac_tn.tn.spec.DimSpec` per trailing dimension.

    Returns:
        ``[*lead, P_l + I_1 + P_r, ...]`` (``x`` itself if nothing is padded).
    """
    if all(d.pad_left == 0 and d.pad_right == 0 for d in dims):
        return x
    pads: list[int] = []
    for d in reversed(dims):
        pads.extend((d.pad_left, d.pad_right))
    return F.pad(x, pads)


def patch_view(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Unfolded input as a strided view: ``[*lead, *I] -> [*lead, *O, *K]``.

    ``out[..., o, k] = x_pad[..., S·o + D·k]`` for every spatial dimension.  Only the padding
    (if any) copies ``x``; dense and down-sampling dimensions need no padding.

    Args:
        x: ``[*lead, I_1, ..., I_N]``.
        spec: The convolution's spec (its ``dims`` describe the trailing dimensions).

    Returns:
        A view ``[*lead, O_1, ..., O_N, K_1, ..., K_N]``.
    """
    n = spec.ndim
    xp = pad(x, spec.dims)
    lead = xp.shape[: xp.ndim - n]
    lead_strides = xp.stride()[: xp.ndim - n]
    sp_strides = xp.stride()[xp.ndim - n :]
    size = (*lead, *spec.out_spatial, *spec.kernel_size)
    stride = (
        *lead_strides,
        *(d.stride * s for d, s in zip(spec.dims, sp_strides)),
        *(d.dilation * s for d, s in zip(spec.dims, sp_strides)),
    )
    return xp.as_strided(size, stride, xp.storage_offset())


def scatter_patches(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Transposed unfold by one strided write: ``[*lead, *O] -> [*lead, *K, *I]``.

    ``out[..., k, i] = Σ_o Π[k, o, i] x[..., o]``: for fixed ``k`` every ``o`` lands on a
    distinct ``i = S·o + D·k - P_l``, so a zero buffer of the padded size is written through
    the strided view ``buf[..., k, S·o + D·k]`` (offset stride ``(I_pad + D)`` per ``k``), then
    the padding is cropped.

    Args:
        x: ``[*lead, O_1, ..., O_N]``.
        spec: Spec of the associated convolution.

    Returns:
        ``[*lead, K_1, ..., K_N, I_1, ..., I_N]`` (a view of a fresh buffer).
    """
    n = spec.ndim
    lead = x.shape[: x.ndim - n]
    padded = tuple(d.in_size + d.pad_left + d.pad_right for d in spec.dims)
    buf = x.new_zeros((*lead, *spec.kernel_size, *padded))
    st = buf.stride()
    nl = len(lead)
    k_strides = st[nl : nl + n]
    i_strides = st[nl + n :]
    view = buf.as_strided(
        (*lead, *spec.kernel_size, *spec.out_spatial),
        (
            *st[:nl],
            *(ks + d.dilation * s for d, ks, s in zip(spec.dims, k_strides, i_strides)),
            *(d.stride * s for d, s in zip(spec.dims, i_strides)),
        ),
    )
    view.copy_(x.reshape(*lead, *([1] * n), *spec.out_spatial))
    crop = tuple(slice(d.pad_left, d.pad_left + d.in_size) for d in spec.dims)
    return buf[(Ellipsis, *crop)]


def scatter_kernel(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Toeplitz matrix of a kernel by one strided write: ``T[g, d, o, c, S·o + D·k - P] = W``.

    Args:
        weight: Kernel ``[C_out, C_in/G, *K]``.
        spec: The convolution's spec.

    Returns:
        ``[G, C_out/G·ΠO, C_in/G·ΠI]``, rows ordered ``(c_out, o…)``, columns ``(c_in, i…)``.
    """
    g, nd = spec.groups, spec.ndim
    c_out, c_in = weight.shape[0] // g, weight.shape[1]
    padded = tuple(d.in_size + d.pad_left + d.pad_right for d in spec.dims)
    buf = weight.new_zeros((g, c_out, *spec.out_spatial, c_in, *padded))
    st = buf.stride()
    o_st, c_st, i_st = st[2 : 2 + nd], st[2 + nd], st[3 + nd :]
    view = buf.as_strided(
        (g, c_out, *spec.out_spatial, c_in, *spec.kernel_size),
        (
            st[0],
            st[1],
            *(os + d.stride * s for d, os, s in zip(spec.dims, o_st, i_st)),
            c_st,
            *(d.dilation * s for d, s in zip(spec.dims, i_st)),
        ),
    )
    w = weight.reshape(g, c_out, *([1] * nd), c_in, *spec.kernel_size)
    view.copy_(w.expand(view.shape))
    crop = tuple(slice(d.pad_left, d.pad_left + d.in_size) for d in spec.dims)
    out = buf[(Ellipsis, *crop)]
    return out.reshape(g, c_out * math.prod(spec.out_spatial), c_in * math.prod(spec.in_spatial))


def fold_patches(cols: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Adjoint of :func:`patch_view` (col2im): ``[*lead, *O, *K] -> [*lead, *I]``.

    ``out[..., i] = Σ_{k,o} Π[k, o, i] cols[..., o, k]``, accumulated per kernel tap into
    strided slices of a zero buffer of the padded size (one ``add_`` per tap; taps of
    different kernel positions may overlap), then the padding is cropped.

    Args:
        cols: ``[*lead, O_1, ..., O_N, K_1, ..., K_N]``.
        spec: The convolution's spec.

    Returns:
        ``[*lead, I_1, ..., I_N]`` (a view of a fresh buffer).
    """
    n = spec.ndim
    lead = cols.shape[: cols.ndim - 2 * n]
    padded = tuple(d.in_size + d.pad_left + d.pad_right for d in spec.dims)
    buf = cols.new_zeros((*lead, *padded))
    for taps in _taps(spec.kernel_size):
        target = tuple(
            slice(d.dilation * k, d.dilation * k + d.stride * (d.out_size - 1) + 1, d.stride)
            for d, k in zip(spec.dims, taps)
        )
        source = cols[(Ellipsis, *taps)]
        buf[(Ellipsis, *target)] += source
    crop = tuple(slice(d.pad_left, d.pad_left + d.in_size) for d in spec.dims)
    return buf[(Ellipsis, *crop)]


def _taps(kernel: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """All kernel tap index tuples, row-major."""
    return itertools.product(*(range(k) for k in kernel))
