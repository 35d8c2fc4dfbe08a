"""Cost models of the KFAC input factors: which ``impl`` ``"auto"`` runs, which expand strategy.

Both are decided from shapes alone and cached per shape (``functools.lru_cache``):

* :func:`choose_impl` — ``impl="auto"`` of :func:`~kfac_tn.tn.kfac_expand_factor` /
  :func:`~kfac_tn.tn.kfac_reduce_factor`: the plain network (``'tn'``) or the simplified one.
* :func:`expand_strategy` — ``impl="tn_simplified"`` of the expand factor: one Gram GEMM of the
  strided patch view (``'gemm'``) or the lag products of stride-1 convolutions (``'lag'``,
  :mod:`kfac_tn.tn.lag`).

Estimated time ``= FLOPs·s_flop + elements moved·s_element + GEMM calls·s_call`` with the
plain network's FLOPs at ``plain_rate`` of the GEMM's rate. The constants
(:class:`CpuCalibration`) are fitted per CPU capability (``torch.backends.cpu
.get_cpu_capability()``; relative least squares over the layer shapes of
``python -m kfac_tn.benchmarks.expand_strategies --fit``, one thread, 2-core machines): the AVX2
and the AVX-512 machines differ by up to 2x in how FLOPs compare with memory traffic, enough to
flip choices. The calibration depends only on the machine, so a rerun, a resume and every
replica on one machine take the same paths by construction; other capabilities use AVX2's.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from kfac_tn.tn import networks
from kfac_tn.tn._common import check_impl, prod
from kfac_tn.tn.einsum import contraction_path
from kfac_tn.tn.expressions import routine_expression
from kfac_tn.tn.lag import lag_cost, lag_plan
from kfac_tn.tn.spec import ConvSpec

__all__ = [
    "CALIBRATIONS",
    "CpuCalibration",
    "choose_impl",
    "cpu_calibration",
    "estimated_seconds",
    "expand_factor_work",
    "expand_strategy",
    "plain_features",
    "plain_seconds",
    "resolve_impl",
    "simplified_seconds",
]


@dataclass(frozen=True)
class CpuCalibration:
    """Constants of the expand time model on one kind of CPU (one thread).

    Attributes:
        seconds_per_flop: Seconds per GEMM FLOP.
        seconds_per_element: Seconds per element copied or accumulated.
        seconds_per_call: Seconds per GEMM (or pairwise contraction) call.
        plain_rate: FLOP rate of the plain network's pairwise einsums relative to the GEMM's.
    """

    seconds_per_flop: float
    seconds_per_element: float
    seconds_per_call: float
    plain_rate: float


#: Fitted constants per ``torch.backends.cpu.get_cpu_capability()``.
CALIBRATIONS: dict[str, CpuCalibration] = {
    "AVX2": CpuCalibration(8.5e-12, 8.9e-10, 7.6e-5, 0.7),
    "AVX512": CpuCalibration(1.20e-11, 5.06e-10, 3.91e-5, 0.615),
}
_FALLBACK = "AVX2"
logger = logging.getLogger(__name__)
# accelerators: the plain network when it needs under this fraction of the GEMM's FLOPs (H100)
_GPU_PLAIN_RATE = 0.7


@functools.cache
def cpu_calibration() -> CpuCalibration:
    """Return the calibration of this machine's CPU capability (AVX2's where none was fitted).

    Returns:
        The constants :func:`estimated_seconds` uses by default.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    used = capability if capability in CALIBRATIONS else _FALLBACK
    logger.debug("expand cost model: CPU capability %s, calibration %s", capability, used)
    return CALIBRATIONS[used]


