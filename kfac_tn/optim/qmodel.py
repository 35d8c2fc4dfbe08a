r"""The quadratic model of a step and the loss change it predicts, on the step's own batch.

For the update :math:`\Delta` of one step (the parameter change, momentum and weight decay
included) the optimizer's objective is :math:`h(\theta) = L(\theta) + \tfrac{\lambda}{2}
\lVert\theta\rVert^2` (:math:`\lambda` the param group's ``weight_decay``, which the update adds
as the gradient of that term), and its quadratic model

.. math::
    q(\Delta) = (\nabla L + \lambda\theta)^\top \Delta + \tfrac12 \Delta^\top (C + \lambda I) \Delta

with :math:`C` the curvature: ``"kronecker"`` — the optimizer's own blocks,
:math:`\sum_\ell \langle M_\ell, G_\ell M_\ell A_\ell\rangle` for the layer updates :math:`M_\ell`
in block layout (about the cost of one preconditioning, no model evaluation; parameters without
a block contribute no curvature); ``"exact"`` — the generalised Gauss-Newton matrix of the loss,
:math:`(J\Delta)^\top H_f (J\Delta)` on the recorded batch, with :math:`J\Delta` from one
forward-mode pass (``torch.func.jvp``, exact, about 2-3 forward passes) or, on CPU by default,
from a one-sided difference quotient :math:`(f(\theta + t\Delta) - f(\theta)) / t` (one forward
pass: :math:`f(\theta)` is the recorded output; :data:`DIFFERENCE_STEP` sets :math:`t`).

The true change :math:`h(\theta+\Delta) - h(\theta)` needs the loss at the new parameters on the
same batch: the optimizer records the batch's model inputs, outputs and output gradients during
the step's own forward/backward passes (:class:`RecordedPass`), recovers the targets from them
(:func:`kfac_tn.losses.recovered_targets`; exact for unweighted cross-entropy with hard or soft
targets and for MSE, the losses the optimizer is told about) and evaluates the model once more,
with the random-number state of the recorded pass (same dropout masks) and its buffers restored
afterwards (BatchNorm running statistics are not touched). No closure is needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from kfac_tn.blocks import KroneckerBlock
from kfac_tn.distributed import Communicator
from kfac_tn.enums import LossType, QModel, QModelJvp
from kfac_tn.losses import hessian_quadratic, hessian_traces, loss_value, recovered_targets
from kfac_tn.optim.update import Update

__all__ = [
    "DIFFERENCE_STEP",
    "RecordedPass",
    "RngState",
    "StepPieces",
    "SAMPLING_MIX",
    "SampledBatch",
    "SampledPass",
    "exact_curvature",
    "importance_sample",
    "inclusion_probabilities",
    "jvp_forwards",
    "kronecker_curvature",
    "recorded_loss",
    "sampled_loss",
    "sampling_offset",
    "step_pieces",
]


DIFFERENCE_STEP: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 5e-9}
r"""Relative size :math:`c` of the difference step, :math:`t \lVert\Delta\rVert = c
\max(\lVert\theta\rVert, \lVert\Delta\rVert)`, per parameter dtype (about
:math:`0.3\sqrt{\varepsilon}`). Measured in float32 against a float64 JVP (digits CNN and 3c3d,
64 samples, random directions of relative size 1e-1 and 1e-3): the relative error of
:math:`\Delta^\top G \Delta` is 6e-5 to 3e-3 at :math:`c = 10^{-4}`, and grows on both sides
(ReLU kinks crossed above, rounding below: 2e-3 to 3e-2 at 1e-3 and at 1e-5)."""


@dataclass
class RngState:
    """Random-number state at the start of a forward pass (CPU and, if used, one CUDA device)."""

    cpu: Tensor
    cuda: tuple[int, Tensor] | None = None

    @classmethod
    def capture(cls, device: torch.device | None) -> RngState:
        """Snapshot the generators a forward pass on ``device`` draws from."""
        cuda = None
        if device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = (index, torch.cuda.get_rng_state(index))
        return cls(torch.get_rng_state(), cuda)

    def unchanged(self) -> bool:
        """Whether the generators are still in this state (nothing was drawn since)."""
        if not torch.equal(torch.get_rng_state(), self.cpu):
            return False
        if self.cuda is None:
            return True
        return torch.equal(torch.cuda.get_rng_state(self.cuda[0]), self.cuda[1])

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with this state; the generators are restored afterwards."""
        devices = [self.cuda[0]] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
            yield


