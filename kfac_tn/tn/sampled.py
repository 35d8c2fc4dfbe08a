r"""Randomized backpropagation: unbiased, sampled weight VJPs of convolutions.

Bernoulli column-row sampling (Adelman et al., NeurIPS 2021) applied to the tensor network of
the weight VJP

.. math::
    \partial W_{g, c_{out}, c_{in}, k_1 \dots k_N}
    = \sum_{n, i, o} X_{n, g, c_{in}, i_1 \dots i_N}
      \Big(\prod_d \Pi^{(d)}_{k_d, o_d, i_d}\Big) V_{n, g, c_{out}, o_1 \dots o_N}.

A leg ``j`` of ``X`` is sampled by drawing ``z_j ~ Bernoulli(p)`` and replacing the sum over
``j`` with :math:`\sum_j (z_j / p) (\dots)`, which is unbiased. Only the kept slices of ``X``
(and, for spatial legs, the matching slices of the index patterns) are gathered, stored and
contracted; no zero-filled full-size tensor is ever built.

Two axes are supported:

* ``axis="spatial"`` (the paper's proposal, Dangel 2024, §5): sample the input's spatial
  legs ``i``, which are *contracted* through Π. With ``spatial_mode="position"`` (default) one
  Bernoulli variable decides per full spatial position ``(i_1, ..., i_N)`` -- the column-row
  pairs of the matrix product behind the VJP, shared across the batch and the channels.
  With ``spatial_mode="dims"`` every spatial dimension is sampled independently, with
  per-dimension probability ``keep_prob ** (1/N)`` so that the expected kept fraction is
  ``keep_prob`` as well; the kept sub-grid keeps the tensor-network structure (the exact
  weight VJP with shortened ``i`` legs), evaluated like the per-position case.
* ``axis="channel"``: sample the input channels (as in randomized autodiff, Oktay et al.
  2021). The ``c_in`` leg is *not* contracted in the weight VJP, so the estimate is the exact
  gradient rescaled by ``1/p`` for kept channels and zero for dropped ones.

``keep_prob`` is always the expected fraction of ``X`` that is kept (= the memory saved is
``1 - keep_prob`` in expectation).

Which granularity the paper's spatial sampling uses is not spelled out in our notes; we default
to per-position sampling, the column-row sampling of the VJP's matrix product. In
:mod:`kfac_tn.benchmarks.sampled_backprop` it gives a lower error than per-dimension sampling
(which drops whole rows/columns of the grid, correlated) at equal memory, and both are far
below channel sampling, whose relative error is exactly ``sqrt((1-p)/p)`` in mean square.
Only the weight VJP is sampled: input VJPs, hence all backpropagated gradients, stay exact.

The index sets are drawn on the generator's device (the host by default), so drawing a
sample does not synchronise with an accelerator; only the kept indices are copied over.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kfac_tn.tn.derivatives import conv_weight_vjp
from kfac_tn.tn.einsum import contract
from kfac_tn.tn.patterns import cached_index_pattern
from kfac_tn.tn.spec import ConvSpec, DimSpec, IntOrSeq, Padding, conv_spec

AXES = ("spatial", "channel")
SPATIAL_MODES = ("position", "dims")


@dataclass(frozen=True)
class Sample:
    """One draw of the kept slices of a convolution input ``x: [N, C_in, *spatial]``.

    Attributes:
        axis: ``"spatial"`` or ``"channel"``.
        mode: ``"position"`` or ``"dims"`` (spatial axis) or ``"channel"``.
        keep_prob: Expected kept fraction of the input.
        scale: Rescaling ``1/p`` applied to the estimate (``1 / keep_prob`` except for
            ``"dims"``, where it is the product of the per-dimension ``1/p_d``, which equals
            ``1 / keep_prob`` up to rounding).
        indices: Kept indices, int64 on the input's device. ``"position"``: one tensor ``[M]``
            of flat (row-major) spatial positions; ``"dims"``: one tensor ``[M_d]`` per spatial
            dimension; ``"channel"``: one tensor ``[M]`` of input channels. Sorted ascending.
        input_shape: Shape ``(N, C_in, *spatial)`` of the full input.
    """

    axis: str
    mode: str
    keep_prob: float
    scale: float
    indices: tuple[Tensor, ...]
    input_shape: tuple[int, ...]

    @property
    def kept_fraction(self) -> float:
        """Fraction of the input's entries that were kept (from shapes only, no sync)."""
        if self.mode == "position":
            return self.indices[0].numel() / math.prod(self.input_shape[2:])
        if self.mode == "dims":
            return math.prod(i.numel() / s for i, s in zip(self.indices, self.input_shape[2:]))
        return self.indices[0].numel() / self.input_shape[1]

    def kept_shape(self) -> tuple[int, ...]:
        """Shape of :func:`gather`'s result.

        Returns:
            ``(N, C_in, M)`` for ``"position"``, ``(N, C_in, M_1, ..., M_N)`` for ``"dims"``,
            ``(N, M, *spatial)`` for ``"channel"``.
        """
        n, c, *spatial = self.input_shape
        if self.mode == "position":
            return (n, c, self.indices[0].numel())
        if self.mode == "dims":
            return (n, c, *(i.numel() for i in self.indices))
        return (n, self.indices[0].numel(), *spatial)