def choose_impl(
    kind: str,
    spec: ConvSpec,
    batch_size: int,
    channels: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    calibration: CpuCalibration | None = None,
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
      unfolded input and, on CPUs, its estimated time (FLOPs at the calibration's
      ``plain_rate`` of the GEMM rate, intermediates, pairwise contractions; see the module
      docstring) is below the simplified strategy's; on GPUs, when it needs under 70% of the
      single GEMM's FLOPs.

    Args:
        kind: ``'expand'`` or ``'reduce'``.
        spec: The layer's spec.
        batch_size: ``N``.
        channels: Input channels ``C_in``.
        dtype: Input dtype.
        device: Input device.
        calibration: CPU time-model constants; ``None``: this machine's
            (:func:`cpu_calibration`).

    Returns:
        ``'tn'`` or ``'tn_simplified'``.

    Raises:
        ValueError: If ``kind`` is not ``'expand'`` or ``'reduce'``.
    """
    cal = calibration or cpu_calibration()
    return _choose(kind, spec, batch_size, channels, dtype, torch.device(device).type, cal)


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
        cal = cpu_calibration()
        return _choose(kind, spec, x.shape[0], x.shape[1], x.dtype, x.device.type, cal)
    return impl


@functools.lru_cache(maxsize=4096)
def _choose(
    kind: str,
    spec: ConvSpec,
    batch: int,
    channels: int,
    dtype: torch.dtype,
    device_type: str,
    calibration: CpuCalibration,
) -> str:
    """:func:`choose_impl` on hashable arguments (the device as its type), cached."""
    if kind not in ("expand", "reduce"):
        raise ValueError(f"Invalid kind: {kind!r} (allowed: 'expand', 'reduce')")
    if kind == "reduce" or spec.ndim > 4:  # N > 4: skip the (exponential) dp path search
        return "tn_simplified"
    plain = plain_features(spec, batch, channels)
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    unfolded = batch * channels * prod(spec.kernel_size) * positions
    if device_type == "cpu":  # time model: the simplified strategies include lag products
        simplified = simplified_seconds(spec, batch, channels, device_type, calibration)
        cheaper = plain_seconds(plain, calibration) < min(simplified.values())
    else:  # accelerators: FLOPs only, as measured on the H100
        d = channels // spec.groups * prod(spec.kernel_size)
        gemm = _GPU_PLAIN_RATE * 2 * spec.groups * d * d * batch * positions
        cheaper = plain["flops"] < gemm
    if cheaper and plain["largest"] <= 2 * unfolded:
        return "tn"
    return "tn_simplified"


def plain_features(spec: ConvSpec, batch: int, channels: int) -> dict[str, float]:
    """Return the time model's inputs for the plain expand network (its opt_einsum ``dp`` path).

    Args:
        spec: The layer's spec.
        batch: ``N``.
        channels: Input channels ``C_in``.

    Returns:
        ``{'flops', 'elements', 'calls', 'largest'}``: the path's FLOPs, the elements of its
        intermediates, its pairwise contractions and its largest intermediate.
    """
    spatial = spec.out_spatial if spec.transpose else spec.in_spatial
    expr = routine_expression(networks.kfac_expand_factor, spec, ((batch, channels, *spatial),))
    info = contraction_path(expr.equation, [shape for _, shape in expr.operands])
    return {
        "flops": float(info.opt_cost),
        "elements": float(sum(info.size_list)),
        "calls": float(len(info.contraction_list)),
        "largest": float(info.largest_intermediate),
    }


def plain_seconds(features: dict[str, float], calibration: CpuCalibration | None = None) -> float:
    """Estimated seconds of the plain expand network from :func:`plain_features` (CPU).

    Args:
        features: The network's :func:`plain_features`.
        calibration: The constants; ``None``: this machine's (:func:`cpu_calibration`).

    Returns:
        Seconds: its FLOPs at the calibration's ``plain_rate`` of the GEMM rate, plus its
        intermediates and pairwise contractions.
    """
    c = calibration or cpu_calibration()
    flops = features["flops"] / c.plain_rate
    return estimated_seconds(flops, features["elements"], features["calls"], c)


def expand_strategy(
    spec: ConvSpec,
    batch_size: int,
    channels: int,
    device: torch.device | str,
    *,
    calibration: CpuCalibration | None = None,
) -> str:
    """Strategy of ``kfac_expand_factor(..., impl='tn_simplified')`` for these shapes (cached).

    Args:
        spec: The layer's spec.
        batch_size: ``N``.
        channels: Input channels ``C_in``.
        device: Input device.
        calibration: CPU time-model constants; ``None``: this machine's.

    Returns:
        ``'lag'`` (lag products, :mod:`kfac_tn.tn.lag`; stride-1 convolutions on CPU, where the
        cost model estimates them faster) or ``'gemm'`` (one Gram GEMM of the patch view).
    """
    device_type = torch.device(device).type
    times = simplified_seconds(spec, batch_size, channels, device_type, calibration)
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
    return min(seconds.values()) / cpu_calibration().seconds_per_flop


def estimated_seconds(
    flops: float, elements: float, calls: float, calibration: CpuCalibration | None = None
) -> float:
    """Estimate seconds with the fitted time model.

    Args:
        flops: Floating-point operations.
        elements: Elements copied or accumulated.
        calls: GEMM (or pairwise contraction) calls.
        calibration: The constants; ``None``: this machine's (:func:`cpu_calibration`).

    Returns:
        Estimated seconds on a machine of the calibration's kind (one thread).
    """
    c = calibration or cpu_calibration()
    return (
        flops * c.seconds_per_flop + elements * c.seconds_per_element + calls * c.seconds_per_call
    )


@functools.lru_cache(maxsize=4096)
def simplified_seconds(
    spec: ConvSpec,
    batch: int,
    channels: int,
    device_type: str,
    calibration: CpuCalibration | None = None,
) -> dict[str, float]:
    """Estimated seconds of the simplified expand strategies that apply.

    Args:
        spec: The layer's spec.
        batch: ``N``.
        channels: Input channels ``C_in``.
        device_type: ``'cpu'``, ``'cuda'``, ...
        calibration: The constants; ``None``: this machine's (:func:`cpu_calibration`).

    Returns:
        ``{'gemm': s}`` always, plus ``'lag'`` for stride-1 convolutions on CPU.
    """
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    d = channels // spec.groups * prod(spec.kernel_size)
    blocks = 1 if d < 512 or device_type != "cpu" else (3 if d < 2048 else 4)  # symmetric_gram
    flops = 2 * spec.groups * d * d * batch * positions * (blocks + 1) / (2 * blocks)
    out = {
        "gemm": estimated_seconds(
            flops, batch * channels * prod(spec.kernel_size) * positions, 1, calibration
        )
    }
    plan = lag_plan(spec) if device_type == "cpu" else None  # lag: never measured on GPUs
    if plan is not None:
        out["lag"] = estimated_seconds(
            **lag_cost(plan, batch, channels, spec.groups), calibration=calibration
        )
    return out
