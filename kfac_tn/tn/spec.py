"""Convolution hyperparameters: normalisation, validation and per-dimension geometry.

Everything here works on Python ints only (no tensors), so plans derived from a
:class:`ConvSpec` can be cached on it.  One :class:`DimSpec` describes one spatial
dimension of the *associated convolution*: input size ``I``, output size ``O``, kernel
``K``, stride ``S``, dilation ``D`` and left/right padding.  For a transposed convolution
the roles flip (its input has size ``O``, its output size ``I``), but the geometry and the
index pattern are the associated convolution's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

IntOrSeq = int | Sequence[int]
Padding = int | Sequence[int] | str


class DimCategory(str, Enum):
    """Structural class of one spatial dimension's index pattern.

    * ``dense``: ``K == S``, no padding, no dilation: Π is a reshape of the input.
    * ``down``: ``S > K``, no padding, no dilation: Π is a strided slice, then dense.
    * ``general``: anything else (overlapping patches, padding, dilation).
    """

    DENSE = "dense"
    DOWN = "down"
    GENERAL = "general"


@dataclass(frozen=True)
class DimSpec:
    """Geometry of one spatial dimension of a convolution.

    Attributes:
        in_size: Input size ``I`` of the (associated) convolution.
        out_size: Output size ``O`` of the (associated) convolution.
        kernel: Kernel size ``K``.
        stride: Stride ``S``.
        dilation: Dilation ``D``.
        pad_left: Zero padding before the first input.
        pad_right: Zero padding after the last input.
    """

    in_size: int
    out_size: int
    kernel: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int

    @property
    def category(self) -> DimCategory:
        """The structural class of this dimension (see :class:`DimCategory`)."""
        plain = self.pad_left == 0 and self.pad_right == 0 and self.dilation == 1
        if plain and self.kernel == self.stride:
            return DimCategory.DENSE
        if plain and self.stride > self.kernel:
            return DimCategory.DOWN
        return DimCategory.GENERAL

    @property
    def used_inputs(self) -> int:
        """Number of leading inputs reachable by some (k, o): ``S·(O-1) + D·(K-1) + 1 - P_l``."""
        return min(
            self.in_size,
            self.stride * (self.out_size - 1)
            + self.dilation * (self.kernel - 1)
            + 1
            - self.pad_left,
        )


@dataclass(frozen=True)
class ConvSpec:
    """Hyperparameters of an N-d convolution, normalised and validated.

    Attributes:
        dims: One :class:`DimSpec` per spatial dimension.
        groups: Number of channel groups ``G``.
        transpose: Whether this describes a transposed convolution.
        output_padding: Extra output size per dimension (transposed convolutions only).
    """

    dims: tuple[DimSpec, ...]
    groups: int = 1
    transpose: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions ``N``."""
        return len(self.dims)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """Kernel size per dimension."""
        return tuple(d.kernel for d in self.dims)

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride per dimension."""
        return tuple(d.stride for d in self.dims)

    @property
    def dilations(self) -> tuple[int, ...]:
        """Dilation per dimension."""
        return tuple(d.dilation for d in self.dims)

    @property
    def padding_pairs(self) -> tuple[tuple[int, int], ...]:
        """``(left, right)`` padding per dimension."""
        return tuple((d.pad_left, d.pad_right) for d in self.dims)

    @property
    def in_spatial(self) -> tuple[int, ...]:
        """Spatial input size of the associated convolution, ``(I_1, ..., I_N)``."""
        return tuple(d.in_size for d in self.dims)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """Spatial output size of the associated convolution, ``(O_1, ..., O_N)``."""
        return tuple(d.out_size for d in self.dims)

    @property
    def categories(self) -> tuple[DimCategory, ...]:
        """Structural class of each dimension."""
        return tuple(d.category for d in self.dims)

    @property
    def layer_category(self) -> str:
        """Layer class as in the paper's benchmark: general | mixed | dense | down."""
        cats = set(self.categories)
        if cats == {DimCategory.DENSE}:
            return "dense"
        if DimCategory.DOWN in cats and DimCategory.GENERAL not in cats:
            return "down"
        if DimCategory.GENERAL in cats and len(cats) > 1:
            return "mixed"
        return "general"


def _tuple(name: str, value: IntOrSeq, n: int, *, minimum: int) -> tuple[int, ...]:
    """Expand an int or sequence into an ``n``-tuple of ints ``>= minimum``.

    Raises:
        ValueError: If the length is wrong or an entry is below ``minimum``.
    """
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected an int or a sequence of {n} ints)")
    if isinstance(value, int):
        values = (value,) * n
    else:
        try:
            values = tuple(int(v) for v in value)
        except TypeError as err:
            raise ValueError(
                f"Invalid {name}: {value!r} (expected an int or a sequence of {n} ints)"
            ) from err
        if len(values) != n:
            raise ValueError(
                f"Invalid {name}: {value!r} has {len(values)} entries, expected {n} "
                f"(one per spatial dimension)"
            )
    for v in values:
        if v < minimum:
            raise ValueError(f"Invalid {name}: {value!r} (entries must be >= {minimum})")
    return values


def output_size(
    in_size: int, kernel: int, stride: int, dilation: int, pad_left: int, pad_right: int
) -> int:
    """Output size of one dimension.

    Args:
        in_size: Input size ``I``.
        kernel: Kernel size ``K``.
        stride: Stride ``S``.
        dilation: Dilation ``D``.
        pad_left: Padding ``P_l``.
        pad_right: Padding ``P_r``.

    Returns:
        ``O = 1 + floor((I + P_l + P_r - D·(K-1) - 1) / S)``.
    """
    return 1 + (in_size + pad_left + pad_right - dilation * (kernel - 1) - 1) // stride