@dataclass
class RecordedPass:
    """One forward/backward pass of a step, kept to re-evaluate its loss.

    Attributes:
        args: Positional arguments of the model call.
        kwargs: Keyword arguments of the model call.
        rng: Random-number state before the call.
        output: The model output ``[N, *]`` (detached).
        output_grad: The gradient of the user's loss w.r.t. the output (``None`` until the
            backward pass reached it; unscaled by a ``GradScaler``).
        autocast: Whether the call ran under ``torch.autocast`` (its output is then not the
            full-precision function a difference quotient needs).
        drew_random: Whether the call drew random numbers (dropout and the like): its
            output is then not comparable with a pass over a part of its samples.
    """

    args: tuple
    kwargs: dict
    rng: RngState
    output: Tensor | None = None
    output_grad: Tensor | None = None
    autocast: bool = False
    drew_random: bool = True

    @property
    def complete(self) -> bool:
        """Whether both the output and its gradient were recorded."""
        return self.output is not None and self.output_grad is not None


def _module(model: nn.Module) -> nn.Module:
    """Return the module to evaluate: DDP's wrapped module (no collectives), else ``model``."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Let normalisation layers use batch statistics without updating the running ones.

    A function transform must not mutate captured buffers; the outputs are unchanged.
    """
    changed = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def recorded_loss(
    model: nn.Module,
    passes: Sequence[RecordedPass],
    loss: LossType,
    r: float,
    *,
    params: Mapping[str, Tensor] | None = None,
) -> Tensor:
    r"""Return the loss of the recorded passes, as recorded or at other parameter values.

    Args:
        model: The model (a DDP wrapper is unwrapped, so no collectives run).
        passes: Complete recorded passes of one step.
        loss: The loss function.
        r: Reduction scale over all the step's samples.
        params: ``None``: the recorded outputs' loss. Else re-run the model with these
            parameter values (by ``named_parameters`` name; the others as they are), with the
            recorded random state and the buffers restored afterwards.

    Returns:
        :math:`r \sum_n \ell_n` over all passes, a float64 scalar.
    """
    module = _module(model)
    total = torch.zeros((), dtype=torch.float64)
    for p in passes:
        targets = recovered_targets(p.output, p.output_grad, loss, r)
        output = p.output
        if params is not None:
            with torch.no_grad(), p.rng.replay(), _buffers_restored(module):
                output = functional_call(module, dict(params), p.args, p.kwargs, strict=False)
        total = total + loss_value(output, targets, loss, r).cpu()
    return total


