"""The KFAC optimizer's contract: validation, state, groups, schedulers, AMP, accumulation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

from kfac_tn import KFAC


def small_cnn(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.ReLU(inplace=inplace),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).double()


def batch(seed: int, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def train(model, opt, steps, start=0, n=8):
    for i in range(start, start + steps):
        x, y = batch(i, n)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------- validation
INVALID = [  # argument, value, expected message fragment
    ("lr", -0.1, "Invalid learning rate value: -0.1"),
    ("momentum", 1.0, "Invalid momentum value: 1.0"),
    ("momentum", -0.5, "Invalid momentum value: -0.5"),
    ("weight_decay", -1.0, "Invalid weight_decay value: -1.0"),
    ("damping", 0.0, "Invalid damping value: 0.0"),
    ("damping", float("nan"), "Invalid damping value: nan"),
    ("factor_decay", 1.0, "Invalid factor_decay value: 1.0"),
    ("factor_update_period", 0, "Invalid factor_update_period value: 0"),
    ("inverse_update_period", 2.5, "Invalid inverse_update_period value: 2.5"),
    ("kfac_approx", "average", "Invalid kfac_approx value: 'average'"),
    ("fisher_type", "true", "Invalid fisher_type value: 'true'"),
    ("mc_samples", 0, "Invalid mc_samples value: 0"),
    ("loss", "nll", "Invalid loss value: 'nll'"),
    ("loss_reduction", "none", "Invalid loss_reduction value: 'none'"),
    ("inversion", "svd", "Invalid inversion value: 'svd'"),
    ("kl_clip", 0.0, "Invalid kl_clip value: 0.0"),
    ("factor_dtype", torch.int64, "Invalid factor_dtype value: torch.int64"),
    ("inverse_dtype", "float32", "Invalid inverse_dtype value: 'float32'"),
    ("distributed_strategy", "zero", "Invalid distributed_strategy value: 'zero'"),
    ("bucket_cap_mb", 0, "Invalid bucket_cap_mb value: 0"),
    ("nesterov", True, "Invalid nesterov value: True"),  # with momentum=0 below
    ("layer_settings", {"0": "freeze"}, "Invalid layer_settings value for '0': 'freeze'"),
    ("layer_settings", {"0": {"lr": 1.0}}, "Invalid layer_settings key for '0': 'lr'"),
    ("layer_settings", {"0": {"damping": -1.0}}, "Invalid damping value: -1.0"),
]


@pytest.mark.parametrize("name,value,message", INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_hyperparameters_raise_value_error_naming_the_value(name, value, message):
    kwargs = {name: value}
    if name == "nesterov":
        kwargs["momentum"] = 0.0
    with pytest.raises(ValueError) as err:
        KFAC(small_cnn(), **kwargs)
    assert message in str(err.value)


def test_enum_errors_list_the_allowed_values():
    with pytest.raises(ValueError, match="'expand', 'reduce'"):
        KFAC(small_cnn(), kfac_approx="both")


def test_invalid_param_group_value_raises():
    model = small_cnn()
    opt = KFAC(model, params=[{"params": model[0].parameters()}])
    with pytest.raises(ValueError, match="Invalid damping value: -1"):
        opt.add_param_group({"params": model[6].parameters(), "damping": -1})


# ----------------------------------------------------------------------------------- state
def test_state_dict_round_trip_then_lockstep():
    kw = dict(lr=0.05, inverse_update_period=2, factor_decay=0.9, weight_decay=1e-3)
    model = small_cnn()
    opt = KFAC(model, **kw)
    train(model, opt, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    resumed = small_cnn()
    resumed.load_state_dict(saved_model)
    opt2 = KFAC(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    for key in ("A", "G"):
        assert torch.equal(opt2.state[resumed[0].weight][key], opt.state[model[0].weight][key])
    train(model, opt, 4, start=3)
    train(resumed, opt2, 4, start=3)
    assert params_equal(model, resumed)
    assert opt.stats == opt2.stats


def test_load_keeps_the_factor_dtype():
    model = small_cnn().float()
    opt = KFAC(model, factor_dtype=torch.float64)
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x.float()), y).backward()
    opt.step()
    opt2 = KFAC(copy.deepcopy(model), factor_dtype=torch.float64)
    opt2.load_state_dict(opt.state_dict())
    state = opt2.state[opt2.model[0].weight]
    assert state["A"].dtype == torch.float64 and state["inverse"][0].dtype == torch.float64


def test_deepcopy_trains_in_lockstep_and_independently():
    model = small_cnn()
    opt = KFAC(model, lr=0.05)
    train(model, opt, 2)
    clone = copy.deepcopy(opt)
    assert clone.model is not model and clone.blocks[0].module is clone.model[0]
    train(model, opt, 3, start=2)
    train(clone.model, clone, 3, start=2)
    assert params_equal(model, clone.model)
    assert opt.stats == clone.stats


# ----------------------------------------------------------------------------------- groups
def test_param_groups_use_their_own_lr_and_damping():
    base = small_cnn()
    model = copy.deepcopy(base)
    groups = [
        {"params": [p for i in (0, 1) for p in model[i].parameters()], "lr": 0.1, "damping": 0.01},
        {"params": list(model[3].parameters()) + list(model[6].parameters()), "lr": 0.3},
    ]
    opt = KFAC(model, groups, momentum=0.0, kl_clip=None, damping=1.0)
    train(model, opt, 1)
    for lr, damping, layers in ((0.1, 0.01, (0, 1)), (0.3, 1.0, (3, 6))):
        ref = copy.deepcopy(base)
        train(ref, KFAC(ref, lr=lr, damping=damping, momentum=0.0, kl_clip=None), 1)
        for i in layers:
            for p, q in zip(model[i].parameters(), ref[i].parameters()):
                assert_close(p, q, rtol=1e-12)


def test_lr_scheduler_changes_the_step():
    model = small_cnn()
    opt = KFAC(model, lr=0.1, norm_block="skip", curvature_budget=None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    train(model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = copy.deepcopy(model)
    train(model, opt, 1, start=1)
    # lr 0: parameters frozen (BatchNorm running stats do move)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert opt.stats["factor_updates"] == 6  # statistics still accumulate


def test_layer_settings_override_and_skip():
    model = small_cnn()
    opt = KFAC(
        model,
        norm_block="skip",
        layer_settings={"6": "skip", "3": {"kfac_approx": "reduce", "damping": 0.5}},
    )
    assert [b.name for b in opt.blocks] == ["0", "3"]
    hp = opt.layer_hp()
    assert hp[id(opt.blocks[1])].kfac_approx.value == "reduce"
    assert hp[id(opt.blocks[1])].damping == 0.5
    assert hp[id(opt.blocks[0])].damping == 1e-4  # the default start damping with qmodel steps


def test_skipped_layer_and_batchnorm_get_the_sgd_update():
    """A layer set to "skip" and a BatchNorm with ``norm_block="skip"`` get plain SGD."""
    model = small_cnn()
    opt = KFAC(
        model,
        lr=0.1,
        momentum=0.0,
        weight_decay=0.01,
        norm_block="skip",
        layer_settings={"6": "skip"},
    )
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = {i: [p - 0.1 * (p.grad + 0.01 * p) for p in model[i].parameters()] for i in (1, 6)}
    conv_before = model[0].weight.detach().clone()
    sgd_conv = conv_before - 0.1 * (model[0].weight.grad + 0.01 * conv_before)
    opt.step()
    for i, ps in expected.items():
        for p, e in zip(model[i].parameters(), ps):
            assert_close(p, e, rtol=1e-14)
    assert not torch.allclose(model[0].weight, sgd_conv)  # the conv is preconditioned


def test_params_without_grad_and_frozen_params():
    model = small_cnn()
    model[0].weight.requires_grad_(False)  # frozen: not optimised, its layer falls back to SGD
    extra = nn.Linear(2, 2).double()  # never used in forward: grads stay None
    holder = nn.ModuleDict({"net": model, "unused": extra})
    opt = KFAC(holder, lr=0.1, norm_block="skip")
    assert [b.name for b in opt.blocks] == ["net.3", "net.6", "unused"]
    before = copy.deepcopy(extra.state_dict())
    for i in range(2):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(v, extra.state_dict()[k]) for k, v in before.items())
    assert "A" not in opt.state[extra.weight]


# ----------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "type2"])
def test_inplace_relu_gives_the_same_training(fisher_type):
    a, b = small_cnn(inplace=False), small_cnn(inplace=True)
    opt_a, opt_b = (KFAC(m, lr=0.05, fisher_type=fisher_type) for m in (a, b))
    for i in range(3):
        x, y = batch(i)
        for model, opt in ((a, opt_a), (b, opt_b)):
            torch.manual_seed(i)  # same MC labels for both
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert params_equal(a, b)
    for layer in (0, 3, 6):
        assert torch.equal(opt_a.state[a[layer].weight]["G"], opt_b.state[b[layer].weight]["G"])


@pytest.mark.parametrize("fisher_type", ["empirical", "type2"])
def test_two_micro_batches_equal_one_batch(fisher_type):
    big, acc = small_cnn(), small_cnn()
    kw = dict(lr=0.05, fisher_type=fisher_type)
    opt_big, opt_acc = KFAC(big, **kw), KFAC(acc, **kw)
    for i in range(2):
        x, y = batch(i, n=8)
        opt_big.zero_grad()
        F.cross_entropy(big(x), y).backward()
        opt_big.step()
        opt_acc.zero_grad()
        for part in range(2):
            sl = slice(4 * part, 4 * part + 4)
            (F.cross_entropy(acc(x[sl]), y[sl]) / 2).backward()
        opt_acc.step()
    # BatchNorm batch statistics differ between micro-batches: compare the factors of the first
    # layer's input (identical data) and the last layer's gradient factor after one step instead
    big1, acc1 = small_cnn(), small_cnn()
    big1[1], acc1[1] = nn.Identity(), nn.Identity()
    opt_big, opt_acc = KFAC(big1, **kw), KFAC(acc1, **kw)
    x, y = batch(0, n=8)
    opt_big.zero_grad()
    F.cross_entropy(big1(x), y).backward()
    opt_big.step()
    opt_acc.zero_grad()
    for part in range(2):
        sl = slice(4 * part, 4 * part + 4)
        (F.cross_entropy(acc1(x[sl]), y[sl]) / 2).backward()
    opt_acc.step()
    for layer in (0, 3, 6):
        for key in ("A", "G"):
            assert_close(
                opt_acc.state[acc1[layer].weight][key], opt_big.state[big1[layer].weight][key]
            )
    for p, q in zip(acc1.parameters(), big1.parameters()):
        assert_close(p, q, rtol=1e-12)


def test_closure_is_run_with_grad_and_captured():
    a, b = small_cnn(), small_cnn()
    opt_a, opt_b = KFAC(a, lr=0.05), KFAC(b, lr=0.05)
    train(a, opt_a, 2)
    for i in range(2):
        x, y = batch(i)

        def closure(x=x, y=y):
            opt_b.zero_grad()
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        loss = opt_b.step(closure)
        assert loss.grad_fn is not None  # the closure ran with gradients enabled
    assert params_equal(a, b)


def test_remove_hooks_then_momentum_sgd_everywhere():
    model = small_cnn()
    ref = copy.deepcopy(model)
    opt = KFAC(model, lr=0.1, momentum=0.9)
    opt.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 3)
    train(ref, sgd, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_close(p, q, rtol=1e-12)


def test_factor_and_inverse_periods():
    model = small_cnn()
    opt = KFAC(model, factor_update_period=2, inverse_update_period=3, norm_block="skip")
    train(model, opt, 6)
    state = opt.state[model[0].weight]
    assert state["factor_updates"] == 3  # steps 0, 2, 4
    # inverses staggered (kfac_tn.optim.schedule): the costliest layer (the grouped conv) on
    # phase 0, the others on 1 and 2; every layer at step 0 (no inverse yet), then each period
    phases = opt.schedule.phases({b.name: 3 for b in opt.blocks})
    assert phases == {"3": 0, "0": 1, "6": 2}
    for block in opt.blocks:
        steps = [0] + [t for t in range(1, 6) if (t + phases[block.name]) % 3 == 0]
        assert opt.state[block.weight]["inverse_updates"] == len(steps)
    assert opt.stats["steps"] == 6


def test_eval_mode_and_no_grad_capture_nothing():
    model = small_cnn()
    opt = KFAC(model)
    model.eval()
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    model.train()
    with torch.no_grad():
        model(x)
    assert not any(b.has_statistics for b in opt.blocks)


# ----------------------------------------------------------------------------------- AMP
def test_grad_scaler_inf_step_leaves_factors_and_params_untouched():
    model = small_cnn().float()
    ref = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = KFAC(model, lr=0.05, grad_scaler=scaler)
    opt_ref = KFAC(ref, lr=0.05)

    def scaled_step(x, y):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()

    x, y = batch(0)
    x, x_bad = x.float(), x.float().clone()
    x_bad[0, 0, 0, 0] = float("inf")
    scaled_step(x, y)
    opt_ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    opt_ref.step()
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items() if k in ("A", "G")}
    params = copy.deepcopy(model.state_dict())
    scaled_step(x_bad, y)  # inf gradients: GradScaler skips opt.step()
    assert scaler.get_scale() < 2.0**10
    for k, v in state.items():
        assert torch.equal(opt.state[model[0].weight][k], v)
    for k, v in params.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(model.state_dict()[k], v)
    # the next step (its zero_grad drops the bad statistics) matches a run that never saw the
    # bad batch, and G is unscaled: the scaled run matches the unscaled reference
    x1, y1 = batch(1)
    scaled_step(x1.float(), y1)
    opt_ref.zero_grad()
    F.cross_entropy(ref(x1.float()), y1).backward()
    opt_ref.step()
    for layer in (0, 3, 6):
        for key in ("A", "G"):
            got, want = opt.state[model[layer].weight][key], opt_ref.state[ref[layer].weight][key]
            assert_close(got, want, rtol=1e-5)


def test_bf16_autocast_factors_are_float32():
    model = small_cnn().float()
    opt = KFAC(model, lr=0.05)
    x, y = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.float()), y)
    loss.backward()
    opt.step()
    ref = small_cnn().float()
    opt_ref = KFAC(ref, lr=0.05)
    opt_ref.zero_grad()
    F.cross_entropy(ref(x.float()), y).backward()
    opt_ref.step()
    for layer in (0, 3, 6):
        for key in ("A", "G"):
            f = opt.state[model[layer].weight][key]
            r = opt_ref.state[ref[layer].weight][key]
            assert f.dtype == torch.float32 and torch.isfinite(f).all()
            assert ((f - r).norm() / r.norm()).item() < 5e-2  # bf16 activations, ~3 digits


def test_stats_counters():
    model = small_cnn()
    opt = KFAC(model, inverse_update_period=2, norm_block="skip", curvature_budget=None)
    train(model, opt, 3)
    stats = opt.stats
    assert stats == {
        "steps": 3,
        "skipped_steps": 0,
        "factor_updates": 9,
        "skipped_factor_updates": 0,
        "inverse_updates": 6,
        "fallback_inversions": 0,
        "failed_inversions": 0,
        "invalid_factors": 0,
        "damping_adaptations": 1,
        "eigh_decompositions": 0,
        "warm_decompositions": 0,
        "qr_decompositions": 0,
        "cholesky_decompositions": 16,  # per matrix: 2 updates x (2 + 2 + 4: the grouped conv)
        "offloaded_decompositions": 0,
        "factored_preconditionings": 0,  # the 3x17 dense layer at batch 8 does not pay
        "kfac_layers": 3,
        "damping": [opt.param_groups[0]["damping"]],
        "rho": opt.state["kfac"]["rho"],
        "step_scale": 1.0,
    }


@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "type2"])
def test_statistics_are_committed_by_the_backward_pass(fisher_type):
    """zero_grad between forward and backward keeps the step's statistics; no backward, none."""
    a, b = small_cnn(), small_cnn()
    opt_a, opt_b = (
        KFAC(a, lr=0.05, fisher_type=fisher_type),
        KFAC(b, lr=0.05, fisher_type=fisher_type),
    )
    x, y = batch(0)
    torch.manual_seed(5)
    opt_a.zero_grad()
    F.cross_entropy(a(x), y).backward()
    opt_a.step()
    torch.manual_seed(5)
    loss = F.cross_entropy(b(x), y)
    opt_b.zero_grad()  # common loop order: forward, zero_grad, backward, step
    loss.backward()
    opt_b.step()
    assert params_equal(a, b)
    b(x)  # a forward pass without backward contributes nothing
    assert not any(block.has_statistics for block in opt_b.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fisher_type", ["empirical", "mc", "type2"])
@pytest.mark.parametrize("inversion", ["eigen", "cholesky"])
def test_cuda_matches_cpu(fisher_type, inversion):
    cpu = small_cnn()
    gpu = copy.deepcopy(cpu).cuda()
    kw = dict(lr=0.05, fisher_type=fisher_type, inversion=inversion, inverse_update_period=2)
    opt_cpu, opt_gpu = KFAC(cpu, **kw), KFAC(gpu, **kw)
    for i in range(3):
        x, y = batch(i)
        for model, opt, dev in ((cpu, opt_cpu, "cpu"), (gpu, opt_gpu, "cuda")):
            torch.manual_seed(i)  # MC labels: same seed, but the CPU and CUDA streams differ
            opt.zero_grad()
            F.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
    if fisher_type == "mc":
        assert all(torch.isfinite(p).all() for p in gpu.parameters())
        assert opt_gpu.stats["skipped_factor_updates"] == 0
        return
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert_close(q, p, rtol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_and_grad_scaler():
    model = small_cnn().float().cuda()
    scaler = torch.amp.GradScaler("cuda")
    opt = KFAC(model, lr=0.05, grad_scaler=scaler)
    for i in range(3):
        x, y = batch(i)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x.float().cuda()), y.cuda())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    state = opt.state[model[0].weight]
    assert state["A"].dtype == torch.float32 and torch.isfinite(state["G"]).all()
    assert opt.stats["factor_updates"] == 9


