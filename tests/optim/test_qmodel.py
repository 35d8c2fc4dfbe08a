"""The quadratic model of a step: exact GGN and Kronecker curvature vs dense matrices (float64),
the loss re-evaluated from recovered targets, and the reduction ratio on a quadratic problem."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn
from torch.func import functional_call, jacrev

from kfac_tn import KFAC
from kfac_tn.enums import LossType, QModelJvp
from kfac_tn.losses import hessian_traces, loss_value, recovered_targets
from kfac_tn.optim.qmodel import (
    SAMPLING_MIX,
    RecordedPass,
    RngState,
    _exact_terms,
    exact_curvature,
    importance_sample,
    inclusion_probabilities,
    jvp_forwards,
    kronecker_curvature,
    recorded_loss,
    sampled_loss,
    sampling_offset,
)

# loss, reduction scale r for a batch of 6 with 3 outputs, torch loss
LOSSES = [
    ("cross_entropy", 1 / 6, lambda f, y: F.cross_entropy(f, y)),
    ("cross_entropy_smoothed", 1 / 6, lambda f, y: F.cross_entropy(f, y, label_smoothing=0.2)),
    ("mse", 1 / 18, lambda f, y: F.mse_loss(f, y)),
]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
    ).double()


def targets_for(name: str, gen: torch.Generator) -> torch.Tensor:
    if name == "mse":
        return torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return torch.randint(0, 3, (6,), generator=gen)


@pytest.mark.parametrize("name,r,fn", LOSSES, ids=[c[0] for c in LOSSES])
def test_recovered_targets_reproduce_the_users_loss(name, r, fn, generator):
    f = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    y = targets_for(name, generator)
    loss = fn(f, y)
    (g,) = torch.autograd.grad(loss, f)
    kind = LossType.MSE if name == "mse" else LossType.CROSS_ENTROPY
    targets = recovered_targets(f, g, kind, r)
    assert_close(loss_value(f, targets, kind, r), loss.detach())
    shifted = f.detach() + torch.randn(6, 3, generator=generator, dtype=torch.float64)
    assert_close(loss_value(shifted, targets, kind, r), fn(shifted, y))


def _record(model, x, y, fn):
    out = model(x)
    loss = fn(out, y)
    (g,) = torch.autograd.grad(loss, out)
    return RecordedPass((x,), {}, RngState.capture(None), out.detach(), g), loss


def _dense_ggn(model, params, tangents, x, y, fn):
    """``vᵀ Jᵀ H J v`` of the loss ``fn`` (mean-reduced) on the batch ``x``, from dense matrices."""
    n = x.shape[0]
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    flat_j = torch.cat([jac[k].reshape(3 * n, -1) for k in params], dim=1)
    out = model(x).detach().reshape(-1).requires_grad_()
    hess = torch.autograd.functional.hessian(lambda o: fn(o.reshape(n, 3), y), out)
    v = torch.cat([tangents[k].reshape(-1) for k in params])
    return v @ flat_j.T @ hess @ flat_j @ v


def _problem(name: str, fn, generator: torch.Generator):
    """The tiny net, a batch of 6 with targets for loss ``name``, its recorded pass, the
    parameters, random tangents and the loss kind."""
    model = tiny_net()
    x = torch.randn(6, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = targets_for(name, generator)
    record, _ = _record(model, x, y, fn)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    kind = LossType.MSE if name == "mse" else LossType.CROSS_ENTROPY
    return model, x, y, record, params, tangents, kind


@pytest.mark.parametrize("name,r,fn", LOSSES, ids=[c[0] for c in LOSSES])
@pytest.mark.parametrize("samples", [2, 4, 6, None], ids=lambda m: f"samples={m}")
@pytest.mark.parametrize("offset", [0.0, 0.37, 0.9], ids=lambda u: f"offset={u}")
def test_sub_batch_curvature_is_the_weighted_ggn_of_the_drawn_samples(
    name, r, fn, samples, offset, generator
):
    """With ``samples=m`` the estimate is the r-scaled GGN of the drawn samples, each divided
    by its inclusion probability (dense per-sample GGNs as the reference)."""
    model, x, y, record, params, tangents, kind = _problem(name, fn, generator)
    actual = exact_curvature(
        model, [record], kind, r, params, tangents, samples=samples, offset=offset
    )
    per_sample = torch.stack(
        [_dense_ggn(model, params, tangents, x[n : n + 1], y[n : n + 1], fn) / 6 for n in range(6)]
    )  # each sample's share of the mean-reduced batch loss's GGN
    if samples is None:
        expected = per_sample.sum()
    else:
        index, pi = importance_sample(hessian_traces(record.output, kind), samples, offset)
        assert len(index) == samples
        expected = (per_sample[index] / pi).sum()
    assert_close(actual, expected)


@pytest.mark.parametrize("name,r,fn", LOSSES, ids=[c[0] for c in LOSSES])
def test_sub_batch_curvature_is_unbiased_over_the_offsets(name, r, fn, generator):
    """Averaged over evenly spread offsets, the estimate from 2 of 6 samples is the full GGN."""
    model, x, y, record, params, tangents, kind = _problem(name, fn, generator)
    exact = exact_curvature(model, [record], kind, r, params, tangents)
    draws = [
        exact_curvature(model, [record], kind, r, params, tangents, samples=2, offset=u)
        for u in ((k + 0.5) / 400 for k in range(400))
    ]
    assert_close(torch.stack(draws).mean(), exact, rtol=1e-2)


@pytest.mark.parametrize("name,r,fn", LOSSES, ids=[c[0] for c in LOSSES])
def test_exact_curvature_equals_the_dense_ggn(name, r, fn, generator):
    model, x, y, record, params, tangents, kind = _problem(name, fn, generator)
    actual = exact_curvature(model, [record], kind, r, params, tangents)
    # dense reference: J^T H J with H the Hessian of the loss w.r.t. the output
    assert_close(actual, _dense_ggn(model, params, tangents, x, y, fn))


def test_kronecker_curvature_equals_the_dense_kronecker_product(generator):
    model = tiny_net()
    opt = KFAC(model, lr=0.1)
    x = torch.randn(6, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    steps = {id(p): torch.randn_like(p) for p in model.parameters()}
    expected = torch.zeros((), dtype=torch.float64)
    for block in opt.blocks:
        state = opt.state[block.weight]
        m = block.to_matrix([steps[id(p)] for p in block.params])[0]  # [d_G, d_A]
        vec = m.T.reshape(-1)  # column-major vec
        expected += vec @ torch.kron(state["A"][0], state["G"][0]) @ vec
    assert_close(kronecker_curvature(opt.blocks, opt.state, steps), expected)


def test_recorded_loss_replays_dropout_and_keeps_batchnorm_statistics(generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model = model.double()
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    rng = RngState.capture(None)
    out = model(x)
    loss = F.cross_entropy(out, y)
    (g,) = torch.autograd.grad(loss, out)
    record = RecordedPass((x,), {}, rng, out.detach(), g)
    stats = copy.deepcopy(model[1].state_dict())
    params = dict(model.named_parameters())
    again = recorded_loss(model, [record], LossType.CROSS_ENTROPY, 1 / 6, params=params)
    assert_close(again, loss.detach(), rtol=1e-12)  # same dropout mask, same batch statistics
    for key, value in stats.items():
        assert torch.equal(model[1].state_dict()[key], value)


# id, qmodel_samples, qmodel_jvp, step_size, rel. tolerance on rho, batch sizes of one step's
# forward passes (the step's own, the JVP's, the damping's)
QUADRATIC_CASES = [
    ("whole_batch", None, "forward", "fixed", 1e-9, [16, 16, 16]),
    ("sub_batch", 5, "forward", "fixed", 1e-9, [16, 5, 5]),
    ("sub_batch_difference", 5, "difference", "fixed", 1e-6, [16, 5, 5]),
    ("sub_batch_step_scale", 5, "forward", "qmodel", 1e-9, [16, 5, 5]),
]


@pytest.mark.parametrize(
    "samples,jvp,step_size,rel,sizes",
    [c[1:] for c in QUADRATIC_CASES],
    ids=[c[0] for c in QUADRATIC_CASES],
)
def test_reduction_ratio_is_one_on_a_quadratic_problem(
    samples, jvp, step_size, rel, sizes, generator
):
    """Linear regression with MSE: the exact quadratic model is the loss itself, so rho = 1.

    Also when the JVP ran on a sub-batch: rho then compares the weighted loss change of those
    samples with their weighted model (each sample's loss is its own quadratic, so it is 1
    whatever the draw), and the damping's forward pass runs on them alone.
    """
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    opt = KFAC(
        model,
        lr=0.1,
        weight_decay=1e-2,
        loss="mse",
        qmodel="exact",
        qmodel_jvp=jvp,  # forward: an identity, no difference quotient's rounding
        qmodel_samples=samples,
        step_size=step_size,
        damping_adaptation_period=1,
        min_damping=1e-8,
    )
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    for _ in range(4):
        x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
        y = torch.randn(16, 2, generator=generator, dtype=torch.float64)
        opt.zero_grad()
        seen.clear()
        F.mse_loss(model(x), y).backward()
        before = opt.param_groups[0]["damping"]
        opt.step()
        assert seen == sizes
        assert opt.state["kfac"]["rho"] == pytest.approx(1.0, rel=rel)
        assert opt.param_groups[0]["damping"] == pytest.approx(before * 0.9, rel=1e-12)


def _per_sample(model, params, x, y, fn):
    """Each sample's share of the mean-reduced loss ``fn`` at ``params``, ``[N]``."""
    out = functional_call(model, params, (x,))
    return torch.stack([fn(out[n : n + 1], y[n : n + 1]) / len(x) for n in range(len(x))])