def _check_keep_prob(keep_prob: float) -> float:
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, numbers.Real):
        raise ValueError(f"Invalid keep_prob: {keep_prob!r} (must be a float in (0, 1])")
    if not 0.0 < float(keep_prob) <= 1.0:
        raise ValueError(f"Invalid keep_prob: {keep_prob!r} (must be a float in (0, 1])")
    return float(keep_prob)


def check_sampling_args(keep_prob: float, axis: str, spatial_mode: str = "position") -> float:
    """Validate the sampling hyperparameters.

    Args:
        keep_prob: Expected kept fraction, in ``(0, 1]``.
        axis: ``"spatial"`` or ``"channel"``.
        spatial_mode: ``"position"`` or ``"dims"``.

    Returns:
        ``keep_prob`` as a float.

    Raises:
        ValueError: On a bad value, naming the argument, its value and the allowed values.
    """
    keep_prob = _check_keep_prob(keep_prob)
    if axis not in AXES:
        raise ValueError(f"Invalid axis: {axis!r} (allowed: {', '.join(map(repr, AXES))})")
    if spatial_mode not in SPATIAL_MODES:
        raise ValueError(
            f"Invalid spatial_mode: {spatial_mode!r} "
            f"(allowed: {', '.join(map(repr, SPATIAL_MODES))})"
        )
    return keep_prob