def exact_curvature(
    model: nn.Module,
    passes: Sequence[RecordedPass],
    loss: LossType,
    r: float,
    params: Mapping[str, Tensor],
    tangents: Mapping[str, Tensor],
    *,
    samples: int | None = None,
    jvp_mode: QModelJvp = QModelJvp.FORWARD,
    offset: float = 0.5,
) -> Tensor:
    r""":math:`\Delta^\top G \Delta` (GGN) on the recorded batch, by one JVP per pass.

    The JVP :math:`J\Delta` is forward-mode (``jvp_mode="forward"``) or a difference quotient
    (``"difference"``; ``"auto"``: on CPU), see :func:`jvp_forwards` for when the latter applies.
    Its base :math:`f(\theta)` is the pass's recorded output when the pass ran without
    autocast, in the parameters' dtype, and either on exactly these samples or without drawing
    random numbers and without BatchNorm in training mode (then a slice of it); otherwise one
    more forward pass at :math:`\theta` with the recorded random state. A model whose layers
    couple samples some other way (a custom batch statistic) needs ``"forward"`` with
    ``samples`` below the batch size.

    With ``samples`` = m smaller than the step's N samples (over all passes), the JVP runs on
    m of them, drawn with probability proportional to their loss-Hessian trace
    (:func:`importance_sample`: for cross-entropy the uncertain predictions, which carry the
    curvature; for MSE evenly spaced samples) and weighted by their inverse inclusion
    probabilities — an unbiased estimate at about m / N of the cost. Measured on the MNIST CNN
    over 3 epochs of training at batch 128 (``Δ`` each step's update;
    ``python -m kfac_tn.benchmarks.qmodel_sampling``): the estimate's relative error (standard
    deviation over the draws) had median 0.000 and maximum 0.048 with m = 64, against 0.54 and
    0.90 for 64 uniformly drawn samples (what the first 64 of a shuffled batch are, the earlier
    rule); with m = 32 0.003 and 0.20 against 0.93 and 1.56. The samples are
    picked over the passes in order, so accumulated micro-batches
    equal one large batch (every tensor argument of a pass whose leading dimension is its batch
    size is indexed). Batch-coupled layers (BatchNorm in training mode) then normalise with the
    sub-batch's statistics, and dropout masks are drawn afresh for the smaller shape, so the
    estimate is of a slightly different function; ``samples=None`` is exact.

    Args:
        model: The model (DDP unwrapped).
        passes: Complete recorded passes.
        loss: The loss function.
        r: Reduction scale.
        params: Parameters to evaluate at, by ``named_parameters`` name (others: the module's).
        tangents: :math:`\Delta` for (a subset of) those names.
        samples: Samples to evaluate on, over all passes (``None``: all).
        jvp_mode: How :math:`J\Delta` is computed.
        offset: The draw's offset in ``[0, 1)`` (:func:`importance_sample`; the optimizer
            varies it per step with :func:`sampling_offset`).

    Returns:
        A float64 scalar.
    """
    curvature, _ = _exact_terms(
        model, passes, loss, r, params, tangents, samples, jvp_mode, offset, keep=False
    )
    return curvature


@dataclass
class SampledPass:
    r"""One recorded pass's share of the exact curvature's sub-batch.

    Attributes:
        record: The recorded pass.
        args: Its model arguments on the drawn samples.
        kwargs: Its keyword arguments on the drawn samples.
        base: :math:`f(\theta)` on them ``[k, *]``, the function the JVP differentiated.
        targets: Their recovered targets ``[k, *]``.
        weight: Their Horvitz-Thompson weights :math:`1/\pi_n` ``[k]`` (float64).
        linear: :math:`\sum_n (\partial L / \partial f_n)^\top (J\Delta)_n / \pi_n` over
            them (float64 scalar, on the CPU; the chain rule on the recorded output gradients).
    """

    record: RecordedPass
    args: tuple
    kwargs: dict
    base: Tensor
    targets: Tensor
    weight: Tensor
    linear: Tensor


@dataclass
class SampledBatch:
    r"""The sub-batch the exact curvature ran on, kept so a step can be judged on it alone.

    Attributes:
        passes: The passes' drawn samples.
    """

    passes: list[SampledPass]

    @property
    def linear(self) -> Tensor:
        r"""The Horvitz-Thompson estimate of :math:`\nabla L^\top \Delta` on these samples.

        Returns:
            The passes' :attr:`SampledPass.linear` summed, a float64 scalar.
        """
        total = torch.zeros((), dtype=torch.float64)
        for s in self.passes:
            total = total + s.linear
        return total


def sampled_loss(
    model: nn.Module,
    batch: SampledBatch,
    loss: LossType,
    r: float,
    params: Mapping[str, Tensor],
) -> tuple[Tensor, Tensor]:
    r"""Return the weighted loss of a :class:`SampledBatch` at ``params`` and at the recorded θ.

    Both are :math:`r \sum_n \ell_n / \pi_n` over the drawn samples, so their difference is
    the Horvitz-Thompson estimate of the batch loss's change; the model runs once (at
    ``params``, on the drawn samples only, with the recorded random state and the buffers
    restored afterwards), the value at θ is that of :attr:`SampledPass.base`.

    Args:
        model: The model (DDP unwrapped).
        batch: The sub-batch.
        loss: The loss function.
        r: Reduction scale.
        params: The parameters to evaluate at, by ``named_parameters`` name.

    Returns:
        The weighted losses at ``params`` and at the recorded θ, float64 scalars.
    """
    module = _module(model)
    new = torch.zeros((), dtype=torch.float64)
    old = torch.zeros((), dtype=torch.float64)
    for s in batch.passes:
        with (
            torch.no_grad(),
            _running_stats_frozen(module),
            _buffers_restored(module),
            s.record.rng.replay(),
        ):
            output = functional_call(module, dict(params), s.args, s.kwargs, strict=False)
        new = new + loss_value(output, s.targets, loss, r, s.weight).cpu()
        old = old + loss_value(s.base, s.targets, loss, r, s.weight).cpu()
    return new, old


