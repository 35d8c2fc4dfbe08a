"""kfac_tn.optim.schedule: staggered phases, the budget's period choice, the controller on a fake
clock, and exact resume with a budget on."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_tn import KFAC
from kfac_tn.optim import schedule
from kfac_tn.optim.schedule import (
    FACTOR_PERIODS,
    INVERSE_PERIODS,
    CostMeter,
    CurvatureCosts,
    CurvatureSchedule,
    Periods,
    check_schedule_state,
    choose_periods,
    stagger_phases,
)


class FakeClock:
    """A clock the test moves by hand (``advance``), or by ``tick`` on every reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------------------ staggering
def _loads(periods, costs, phases, horizon):
    load = [0.0] * horizon
    for name, p in periods.items():
        for t in range(phases[name], horizon, p):
            load[t] += costs[name]
    return load


STAGGER_CASES = [
    ("ten-equal", {f"l{i}": 10 for i in range(10)}, {f"l{i}": 1.0 for i in range(10)}, 1.0),
    ("one-big", {"a": 4, "b": 4, "c": 4, "d": 4}, {"a": 8.0, "b": 1.0, "c": 1.0, "d": 1.0}, 8.0),
    (
        "3c3d-n3",
        {n: 10 for n in "abcdef"},
        dict(zip("abcdef", [2e5, 1.9e8, 6.5e8, 1.7e9, 1.5e8, 1.7e7])),
        1.7e9,
    ),
    (
        "mixed-periods",
        {"a": 2, "b": 4, "c": 4, "d": 8},
        {"a": 4.0, "b": 2.0, "c": 2.0, "d": 1.0},
        4.0,
    ),
]


@pytest.mark.parametrize(
    "periods,costs,peak", [c[1:] for c in STAGGER_CASES], ids=[c[0] for c in STAGGER_CASES]
)
def test_stagger_keeps_every_period_and_balances_the_cost(periods, costs, peak):
    phases = stagger_phases(periods, costs)
    assert set(phases) == set(periods)
    assert all(0 <= phases[n] < periods[n] for n in periods)  # every period is kept
    horizon = math.lcm(*periods.values())
    load = _loads(periods, costs, phases, horizon)
    assert max(load) == pytest.approx(peak)  # the optimum here: the largest job alone, or a+b
    unstaggered = _loads(periods, costs, dict.fromkeys(periods, 0), horizon)
    assert sum(load) == pytest.approx(sum(unstaggered))  # the same work, spread out
    assert stagger_phases(dict(reversed(periods.items())), costs) == phases  # deterministic


def test_stagger_accepts_periods_beyond_the_horizon():
    # regression: inverse_update_period=10**6 ("freeze the inverses") raised ValueError, as
    # phases past the 4096-step horizon had no steps to balance
    periods = {"a": 10**6, "b": 10**6, "c": 7}
    phases = stagger_phases(periods, {"a": 2.0, "b": 1.0, "c": 1.0})
    assert all(0 <= phases[n] < periods[n] for n in periods)
    assert phases["a"] != phases["b"]  # still spread: the two jobs do not share a step