def conv_spec(
    input_spatial: Sequence[int],
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> ConvSpec:
    """Normalise and validate the hyperparameters of a convolution.

    Args:
        input_spatial: Spatial input size ``(I_1, ..., I_N)``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints (``>= 1``).
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'`` (stride 1 only;
            total padding ``D·(K-1)``, left gets ``total // 2``).
        dilation: Dilation, int or N ints (``>= 1``).
        groups: Number of channel groups (``>= 1``); channel divisibility is checked by callers.

    Returns:
        The validated :class:`ConvSpec`.

    Raises:
        ValueError: On a bad value, naming the argument, its value and what is allowed.
    """
    n = len(input_spatial)
    if n < 1:
        raise ValueError(
            f"Invalid input size: {tuple(input_spatial)} (need >= 1 spatial dimension)"
        )
    spatial = _tuple("input size", input_spatial, n, minimum=1)
    kernel = _tuple("kernel_size", kernel_size, n, minimum=1)
    strides = _tuple("stride", stride, n, minimum=1)
    dilations = _tuple("dilation", dilation, n, minimum=1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Invalid groups: {groups!r} (must be an int >= 1)")
    pads = _padding(padding, kernel, strides, dilations)
    dims = []
    for i, k, s, d, (pl, pr) in zip(spatial, kernel, strides, dilations, pads):
        if i + pl + pr < d * (k - 1) + 1:
            raise ValueError(
                f"Invalid kernel_size: {kernel_size!r} (dilated kernel {d * (k - 1) + 1} is larger "
                f"than the padded input {i + pl + pr} of input size {spatial}, padding {padding!r})"
            )
        dims.append(DimSpec(i, output_size(i, k, s, d, pl, pr), k, s, d, pl, pr))
    return ConvSpec(tuple(dims), groups)


def conv_transpose_spec(
    input_spatial: Sequence[int],
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: IntOrSeq = 0,
    output_padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> ConvSpec:
    """Normalise and validate the hyperparameters of a transposed convolution.

    The transposed convolution's input has spatial size ``O`` (the associated convolution's
    output); its output size is ``I = (O-1)·S - 2P + D·(K-1) + 1 + output_padding``.

    Args:
        input_spatial: Spatial input size of the transposed convolution ``(O_1, ..., O_N)``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: Symmetric padding, int or N ints (strings are not allowed, as in torch).
        output_padding: Int or N ints, each ``< max(stride, dilation)``.
        dilation: Dilation, int or N ints.
        groups: Number of channel groups.

    Returns:
        The validated :class:`ConvSpec` (``transpose=True``), geometry of the associated conv.

    Raises:
        ValueError: On a bad value, naming the argument, its value and what is allowed.
    """
    n = len(input_spatial)
    if n < 1:
        raise ValueError(
            f"Invalid input size: {tuple(input_spatial)} (need >= 1 spatial dimension)"
        )
    spatial = _tuple("input size", input_spatial, n, minimum=1)
    kernel = _tuple("kernel_size", kernel_size, n, minimum=1)
    strides = _tuple("stride", stride, n, minimum=1)
    dilations = _tuple("dilation", dilation, n, minimum=1)
    if isinstance(padding, str):
        raise ValueError(f"Invalid padding: {padding!r} (transposed convolutions take ints only)")
    pads = _tuple("padding", padding, n, minimum=0)
    out_pads = _tuple("output_padding", output_padding, n, minimum=0)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"Invalid groups: {groups!r} (must be an int >= 1)")
    dims = []
    for o, k, s, d, p, op in zip(spatial, kernel, strides, dilations, pads, out_pads):
        if op >= max(s, d):
            raise ValueError(
                f"Invalid output_padding: {output_padding!r} (must be smaller than "
                f"max(stride, dilation) = {max(s, d)})"
            )
        i = (o - 1) * s - 2 * p + d * (k - 1) + 1 + op
        if i < 1:
            raise ValueError(
                f"Invalid padding: {padding!r} (output size {i} of the transposed convolution "
                f"would be < 1 for input size {spatial})"
            )
        dims.append(DimSpec(i, o, k, s, d, p, p))
    return ConvSpec(tuple(dims), groups, transpose=True, output_padding=out_pads)


def _padding(
    padding: Padding,
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[tuple[int, int], ...]:
    """Resolve ``padding`` into one (left, right) pair per dimension."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in strides):
                raise ValueError(
                    f"Invalid padding: 'same' needs stride 1, got stride={strides} "
                    f"(allowed: 'valid', 'same', int, or a sequence of ints)"
                )
            totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(
            f"Invalid padding: {padding!r} (allowed: 'valid', 'same', int, or a sequence of ints)"
        )
    if not isinstance(padding, int) and any(not isinstance(p, int) for p in padding):
        pairs = tuple(tuple(int(v) for v in p) for p in padding)
        if len(pairs) != n or any(len(p) != 2 or min(p) < 0 for p in pairs):
            raise ValueError(
                f"Invalid padding: {padding!r} (expected {n} non-negative (left, right) pairs)"
            )
        return pairs  # type: ignore[return-value]
    pads = _tuple("padding", padding, n, minimum=0)
    return tuple((p, p) for p in pads)
