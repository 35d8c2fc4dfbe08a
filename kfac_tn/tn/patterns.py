"""Index pattern tensors Π, one per spatial dimension.

``Π[k, o, i] = 1`` iff ``i = S·o + D·k - P_l`` and ``0 <= i < I``: the binary tensor that
connects kernel tap ``k`` and output position ``o`` to input position ``i``.  Taps that land
in the zero padding have no entry.
"""

from __future__ import annotations

import functools

import torch

from kfac_tn.tn.spec import DimSpec


def index_pattern(
    dim: DimSpec, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Build the index pattern of one spatial dimension.

    Args:
        dim: Geometry of the dimension.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        Π of shape ``[K, O, I]`` with entries in {0, 1}.
    """
    return _cached_pattern(dim, dtype, torch.device(device)).clone()


@functools.lru_cache(maxsize=512)
def _cached_pattern(dim: DimSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(dim.kernel, device=device).view(-1, 1)
    o = torch.arange(dim.out_size, device=device).view(1, -1)
    target = dim.stride * o + dim.dilation * k - dim.pad_left  # [K, O]
    i = torch.arange(dim.in_size, device=device).view(1, 1, -1)
    return (target.unsqueeze(-1) == i).to(dtype)


def cached_index_pattern(dim: DimSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Like :func:`index_pattern`, but returns a shared cached tensor (do not modify it).

    Args:
        dim: Geometry of the dimension.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        Π of shape ``[K, O, I]`` (shared).
    """
    return _cached_pattern(dim, dtype, torch.device(device))


def summed_index_pattern(dim: DimSpec, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Build Π summed over its output leg, ``Π̄[k, i] = Σ_o Π[k, o, i]`` (KFAC-reduce).

    Args:
        dim: Geometry of the dimension.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Returns:
        ``Π̄`` of shape ``[K, I]`` (a fresh tensor).
    """
    return _cached_pattern(dim, dtype, torch.device(device)).sum(1)


def cached_summed_index_pattern(
    dim: DimSpec, dtype: torch.dtype, device: torch.device, *, over: str = "o"
) -> torch.Tensor:
    """Return the cached Π summed over one leg (shared tensor, do not modify it).

    Args:
        dim: Geometry of the dimension.
        dtype: Floating dtype of the result.
        device: Device of the result.
        over: ``'o'`` gives ``Π̄[k, i] = Σ_o Π[k, o, i]`` ``[K, I]`` (KFAC-reduce of a
            convolution); ``'i'`` gives ``Σ_i Π[k, o, i]`` ``[K, O]`` (KFAC-reduce of a
            transposed convolution).

    Returns:
        ``[K, I]`` (``over='o'``) or ``[K, O]`` (``over='i'``), shared.

    Raises:
        ValueError: If ``over`` is not ``'o'`` or ``'i'``.
    """
    if over not in ("o", "i"):
        raise ValueError(f"Invalid over: {over!r} (allowed: 'o', 'i')")
    return _cached_summed(dim, dtype, torch.device(device), over)


@functools.lru_cache(maxsize=512)
def _cached_summed(
    dim: DimSpec, dtype: torch.dtype, device: torch.device, over: str
) -> torch.Tensor:
    return _cached_pattern(dim, dtype, device).sum(1 if over == "o" else 2)