def test_optimizer_with_a_frozen_inverse_period_steps(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    opt = KFAC(model, inverse_update_period=10**9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        opt.step()
    assert opt.stats["inverse_updates"] == 2  # the first inverse of each layer, then frozen


def test_optimizer_inverse_steps_are_staggered_and_periodic(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(5))).double()
    opt = KFAC(model, inverse_update_period=5)
    steps: dict[str, list[int]] = {b.name: [] for b in opt.blocks}
    for t in range(16):
        before = {b.name: opt.state[b.weight].get("inverse_updates", 0) for b in opt.blocks}
        opt.zero_grad()
        model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
        opt.step()
        for b in opt.blocks:
            if opt.state[b.weight]["inverse_updates"] > before[b.name]:
                steps[b.name].append(t)
    for ts in steps.values():  # step 0 (no inverse yet), then every 5 steps on its phase
        assert ts[0] == 0 and all(b - a == 5 for a, b in zip(ts[1:], ts[2:]))
    per_step = [sum(t in ts for ts in steps.values()) for t in range(1, 16)]
    assert per_step == [1] * 15  # five equal layers, period 5: one inversion per step


# ------------------------------------------------------------------------------ choosing
def _objective(periods):
    return sum(p.factor + p.inverse for p in periods.values())


CHOOSE_CASES = [
    # (id, costs, budget, explicit, expected periods)
    (
        "sqrt-rule",
        CurvatureCosts(1.0, 0.0, {"a": 0.0, "b": 0.0}, {"a": 4.0, "b": 16.0}),
        0.5,
        {"a": (None, None), "b": (None, None)},
        {"a": Periods(1, 12), "b": Periods(1, 24)},
    ),
    (
        "factor-and-inverse",
        CurvatureCosts(1.0, 0.5, {"a": 1.0}, {"a": 4.0}),
        0.5,
        {"a": (None, None)},
        {"a": Periods(6, 12)},  # 1/6 + 4/12 = 0.5: the optimum of f + i
    ),
    (
        "cheap-every-step",
        CurvatureCosts(
            1.0, 0.1, {"a": 0.01, "b": 0.01, "c": 0.4}, {"a": 0.01, "b": 0.01, "c": 2.0}
        ),
        0.25,
        {"a": (None, None), "b": (None, None), "c": (None, None)},
        {"a": Periods(1, 1), "b": Periods(1, 1), "c": Periods(7, 15)},  # c pays for a and b
    ),
    (
        # regression: the budget allowed 1/1 for both (0.16 of the allowed 0.33), more than the
        # fixed 1/10 (0.133); a budget must not add curvature work
        "never-above-the-fixed-periods",
        CurvatureCosts(1.0, 0.1, {"a": 0.01, "b": 0.02}, {"a": 0.01, "b": 0.02}),
        0.25,
        {"a": (None, None), "b": (None, None)},
        {"a": Periods(2, 2), "b": Periods(2, 2)},  # 0.13 <= 0.133
    ),
    (
        "explicit-wins",
        CurvatureCosts(1.0, 0.0, {"a": 0.0, "b": 0.0}, {"a": 4.0, "b": 16.0}),
        0.5,
        {"a": (3, 8), "b": (None, None)},
        {"a": Periods(3, 8), "b": Periods(1, 32)},  # a takes 4/8 of the allowed 1.0
    ),
    (
        "out-of-reach-keeps-a-reserve",
        CurvatureCosts(1.0, 2.0, {"a": 1.0}, {"a": 1.0}),
        0.5,
        {"a": (None, None)},
        {"a": Periods(8, 8)},  # 1/8 + 1/8: the quarter of the allowed 1.0 on top of P
    ),
    (
        "out-of-reach-at-the-bounds",
        CurvatureCosts(1.0, 2.0, {"a": 100.0}, {"a": 1000.0}),
        0.5,
        {"a": (None, None)},
        {"a": Periods(FACTOR_PERIODS[1], INVERSE_PERIODS[1])},
    ),
]


@pytest.mark.parametrize(
    "costs,budget,explicit,expected",
    [c[1:] for c in CHOOSE_CASES],
    ids=[c[0] for c in CHOOSE_CASES],
)
def test_choose_periods(costs, budget, explicit, expected):
    plan = choose_periods(costs, budget, explicit)
    assert plan.periods == expected
    assert plan.allowed == pytest.approx(budget / (1 - budget) * costs.base)
    fixed = {
        n: Periods(*(e if e is not None else d for e, d in zip(explicit[n], (1, 10))))
        for n in explicit
    }
    assert plan.ceiling == pytest.approx(schedule._cost(costs, fixed))
    assert plan.curvature <= plan.ceiling + 1e-12
    assert plan.feasible == (plan.curvature <= plan.allowed)
    assert choose_periods(costs, budget, explicit) == plan  # deterministic


def test_choose_periods_is_near_the_brute_force_optimum():
    costs = CurvatureCosts(1.0, 0.2, {"a": 0.3, "b": 0.05}, {"a": 2.0, "b": 0.4})
    explicit = {"a": (None, None), "b": (None, None)}
    plan = choose_periods(costs, 0.4, explicit)
    assert plan.feasible
    grid = [Periods(f, i) for f in range(1, 13) for i in range(f, 41)]
    best = min(
        _objective({"a": pa, "b": pb})
        for pa, pb in itertools.product(grid, grid)
        if costs.fixed
        + sum(
            costs.factor[n] / p.factor + costs.inverse[n] / p.inverse
            for n, p in (("a", pa), ("b", pb))
        )
        <= plan.allowed
    )
    assert best <= _objective(plan.periods) <= 1.25 * best


# ------------------------------------------------------------------------------ controller
def _drive(sched: CurvatureSchedule, clock: FakeClock, costs: dict, steps: int, explicit):
    """Play ``steps`` steps with the given phase costs on the fake clock."""
    for t in range(steps):
        sched.on_forward()
        meter = sched.meter
        for name in costs["factor"]:
            with meter.span("factor", name):
                clock.advance(costs["factor"][name])
        for name in costs["inverse"]:
            periods = {n: sched.periods(n, *explicit[n]).inverse for n in explicit}
            if sched.inverse_due(name, t, periods):
                with meter.span("inverse", name):
                    clock.advance(costs["inverse"][name])
        with meter.span("fixed"):
            clock.advance(costs["fixed"])
        if costs.get("tuning"):
            with meter.span(schedule.TUNING):
                clock.advance(costs["tuning"])
        clock.advance(costs["base"])
        sched.end_step(lambda: {n: (True, True) for n in explicit}, lambda: explicit)


def test_controller_on_a_fake_clock_chooses_the_periods_of_its_measured_costs(caplog):
    costs = {
        "base": 1.0,
        "fixed": 0.05,
        "factor": {"a": 0.2, "b": 0.01},
        "inverse": {"a": 2.0, "b": 0.1},
    }
    explicit = {"a": (None, None), "b": (None, None)}
    clock = FakeClock()
    sched = CurvatureSchedule([("a", 8.0, 4.0), ("b", 1.0, 1.0)], 0.3, CostMeter(clock=clock))
    with caplog.at_level("INFO", logger="kfac_tn"):
        _drive(sched, clock, costs, schedule.PROBE_START + schedule.PROBE_STEPS, explicit)
    expected = choose_periods(
        CurvatureCosts(1.0, 0.05, costs["factor"], costs["inverse"]), 0.3, explicit
    )
    state = sched.state
    assert {n: Periods(*p) for n, p in state["periods"].items()} == expected.periods
    assert state["base"][""][0] == pytest.approx(1.0) and state["fixed"][""][0] == pytest.approx(
        0.05
    )
    assert expected.periods["a"].inverse > expected.periods["b"].inverse  # the costly one waits
    decided = f"curvature_budget=0.3 at step {schedule.PROBE_START + schedule.PROBE_STEPS}:"
    assert sum(decided in r.getMessage() for r in caplog.records) == 1
    # the costs change: the next decision adapts (periods of "a" grow)
    costs["inverse"]["a"] = 20.0
    _drive(sched, clock, costs, schedule.DECIDE_EVERY, explicit)
    assert Periods(*sched.state["periods"]["a"]).inverse > expected.periods["a"].inverse
    assert sched.state["decisions"] == 2


def test_controller_counts_the_self_tuning_as_base_time():
    """The self-tuning's span is timed apart but plans like the forward pass it is."""
    explicit = {"a": (None, None)}
    plans = []
    for base, tuning in ((1.0, 0.0), (0.6, 0.4)):
        costs = {"base": base, "tuning": tuning, "fixed": 0.05}
        costs |= {"factor": {"a": 0.2}, "inverse": {"a": 2.0}}
        clock = FakeClock()
        sched = CurvatureSchedule([("a", 8.0, 4.0)], 0.3, CostMeter(clock=clock))
        _drive(sched, clock, costs, schedule.PROBE_START + schedule.PROBE_STEPS, explicit)
        assert sched.state["base"][""][0] == pytest.approx(1.0)
        assert sched.meter.last.get((schedule.TUNING, ""), 0.0) == pytest.approx(tuning)
        plans.append(sched.state["periods"])
    assert plans[0] == plans[1]


def test_controller_keeps_a_plan_that_still_fits():
    costs = {"base": 1.0, "fixed": 0.05, "factor": {"a": 0.2}, "inverse": {"a": 2.0}}
    explicit = {"a": (None, None)}
    clock = FakeClock()
    sched = CurvatureSchedule([("a", 8.0, 4.0)], 0.3, CostMeter(clock=clock))
    _drive(sched, clock, costs, schedule.PROBE_START + schedule.PROBE_STEPS, explicit)
    first = dict(sched.state["periods"])
    costs["inverse"]["a"] = 1.9  # noise-sized change
    _drive(sched, clock, costs, schedule.DECIDE_EVERY, explicit)
    assert sched.state["periods"] == first and sched.state["decisions"] == 1


def test_meter_is_free_when_inactive():
    clock = FakeClock(tick=1.0)
    meter = CostMeter(clock=clock)
    with meter.span("fixed"):
        pass
    assert clock.now == 0.0 and meter.take() == {}


# ------------------------------------------------------------------------------ optimizer
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double()


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _budget_opt(model, **kw):
    kw.setdefault("budget_costs", "measured")
    opt = KFAC(model, lr=0.05, curvature_budget=0.2, eigenbasis_tolerance=0.05, **kw)
    # durations: clock readings inside a span; a power of two keeps the sums exact, so a resumed
    # clock (restarting at 0) gives the same durations bitwise
    opt.schedule.meter.clock = FakeClock(tick=2**-10)
    opt.schedule.probe_start, opt.schedule.probe_steps, opt.schedule.decide_every = 1, 3, 4
    return opt


def test_budget_resume_is_exact(one_thread):
    model = _net()
    opt = _budget_opt(model)
    _train(model, opt, 6)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 8, start=6)
    resumed = _net()
    resumed.load_state_dict(saved_model)
    opt2 = _budget_opt(resumed)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 8, start=6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    state = opt.state["kfac"]["schedule"]
    assert state == opt2.state["kfac"]["schedule"]
    assert state["step"] == 14 and state["next_decision"] == 16  # decided at 4, 8 and 12
    assert set(state["periods"]) == {"0", "3"}
    assert opt.stats == opt2.stats