def test_layer_whose_factors_never_saw_a_finite_batch_gets_the_plain_gradient():
    """``factors_valid`` False (only non-finite statistics so far): momentum-free SGD direction."""
    model = small_cnn().double()
    opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None, step_size="fixed")
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    conv = model[0]
    opt.state[conv.weight]["factors_valid"] = torch.tensor(False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    # keep the invalid flag through this step's factor update: no statistics for this layer
    opt.blocks[0].clear_statistics()
    before, grad = conv.weight.detach().clone(), conv.weight.grad.clone()
    opt.step()
    assert_close(conv.weight.detach(), before - 0.1 * grad)


def test_model_and_optimizer_pickle_with_hooks_attached():
    """Regression (#10): hooks were local closures, so torch.save(model) / pickle failed."""
    import io
    import pickle

    model = small_cnn()
    opt = KFAC(model, lr=0.05)
    train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, _ = batch(0)
    assert torch.equal(loaded(x), model(x))  # its hooks are inert: no capture for `opt`
    clone = pickle.loads(pickle.dumps(opt))
    train(model, opt, 2, start=2)
    train(clone.model, clone, 2, start=2)
    assert params_equal(model, clone.model)


def test_global_settings_are_in_the_state_dict_and_checked_at_load():
    model = small_cnn()
    opt = KFAC(model, fisher_type="mc", mc_samples=2)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["fisher_type"] == "mc"
    other = KFAC(copy.deepcopy(model))
    with pytest.raises(ValueError, match="fisher_type: 'mc', but this optimizer has 'empirical'"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="Invalid loss value"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "loss": "mse"})