@pytest.mark.parametrize("name,r,fn", LOSSES, ids=[c[0] for c in LOSSES])
@pytest.mark.parametrize("jvp", ["forward", "difference"])
@pytest.mark.parametrize("offset", [0.0, 0.37, 0.9], ids=lambda u: f"offset={u}")
def test_sampled_batch_holds_the_weighted_terms_of_the_drawn_samples(
    name, r, fn, jvp, offset, generator
):
    """The kept sub-batch's linear term and loss change are the drawn samples' own (autograd
    per-sample references), each divided by its inclusion probability; its curvature is
    :func:`exact_curvature`'s."""
    model, x, y, record, params, tangents, kind = _problem(name, fn, generator)
    mode = QModelJvp(jvp)
    curvature, sampled = _exact_terms(
        model, [record], kind, r, params, tangents, 3, mode, offset, keep=True
    )
    assert_close(
        curvature,
        exact_curvature(
            model, [record], kind, r, params, tangents, samples=3, jvp_mode=mode, offset=offset
        ),
    )
    index, pi = importance_sample(hessian_traces(record.output, kind), 3, offset)
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    names = list(params)

    def per_sample_at(vector):
        chunks = vector.split([p.numel() for p in params.values()])
        at = {n: c.reshape(params[n].shape) for n, c in zip(names, chunks)}
        return _per_sample(model, at, x, y, fn)

    grads = torch.autograd.functional.jacobian(per_sample_at, flat)  # [N, P]
    direction = torch.cat([tangents[n].reshape(-1) for n in names])
    rtol = 1e-6 if jvp == "difference" else 1e-10
    assert_close(sampled.linear, ((grads @ direction)[index] / pi).sum(), rtol=rtol)
    moved = {n: params[n] + 0.1 * tangents[n] for n in names}
    new, old = sampled_loss(model, sampled, kind, r, moved)
    assert_close(new, (_per_sample(model, moved, x, y, fn)[index] / pi).sum())
    assert_close(old, (_per_sample(model, params, x, y, fn)[index] / pi).sum())


