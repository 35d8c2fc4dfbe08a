"""Cost models of the KFAC input factors: which ``impl`` ``"auto"`` runs, which expand strategy.

Both are decided from shapes alone and cached per shape (``functools.lru_cache``):

* :func:`choose_impl` — ``impl="auto"`` of :func:`~kfac_tn.tn.kfac_expand_factor` /
  :func:`~kfac_tn.tn.kfac_reduce_factor`: the plain network (``'tn'``) or the simplified one.
* :func:`expand_strategy` — ``impl="tn_simplified"`` of the expand factor: one Gram GEMM of the
  strided patch view (``'gemm'``) or the lag products of stride-1 convolutions (``'lag'``,
  :mod:`kfac_tn.tn.lag`).

Estimated time ``= FLOPs·8.5e-12 s + elements moved·8.9e-10 s + GEMM calls·7.6e-5 s``
(relative least-squares fit over 25 layer shapes at batch 32-128, one thread, on a 2-core CPU:
``python -m kfac_tn.benchmarks.expand_strategies``; it picks the faster strategy wherever the
two differ by more than the run-to-run noise).
"""

from __future__ import annotations

import functools

import torch

from kfac_tn.tn import networks
from kfac_tn.tn._common import check_impl, prod
from kfac_tn.tn.einsum import contraction_path
from kfac_tn.tn.expressions import routine_expression
from kfac_tn.tn.lag import lag_cost, lag_plan
from kfac_tn.tn.spec import ConvSpec

__all__ = [
    "choose_impl",
    "estimated_seconds",
    "expand_factor_work",
    "expand_strategy",
    "resolve_impl",
    "simplified_seconds",
]

# expand cost model: seconds per FLOP, per element copied or accumulated, per GEMM call
_SECONDS_PER_FLOP = 8.5e-12
_SECONDS_PER_ELEMENT = 8.9e-10
_SECONDS_PER_CALL = 7.6e-5
# the plain network's pairwise einsums run at ~70% of the GEMM's FLOP rate (measured)
_PLAIN_FLOP_RATE = 0.7