def _exact_terms(
    model: nn.Module,
    passes: Sequence[RecordedPass],
    loss: LossType,
    r: float,
    params: Mapping[str, Tensor],
    tangents: Mapping[str, Tensor],
    samples: int | None,
    jvp_mode: QModelJvp,
    offset: float,
    *,
    keep: bool,
) -> tuple[Tensor, SampledBatch | None]:
    """:func:`exact_curvature`, and with ``keep`` its :class:`SampledBatch` (when it drew one)."""
    module = _module(model)
    names = [n for n in tangents if n in params]
    total = torch.zeros((), dtype=torch.float64)
    sizes = [_batch_size(p) for p in passes]
    chosen = _chosen_samples(passes, sizes, loss, samples, offset)
    primals = tuple(params[n].detach() for n in names)
    directions = tuple(tangents[n].detach().to(params[n].dtype) for n in names)
    difference = _uses_difference(jvp_mode, primals)
    if difference:
        t = _difference_step(primals, directions)
        shifted = {n: x + t.to(x.device) * v for n, x, v in zip(names, primals, directions)}
        own = dict(module.named_parameters())
        recorded_at = all(params[n] is own.get(n) for n in names)  # the recorded outputs' θ
        sliceable = not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules()
        )
    kept: list[SampledPass] | None = [] if keep and chosen and chosen[0] is not None else None
    for p, size, pick in zip(passes, sizes, chosen):
        if pick is not None and not len(pick.index):
            continue
        args, kwargs = _sub_batch(p, size, None if pick is None else pick.index)
        if difference:
            base = _recorded_base(p, pick, primals[0].dtype, sliceable) if recorded_at else None
            at = None if base is not None else dict(zip(names, primals))
            output, jv = _difference_jvp(module, p, args, kwargs, shifted, t, base, at)
        else:
            output, jv = _forward_mode_jvp(module, p, args, kwargs, names, primals, directions)
        if pick is None:
            total = total + hessian_quadratic(output, jv, loss, r).cpu()
            continue
        # Horvitz-Thompson: sample n counts 1 / pi_n times
        scaled = jv * pick.weight.rsqrt().to(jv).reshape(-1, *[1] * (jv.dim() - 1))
        total = total + hessian_quadratic(output, scaled, loss, r).cpu()
        if kept is not None:
            piece = _sampled_pass(p, pick, args, kwargs, output, jv, loss, r)
            kept = None if piece is None else [*kept, piece]
    return total, None if kept is None else SampledBatch(kept)


def _sampled_pass(
    p: RecordedPass,
    pick: _Pick,
    args: tuple,
    kwargs: dict,
    base: Tensor,
    jv: Tensor,
    loss: LossType,
    r: float,
) -> SampledPass | None:
    """Return one pass's drawn samples as a :class:`SampledPass` (``None``: it cannot be one)."""
    out, grad = p.output, p.output_grad
    if out is None or grad is None or out.dim() == 0:
        return None
    index = pick.index.to(out.device)
    targets = recovered_targets(out, grad, loss, r)[index]
    weight = pick.weight.reciprocal()
    per_sample = (grad[index].double() * jv.double()).reshape(len(index), -1).sum(1)
    linear = (weight.to(per_sample) * per_sample).sum().cpu()
    return SampledPass(p, args, kwargs, base.detach(), targets, weight, linear)


_FORWARD_MODE_PASSES = 3.0