def test_eval_mode_during_training_warns_once(caplog):
    """Regression (#10): model.eval() silently turned KFAC into SGD."""
    model = small_cnn()
    opt = KFAC(model, lr=0.05)
    model.eval()
    with caplog.at_level("WARNING", logger="kfac_tn"):
        train(model, opt, 3)
    assert sum("eval mode" in r.getMessage() for r in caplog.records) == 1


def test_unmatched_layer_settings_pattern_warns(caplog):
    with caplog.at_level("WARNING", logger="kfac_tn"):
        KFAC(small_cnn(), layer_settings={"conv*": {"damping": 0.1}, "0": "skip"})
    messages = [r.getMessage() for r in caplog.records]
    assert any("'conv*' matches no module" in m for m in messages)
    assert not any("'0' matches" in m for m in messages)


def test_tied_weight_message_is_true(caplog):
    """Regression (#10): the second user of a tied weight was said to be 'trained with SGD'."""
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second).double()
    with caplog.at_level("WARNING", logger="kfac_tn"):
        opt = KFAC(model)
    assert [b.name for b in opt.blocks] == ["0"]
    (message,) = [r.getMessage() for r in caplog.records if "shared" in r.getMessage()]
    assert "preconditioned with the curvature of 0 only" in message
    assert "its own bias is trained with SGD" in message


