"""Shared plumbing of the TN routines: argument checks, cached specs, index names.

Everything here works on shapes and hyperparameters, never on tensor data: the routines call
it while they plan (once per shape, the plans are ``functools.lru_cache``-d), and
:func:`~kfac_tn.tn.symbolic` calls it with :class:`ShapeOnly` stand-ins for tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from kfac_tn.enums import Impl
from kfac_tn.tn.spec import ConvSpec, IntOrSeq, Padding, conv_spec, conv_transpose_spec

__all__ = [
    "IMPLS",
    "Shape",
    "ShapeOnly",
    "TensorLike",
    "cached_call",
    "check_cotangent",
    "check_groups",
    "check_impl",
    "hashable",
    "input_spatial",
    "join",
    "make_spec",
    "names",
    "prod",
    "spatial_ndim",
]

Shape = tuple[int, ...]
"""A tensor shape as plain ints (hashable: the key of cached plans)."""

IMPLS: tuple[str, ...] = tuple(i.value for i in Impl)
"""Values of ``impl=`` every routine accepts (:class:`kfac_tn.enums.Impl`)."""

_T = TypeVar("_T")


def check_impl(impl: str) -> str:
    """Validate the ``impl`` argument.

    Args:
        impl: One of :data:`IMPLS` (a :class:`~kfac_tn.enums.Impl` member or its value).

    Returns:
        ``impl`` unchanged.

    Raises:
        ValueError: If ``impl`` is not one of :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} (allowed: {Impl.allowed()})")
    return impl


def hashable(value: Any) -> Any:
    """Turn ints / strings / nested sequences into a hashable form (nested tuples of ints).

    Args:
        value: ``None``, an int, a string, a ``torch.Size`` or a (nested) sequence of those.

    Returns:
        The same value with every sequence replaced by a tuple.

    Raises:
        ValueError: If ``value`` is of any other type.
    """
    if isinstance(value, (str, int)) or value is None:
        return value
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, Sequence):
        return tuple(hashable(v) for v in value)
    raise ValueError(f"Invalid hyperparameter value: {value!r} (expected an int or a sequence)")


def spatial_ndim(x: TensorLike, kernel_size: IntOrSeq, name: str = "x") -> int:
    """Return the number of spatial dimensions of ``x: [N, C, *spatial]`` given ``kernel_size``.

    Args:
        x: The tensor (or its shape stand-in) ``[N, C, *spatial]``.
        kernel_size: Int, or one int per spatial dimension.
        name: The argument's name in error messages.

    Returns:
        ``x.ndim - 2``.

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
    """Check that ``groups`` is a positive int that divides ``channels``.

    Args:
        channels: Channel count of the argument.
        groups: Channel groups ``G``.
        name: The argument's name in error messages.

    Raises:
        ValueError: Naming ``groups`` and the channel count otherwise.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Invalid groups: {groups!r} (must be an int >= 1)")
    if channels % groups != 0:
        raise ValueError(
            f"Invalid groups: {groups} does not divide the {channels} channels of {name}"
        )


def check_cotangent(x: TensorLike, v: TensorLike, spatial: tuple[int, ...]) -> None:
    """Check that ``v`` is shaped like a cotangent ``[N, C, *spatial]`` of a layer with input ``x``.

    Args:
        x: Layer input ``[N, C_in, *]`` (a tensor or its shape).
        v: The cotangent (a tensor or its shape).
        spatial: The spatial size ``v`` must have.

    Raises:
        ValueError: Naming ``v``'s shape and the expected one.
    """
    if v.ndim != x.ndim or v.shape[0] != x.shape[0] or tuple(v.shape[2:]) != spatial:
        raise ValueError(
            f"Invalid v: shape {tuple(v.shape)} (expected [{x.shape[0]}, C_out, *{spatial}] "
            f"for x of shape {tuple(x.shape)})"
        )