def choose_impl(
    kind: str,
    spec: ConvSpec,
    batch_size: int,
    channels: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> str:
    """Pick the implementation ``impl='auto'`` uses for a factor, from shapes alone (cached).

    Cost model (calibrated on a 2-core CPU, one thread; see
    ``python -m kfac_tn.benchmarks.tn``):

    * KFAC-reduce: ``'tn_simplified'``.  It never materialises the unfolded input: 1×1
      dimensions are summed on strided views, all others contracted with the 0/1 band matrix
      ``Π̄`` — about one pass over the input (10-40x faster than unfold + mean on 3×3 / 7×7
      layers, and no auxiliary memory).
    * KFAC-expand: ``'tn_simplified'`` has two strategies (:func:`expand_strategy`): the single
      GEMM copies the strided patch view once, straight into the matmul layout
      ``[G, (c k…), (n o…)]`` (the standard way copies twice: im2col, then the rearrangement)
      and costs ``2·G·D²·N·O`` FLOPs; on CPUs, stride-1 layers can instead contract lag
      products (:mod:`kfac_tn.tn.lag`: the Π-pair contraction is Toeplitz, so ``(2K-1)^N``
      shared lags replace ``K^{2N}`` block products; 2-5x faster on 3×3 / 5×5 layers with
      ``C ≥ 8``).  The plain network can be cheaper when correlating the input *before*
      applying Π saves work (long kernels on small inputs, e.g. InceptionV3's 7×1 on GPUs):
      its opt_einsum ``dp`` path is chosen when its largest intermediate is at most twice the
      unfolded input and, on CPUs, its estimated time (FLOPs at 70% of the GEMM rate,
      intermediates, pairwise contractions; see the module docstring) is below the
      simplified strategy's; on GPUs, when it needs under 70% of the single GEMM's FLOPs.

    Args:
        kind: ``'expand'`` or ``'reduce'``.
        spec: The layer's spec.
        batch_size: ``N``.
        channels: Input channels ``C_in``.
        dtype: Input dtype.
        device: Input device.

    Returns:
        ``'tn'`` or ``'tn_simplified'``.

    Raises:
        ValueError: If ``kind`` is not ``'expand'`` or ``'reduce'``.
    """
    return _choose(kind, spec, batch_size, channels, dtype, torch.device(device).type)


def resolve_impl(kind: str, impl: str, spec: ConvSpec, x: torch.Tensor) -> str:
    """Check a factor's ``impl``; ``'auto'`` becomes :func:`choose_impl`'s choice for ``x``.

    Args:
        kind: ``'expand'`` or ``'reduce'``.
        impl: The ``impl`` argument of the factor.
        spec: The layer's spec.
        x: The layer input ``[N, C_in, *spatial]``.

    Returns:
        ``'tn'``, ``'tn_simplified'`` or ``'standard'``.

    Raises:
        ValueError: If ``impl`` is invalid.
    """
    check_impl(impl)
    if impl == "auto":
        return _choose(kind, spec, x.shape[0], x.shape[1], x.dtype, x.device.type)
    return impl


@functools.lru_cache(maxsize=4096)
def _choose(
    kind: str, spec: ConvSpec, batch: int, channels: int, dtype: torch.dtype, device_type: str
) -> str:
    """:func:`choose_impl` on hashable arguments (the device as its type), cached."""
    if kind not in ("expand", "reduce"):
        raise ValueError(f"Invalid kind: {kind!r} (allowed: 'expand', 'reduce')")
    if kind == "reduce" or spec.ndim > 4:  # N > 4: skip the (exponential) dp path search
        return "tn_simplified"
    spatial = spec.out_spatial if spec.transpose else spec.in_spatial
    expr = routine_expression(networks.kfac_expand_factor, spec, ((batch, channels, *spatial),))
    info = contraction_path(expr.equation, [shape for _, shape in expr.operands])
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    unfolded = batch * channels * prod(spec.kernel_size) * positions
    if device_type == "cpu":  # time model: the simplified strategies include lag products
        simplified = simplified_seconds(spec, batch, channels, device_type)
        plain = estimated_seconds(
            float(info.opt_cost) / _PLAIN_FLOP_RATE,
            sum(info.size_list),
            len(info.contraction_list),
        )
        cheaper = plain < min(simplified.values())
    else:  # accelerators: FLOPs only, as measured on the H100
        d = channels // spec.groups * prod(spec.kernel_size)
        gemm = _PLAIN_FLOP_RATE * 2 * spec.groups * d * d * batch * positions
        cheaper = float(info.opt_cost) < gemm
    if cheaper and info.largest_intermediate <= 2 * unfolded:
        return "tn"
    return "tn_simplified"


def expand_strategy(
    spec: ConvSpec, batch_size: int, channels: int, device: torch.device | str
) -> str:
    """Strategy of ``kfac_expand_factor(..., impl='tn_simplified')`` for these shapes (cached).

    Args:
        spec: The layer's spec.
        batch_size: ``N``.
        channels: Input channels ``C_in``.
        device: Input device.

    Returns:
        ``'lag'`` (lag products, :mod:`kfac_tn.tn.lag`; stride-1 convolutions on CPU, where the
        cost model estimates them faster) or ``'gemm'`` (one Gram GEMM of the patch view).
    """
    times = simplified_seconds(spec, batch_size, channels, torch.device(device).type)
    return min(times, key=times.__getitem__)


def expand_factor_work(spec: ConvSpec, batch_size: int, channels: int, device_type: str) -> float:
    """Work of the simplified expand input factor, in GEMM-flop equivalents.

    The estimated seconds of the faster simplified strategy (:func:`simplified_seconds`) at the
    fitted GEMM rate, so the lag products of stride-1 convolutions count for what they cost
    rather than for the Gram GEMM they replace (the ``curvature_budget`` cost model). Where
    ``impl='auto'`` runs the plain network instead, it does so because that is estimated
    cheaper, so this is an upper bound of what ``auto`` costs.

    Args:
        spec: The layer's spec.
        batch_size: ``N``.
        channels: Input channels ``C_in``.
        device_type: ``'cpu'``, ``'cuda'``, ...

    Returns:
        Flop-equivalents ``>= 0``.
    """
    seconds = simplified_seconds(spec, batch_size, channels, device_type)
    return min(seconds.values()) / _SECONDS_PER_FLOP


def estimated_seconds(flops: float, elements: float, calls: float) -> float:
    """Estimate seconds with the fitted time model.

    Args:
        flops: Floating-point operations.
        elements: Elements copied or accumulated.
        calls: GEMM (or pairwise contraction) calls.

    Returns:
        Estimated seconds on the calibration machine (one thread).
    """
    return flops * _SECONDS_PER_FLOP + elements * _SECONDS_PER_ELEMENT + calls * _SECONDS_PER_CALL


@functools.lru_cache(maxsize=4096)
def simplified_seconds(
    spec: ConvSpec, batch: int, channels: int, device_type: str
) -> dict[str, float]:
    """Estimated seconds of the simplified expand strategies that apply.

    Args:
        spec: The layer's spec.
        batch: ``N``.
        channels: Input channels ``C_in``.
        device_type: ``'cpu'``, ``'cuda'``, ...

    Returns:
        ``{'gemm': s}`` always, plus ``'lag'`` for stride-1 convolutions on CPU.
    """
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    d = channels // spec.groups * prod(spec.kernel_size)
    blocks = 1 if d < 512 or device_type != "cpu" else (3 if d < 2048 else 4)  # symmetric_gram
    flops = 2 * spec.groups * d * d * batch * positions * (blocks + 1) / (2 * blocks)
    out = {
        "gemm": estimated_seconds(flops, batch * channels * prod(spec.kernel_size) * positions, 1)
    }
    plan = lag_plan(spec) if device_type == "cpu" else None  # lag: never measured on GPUs
    if plan is not None:
        out["lag"] = estimated_seconds(**lag_cost(plan, batch, channels, spec.groups))
    return out