def jvp_forwards(jvp_mode: QModelJvp, params: Sequence[Tensor]) -> float:
    """Forward passes (on the JVP's samples) one JVP costs, which also says which kind is used.

    The difference quotient (1) needs float32 or float64 parameters of one dtype; with
    ``"auto"`` also all of them on CPU (on accelerators TF32 and reduced-precision kernels
    would swamp the difference). Otherwise forward mode (about 3, the cost model's figure).

    Args:
        jvp_mode: The ``qmodel_jvp`` setting.
        params: The parameters with a direction.

    Returns:
        1.0 (difference quotient; 2.0 in fact where the recorded output cannot serve as the
        base) or 3.0 (forward mode).
    """
    return 1.0 if _uses_difference(jvp_mode, params) else _FORWARD_MODE_PASSES


def _uses_difference(jvp_mode: QModelJvp, params: Sequence[Tensor]) -> bool:
    """Whether ``jvp_mode`` takes the difference quotient for these parameters."""
    dtypes = {x.dtype for x in params}
    if jvp_mode is QModelJvp.FORWARD or len(dtypes) != 1 or dtypes.pop() not in DIFFERENCE_STEP:
        return False
    return jvp_mode is QModelJvp.DIFFERENCE or all(x.device.type == "cpu" for x in params)


def _difference_step(primals: Sequence[Tensor], directions: Sequence[Tensor]) -> Tensor:
    """Return the difference quotient's step :math:`t` (:data:`DIFFERENCE_STEP`), 0-d."""
    device = primals[0].device

    def norm(xs: Sequence[Tensor]) -> Tensor:
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(x).to(device) for x in xs])
        )

    theta, delta = norm(primals), norm(directions)
    c = DIFFERENCE_STEP[primals[0].dtype]
    return torch.where(delta > 0, c * torch.maximum(theta, delta) / delta, torch.ones_like(delta))