def input_spatial(input_size: Sequence[int], nd: int, name: str = "input_size") -> Shape:
    """Spatial part of ``input_size`` (``N`` spatial sizes, or a full ``[N, C, *spatial]``).

    Args:
        input_size: ``(I_1, ..., I_N)`` or ``(N, C, I_1, ..., I_N)``.
        nd: Number of spatial dimensions ``N``.
        name: The argument's name in error messages.

    Returns:
        ``(I_1, ..., I_N)``.

    Raises:
        ValueError: If the length is neither ``nd`` nor ``nd + 2``.
    """
    size = tuple(int(v) for v in input_size)
    if len(size) == nd:
        return size
    if len(size) == nd + 2:
        return size[2:]
    raise ValueError(
        f"Invalid {name}: {tuple(input_size)!r} (expected {nd} spatial sizes or a full "
        f"[N, C, *spatial] shape of length {nd + 2})"
    )


@functools.lru_cache(maxsize=4096)
def _conv_spec(
    spatial: Shape,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: Padding,
    dilation: IntOrSeq,
    groups: int,
) -> ConvSpec:
    return conv_spec(spatial, kernel_size, stride, padding, dilation, groups)


@functools.lru_cache(maxsize=4096)
def _conv_transpose_spec(
    spatial: Shape,
    kernel_size: IntOrSeq,
    stride: IntOrSeq,
    padding: IntOrSeq,
    output_padding: IntOrSeq,
    dilation: IntOrSeq,
    groups: int,
) -> ConvSpec:
    return conv_transpose_spec(
        spatial, kernel_size, stride, padding, output_padding, dilation, groups
    )


def make_spec(
    spatial: Sequence[int],
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    transpose: bool = False,
    output_padding: IntOrSeq = 0,
) -> ConvSpec:
    """Build a cached :func:`conv_spec` / :func:`conv_transpose_spec` on hashable arguments.

    Args:
        spatial: Spatial input size; for ``transpose=True`` that of the transposed
            convolution's input (the associated convolution's output).
        kernel_size: Int or N ints.
        stride: Int or N ints.
        padding: As in :func:`~kfac_tn.tn.spec.conv_spec` (ints only for ``transpose``).
        dilation: Int or N ints.
        groups: Channel groups ``G``.
        transpose: Build a transposed convolution's spec.
        output_padding: Int or N ints (``transpose=True`` only).

    Returns:
        The validated (cached) :class:`~kfac_tn.tn.spec.ConvSpec`.

    Raises:
        ValueError: On invalid hyperparameters.
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
    """Stand-in for a tensor when only its shape is known (plans, :func:`symbolic`).

    Attributes:
        shape: The shape, a ``torch.Size``.
        ndim: Its length.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        """Wrap ``shape``.

        Args:
            shape: The tensor's shape.
        """
        self.shape = torch.Size(shape)
        self.ndim = len(self.shape)


TensorLike = torch.Tensor | ShapeOnly
"""What argument checks read of a tensor (only its shape): a tensor or a :class:`ShapeOnly`."""


def cached_call(builder: Callable[..., _T], *key: Any) -> _T:
    """Call an ``lru_cache``-d plan ``builder(*key)``, normalising unhashable (list) arguments.

    The common case (ints, tuples, strings, ``torch.Size``) hashes as given, so a repeated
    call costs one dictionary lookup.

    Args:
        builder: The cached plan function.
        *key: Its arguments (shapes and hyperparameters).

    Returns:
        ``builder(*key)``.
    """
    try:
        return builder(*key)
    except TypeError:
        normalised = tuple(hashable(k) for k in key)
        if normalised == key:
            raise
        return builder(*normalised)


def names(prefix: str, n: int, suffix: str = "") -> list[str]:
    """Readable einsum leg names.

    Args:
        prefix: Leg kind, e.g. ``'i'``, ``'o'``, ``'k'``.
        n: Number of spatial dimensions.
        suffix: Appended to every name (``'_'`` marks a second copy).

    Returns:
        ``[prefix0suffix, prefix1suffix, ...]``.
    """
    return [f"{prefix}{j}{suffix}" for j in range(n)]


def join(*parts: str | Sequence[str]) -> str:
    """Join leg names into one space-separated operand term.

    Args:
        *parts: Space-separated strings or lists of leg names.

    Returns:
        The legs of all parts, in order, separated by single spaces.
    """
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            out.extend(p.split())
        else:
            out.extend(p)
    return " ".join(out)


def prod(values: Sequence[int]) -> int:
    """Product of a sequence of ints.

    Args:
        values: The ints.

    Returns:
        Their product (1 for an empty sequence).
    """
    return math.prod(values)