def test_factors_follow_the_parameter_dtype():
    """Regression (#10): after model.to(float64) the factors stayed float32."""
    model = small_cnn().float()
    opt = KFAC(model, lr=0.05, curvature_budget=None)  # factors on the second step too
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x.float()), y).backward()
    opt.step()
    model.double()
    train(model, opt, 1, start=1)
    state = opt.state[model[0].weight]
    assert state["A"].dtype == state["G"].dtype == torch.float64
    assert state["momentum_buffer"].dtype == torch.float64


# id, KFAC settings, batch size, the self-tuning's forward passes of the batch per step the
# budget's cost model counts (float32 on CPU: the difference-quotient JVP, 1 pass on its samples)
EXTRA_FORWARD_CASES = [
    ("defaults_whole_batch", {}, 64, 1.0 + 1.0 / 5),
    ("defaults_sub_batch", {}, 128, 0.5 + 0.5 / 5),  # the damping's pass on the JVP's samples
    ("forward_mode_sub_batch", {"qmodel_jvp": "forward"}, 128, 1.5 + 0.5 / 5),
    ("fixed_step_kronecker_damping", {"step_size": "fixed"}, 128, 1.0 / 5),
    ("fixed_step_exact_damping", {"step_size": "fixed", "qmodel": "exact"}, 128, 1.0 / 5),
    (
        "fixed_step_exact_damping_forward_mode",
        {"step_size": "fixed", "qmodel": "exact", "qmodel_jvp": "forward"},
        128,
        (0.5 + 1.5) / 5,
    ),
    ("fixed_step_no_adaptation", {"step_size": "fixed", "damping_adaptation": False}, 128, 0.0),
]


@pytest.mark.parametrize(
    "kwargs,n,expected",
    [c[1:] for c in EXTRA_FORWARD_CASES],
    ids=[c[0] for c in EXTRA_FORWARD_CASES],
)
def test_cost_model_counts_the_self_tunings_forward_passes(kwargs, n, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))
    opt = KFAC(model, lr=0.1, **kwargs)
    x, y = torch.randn(n, 1, 6, 6), torch.randint(0, 3, (n,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _, extra = opt._layer_work()
    assert extra == pytest.approx(expected)
