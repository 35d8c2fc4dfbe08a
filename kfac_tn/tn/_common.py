"""Shared plumbing of the TN routines: argument checks, cached specs, index names, strided views.

The strided views are the tensor-level form of the symbolic simplification: after zero
padding, the contraction of one spatial leg ``i`` with its index pattern ``Π[k, o, i]`` is the
strided view ``x_pad[S·o + D·k]`` with legs ``(o, k)`` (no copy).  Dense (``K = S``) and
down-sampling (``S > K``) dimensions are special cases of that view (a reshape and a strided
slice).  The scatter counterpart ``out_pad[k, S·o + D·k] = x[o]`` writes a transposed
unfold through one strided view of a zero buffer.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kfac_tn.tn.spec import ConvSpec, DimSpec, conv_spec, conv_transpose_spec

IMPLS: tuple[str, ...] = ("auto", "tn", "tn_simplified", "standard")


def check_impl(impl: str) -> str:
    """Validate the ``impl`` argument.

    Raises:
        ValueError: If ``impl`` is not one of :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} (allowed: {', '.join(map(repr, IMPLS))})")
    return impl


def hashable(value):
    """Turn ints / strings / nested sequences into a hashable form (tuples)."""
    if isinstance(value, (str, int)) or value is None:
        return value
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, Sequence):
        return tuple(hashable(v) for v in value)
    raise ValueError(f"Invalid hyperparameter value: {value!r} (expected an int or a sequence)")


def spatial_ndim(x: torch.Tensor, kernel_size, name: str = "x") -> int:
    """Return the number of spatial dimensions of ``x: [N, C, *spatial]`` given ``kernel_size``.

    Raises:
        ValueError: If ``x`` has fewer than 3 dimensions or its rank does not match a
            sequence-valued ``kernel_size``.
    """
    if x.ndim < 3:
        raise ValueError(
            f"Invalid {name}: shape {tuple(x.shape)} (expected [N, C, *spatial] with at least "
            f"one spatial dimension)"
        )
    n = x.ndim - 2
    if not isinstance(kernel_size, int):
        k = len(kernel_size)
        if k != n:
            raise ValueError(
                f"Invalid {name}: shape {tuple(x.shape)} has {n} spatial dimensions, but "
                f"kernel_size={tuple(kernel_size)!r} has {k} (expected [N, C, *spatial] with "
                f"{k} spatial dimensions)"
            )
    return n


def check_groups(channels: int, groups: int, name: str = "x") -> None:
    """Check that ``groups`` divides ``channels``.

    Raises:
        ValueError: Naming ``groups`` and the channel count otherwise.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Invalid groups: {groups!r} (must be an int >= 1)")
    if channels % groups != 0:
        raise ValueError(
            f"Invalid groups: {groups} does not divide the {channels} channels of {name}"
        )


@functools.lru_cache(maxsize=4096)
def _conv_spec(spatial, kernel_size, stride, padding, dilation, groups) -> ConvSpec:
    return conv_spec(spatial, kernel_size, stride, padding, dilation, groups)


@functools.lru_cache(maxsize=4096)
def _conv_transpose_spec(
    spatial, kernel_size, stride, padding, output_padding, dilation, groups
) -> ConvSpec:
    return conv_transpose_spec(
        spatial, kernel_size, stride, padding, output_padding, dilation, groups
    )


def make_spec(
    spatial: Sequence[int],
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    transpose: bool = False,
    output_padding=0,
) -> ConvSpec:
    """Build a cached :func:`conv_spec` / :func:`conv_transpose_spec` on hashable arguments.

    For ``transpose=True`` ``spatial`` is the spatial size of the transposed convolution's
    input (the associated convolution's output).
    """
    key = (
        tuple(spatial),
        kernel_size,
        stride,
        padding,
        dilation,
        groups,
        transpose,
        output_padding,
    )
    try:  # fast path: ints / tuples / strings are hashable as given
        return _spec_from_key(key)
    except TypeError:  # lists (unhashable): normalise to tuples first
        return _spec_from_key(tuple(hashable(v) for v in key))


@functools.lru_cache(maxsize=4096)
def _spec_from_key(key: tuple) -> ConvSpec:
    spatial, kernel_size, stride, padding, dilation, groups, transpose, output_padding = key
    args = (hashable(spatial), hashable(kernel_size), hashable(stride), hashable(padding))
    if transpose:
        return _conv_transpose_spec(*args, hashable(output_padding), hashable(dilation), groups)
    op = hashable(output_padding)
    if op != 0 and not (isinstance(op, tuple) and all(p == 0 for p in op)):
        raise ValueError(
            f"Invalid output_padding: {output_padding!r} (only allowed with transpose=True)"
        )
    return _conv_spec(*args, hashable(dilation), groups)


class ShapeOnly:
    """Stand-in for a tensor when only its shape is known (plans, :func:`symbolic`)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)
        self.ndim = len(self.shape)


def cached_call(builder, *key):
    """Call an ``lru_cache``-d plan ``builder(*key)``, normalising unhashable (list) arguments.

    The common case (ints, tuples, strings, ``torch.Size``) hashes as given, so a repeated
    call costs one dictionary lookup.
    """
    try:
        return builder(*key)
    except TypeError:
        normalised = tuple(hashable(k) for k in key)
        if normalised == key:
            raise
        return builder(*normalised)


def names(prefix: str, n: int, suffix: str = "") -> list[str]:
    """Readable einsum leg names ``[prefix0suffix, prefix1suffix, ...]``."""
    return [f"{prefix}{j}{suffix}" for j in range(n)]


def join(*parts: str | Sequence[str]) -> str:
    """Join leg names (strings or lists of strings) into one space-separated operand term."""
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            out.extend(p.split())
        else:
            out.extend(p)
    return " ".join(out)


def prod(values: Sequence[int]) -> int:
    """Product of a sequence of ints (1 for an empty sequence)."""
    return math.prod(values)


def pad(x: torch.Tensor, dims: Sequence[DimSpec]) -> torch.Tensor:
    """Zero-pad the trailing spatial dimensions of ``x`` by each dimension's ``(P_l, P_r)``."""
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


def fold_patches(cols: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Adjoint of :func:`patch_view` (col2im): ``[*lead, *O, *K] -> [*lead, *I]``.

    ``out[..., i] = Σ_{k,o} Π[k, o, i] cols[..., o, k]``, accumulated per kernel tap into
    strided slices of a zero buffer of the padded size (one ``add_`` per tap; taps of
    different kernel positions may overlap), then the padding is cropped.
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


def _taps(kernel: Sequence[int]):
    """All kernel tap index tuples."""
    return itertools.product(*(range(k) for k in kernel))