def test_explicit_periods_win_over_the_budget(one_thread):
    model = _net()
    opt = _budget_opt(
        model, inverse_update_period=3, layer_settings={"3": {"factor_update_period": 2}}
    )
    _train(model, opt, 8)
    hps = opt.layer_hp()
    conv, linear = opt.blocks
    assert hps[id(conv)].inverse_update_period == 3 and hps[id(linear)].inverse_update_period == 3
    assert hps[id(linear)].factor_update_period == 2
    chosen = opt.state["kfac"]["schedule"]["periods"]
    assert chosen["0"][1] == 3 and chosen["3"] == [2, 3]


def test_state_dict_is_a_snapshot():
    model = _net()
    opt = _budget_opt(model)
    _train(model, opt, 2)
    saved = opt.state_dict()
    before = copy.deepcopy(saved["state"]["kfac"])
    _train(model, opt, 3, start=2)
    assert saved["state"]["kfac"] == before


@pytest.mark.parametrize(
    "entry,match",
    [
        ([], "not a mapping"),
        ({"step": 1.5}, "'step'"),
        ({"periods": {"0": [0, 3]}}, "two ints >= 1"),
        ({"inverse": {"0": [float("nan"), 1]}}, r"\[seconds, step\]"),
    ],
    ids=["not-mapping", "step", "periods", "nan-cost"],
)
def test_malformed_schedule_state_is_refused(entry, match):
    with pytest.raises(ValueError, match=match):
        check_schedule_state(entry)
    model = _net()
    opt = _budget_opt(model)
    _train(model, opt, 1)
    state = opt.state_dict()
    state["state"]["kfac"]["schedule"] = entry
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)