def test_sampled_batch_is_kept_only_for_a_sub_batch(generator):
    model, x, y, record, params, tangents, kind = _problem("cross_entropy", LOSSES[0][2], generator)
    mode = QModelJvp.FORWARD
    for samples in (6, None):
        _, sampled = _exact_terms(
            model, [record], kind, 1 / 6, params, tangents, samples, mode, 0.5, keep=True
        )
        assert sampled is None
    _, sampled = _exact_terms(
        model, [record], kind, 1 / 6, params, tangents, 3, mode, 0.5, keep=False
    )
    assert sampled is None


class _FeatureMajorNoise(nn.Module):
    """Adds noise drawn feature-major: a sub-batch's noise is not a slice of the batch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn(x.shape[1], x.shape[0], dtype=x.dtype).T


def _net(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    act = {"tanh": nn.Tanh(), "relu": nn.ReLU()}.get(kind, nn.Tanh())
    layers = [nn.Conv2d(2, 4, 3, padding=1), act, nn.Flatten(), nn.Linear(4 * 16, 3)]
    if kind == "batchnorm":
        layers.insert(1, nn.BatchNorm2d(4))
    if kind == "dropout":
        layers.insert(2, nn.Dropout(0.3))
    if kind == "noise":
        layers.insert(3, _FeatureMajorNoise())
    return nn.Sequential(*layers).to(dtype)


def _recorded_net(kind: str, dtype: torch.dtype, drew: bool, generator: torch.Generator):
    """:func:`_net`, one recorded cross-entropy pass over 6 samples, its parameters (the
    recorded outputs' own) and random tangents."""
    model = _net(kind, dtype)
    x = torch.randn(6, 2, 4, 4, generator=generator).to(dtype)
    y = torch.randint(0, 3, (6,), generator=generator)
    rng = RngState.capture(None)
    out = model(x)
    (g,) = torch.autograd.grad(F.cross_entropy(out, y), out)
    record = RecordedPass((x,), {}, rng, out.detach(), g, drew_random=drew)
    params = dict(model.named_parameters())
    tangents = {
        n: 0.1 * torch.randn(p.shape, generator=generator).to(dtype) for n, p in params.items()
    }
    return model, record, params, tangents


# id, net, dtype, samples, drew_random as recorded, rtol against forward mode
DIFFERENCE_CASES = [
    ("tanh_f64_all", "tanh", torch.float64, None, False, 1e-6),
    ("tanh_f64_first4_sliced", "tanh", torch.float64, 4, False, 1e-6),
    ("batchnorm_f64_first4_not_sliced", "batchnorm", torch.float64, 4, False, 1e-6),
    ("dropout_f64_all", "dropout", torch.float64, None, True, 1e-6),
    ("dropout_f64_first4_not_sliced", "dropout", torch.float64, 4, True, 1e-6),
    ("noise_f64_first4_not_sliced", "noise", torch.float64, 4, True, 1e-6),
    ("relu_f32_all", "relu", torch.float32, None, False, 2e-2),
]


@pytest.mark.parametrize(
    "kind,dtype,samples,drew,rtol",
    [c[1:] for c in DIFFERENCE_CASES],
    ids=[c[0] for c in DIFFERENCE_CASES],
)
def test_difference_quotient_curvature_matches_forward_mode(
    kind, dtype, samples, drew, rtol, generator
):
    """The difference quotient on the recorded output (or a slice, or a fresh base where a
    slice would be another function: BatchNorm's batch statistics, dropout's masks) agrees
    with the exact forward-mode JVP."""
    model, record, params, tangents = _recorded_net(kind, dtype, drew, generator)
    kind_ = LossType.CROSS_ENTROPY
    common = dict(samples=samples)
    exact = exact_curvature(model, [record], kind_, 1 / 6, params, tangents, **common)
    diff = exact_curvature(
        model, [record], kind_, 1 / 6, params, tangents, jvp_mode=QModelJvp.DIFFERENCE, **common
    )
    assert_close(diff, exact, rtol=rtol)


# id, net, whether the recorded output was drawn with random numbers
SAMPLED_NET_CASES = [
    ("tanh_sliced", "tanh", False),
    ("batchnorm_sub_batch_statistics", "batchnorm", False),
    ("dropout_replayed_masks", "dropout", True),
    ("noise_replayed", "noise", True),
]


@pytest.mark.parametrize("jvp", ["forward", "difference"])
@pytest.mark.parametrize(
    "kind,drew", [c[1:] for c in SAMPLED_NET_CASES], ids=[c[0] for c in SAMPLED_NET_CASES]
)
def test_sampled_loss_at_unchanged_parameters_does_not_change(kind, drew, jvp, generator):
    """The sub-batch's loss at θ is that of the function the JVP differentiated (its batch
    statistics, its random draws), so without a step there is no change (float64)."""
    model, record, params, tangents = _recorded_net(kind, torch.float64, drew, generator)
    ce = LossType.CROSS_ENTROPY
    _, sampled = _exact_terms(
        model, [record], ce, 1 / 6, params, tangents, 3, QModelJvp(jvp), 0.4, keep=True
    )
    new, old = sampled_loss(model, sampled, ce, 1 / 6, params)
    assert_close(new, old, rtol=1e-12)
    moved = {n: p + 0.1 * tangents[n] for n, p in params.items()}
    assert (sampled_loss(model, sampled, ce, 1 / 6, moved)[0] - old).abs() > 1e-6


def test_difference_quotient_of_a_zero_step_is_zero(generator):
    model = _net("tanh", torch.float64)
    x = torch.randn(6, 2, 4, 4, generator=generator, dtype=torch.float64)
    record, _ = _record(model, x, torch.randint(0, 3, (6,), generator=generator), F.cross_entropy)
    params = dict(model.named_parameters())
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    curvature = exact_curvature(
        model, [record], LossType.CROSS_ENTROPY, 1 / 6, params, zeros, jvp_mode=QModelJvp.DIFFERENCE
    )
    assert curvature.item() == 0.0


# id, mode, parameter dtype, device kind, expected forward passes
JVP_KIND_CASES = [
    ("auto_cpu_f32_difference", QModelJvp.AUTO, torch.float32, "cpu", 1.0),
    ("auto_cpu_f64_difference", QModelJvp.AUTO, torch.float64, "cpu", 1.0),
    ("auto_cpu_bf16_forward", QModelJvp.AUTO, torch.bfloat16, "cpu", 3.0),
    ("auto_meta_f32_forward", QModelJvp.AUTO, torch.float32, "meta", 3.0),
    ("difference_meta_f32_difference", QModelJvp.DIFFERENCE, torch.float32, "meta", 1.0),
    ("difference_cpu_f16_forward", QModelJvp.DIFFERENCE, torch.float16, "cpu", 3.0),
    ("forward_cpu_f32_forward", QModelJvp.FORWARD, torch.float32, "cpu", 3.0),
]


@pytest.mark.parametrize(
    "mode,dtype,device,expected",
    [c[1:] for c in JVP_KIND_CASES],
    ids=[c[0] for c in JVP_KIND_CASES],
)
def test_jvp_kind_follows_mode_dtype_and_device(mode, dtype, device, expected):
    """``auto`` takes the difference quotient on CPU only (the meta device stands in for an
    accelerator); half precision always falls back to forward mode."""
    params = [
        torch.zeros(3, dtype=dtype, device=device),
        torch.zeros(2, dtype=dtype, device=device),
    ]
    assert jvp_forwards(mode, params) == expected


def test_mixed_parameter_dtypes_use_forward_mode():
    params = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    assert jvp_forwards(QModelJvp.DIFFERENCE, params) == 3.0


# id, module, autocast, drew_random expected
RECORD_CASES = [
    ("plain", lambda: nn.Sequential(nn.Linear(4, 3)), False, False),
    (
        "dropout",
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3)),
        False,
        True,
    ),
    ("autocast", lambda: nn.Sequential(nn.Linear(4, 3)), True, False),
]