def _difference_jvp(
    module: nn.Module,
    p: RecordedPass,
    args: tuple,
    kwargs: dict,
    shifted: Mapping[str, Tensor],
    t: Tensor,
    base: Tensor | None,
    at: Mapping[str, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """Return ``f(θ)`` and ``(f(θ + tΔ) - f(θ)) / t`` on ``args``' samples.

    ``base`` is ``f(θ)`` if known; else it is evaluated at the parameters ``at``.
    """
    with torch.no_grad(), _running_stats_frozen(module), _buffers_restored(module):
        if base is None:
            with p.rng.replay():
                base = functional_call(module, dict(at or {}), args, kwargs, strict=False)
        with p.rng.replay():
            moved = functional_call(module, dict(shifted), args, kwargs, strict=False)
    return base, (moved - base) / t.to(base.device)


def _recorded_base(
    p: RecordedPass, pick: _Pick | None, dtype: torch.dtype, sliceable: bool
) -> Tensor | None:
    """Return the recorded output as ``f(θ)`` on the ``pick`` of its samples, if it is that.

    ``sliceable``: no layer couples the samples (no BatchNorm in training mode).
    """
    out = p.output
    if out is None or p.autocast or out.dtype != dtype:
        return None
    if pick is None:
        return out
    return out[pick.index.to(out.device)] if sliceable and not p.drew_random else None


def _forward_mode_jvp(
    module: nn.Module,
    p: RecordedPass,
    args: tuple,
    kwargs: dict,
    names: Sequence[str],
    primals: tuple[Tensor, ...],
    directions: tuple[Tensor, ...],
) -> tuple[Tensor, Tensor]:
    """Return ``f(θ)`` and ``JΔ`` (``torch.func.jvp``) on one pass's (first) samples."""
    frozen = {n: x.detach() for n, x in module.named_parameters() if n not in names}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    def f(*values: Tensor) -> Tensor:
        state = {**frozen, **buffers, **dict(zip(names, values))}
        return functional_call(module, state, args, kwargs)

    with torch.no_grad(), p.rng.replay(), _running_stats_frozen(module):
        return jvp(f, primals, directions)


def _batch_size(p: RecordedPass) -> int:
    """Return the samples of a recorded pass (leading output dimension; 1 for a scalar)."""
    return p.output.shape[0] if p.output is not None and p.output.dim() > 0 else 1


def _sub_batch(p: RecordedPass, size: int, index: Tensor | None) -> tuple[tuple, dict]:
    """Return the pass's model arguments at the samples ``index`` of ``size`` (``None``: all)."""
    if index is None:
        return p.args, p.kwargs

    def cut(a: Any) -> Any:
        if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == size:
            return a[index.to(a.device)]
        return a

    return tuple(cut(a) for a in p.args), {k: cut(v) for k, v in p.kwargs.items()}


@dataclass(frozen=True)
class _Pick:
    """The samples of one pass the exact curvature uses, and their inclusion probabilities."""

    index: Tensor  # [k] int64, increasing
    weight: Tensor  # [k] float64 inclusion probabilities pi_n in (0, 1]


def _chosen_samples(
    passes: Sequence[RecordedPass],
    sizes: Sequence[int],
    loss: LossType,
    samples: int | None,
    offset: float,
) -> list[_Pick | None]:
    """Draw ``samples`` of all passes' samples (:func:`importance_sample`); ``None``: all."""
    if samples is None or samples >= sum(sizes):
        return [None] * len(passes)
    traces = torch.cat([_traces(p, size, loss) for p, size in zip(passes, sizes)])
    index, pi = importance_sample(traces, samples, offset)
    picks, start = [], 0
    for size in sizes:
        inside = (index >= start) & (index < start + size)
        picks.append(_Pick(index[inside] - start, pi[inside]))
        start += size
    return picks


def _traces(p: RecordedPass, size: int, loss: LossType) -> Tensor:
    """Per-sample loss-Hessian traces of a recorded pass, on the CPU (ones if not readable)."""
    if p.output is None or p.output.dim() == 0 or p.output.shape[0] != size:
        return torch.ones(size, dtype=torch.float64)
    traces = hessian_traces(p.output, loss).cpu()
    return traces if bool(traces.isfinite().all()) else torch.ones(size, dtype=torch.float64)


SAMPLING_MIX = 0.1
"""Share of the uniform distribution in :func:`importance_sample`'s sampling distribution
(defensive importance sampling: no sample's inclusion probability falls below
``SAMPLING_MIX · m / N``, which bounds the weight of a sample whose curvature the trace
underrates)."""

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def sampling_offset(step: int) -> float:
    """Return the draw offset of step ``step``: ``frac(step · φ)``, φ = (√5 - 1) / 2.

    Deterministic (resume and data-parallel ranks agree) and evenly spread over ``[0, 1)``
    across consecutive steps (a low-discrepancy sequence).
    """
    return math.fmod(step * _GOLDEN, 1.0)


def inclusion_probabilities(weights: Tensor, m: int) -> Tensor:
    """Return inclusion probabilities ``pi_n ∝ q_n``, capped at 1, summing to ``m``.

    ``q`` mixes ``weights / sum(weights)`` with :data:`SAMPLING_MIX` of the uniform distribution
    (all-zero weights: uniform). Samples whose share would exceed 1 get ``pi = 1`` (always
    drawn) and the rest is rescaled, until none does.

    Args:
        weights: ``[N]`` non-negative sample weights.
        m: Samples to draw, ``1 <= m <= N``.

    Returns:
        ``[N]`` float64 in ``(0, 1]``, summing to ``m`` (up to rounding).
    """
    w = weights.double().clamp_min(0.0)
    n = w.numel()
    uniform = torch.full_like(w, 1.0 / n)
    q = (
        uniform
        if float(w.sum()) <= 0
        else (1 - SAMPLING_MIX) * w / w.sum() + SAMPLING_MIX * uniform
    )
    sure = torch.zeros(n, dtype=torch.bool)
    pi = m * q
    for _ in range(n):
        over = (pi >= 1.0) & ~sure
        if not bool(over.any()):
            break
        sure |= over
        rest = m - int(sure.sum())
        free = q[~sure].sum()
        pi = torch.where(sure, torch.ones_like(q), q * (rest / free if rest > 0 else 0.0))
    return pi.clamp(max=1.0)


def importance_sample(weights: Tensor, m: int, offset: float) -> tuple[Tensor, Tensor]:
    r"""Draw ``m`` of ``N`` samples by ``weights``, without replacement (systematic sampling).

    With :math:`\pi` = :func:`inclusion_probabilities` and their cumulative sums
    :math:`c_n`, sample ``n`` is drawn when one of the points ``offset + k``
    (``k = 0 ... m-1``) falls in :math:`[c_{n-1}, c_n)`. For ``offset`` uniform in ``[0, 1)``
    each sample is drawn with probability :math:`\pi_n`, so :math:`\sum_{n\,\text{drawn}}
    x_n / \pi_n` is an unbiased estimate of :math:`\sum_n x_n` (Horvitz-Thompson); the
    estimate is exact when :math:`x_n \propto \pi_n`.

    Args:
        weights: ``[N]`` non-negative weights (here: :func:`kfac_tn.losses.hessian_traces`).
        m: Samples to draw, ``1 <= m <= N``.
        offset: In ``[0, 1)``.

    Returns:
        The drawn samples' indices ``[k]`` (increasing, k = m up to rounding) and their
        inclusion probabilities ``[k]``.
    """
    pi = inclusion_probabilities(weights, m)
    cum = torch.cumsum(pi, 0)
    drawn = torch.floor(cum - offset) > torch.floor(cum - pi - offset)
    index = drawn.nonzero().flatten()
    return index, pi[index]


def kronecker_curvature(
    blocks: Sequence[KroneckerBlock],
    state: Mapping[Tensor, dict[str, Any]],
    steps: Mapping[int, Tensor],
) -> Tensor:
    r""":math:`\sum_\ell \langle M_\ell, G_\ell M_\ell A_\ell\rangle` over the blocks with factors.

    (EKFAC blocks: their rescaled curvature, :meth:`KroneckerBlock.curvature_quadratic`.)

    Args:
        blocks: The optimizer's blocks.
        state: Its state (``state[block.weight]["A"]``, ``["G"]``).
        steps: The parameter changes by ``id(param)``.

    Returns:
        A float64 scalar.
    """
    total = torch.zeros((), dtype=torch.float64)
    for block in blocks:
        layer = state.get(block.weight, {})
        if "A" not in layer or not all(id(p) in steps for p in block.params):
            continue
        delta = [steps[id(p)] for p in block.params]
        total = total + block.curvature_quadratic(layer, delta).double().cpu()
    return total


@dataclass
class StepPieces:
    r"""The terms of a proposed step's quadratic model, before any rescaling by :math:`\alpha`.

    All float64 scalars averaged over workers. With the step scaled by :math:`\alpha`:
    :math:`q = \alpha\,(\text{linear} + \text{decay\_linear}) + \tfrac12 \alpha^2
    (\text{curvature} + \text{decay\_square})`.

    Attributes:
        linear: :math:`\nabla L^\top \Delta`.
        decay_linear: :math:`\sum \lambda\,\theta^\top \Delta` (weight decay's gradient term).
        decay_square: :math:`\sum \lambda \lVert\Delta\rVert^2`.
        damping_square: :math:`\sum \delta \lVert\Delta\rVert^2` (the groups' damping).
        curvature: :math:`\Delta^\top C \Delta` with the chosen curvature (``nan`` if not needed).
        exact_curvature: :math:`\Delta^\top G \Delta` with the GGN (``nan`` if not needed).
        sampled: The sub-batch the exact curvature was estimated on, if it was kept
            (this worker's; ``None``: it ran on the whole batch, or was not asked to keep it).
        sampled_linear: :attr:`SampledBatch.linear` averaged over workers (``nan`` without
            ``sampled``).
    """

    linear: float
    decay_linear: float
    decay_square: float
    damping_square: float
    curvature: float
    exact_curvature: float
    sampled: SampledBatch | None = None
    sampled_linear: float = math.nan

    def predicted(self, alpha: float = 1.0, *, sampled: bool = False) -> float:
        r"""Return :math:`q(\alpha\Delta)` with the chosen curvature (damping not included).

        With ``sampled``, on the sub-batch alone: :attr:`sampled_linear` in place of
        :attr:`linear` and the exact curvature (estimated on the same samples).
        """
        if sampled:
            first = alpha * (self.sampled_linear + self.decay_linear)
            return first + 0.5 * alpha**2 * (self.exact_curvature + self.decay_square)
        first = alpha * (self.linear + self.decay_linear)
        return first + 0.5 * alpha**2 * (self.curvature + self.decay_square)

    def decay_change(self, alpha: float = 1.0) -> float:
        r"""Return the weight-decay term's change over the step scaled by ``alpha``."""
        return alpha * self.decay_linear + 0.5 * alpha**2 * self.decay_square


def step_pieces(
    update: Update,
    param_groups: Sequence[Mapping[str, Any]],
    blocks: Sequence[KroneckerBlock],
    state: Mapping[Tensor, dict[str, Any]],
    *,
    model: nn.Module,
    records: Sequence[RecordedPass],
    loss: LossType,
    r: float,
    curvature: QModel | None,
    exact: bool,
    comm: Communicator | None,
    samples: int | None = None,
    jvp_mode: QModelJvp = QModelJvp.FORWARD,
    offset: float = 0.5,
    keep_sample: bool = False,
) -> StepPieces:
    """Evaluate the quadratic-model terms of ``update`` at the current (old) parameters.

    Args:
        update: The proposed step.
        param_groups: The optimizer's param groups (``weight_decay``, ``damping``).
        blocks: Its blocks (Kronecker curvature).
        state: Its state (factors).
        model: The model (exact curvature).
        records: The step's recorded passes (exact curvature).
        loss: The loss function.
        r: The reduction scale over the recorded samples.
        curvature: Which curvature :attr:`StepPieces.curvature` uses (``None``: not needed).
        exact: Whether :attr:`StepPieces.exact_curvature` is needed.
        comm: Averages the terms over workers (``None``: one process).
        samples: Samples the exact curvature uses (:func:`exact_curvature`).
        jvp_mode: How the exact curvature's JVP is computed (:func:`exact_curvature`).
        offset: The exact curvature's sample draw (:func:`importance_sample`).
        keep_sample: Keep the exact curvature's sub-batch (:attr:`StepPieces.sampled`), to
            judge the step on it (when it drew one: ``samples`` below the batch size).

    Returns:
        The :class:`StepPieces`.
    """
    terms = torch.zeros(4, dtype=torch.float64)
    for group, p in update.by_group(param_groups):
        step = update.steps[id(p)].double()
        terms += torch.stack(
            [
                (p.grad.double() * step).sum(),
                group["weight_decay"] * (p.double() * step).sum(),
                group["weight_decay"] * step.square().sum(),
                group["damping"] * step.square().sum(),
            ]
        ).cpu()
    nan = torch.tensor([math.nan], dtype=torch.float64)
    ggn, sampled = nan, None
    if exact or curvature is QModel.EXACT:
        ggn, sampled = _exact_for(
            update, model, records, loss, r, samples, jvp_mode, offset, keep_sample
        )
        ggn = ggn.reshape(1)
    kron = nan
    if curvature is QModel.KRONECKER:
        kron = kronecker_curvature(blocks, state, update.steps).reshape(1)
    sampled_lin = nan if sampled is None else sampled.linear.reshape(1)
    values = torch.cat([terms, kron, ggn, sampled_lin])
    if comm is not None:
        values = comm.average(values)
    lin, d_lin, d_sq, damp_sq, kron_c, ggn_c, s_lin = values.tolist()
    chosen = ggn_c if curvature is QModel.EXACT else kron_c
    return StepPieces(lin, d_lin, d_sq, damp_sq, chosen, ggn_c, sampled, s_lin)


def _exact_for(
    update: Update,
    model: nn.Module,
    records: Sequence[RecordedPass],
    loss: LossType,
    r: float,
    samples: int | None,
    jvp_mode: QModelJvp,
    offset: float,
    keep: bool,
) -> tuple[Tensor, SampledBatch | None]:
    names = {id(p): n for n, p in _module(model).named_parameters()}
    params = {names[id(p)]: p for p in update.params if id(p) in names}
    tangents = {names[id(p)]: update.steps[id(p)] for p in update.params if id(p) in names}
    return _exact_terms(
        model, records, loss, r, params, tangents, samples, jvp_mode, offset, keep=keep
    )