# ------------------------------------------------------------------------------ modeled costs
WORK_CASES = [
    ("conv2d-stride2", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (5, 4, 9, 9)),
    ("conv1d-groups", lambda: nn.Conv1d(4, 6, 3, groups=2, bias=False), (5, 4, 11)),
    ("conv-transpose2d", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, bias=False), (5, 4, 7, 7)),
    ("linear-sequence", lambda: nn.Linear(4, 6, bias=False), (5, 3, 4)),
]


def _layer_work_after_one_step(layer: nn.Module, shape: tuple[int, ...]) -> schedule.LayerWork:
    model = nn.Sequential(layer).double()
    opt = KFAC(model, curvature_budget=0.5)
    opt.zero_grad()
    model(torch.randn(shape, dtype=torch.float64)).square().sum().backward()
    opt.step()
    opt.remove_hooks()  # the flop count below is of the layer alone
    return opt._layer_work()[0]["0"]


@pytest.mark.parametrize("make,shape", [c[1:] for c in WORK_CASES], ids=[c[0] for c in WORK_CASES])
def test_modeled_base_work_is_the_layer_flops_of_torch_flop_counter(make, shape):
    """The cost model's base work equals the flops torch counts for the layer's forward pass
    (independent reference: ``torch.utils.flop_counter``), three times for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layer = make()
    work = _layer_work_after_one_step(layer, shape)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(shape, dtype=torch.float64))
    base = schedule.modeled_costs({"0": work}).base - 3 * schedule.PASS_WORK
    assert base == pytest.approx(3 * counter.get_total_flops())


ORDER_CASES = [  # (id, cheaper settings, dearer settings, which cost)
    ("reduce-factors-cheaper", dict(reduce=True), dict(reduce=False), "factor"),
    ("cholesky-inverse-cheaper", dict(cholesky=True), dict(cholesky=False), "inverse"),
    ("cholesky-preconditioning-cheaper", dict(cholesky=True), dict(cholesky=False), "fixed"),
    ("ekfac-factors-dearer", dict(ekfac=False), dict(ekfac=True), "factor"),
]


@pytest.mark.parametrize(
    "cheap,dear,part", [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES]
)
def test_modeled_costs_order_the_settings(cheap, dear, part):
    layer = dict(samples=32, input_positions=64.0, output_positions=64.0, groups=1, d_a=289)
    works = [schedule.LayerWork(**layer, d_g=64, **s) for s in (cheap, dear)]
    costs = [schedule.modeled_costs({"l": w}) for w in works]
    value = [c.fixed if part == "fixed" else getattr(c, part)["l"] for c in costs]
    assert value[0] < value[1]


def _model_budget_run(steps, checkpoint_at=None):
    model = _net()
    opt = KFAC(model, lr=0.05, curvature_budget=0.2)
    saved = None
    for t in range(steps):
        if t == checkpoint_at:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        _train(model, opt, 1, start=t)
        assert not opt.schedule.meter.active  # modeled costs: no step is ever timed
    return model, opt, saved


def test_budget_with_modeled_costs_decides_once_and_is_reproducible(one_thread, caplog):
    with caplog.at_level("INFO", logger="kfac_tn"):
        model, opt, saved = _model_budget_run(12, checkpoint_at=1)
    state = opt.state["kfac"]["schedule"]
    assert state["decisions"] == 1 and state["step"] == 12
    assert sum("at step 1:" in r.getMessage() for r in caplog.records) == 1
    assert set(state["periods"]) == {"0", "3"}
    assert max(p for periods in state["periods"].values() for p in periods) > 1
    again, opt_again, _ = _model_budget_run(12)  # a rerun: the same periods, bitwise
    assert opt_again.state["kfac"]["schedule"] == state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    resumed = _net()  # resume from step 1, right after the decision: bitwise the same run
    resumed.load_state_dict(saved[0])
    opt2 = KFAC(resumed, lr=0.05, curvature_budget=0.2)
    opt2.load_state_dict(saved[1])
    _train(resumed, opt2, 11, start=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert opt2.state["kfac"]["schedule"] == state


def test_modeled_plan_of_accumulated_micro_batches_is_that_of_one_batch(one_thread):
    """Regression: the cost model took N from the last micro-batch, so accumulating 3 passes
    chose other periods than one batch 3 times larger (and the runs diverged)."""
    plans = []
    for chunks in (1, 3):
        model = _net()
        opt = KFAC(model, lr=0.05, curvature_budget=0.2)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(12, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (12,), generator=gen)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks)):
            (F.cross_entropy(model(xs), ys) / chunks).backward()
        opt.step()
        plans.append(opt.state["kfac"]["schedule"])
    assert plans[0]["base"] == plans[1]["base"] and plans[0]["periods"] == plans[1]["periods"]