def _bernoulli_indices(
    size: int, p: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Draw ``z_j ~ Bernoulli(p)`` i.i.d.; return the sorted ``j < size`` with ``z_j = 1``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if p >= 1.0:
        return torch.arange(size, device=device)
    keep = torch.rand(size, generator=generator, device=gen_device) < p
    idx = keep.nonzero().view(-1)
    if idx.device != device:
        if device.type == "cuda" and idx.device.type == "cpu":
            idx = idx.pin_memory().to(device, non_blocking=True)
        else:
            idx = idx.to(device)
    return idx


def draw_sample(
    input_shape: Sequence[int],
    keep_prob: float,
    axis: str = "spatial",
    *,
    spatial_mode: str = "position",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Sample:
    """Draw which slices of a convolution input to keep.

    Args:
        input_shape: ``(N, C_in, *spatial)``.
        keep_prob: Expected kept fraction, in ``(0, 1]``.
        axis: ``"spatial"`` or ``"channel"``.
        spatial_mode: ``"position"`` (one Bernoulli per spatial position) or ``"dims"``
            (independent Bernoulli per index of every spatial dimension, each with
            probability ``keep_prob ** (1/N)``). Ignored for ``axis="channel"``.
        generator: Random generator; the Bernoulli variables are drawn on its device
            (the host when ``None``, using the global host generator).
        device: Device of the returned indices.

    Returns:
        The :class:`Sample`.

    Raises:
        ValueError: On a bad ``keep_prob``, ``axis``, ``spatial_mode`` or ``input_shape``.
    """
    keep_prob = check_sampling_args(keep_prob, axis, spatial_mode)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 3:
        raise ValueError(
            f"Invalid input_shape: {shape} (expected (N, C_in, *spatial) with >= 1 spatial dim)"
        )
    device = torch.device(device)
    spatial = shape[2:]
    if axis == "channel":
        idx = _bernoulli_indices(shape[1], keep_prob, generator, device)
        return Sample(axis, "channel", keep_prob, 1.0 / keep_prob, (idx,), shape)
    if spatial_mode == "position":
        idx = _bernoulli_indices(math.prod(spatial), keep_prob, generator, device)
        return Sample(axis, "position", keep_prob, 1.0 / keep_prob, (idx,), shape)
    p_dim = keep_prob ** (1.0 / len(spatial))
    indices = tuple(_bernoulli_indices(s, p_dim, generator, device) for s in spatial)
    return Sample(axis, "dims", keep_prob, 1.0 / p_dim ** len(spatial), indices, shape)


def gather(x: Tensor, sample: Sample) -> Tensor:
    """Gather the kept slices of ``x`` (a copy of only the kept entries).

    Args:
        x: Convolution input ``[N, C_in, *spatial]`` of shape ``sample.input_shape``.
        sample: The draw.

    Returns:
        ``"position"``: ``[N, C_in, M]``; ``"dims"``: ``[N, C_in, M_1, ..., M_N]``;
        ``"channel"``: ``[N, M, *spatial]``.

    Raises:
        ValueError: If ``x`` does not have the sample's input shape.
    """
    if tuple(x.shape) != sample.input_shape:
        raise ValueError(
            f"Invalid x: shape {tuple(x.shape)} does not match the sample's input shape "
            f"{sample.input_shape}"
        )
    if sample.mode == "position":
        return x.flatten(2).index_select(2, sample.indices[0])
    if sample.mode == "dims":
        for d, idx in enumerate(sample.indices):
            x = x.index_select(2 + d, idx)
        return x
    return x.index_select(1, sample.indices[0])


def _spatial_names(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{d}" for d in range(n))


def _check_v(v: Tensor, spec: ConvSpec, batch: int) -> int:
    expected = (batch, *spec.out_spatial)
    if v.dim() != spec.ndim + 2 or (v.shape[0], *v.shape[2:]) != expected:
        raise ValueError(
            f"Invalid v: shape {tuple(v.shape)}, expected (N={batch}, C_out, "
            f"*{spec.out_spatial}) for this input and these hyperparameters"
        )
    c_out = v.shape[1]
    if c_out % spec.groups:
        raise ValueError(f"Invalid groups: {spec.groups} (does not divide C_out = {c_out} of v)")
    return c_out


def _tap_output_index(dim: DimSpec, positions: Tensor) -> tuple[Tensor, Tensor]:
    """For input positions ``a`` and taps ``k``: the output ``o`` with ``Π[k, o, a] = 1``.

    ``Π[k, :, a]`` has at most one non-zero, at ``o = (a + P_l - D·k) / S`` if that is an
    integer in ``[0, O)``.

    Args:
        dim: Geometry of the dimension.
        positions: Input positions ``[M]`` (int64).

    Returns:
        ``(o, valid)``, both ``[K, M]``; ``o`` is clamped into range where not valid.
    """
    k = torch.arange(dim.kernel, device=positions.device).view(-1, 1)
    num = positions.view(1, -1) + dim.pad_left - dim.dilation * k
    o = torch.div(num, dim.stride, rounding_mode="floor")
    valid = (num >= 0) & (num % dim.stride == 0) & (o < dim.out_size)
    return o.clamp(0, dim.out_size - 1), valid


def _tap_table(spec: ConvSpec, positions: Tensor) -> Tensor:
    """Flat output index read by every kernel tap at the given input positions.

    Args:
        spec: Convolution geometry.
        positions: Flat (row-major) input positions ``[M]`` (int64).

    Returns:
        ``[ΠK, M]`` (taps in row-major order ``(k_1, ..., k_N)``): the flat ``o`` with
        ``Π_d[k_d, o_d, a_d] = 1`` for all ``d``, or ``ΠO`` (an appended zero slot) where a tap
        lands in the padding.
    """
    coords = torch.unravel_index(positions, spec.in_spatial)
    flat_o, valid = _tap_output_index(spec.dims[0], coords[0])  # [K_1, M]
    for dim, a, o_size in zip(spec.dims[1:], coords[1:], spec.out_spatial[1:]):
        o_d, valid_d = _tap_output_index(dim, a)  # [K_d, M]
        flat_o = (flat_o.unsqueeze(-2) * o_size + o_d.unsqueeze(-3)).flatten(-3, -2)
        valid = (valid.unsqueeze(-2) & valid_d.unsqueeze(-3)).flatten(-3, -2)
    return torch.where(valid, flat_o, math.prod(spec.out_spatial))


def _zero_slot_layout(v: Tensor) -> Tensor:
    """``v: [N, C_out, *O]`` as ``[C_out, ΠO + 1, N]`` with a zero slot at ``ΠO``."""
    n, c_out = v.shape[:2]
    o_total = math.prod(v.shape[2:])
    v_t = v.new_empty(c_out, o_total + 1, n)
    v_t[:, :o_total].copy_(v.flatten(2).permute(1, 2, 0))
    v_t[:, o_total].zero_()
    return v_t


def _vjp_positions(x_kept: Tensor, positions: Tensor, v: Tensor, spec: ConvSpec) -> Tensor:
    """Weight VJP from kept spatial positions: ``[G, C_out/G, C_in/G, ΠK]`` (unscaled).

    Contracts ``x_kept[n, g, c_in, j]`` (``j`` over the kept positions ``a(j)``) with the
    gathered index patterns ``Π^{(d)}[k_d, o_d, a_d(j)]`` and ``v``. As every
    ``Π^{(d)}[k_d, :, a]`` is one-hot (or zero), contracting the gathered patterns with ``v``
    is a gather of ``v``: ``v_kept[c_out, k, j, n] = v[n, c_out, o(k, j)]`` (zero where the
    tap hits padding), laid out so that the remaining contraction over ``(j, n)`` is one
    batched matrix product.

    Args:
        x_kept: Kept input entries ``[N, C_in, M]``.
        positions: Their flat (row-major) spatial positions ``[M]``.
        v: Output gradient ``[N, C_out, *out_spatial]``.
        spec: Convolution geometry.
    """
    n, c_in, m = x_kept.shape
    c_out = v.shape[1]
    g = spec.groups
    flat_o = _tap_table(spec, positions)
    k_total = flat_o.shape[0]
    v_kept = _zero_slot_layout(v).index_select(1, flat_o.flatten())  # [C_out, ΠK·M, N]
    x_t = x_kept.view(n, g, c_in // g, m).permute(1, 3, 0, 2).reshape(g, m * n, c_in // g)
    out = torch.bmm(v_kept.view(g, (c_out // g) * k_total, m * n), x_t)
    return out.view(g, c_out // g, k_total, c_in // g).transpose(2, 3)


def _grid_positions(indices: tuple[Tensor, ...], spatial: Sequence[int]) -> Tensor:
    """Flat row-major positions of the sub-grid ``indices[0] × indices[1] × ...``: ``[ΠM_d]``."""
    flat = indices[0]
    for idx, size in zip(indices[1:], spatial[1:]):
        flat = (flat.unsqueeze(-1) * size + idx).flatten()
    return flat


def position_contribution_norms(
    x: Tensor,
    v: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    chunk_numel: int = 1 << 24,
) -> Tensor:
    r"""Squared Frobenius norm of every input position's term of the weight VJP.

    The weight VJP splits over input positions, :math:`\partial W = \sum_i T_i`; this returns
    :math:`\|T_i\|_F^2`. The ``"position"`` estimator's expected squared error follows
    exactly: :math:`E\|\hat g - g\|^2 = \frac{1-p}{p} \sum_i \|T_i\|_F^2`.

    Args:
        x: Convolution input ``[N, C_in, *spatial]``.
        v: Output gradient ``[N, C_out, *out_spatial]``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Dilation, int or N ints.
        groups: Number of channel groups.
        chunk_numel: Upper bound on the entries of the per-chunk terms ``T_i`` held at once.

    Returns:
        ``[*spatial]`` non-negative norms.

    Raises:
        ValueError: On inconsistent shapes or hyperparameters.
    """
    if x.dim() < 3:
        raise ValueError(f"Invalid x: shape {tuple(x.shape)} (expected [N, C_in, *spatial])")
    n, c_in, *spatial = x.shape
    spec = conv_spec(spatial, kernel_size, stride, padding, dilation, groups)
    if c_in % groups:
        raise ValueError(f"Invalid groups: {groups} (does not divide C_in = {c_in})")
    c_out = _check_v(v, spec, n)
    g, i_total, k_total = groups, math.prod(spatial), math.prod(spec.kernel_size)
    v_t = _zero_slot_layout(v)
    x_flat = x.flatten(2)
    per_position = c_out * k_total * (c_in // g)
    chunk = max(1, chunk_numel // per_position)
    norms = []
    for start in range(0, i_total, chunk):
        pos = torch.arange(start, min(start + chunk, i_total), device=x.device)
        m = pos.numel()
        v_kept = v_t.index_select(1, _tap_table(spec, pos).flatten())
        terms = contract(
            "g c_out k m n, n g c_in m -> m g c_out k c_in",
            v_kept.view(g, c_out // g, k_total, m, n),
            x_flat[:, :, start : start + m].reshape(n, g, c_in // g, m),
        )
        norms.append(terms.pow(2).flatten(1).sum(1))
    return torch.cat(norms).view(spatial)


def _vjp_channel(x_kept: Tensor, sample: Sample, v: Tensor, spec: ConvSpec) -> Tensor:
    """Weight VJP for kept input channels, zero elsewhere: ``[G, C_out/G, C_in/G, ΠK]``."""
    n, m = x_kept.shape[:2]
    c_in = sample.input_shape[1]
    c_out = v.shape[1]
    g, nd = spec.groups, spec.ndim
    k_total = math.prod(spec.kernel_size)
    out = x_kept.new_zeros(g, c_out // g, c_in // g, k_total)
    if m == 0:
        return out
    channels = sample.indices[0]
    if g == 1:  # the kept channels form an ordinary convolution: use the engine's fastest VJP
        kept = conv_weight_vjp(
            x_kept,
            v,
            spec.kernel_size,
            spec.strides,
            spec.padding_pairs,
            spec.dilations,
        )
        out[0].index_copy_(1, channels, kept.flatten(2))
        return out
    # each kept channel meets only its own group's output gradients
    patterns = [cached_index_pattern(dim, x_kept.dtype, x_kept.device) for dim in spec.dims]
    i, o, k = (_spatial_names(p, nd) for p in ("i", "o", "k"))
    pats = ", ".join(f"k{d} o{d} i{d}" for d in range(nd))
    c_group = c_in // g
    group_of, local = channels // c_group, channels % c_group
    v_kept = v.view(n, g, c_out // g, *v.shape[2:]).index_select(1, group_of)
    kept = contract(f"n j {i}, {pats}, n j c_out {o} -> j c_out {k}", x_kept, *patterns, v_kept)
    out[group_of, :, local] = kept.flatten(2)
    return out


def kept_conv_weight_vjp(
    x_kept: Tensor,
    sample: Sample,
    v: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> Tensor:
    """Unbiased weight-VJP estimate from the kept input slices of a draw.

    Args:
        x_kept: ``gather(x, sample)``.
        sample: The draw (see :func:`draw_sample`).
        v: Output gradient ``[N, C_out, *out_spatial]``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Dilation, int or N ints.
        groups: Number of channel groups.

    Returns:
        Estimate of the weight gradient ``[C_out, C_in/G, *kernel_size]``.

    Raises:
        ValueError: On inconsistent shapes or hyperparameters.
    """
    n, c_in, *spatial = sample.input_shape
    spec = conv_spec(spatial, kernel_size, stride, padding, dilation, groups)
    if tuple(x_kept.shape) != sample.kept_shape():
        raise ValueError(
            f"Invalid x_kept: shape {tuple(x_kept.shape)}, expected {sample.kept_shape()} "
            f"(use gather(x, sample))"
        )
    if c_in % groups:
        raise ValueError(f"Invalid groups: {groups} (does not divide C_in = {c_in})")
    c_out = _check_v(v, spec, n)
    if sample.mode == "channel":
        out = _vjp_channel(x_kept, sample, v, spec)
    elif x_kept.numel() == 0:
        out = x_kept.new_zeros(groups, c_out // groups, c_in // groups, math.prod(spec.kernel_size))
    elif sample.mode == "position":
        out = _vjp_positions(x_kept, sample.indices[0], v, spec)
    else:  # the kept sub-grid, flattened row-major like its positions
        positions = _grid_positions(sample.indices, spec.in_spatial)
        out = _vjp_positions(x_kept.flatten(2), positions, v, spec)
    out = out.reshape(c_out, c_in // groups, *spec.kernel_size)
    return out * sample.scale if sample.scale != 1.0 else out


def sampled_conv_weight_vjp(
    x: Tensor,
    v: Tensor,
    kernel_size: IntOrSeq,
    stride: IntOrSeq = 1,
    padding: Padding = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    keep_prob: float,
    axis: str = "spatial",
    spatial_mode: str = "position",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Unbiased Bernoulli-CRS estimate of the weight VJP of an N-d convolution.

    Draws the kept slices (:func:`draw_sample`), gathers them (:func:`gather`) and contracts
    them with the matching index-pattern slices and ``v`` (:func:`kept_conv_weight_vjp`).
    With ``keep_prob=1`` the result equals the exact weight VJP.

    Args:
        x: Convolution input ``[N, C_in, *spatial]``.
        v: Output gradient ``[N, C_out, *out_spatial]``.
        kernel_size: Kernel size, int or N ints.
        stride: Stride, int or N ints.
        padding: Int, N ints, N (left, right) pairs, ``'valid'`` or ``'same'``.
        dilation: Dilation, int or N ints.
        groups: Number of channel groups.
        keep_prob: Expected kept fraction of ``x``, in ``(0, 1]``.
        axis: ``"spatial"`` (sample input positions, contracted through Π) or ``"channel"``.
        spatial_mode: ``"position"`` (default) or ``"dims"``, see the module docstring.
        generator: Random generator (its device is where the Bernoulli draws happen).

    Returns:
        Estimated weight gradient ``[C_out, C_in/G, *kernel_size]``.

    Raises:
        ValueError: On a bad ``keep_prob``, ``axis``, ``spatial_mode`` or inconsistent shapes.
    """
    check_sampling_args(keep_prob, axis, spatial_mode)
    if x.dim() < 3:
        raise ValueError(f"Invalid x: shape {tuple(x.shape)} (expected [N, C_in, *spatial])")
    sample = draw_sample(
        x.shape, keep_prob, axis, spatial_mode=spatial_mode, generator=generator, device=x.device
    )
    return kept_conv_weight_vjp(
        gather(x, sample), sample, v, kernel_size, stride, padding, dilation, groups
    )
