r"""When curvature work happens: staggered inverse updates and the ``curvature_budget`` controller.

**Staggering** (always on). Layer ``ℓ`` with inverse period :math:`p_\ell` recomputes its inverse
on the steps :math:`t \ge 1` with :math:`(t + \varphi_\ell) \bmod p_\ell = 0`, and as soon as
it has factors but no inverse (so a layer's first refresh comes no later than unstaggered). The
decompositions of the layers are spread over the period instead of all landing on one "spike"
step. The phases :math:`\varphi_\ell \in [0, p_\ell)`
come from :func:`stagger_phases`: largest ``n³`` cost (:meth:`KroneckerBlock.inversion_cost`)
first, each layer on the phase that keeps the most loaded step lowest. A phase is a function of
the periods and the costs only — not of the number of workers — so every rank, every resumed
run and a data-parallel run compared with one process compute the same ones; under
``torch.distributed`` each layer's owner (:meth:`Communicator.assign`, also by ``n³``) inverts it
on its phase. Every layer keeps its period; factor updates stay on ``t mod f = 0``.

**Budget** (``curvature_budget=β``). The fraction of a step's time spent on curvature work —
capturing statistics (hooks), the factor EMA, decompositions and preconditioning — is kept at or
below β by choosing each layer's ``factor_update_period`` :math:`f_\ell` and
``inverse_update_period`` :math:`i_\ell` (only where they are not set explicitly: explicit
integers always win). With measured costs (seconds) — ``base`` :math:`B` (everything outside
curvature work: forward, backward, the update), ``fixed`` :math:`P` (curvature work every step:
preconditioning, finiteness checks), per layer :math:`F_\ell` per factor update and
:math:`I_\ell` per inverse update — :func:`choose_periods` solves

.. math::
    \min \sum_\ell (f_\ell + i_\ell) \quad \text{s.t.} \quad
    P + \sum_\ell \Big(\frac{F_\ell}{f_\ell} + \frac{I_\ell}{i_\ell}\Big)
    \le \frac{\beta}{1-\beta} B,
    \qquad 1 \le f_\ell \le i_\ell,\; f_\ell \le f_{\max},\; i_\ell \le i_{\max}

(curvature ≤ β of the whole step), and never more than the fixed periods (the explicit ones,
else :data:`DEFAULT_PERIODS`) would spend: the budget redistributes and cuts curvature work, it
does not add to it. Without that ceiling a generous budget on a model with cheap factors (e.g.
3c3d with KFAC-reduce, ``curvature_budget=0.3``) chose inverse period 1 for most layers and its
step took 2.39× an SGD step instead of 2.06× with ``1/10``
(``python -m kfac_tn.benchmarks.step --models 3c3d --inversion cholesky --budget 0.3``).
Its Lagrangian solution is :math:`p \propto \sqrt{\text{cost}}`:
expensive layers update less often, cheap ones every step. Integer periods
:math:`\lceil\sqrt{c/\mu}\rceil` are found by bisection on μ (deterministic). If the
budget is out of reach (``P`` alone takes more than ``1 -`` :data:`RESERVE_FRACTION` of it), the
periodic work is still given :data:`RESERVE_FRACTION` of the budget on top of ``P`` (periods at
their bounds only if even that is too much) and a warning says so. Bounds:
:data:`FACTOR_PERIODS`, :data:`INVERSE_PERIODS`.

Costs (``budget_costs``). ``"model"`` (default): the costs are *work* (flop-equivalents)
computed by :func:`modeled_costs` from the shapes the layers saw on the first step — samples,
positions, groups and factor sizes — and their settings (expand or reduce, eigen or Cholesky,
EKFAC), with :data:`EIGH_WORK`, :data:`CHOLESKY_WORK`, :data:`CALL_WORK` and :data:`PASS_WORK`
as the only constants; base work is the layers' forward and backward GEMMs plus a fixed work per
layer and pass (the operations between layers are not counted otherwise). The periods are chosen
once, at the end of the first step, and kept: a function of the model, the batch shape and the
settings only, so a rerun, a resume and every replica take the same periods by construction, and
no step is timed or synchronised. ``"measured"``: the costs are seconds measured on sampled
steps, as below; the plan follows the machine (and its load) and adapts when costs change, at
the price of run-to-run reproducibility.

Measurement (:class:`CostMeter`, ``budget_costs="measured"``): a few *sampled* steps are timed
phase by phase, with a device synchronisation around each timed phase on those steps only:
:data:`PROBE_STEPS` steps from step :data:`PROBE_START` on (earlier steps pay one-off costs:
plans, workspaces; the periods are ``1/10`` meanwhile, so every layer's inverse runs once in the
probe), then a step whenever a layer due for an update has not been measured for
:data:`REMEASURE_STEPS` steps (at most one sampled step in :data:`SAMPLE_GAP`). A step's time
runs from the model's first training forward after the previous step to the end of ``step()``
(so it includes the self-tuning's loss evaluations and JVPs: their span, kind
:data:`TUNING`, is reported but counted as base time). Estimates are
exponential averages (weight :data:`COST_DECAY`) of the measurements. Decisions happen after the
probe and then every :data:`DECIDE_EVERY` steps; a plan that still fits the budget (and uses at
least :data:`KEEP_FRACTION` of it) is kept, so noise does not make the periods flap. Changes are
logged (one line per decision that changes something).

State and agreement. The chosen periods, the estimates and the step counters live in the
optimizer's own state entry (``state["kfac"]["schedule"]``), so ``state_dict()`` /
``load_state_dict()`` resume exactly (measured costs: until the next decision, which then uses
the resumed run's own measurements; with a deterministic clock, exactly). Under
``torch.distributed`` the estimates are summed over ranks and rank 0's result is broadcast
before each decision (:meth:`~kfac_tn.distributed.Communicator.agree`), so every rank takes the
same decision by construction. Tests inject the clock (``KFAC.schedule.meter.clock``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kfac_tn.enums import BudgetCosts
from kfac_tn.faults import log_fault

__all__ = [
    "CALL_WORK",
    "CHOLESKY_WORK",
    "COST_DECAY",
    "DECIDE_EVERY",
    "EIGH_WORK",
    "FACTOR_PERIODS",
    "INVERSE_PERIODS",
    "KEEP_FRACTION",
    "PASS_WORK",
    "PROBE_START",
    "PROBE_STEPS",
    "REMEASURE_STEPS",
    "RESERVE_FRACTION",
    "SAMPLE_GAP",
    "CostMeter",
    "CurvatureCosts",
    "CurvatureSchedule",
    "LayerWork",
    "Periods",
    "Plan",
    "check_schedule_state",
    "choose_periods",
    "modeled_costs",
    "stagger_phases",
]

logger = logging.getLogger(__name__)

FACTOR_PERIODS = (1, 20)
"""Bounds of a budget-chosen ``factor_update_period`` (KAISA updates factors every 10 steps)."""
INVERSE_PERIODS = (1, 100)
"""Bounds of a budget-chosen ``inverse_update_period`` (KAISA's ImageNet setting is 100)."""
DEFAULT_PERIODS = (1, 10)
"""Periods of layers without explicit periods when no budget is set, and during the probe."""
PROBE_START = 3
"""First step of the probe (steps before it pay one-off costs and are not measured)."""
PROBE_STEPS = 10
"""Consecutive sampled steps of the probe before the first decision (each inverse runs once)."""
DECIDE_EVERY = 100
"""Steps between budget decisions after the first."""
REMEASURE_STEPS = 50
"""A layer's factor or inverse cost older than this many steps is re-measured when due."""
SAMPLE_GAP = 5
"""Fewest steps between two sampled steps after the probe (device syncs stay rare)."""
COST_DECAY = 0.5
"""Weight of the previous estimate when a new measurement arrives."""
KEEP_FRACTION = 0.8
"""A current plan is kept while its estimated curvature cost is in [this, 1] × the budget."""
RESERVE_FRACTION = 0.25
"""Share of the budget the factor and inverse updates get when the fixed work leaves less."""
CURVATURE_KINDS = ("factor", "inverse", "fixed")
"""Meter kinds of curvature work (what the budget controls)."""
TUNING = "tuning"
"""Meter kind of the self-tuning's stages (reported by benchmarks, base time for the budget)."""
_PHASE_HORIZON = 4096  # steps over which phases are balanced (the lcm of the periods, capped)


# ------------------------------------------------------------------------------ staggering
def stagger_phases(periods: Mapping[str, int], costs: Mapping[str, float]) -> dict[str, int]:
    """Phases of periodic jobs that balance the load of the busiest step (greedy, deterministic).

    Jobs are placed by decreasing cost (ties by name); each takes the phase in
    ``[0, period)`` whose steps have the lowest peak load, ties to the phase with the lower
    total load, then the lowest phase. Loads are counted over the lcm of the periods (capped
    at 4096 steps).

    Args:
        periods: Job (layer name) -> period ``>= 1``.
        costs: Job -> cost ``>= 0`` (e.g. ``n³``).

    Returns:
        Job -> phase in ``[0, period)``.
    """
    horizon = 1
    for p in periods.values():
        horizon = min(_PHASE_HORIZON, horizon * p // math.gcd(horizon, p))
    load = [0.0] * horizon
    phases: dict[str, int] = {}
    for name in sorted(periods, key=lambda k: (-float(costs.get(k, 0.0)), k)):
        period, cost = int(periods[name]), float(costs.get(name, 0.0))
        # a period beyond the horizon touches at most one step in it: phases past it add nothing
        choices = range(min(period, horizon))
        best = min(choices, key=lambda s: (max(load[s::period]), sum(load[s::period]), s))
        for t in range(best, horizon, period):
            load[t] += cost
        phases[name] = best
    return phases


# ------------------------------------------------------------------------------ the budget
class Periods(NamedTuple):
    """A layer's factor and inverse update periods."""

    factor: int
    inverse: int


@dataclass(frozen=True)
class CurvatureCosts:
    """Measured costs in seconds (see the module docstring).

    Attributes:
        base: Per step, outside curvature work (forward, backward, the update).
        fixed: Per step, curvature work independent of the periods (preconditioning, checks).
        factor: Layer -> cost of one factor update (capture in the hooks and the EMA).
        inverse: Layer -> cost of one inverse update.
    """

    base: float
    fixed: float
    factor: Mapping[str, float]
    inverse: Mapping[str, float]


@dataclass(frozen=True)
class Plan:
    """The periods :func:`choose_periods` picked and what they are estimated to cost.

    Attributes:
        periods: Layer -> :class:`Periods`.
        curvature: Estimated curvature seconds per step with these periods.
        allowed: Curvature seconds per step the budget allows.
        feasible: Whether ``curvature <= allowed``.
        ceiling: Curvature seconds per step of the fixed periods (explicit, else
            :data:`DEFAULT_PERIODS`); ``curvature`` never exceeds it.
    """

    periods: dict[str, Periods]
    curvature: float
    allowed: float
    feasible: bool
    ceiling: float = math.inf

    @property
    def limit(self) -> float:
        """The curvature cost the plan may use: the budget's, capped by :attr:`ceiling`."""
        return min(self.allowed, self.ceiling)


def _periods_for(
    mu: float, factor: float, inverse: float, fixed: tuple[int | None, int | None]
) -> Periods:
    def period(cost: float, bounds: tuple[int, int]) -> int:
        if cost <= 0.0:
            return bounds[0]
        return int(min(bounds[1], max(bounds[0], math.ceil(math.sqrt(cost / mu) - 1e-9))))

    f = fixed[0] if fixed[0] is not None else period(factor, FACTOR_PERIODS)
    i = fixed[1] if fixed[1] is not None else max(f, period(inverse, INVERSE_PERIODS))
    return Periods(f, i)


def _cost(costs: CurvatureCosts, periods: Mapping[str, Periods]) -> float:
    total = costs.fixed
    for name, p in periods.items():
        total += costs.factor.get(name, 0.0) / p.factor + costs.inverse.get(name, 0.0) / p.inverse
    return total


def choose_periods(
    costs: CurvatureCosts,
    budget: float,
    explicit: Mapping[str, tuple[int | None, int | None]],
) -> Plan:
    """Choose the periods that keep curvature work within ``budget`` (module docstring).

    The plan never costs more than the fixed periods (:attr:`Plan.ceiling`).

    Args:
        costs: The measured costs.
        budget: Fraction β in ``(0, 1)`` of the step time curvature work may take.
        explicit: Layer -> ``(factor_period, inverse_period)``, each an explicit integer that is
            kept, or ``None`` to be chosen. The layers of the plan are this mapping's keys.

    Returns:
        The :class:`Plan`; deterministic in its arguments.
    """
    allowed = budget / (1.0 - budget) * max(costs.base, 0.0)
    names = sorted(explicit)
    ceiling = _cost(costs, {n: _fixed_periods(explicit[n]) for n in names})
    # out of reach (the fixed work alone near or over the budget): the periodic work still gets
    # RESERVE_FRACTION of the budget, rather than all periods going to their bounds; and never
    # more than the fixed periods would spend
    target = min(ceiling, max(allowed, costs.fixed + RESERVE_FRACTION * allowed))

    def plan_at(mu: float) -> dict[str, Periods]:
        return {
            n: _periods_for(mu, costs.factor.get(n, 0.0), costs.inverse.get(n, 0.0), explicit[n])
            for n in names
        }

    positive = [c for n in names for c in (costs.factor.get(n, 0.0), costs.inverse.get(n, 0.0))]
    positive = [c for c in positive if c > 0.0]
    if not positive:
        periods = plan_at(1.0)
        spent = _cost(costs, periods)
        return Plan(periods, spent, allowed, spent <= allowed, ceiling)
    hi = max(positive) * 2.0  # every period at its lower bound
    lo = min(positive) / (2.0 * max(FACTOR_PERIODS[1], INVERSE_PERIODS[1]) ** 2)  # all at max
    if _cost(costs, plan_at(hi)) <= target:
        periods = plan_at(hi)
    elif _cost(costs, plan_at(lo)) > target:
        periods = plan_at(lo)
    else:
        for _ in range(80):  # bisection on log(mu): cost is non-decreasing in mu
            mid = math.sqrt(lo * hi)
            if _cost(costs, plan_at(mid)) <= target:
                lo = mid
            else:
                hi = mid
        periods = plan_at(lo)
    curvature = _cost(costs, periods)
    return Plan(periods, curvature, allowed, curvature <= allowed, ceiling)


def _fixed_periods(explicit: tuple[int | None, int | None]) -> Periods:
    """Return the periods a layer has without a budget: its explicit ones, else the defaults."""
    f = explicit[0] if explicit[0] is not None else DEFAULT_PERIODS[0]
    i = explicit[1] if explicit[1] is not None else DEFAULT_PERIODS[1]
    return Periods(f, i)


# ------------------------------------------------------------------------------ the cost model
EIGH_WORK = 7.0
"""Work of a symmetric eigendecomposition of an ``n × n`` matrix, in flops: ``EIGH_WORK · n³``
(on CPU an ``eigh`` of n = 300–1200 takes 3–5 times a GEMM of the same size, ``2 n³`` flops)."""
CHOLESKY_WORK = 2.0
"""Work of a Cholesky factorisation and inverse of an ``n × n`` matrix: ``CHOLESKY_WORK · n³``."""
PASS_WORK = 1.5e7
"""Fixed work of one layer in one forward or backward pass (kernel launches, the activation and
pooling around it, Python), in flops (~0.3 ms on CPU: the digits autoencoder's SGD-sized step is
~7 ms for 2.5e7 flops of GEMMs)."""
CALL_WORK = 2e7
"""Fixed work of one curvature routine of a layer (factor update, decomposition,
preconditioning: their kernel launches and Python), in flops (~0.4 ms on CPU, measured on the
digits CNN's smallest layers)."""


@dataclass(frozen=True)
class LayerWork:
    """What a layer's curvature work depends on: the shapes it saw and its settings.

    Attributes:
        samples: ``N``, samples of the batch.
        input_positions: Columns of the input factor per sample and group (output positions of
            a convolution, input positions of a transposed one; 1 for a linear layer on
            ``[N, D]``).
        output_positions: Rows of the gradient factor per sample and group.
        groups: Kronecker blocks of the layer.
        d_a: Input factor size per group.
        d_g: Gradient factor size per group.
        reduce: KFAC-reduce (else expand).
        cholesky: Cholesky inversion (else eigendecompositions).
        ekfac: EKFAC scalings from per-sample gradients.
        input_factor_work: The block's own estimate of its expand input factor's work
            (:meth:`KroneckerBlock.input_factor_work`), replacing the Gram formula.
    """

    samples: int
    input_positions: float
    output_positions: float
    groups: int
    d_a: int
    d_g: int
    reduce: bool = False
    cholesky: bool = False
    ekfac: bool = False
    input_factor_work: float | None = None


def modeled_costs(layers: Mapping[str, LayerWork], extra_forwards: float = 0.0) -> CurvatureCosts:
    """Work of every part of a step, in flops, for :func:`choose_periods` (module docstring).

    Per layer with ``N`` samples, ``P_A``/``P_G`` positions, ``g`` groups and sizes ``a``, ``o``:

    * base ``(3 + extra_forwards) · (2 N P_A g a o + PASS_WORK)`` (forward, two backward GEMMs
      and the self-tuning's extra forward passes, which count as base time when measured);
    * factors: expand ``2 N g (P_A a² + P_G o²)``, reduce ``N g (P_A a + P_G o) + 2 N g (a² +
      o²)``; EKFAC adds the per-sample gradients and their projection
      ``2 N g (P_G o a + o² a + o a²)``; a layer's own estimate of its expand input factor
      (:attr:`LayerWork.input_factor_work`) replaces the Gram term;
    * inverse ``EIGH_WORK g (a³ + o³)`` (Cholesky: ``CHOLESKY_WORK``);
    * fixed (preconditioning) ``4 g (o² a + o a²)`` (Cholesky: two GEMMs, half of it).

    Every curvature routine adds :data:`CALL_WORK`.

    Args:
        layers: Layer name -> its :class:`LayerWork`.
        extra_forwards: Forward passes of the whole batch per step beyond the training one
            (the self-tuning's loss evaluations and JVPs, amortised over their periods).

    Returns:
        The :class:`CurvatureCosts` in flops; deterministic in its arguments.
    """
    base = fixed = 0.0
    factor: dict[str, float] = {}
    inverse: dict[str, float] = {}
    for name, w in layers.items():
        n, g, a, o = float(w.samples), float(w.groups), float(w.d_a), float(w.d_g)
        p_a, p_g = float(w.input_positions), float(w.output_positions)
        base += (3.0 + extra_forwards) * (2.0 * n * p_a * g * a * o + PASS_WORK)
        if w.reduce:
            work = n * g * (p_a * a + p_g * o) + 2.0 * n * g * (a * a + o * o)
        else:
            gram = 2.0 * n * g * p_a * a * a
            work = (gram if w.input_factor_work is None else w.input_factor_work) + (
                2.0 * n * g * p_g * o * o
            )
        if w.ekfac:
            work += 2.0 * n * g * (p_g * o * a + o * o * a + o * a * a)
        factor[name] = work + 2.0 * CALL_WORK
        per_n3 = CHOLESKY_WORK if w.cholesky else EIGH_WORK
        inverse[name] = per_n3 * g * (a**3 + o**3) + 2.0 * CALL_WORK
        gemms = 2.0 if w.cholesky else 4.0
        fixed += gemms * g * (o * o * a + o * a * a) + CALL_WORK
    return CurvatureCosts(base=base, fixed=fixed, factor=factor, inverse=inverse)


# ------------------------------------------------------------------------------ measuring
class CostMeter:
    """Times phases of sampled steps: ``with meter.span(kind, layer): ...``.

    Kinds: :data:`CURVATURE_KINDS` (``"factor"``, ``"inverse"``, ``"fixed"``) and :data:`TUNING`
    (the self-tuning's quadratic-model terms and loss evaluations; base time for the budget).
    Spans are no-ops (no clock read, no sync) while :attr:`active` is false.

    Args:
        clock: Seconds as a float (default ``time.perf_counter``; tests pass a fake one).
        sync: Waits for the device's queued work (default: nothing, for CPU).

    Attributes:
        active: Whether the current step is sampled.
        clock, sync: As passed.
        last: ``{(kind, layer): seconds}`` of the last sampled step (benchmarks read it).
    """

    def __init__(
        self, clock: Callable[[], float] | None = None, sync: Callable[[], None] | None = None
    ) -> None:
        self.clock = clock or time.perf_counter
        self.sync = sync or (lambda: None)
        self.active = False
        self.last: dict[tuple[str, str], float] = {}
        self._spans: dict[tuple[str, str], float] = {}

    @contextlib.contextmanager
    def span(self, kind: str, key: str = "") -> Iterator[None]:
        """Add the duration of the block to ``(kind, key)`` when active."""
        if not self.active:
            yield
            return
        self.sync()
        start = self.clock()
        try:
            yield
        finally:
            self.sync()
            self.add(kind, key, self.clock() - start)

    def now(self) -> float:
        """Read the clock after a device sync."""
        self.sync()
        return self.clock()

    def add(self, kind: str, key: str, seconds: float) -> None:
        """Add ``seconds`` to ``(kind, key)`` (only while active)."""
        if self.active:
            self._spans[kind, key] = self._spans.get((kind, key), 0.0) + float(seconds)

    def take(self) -> dict[tuple[str, str], float]:
        """Return the spans recorded since the last call (also kept as :attr:`last`); reset."""
        spans, self._spans = self._spans, {}
        self.last = spans
        return spans


# ------------------------------------------------------------------------------ the schedule
@dataclass
class _LayerInfo:
    """What the schedule needs to know of a layer (no reference to modules or tensors)."""

    name: str
    n3: float  # inversion cost groups·(d_A³ + d_G³)
    n2: float  # factor size groups·(d_A² + d_G²)


@dataclass
class CurvatureSchedule:
    """The optimizer's "what is due when": stagger phases and, with a budget, the periods.

    A runtime collaborator of :class:`kfac_tn.KFAC` (``opt.schedule``); its persistent part is
    the dict :attr:`state` inside the optimizer's state (see the module docstring).

    Args:
        layers: ``(name, n³ cost, factor size)`` of every block.
        budget: ``curvature_budget`` (``None``: fixed periods).
        meter: The :class:`CostMeter` (default: a real clock, no sync).
        agree: Collective that makes a float64 vector identical on every rank (sum over ranks,
            then rank 0's result), or ``None`` in one process.
        store: Callable returning the persistent dict (the optimizer's
            ``state["kfac"]["schedule"]``; default: a private dict).
        probe_start: First sampled step (:data:`PROBE_START`).
        probe_steps: Sampled steps before the first decision (:data:`PROBE_STEPS`).
        decide_every: Steps between later decisions (:data:`DECIDE_EVERY`).
        costs_from: ``budget_costs``: plan once with modeled work, or with measured seconds.
    """

    layers: Sequence[tuple[str, float, float]]
    budget: float | None
    meter: CostMeter = field(default_factory=CostMeter)
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None
    store: Callable[[], dict[str, Any]] | None = None
    probe_start: int = PROBE_START
    probe_steps: int = PROBE_STEPS
    decide_every: int = DECIDE_EVERY
    costs_from: BudgetCosts = BudgetCosts.MEASURED

    @property
    def measuring(self) -> bool:
        """Whether the schedule times sampled steps (a budget with ``budget_costs="measured"``)."""
        return self.budget is not None and self.costs_from is BudgetCosts.MEASURED

    @property
    def state(self) -> dict[str, Any]:
        """The persistent dict: chosen periods, estimates, step counters (plain Python values)."""
        return self.store() if self.store is not None else self._own

    def __post_init__(self) -> None:
        self._own: dict[str, Any] = {}
        self._info = {n: _LayerInfo(n, float(c3), float(c2)) for n, c3, c2 in self.layers}
        self._phases: tuple[tuple, dict[str, int]] | None = None
        self._iteration_start: float | None = None
        self._unreachable = 0

    # -------------------------------------------------------------- periods and phases
    def periods(self, name: str, factor: int | None, inverse: int | None) -> Periods:
        """Effective periods of layer ``name`` given its explicit ones (``None``: automatic)."""
        chosen = self.state.get("periods", {}).get(name) if self.budget is not None else None
        default = Periods(*chosen) if chosen is not None else Periods(*DEFAULT_PERIODS)
        return Periods(
            factor if factor is not None else default.factor,
            inverse if inverse is not None else default.inverse,
        )

    def factor_due(self, step: int, period: int) -> bool:
        """Whether a layer at its ``step`` captures statistics and updates its factors."""
        return step % period == 0

    def inverse_due(self, name: str, step: int, periods: Mapping[str, int]) -> bool:
        """Whether layer ``name`` at its ``step`` recomputes its inverse (staggered).

        Due on the steps ``t >= 1`` with ``(t + phase) mod p = 0``: the first refresh after the
        first inverse (step 0) comes ``p - phase`` steps later — never later than without
        staggering (early in training the first inverse, from one batch at the initial weights,
        is the worst; delaying its refresh by two steps cost ~1.5 points of test accuracy after
        one epoch on the digits test) — then one every ``p`` steps.

        Args:
            name: The layer.
            step: Its step counter.
            periods: Inverse period of every layer (the phases balance all of them).
        """
        period = periods[name]
        return step >= 1 and (step + self.phases(periods)[name]) % period == 0

    def phases(self, periods: Mapping[str, int]) -> dict[str, int]:
        """Stagger phases for these inverse periods (cached; see :func:`stagger_phases`)."""
        key = tuple(sorted(periods.items()))
        if self._phases is None or self._phases[0] != key:
            costs = {n: self._info[n].n3 if n in self._info else 0.0 for n in periods}
            self._phases = (key, stagger_phases(periods, costs))
        return self._phases[1]

    # -------------------------------------------------------------- sampled steps
    def on_forward(self) -> None:
        """Mark a training forward's start (hooked); the first after a step opens a sampled one."""
        if self.meter.active and self._iteration_start is None and torch.is_grad_enabled():
            self._iteration_start = self.meter.now()

    def discard(self) -> None:
        """Forget the measurements of a step that was skipped (non-finite gradients)."""
        self.meter.take()
        self._iteration_start = None

    def end_step(
        self,
        due_next: Callable[[], Mapping[str, tuple[bool, bool]]],
        explicit: Callable[[], Mapping[str, tuple[int | None, int | None]]],
        work: Callable[[], tuple[Mapping[str, LayerWork], float]] | None = None,
    ) -> None:
        """Close a step: record its measurements, decide if it is time, sample the next or not.

        Args:
            due_next: Returns layer -> (factor update due, inverse update due) at the next step
                under the periods after this call's decision (whether to sample the next step).
            explicit: Returns layer -> its explicit ``(factor, inverse)`` periods (``None``:
                chosen); called at decisions only.
            work: Returns the :class:`LayerWork` of the layers whose shapes were seen and the
                extra forward passes per step (modeled costs; called until the one decision).
        """
        if self.budget is None:
            return
        st = self.state
        step = st.get("step", 0)
        if self.costs_from is BudgetCosts.MODEL:
            st["step"] = step + 1
            layers, extra = work() if work is not None and "periods" not in st else ({}, 0.0)
            if layers:
                self._store(modeled_costs(layers, extra), step + 1)
                self._decide(step + 1, explicit())
            return
        if self.meter.active:
            self._record(step)
        st["step"] = step = step + 1
        if step >= st.get("next_decision", self.probe_start + self.probe_steps):
            self._decide(step, explicit())
            st["next_decision"] = step + self.decide_every
        self.meter.active = self._sample(step, due_next)
        self._iteration_start = None  # a sampled step is opened by the next training forward

    def _record(self, step: int) -> None:
        spans = self.meter.take()
        end = self.meter.now()
        start = self._iteration_start
        curvature = 0.0
        factor: dict[str, float] = {}
        inverse: dict[str, float] = {}
        shared = 0.0
        for (kind, key), seconds in spans.items():
            if kind not in CURVATURE_KINDS:  # the self-tuning's forward passes: base time
                continue
            curvature += seconds
            if kind == "factor" and key:
                factor[key] = factor.get(key, 0.0) + seconds
            elif kind == "factor":
                shared += seconds
            elif kind == "inverse":
                inverse[key] = inverse.get(key, 0.0) + seconds
        if shared and factor:  # e.g. waiting for the factor all-reduce: by factor size
            total = sum(self._info[n].n2 for n in factor if n in self._info) or 1.0
            for n in factor:
                factor[n] += shared * (self._info[n].n2 if n in self._info else 0.0) / total
        for name, seconds in factor.items():
            self._estimate("factor", name, seconds, step)
        for name, seconds in inverse.items():
            self._estimate("inverse", name, seconds, step)
        self._estimate("fixed", "", spans.get(("fixed", ""), 0.0), step)
        if start is not None:
            self._estimate("base", "", max(end - start - curvature, 0.0), step)

    def _store(self, costs: CurvatureCosts, step: int) -> None:
        """Keep modeled costs as the estimates (replacing any)."""
        st = self.state
        st["base"] = {"": [float(costs.base), step]}
        st["fixed"] = {"": [float(costs.fixed), step]}
        st["factor"] = {n: [float(v), step] for n, v in costs.factor.items()}
        st["inverse"] = {n: [float(v), step] for n, v in costs.inverse.items()}

    def _estimate(self, kind: str, name: str, seconds: float, step: int) -> None:
        table = self.state.setdefault(kind, {})
        old = table.get(name)
        value = seconds if old is None else COST_DECAY * old[0] + (1 - COST_DECAY) * seconds
        table[name] = [float(value), int(step)]

    def _stale(self, kind: str, name: str, step: int) -> bool:
        entry = self.state.get(kind, {}).get(name)
        return entry is None or step - entry[1] >= REMEASURE_STEPS

    def _sample(self, step: int, due_next: Callable[[], Mapping[str, tuple[bool, bool]]]) -> bool:
        st = self.state
        if step < self.probe_start + self.probe_steps:
            sampled = step >= self.probe_start
        elif step - st.get("last_sampled", -SAMPLE_GAP) < SAMPLE_GAP:
            sampled = False
        else:
            sampled = self._stale("base", "", step) or any(
                (f and self._stale("factor", n, step)) or (i and self._stale("inverse", n, step))
                for n, (f, i) in due_next().items()
            )
        if sampled:
            st["last_sampled"] = step
        return sampled

    # -------------------------------------------------------------- decisions
    def costs(self) -> CurvatureCosts:
        """Return the current estimates (missing layer costs filled in proportionally to size)."""
        st = self.state
        names = sorted(self._info)
        factor = {n: st.get("factor", {}).get(n, [None])[0] for n in names}
        inverse = {n: st.get("inverse", {}).get(n, [None])[0] for n in names}
        _fill(factor, {n: self._info[n].n2 for n in names})
        _fill(inverse, {n: self._info[n].n3 for n in names})
        return CurvatureCosts(
            base=st.get("base", {}).get("", [0.0])[0],
            fixed=st.get("fixed", {}).get("", [0.0])[0],
            factor=factor,
            inverse=inverse,
        )

    def _agreed_costs(self, step: int) -> CurvatureCosts:
        """Estimates averaged over ranks (rank 0's result everywhere), stored back."""
        if self.agree is None:
            return self.costs()
        st = self.state
        names = sorted(self._info)
        rows = [("base", ""), ("fixed", "")] + [
            (k, n) for k in ("factor", "inverse") for n in names
        ]
        values, counts = [], []
        for kind, name in rows:
            entry = st.get(kind, {}).get(name)
            values.append(0.0 if entry is None else entry[0])
            counts.append(0.0 if entry is None else 1.0)
        vector = self.agree(torch.tensor(values + counts, dtype=torch.float64))
        total, count = vector[: len(rows)].tolist(), vector[len(rows) :].tolist()
        for (kind, name), s, c in zip(rows, total, count):
            if c > 0:
                st.setdefault(kind, {})[name] = [s / c, step]
            else:
                st.get(kind, {}).pop(name, None)
        return self.costs()

    def _decide(self, step: int, explicit: Mapping[str, tuple[int | None, int | None]]) -> None:
        st = self.state
        costs = self._agreed_costs(step)
        plan = choose_periods(costs, self.budget, explicit)
        current = {n: Periods(*p) for n, p in st.get("periods", {}).items()}
        if current and set(current) == set(plan.periods):
            kept = _cost(costs, current)
            if KEEP_FRACTION * plan.limit <= kept <= plan.limit or current == plan.periods:
                return
        st["periods"] = {n: [p.factor, p.inverse] for n, p in plan.periods.items()}
        st["decisions"] = st.get("decisions", 0) + 1
        unit = "flops" if self.costs_from is BudgetCosts.MODEL else "s"
        if not plan.feasible:
            self._unreachable += 1
            log_fault(
                logger,
                self._unreachable,
                "KFAC curvature_budget=%g is out of reach: per-step curvature work alone "
                "(preconditioning, checks) is %.3g %s of a %.3g %s step; the factor and "
                "inverse updates get %g of the budget on top",
                self.budget,
                costs.fixed,
                unit,
                costs.base + costs.fixed,
                unit,
                RESERVE_FRACTION,
            )
        shown = ", ".join(
            f"{n} {p.factor}/{p.inverse}" for n, p in list(sorted(plan.periods.items()))[:8]
        )
        more = ", ..." if len(plan.periods) > 8 else ""
        step_time = costs.base + plan.curvature
        logger.info(
            "KFAC curvature_budget=%g at step %d: factor/inverse periods %s%s "
            "(estimated curvature %.0f%% of a %.3g %s step)",
            self.budget,
            step,
            shown,
            more,
            100.0 * plan.curvature / step_time if step_time > 0 else 0.0,
            step_time,
            unit,
        )


def _fill(values: dict[str, float | None], sizes: Mapping[str, float]) -> None:
    """Replace missing values by ``size × (Σ known values / Σ their sizes)``."""
    known = [n for n, v in values.items() if v is not None]
    size = sum(sizes[n] for n in known)
    rate = sum(values[n] for n in known) / size if size > 0 else 0.0  # type: ignore[misc]
    for n, v in values.items():
        if v is None:
            values[n] = rate * sizes[n]


def check_schedule_state(entry: Any) -> None:
    """Raise ``ValueError`` if a loaded ``state["kfac"]["schedule"]`` is malformed.

    Args:
        entry: The entry (``None``: absent, fine).

    Raises:
        ValueError: ``Invalid state_dict: state['kfac']['schedule']...: <what>``.
    """
    if entry is None:
        return
    where = "Invalid state_dict: state['kfac']['schedule']"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: not a mapping")
    for key in ("step", "next_decision", "last_sampled", "decisions"):
        if key in entry and (not isinstance(entry[key], int) or isinstance(entry[key], bool)):
            raise ValueError(f"{where}[{key!r}]: {entry[key]!r} is not an int")
    for name, periods in dict(entry.get("periods", {})).items():
        ok = isinstance(periods, (list, tuple)) and len(periods) == 2
        ok = ok and all(isinstance(p, int) and 1 <= p for p in periods)
        if not ok:
            raise ValueError(f"{where}['periods'][{name!r}]: {periods!r} is not two ints >= 1")
    for kind in ("base", "fixed", "factor", "inverse"):
        for name, value in dict(entry.get(kind, {})).items():
            ok = isinstance(value, (list, tuple)) and len(value) == 2
            ok = ok and isinstance(value[0], float) and math.isfinite(value[0]) and value[0] >= 0
            if not ok:
                raise ValueError(f"{where}[{kind!r}][{name!r}]: {value!r} is not [seconds, step]")