@pytest.mark.parametrize(
    "make,autocast,drew", [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES]
)
def test_recorded_pass_notes_random_draws_and_autocast(make, autocast, drew, generator):
    """What decides whether the recorded output may be the difference quotient's base; labels
    sampled by ``fisher_type="mc"`` after the forward pass do not count as the model's draws."""
    model = make()
    opt = KFAC(model, lr=0.1, fisher_type="mc")
    x = torch.randn(8, 4, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    F.cross_entropy(out.float(), torch.randint(0, 3, (8,), generator=generator)).backward()
    (record,) = opt.statistics.take_records()
    assert record.autocast is autocast
    assert record.drew_random is drew


def test_optimizer_step_scales_agree_with_either_jvp(generator):
    """Float64: the difference quotient's step scales equal forward mode's to ~1e-7 over steps.

    Fixed periods: the budget's cost model counts one forward pass for the difference quotient
    and three for forward mode, so with a budget the two may take different plans.
    """
    x = torch.randn(6, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    scales = {}
    for mode in ("forward", "difference"):
        model = tiny_net()
        opt = KFAC(model, lr=0.1, qmodel_jvp=mode, max_step_scale=100.0, curvature_budget=None)
        scales[mode] = []
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            scales[mode].append(opt.state["kfac"]["step_scale"])
    assert scales["difference"] == pytest.approx(scales["forward"], rel=1e-6)
    assert len(set(scales["forward"])) > 1  # the scale moved: not a cap both sides share


# id, weights, samples drawn
SAMPLING_CASES = [
    ("uniform", [1.0] * 8, 4),
    ("zeros_are_uniform", [0.0] * 8, 3),
    ("one_dominant", [100.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], 2),
    ("two_dominant_of_many", [0.0] * 10 + [5.0, 7.0] + [1e-2] * 20, 5),
    ("all", [3.0, 1.0, 2.0], 3),
]


@pytest.mark.parametrize(
    "weights,m", [c[1:] for c in SAMPLING_CASES], ids=[c[0] for c in SAMPLING_CASES]
)
def test_inclusion_probabilities_are_capped_proportions_summing_to_m(weights, m):
    w = torch.tensor(weights, dtype=torch.float64)
    pi = inclusion_probabilities(w, m)
    assert_close(pi.sum(), torch.tensor(float(m), dtype=torch.float64), rtol=1e-12)
    assert bool((pi > 0).all()) and bool((pi <= 1).all())
    assert bool((pi >= SAMPLING_MIX * m / len(weights) * (1 - 1e-12)).all())  # defensive floor
    below = pi < 1  # the uncapped ones keep the order of their weights
    assert torch.equal(torch.argsort(pi[below], stable=True), torch.argsort(w[below], stable=True))


@pytest.mark.parametrize(
    "weights,m", [c[1:] for c in SAMPLING_CASES], ids=[c[0] for c in SAMPLING_CASES]
)
def test_systematic_draw_takes_m_distinct_samples_with_the_sure_ones_always(weights, m):
    w = torch.tensor(weights, dtype=torch.float64)
    pi = inclusion_probabilities(w, m)
    sure = set((pi == 1).nonzero().flatten().tolist())
    counts = torch.zeros(len(weights), dtype=torch.float64)
    offsets = [(k + 0.5) / 200 for k in range(200)]
    for u in offsets:
        index, drawn_pi = importance_sample(w, m, u)
        assert len(index) == m and len(set(index.tolist())) == m
        assert torch.equal(drawn_pi, pi[index])
        assert sure <= set(index.tolist())
        counts[index] += 1
    assert_close(counts / len(offsets), pi, atol=1e-2, rtol=0)  # drawn with probability pi


def test_sampling_offsets_are_deterministic_and_spread():
    offsets = [sampling_offset(s) for s in range(100)]
    assert offsets == [sampling_offset(s) for s in range(100)]
    assert all(0 <= u < 1 for u in offsets)
    counts = torch.histc(torch.tensor(offsets), bins=10, min=0, max=1)
    assert int(counts.min()) >= 8  # every tenth of [0, 1) holds 8-12 of 100 consecutive steps


def test_micro_batches_draw_the_samples_of_one_large_batch(generator):
    """Two recorded passes of 3 samples each give the estimate of one pass of all 6."""
    model = tiny_net()
    x = torch.randn(6, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    fn = lambda f, t: F.cross_entropy(f, t, reduction="sum") / 6  # noqa: E731
    whole, _ = _record(model, x, y, fn)
    parts = [_record(model, x[i : i + 3], y[i : i + 3], fn)[0] for i in (0, 3)]
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    ce = LossType.CROSS_ENTROPY
    for u in (0.1, 0.6):
        one = exact_curvature(model, [whole], ce, 1 / 6, params, tangents, samples=3, offset=u)
        two = exact_curvature(model, parts, ce, 1 / 6, params, tangents, samples=3, offset=u)
        assert_close(two, one)


@pytest.mark.parametrize(
    "shape,loss", [((4, 3), "cross_entropy"), ((4, 5, 3), "cross_entropy"), ((4, 2, 2), "mse")]
)
def test_hessian_traces_are_the_per_sample_traces_of_the_dense_hessian(shape, loss, generator):
    f = torch.randn(*shape, generator=generator, dtype=torch.float64)
    kind = LossType(loss)
    targets = torch.softmax(torch.randn(*shape, generator=generator, dtype=torch.float64), -1)
    traces = hessian_traces(f, kind)

    def sample_loss(fn: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # l_n, r = 1
        if kind is LossType.MSE:
            return (fn - t).square().sum()
        return -(t * torch.log_softmax(fn, dim=-1)).sum()

    for n in range(shape[0]):
        h = torch.autograd.functional.hessian(partial(sample_loss, t=targets[n]), f[n])
        dense = h.reshape(f[0].numel(), -1).trace()
        scale = 2.0 if kind is LossType.MSE else 1.0
        assert_close(traces[n] * scale, dense)


def test_sub_batch_finds_the_uncertain_samples_that_carry_the_curvature(generator):
    """Regression: the sub-batch was the first m samples; when those are confident predictions
    (their loss Hessian near 0) the estimate missed nearly all of the curvature. Drawn by the
    Hessian trace, 5 of 8 samples (the 4 uncertain ones always among them) give the full
    batch's curvature within a percent."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    x[:4] *= 1000.0  # confident: softmax nearly one-hot, trace of the loss Hessian ~ 0
    y = torch.randint(0, 3, (8,), generator=generator)
    record, _ = _record(model, x, y, F.cross_entropy)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    ce = LossType.CROSS_ENTROPY
    exact = exact_curvature(model, [record], ce, 1 / 8, params, tangents)
    for u in (0.05, 0.5, 0.95):
        estimate = exact_curvature(
            model, [record], ce, 1 / 8, params, tangents, samples=5, offset=u
        )
        assert_close(estimate, exact, rtol=0.01)
