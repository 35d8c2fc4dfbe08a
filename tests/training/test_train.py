from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from kfac_tn.optim.hyperparams import START_DAMPING
from kfac_tn.training.checkpoint import CheckpointError
from kfac_tn.training.config import ConfigError, ScheduleConfig, ScheduleName, load_config
from kfac_tn.training.train import lr_factor, read_metrics, resolve_device, train

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
ROW_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "wall_clock_s",
    "lr",
    "images_per_s",
    "max_memory_mib",
}
KFAC_ROW_KEYS = {"damping", "rho", "step_scale", "skipped_steps"}  # self-tuning, KFAC runs only

# tiny but real: a subset of the digits, few batches
TINY_DIGITS = [
    "data.train_subset=96",
    "data.test_subset=64",
    "batch_size=32",
    "test_batch_size=64",
    "quiet=true",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY_DIGITS, f"out_dir={tmp_path}", *extra]


# --- learning-rate schedule ---------------------------------------------------------------------

SCHEDULES = [
    # (id, config, step, steps_per_epoch, epochs, expected multiplier)
    ("none", ScheduleConfig(name=ScheduleName.NONE), 37, 10, 5, 1.0),
    ("cosine_start", ScheduleConfig(name=ScheduleName.COSINE), 0, 10, 5, 1.0),
    ("cosine_half", ScheduleConfig(name=ScheduleName.COSINE), 25, 10, 5, 0.5),
    ("cosine_floor", ScheduleConfig(name=ScheduleName.COSINE, min_lr_ratio=0.1), 25, 10, 5, 0.55),
    (
        "cosine_quarter",
        ScheduleConfig(name=ScheduleName.COSINE),
        10,
        10,
        4,
        0.5 * (1 + math.cos(math.pi / 4)),
    ),
    (
        "step_before",
        ScheduleConfig(name=ScheduleName.STEP, step_epochs=2, gamma=0.5),
        19,
        10,
        9,
        1.0,
    ),
    (
        "step_after",
        ScheduleConfig(name=ScheduleName.STEP, step_epochs=2, gamma=0.5),
        40,
        10,
        9,
        0.25,
    ),
    (
        "multistep",
        ScheduleConfig(name=ScheduleName.MULTISTEP, milestones=[1, 3], gamma=0.1),
        30,
        10,
        9,
        0.01,
    ),
    (
        "multistep_mid",
        ScheduleConfig(name=ScheduleName.MULTISTEP, milestones=[1, 3], gamma=0.1),
        29,
        10,
        9,
        0.1,
    ),
    ("onecycle_rise", ScheduleConfig(name=ScheduleName.ONECYCLE, pct_start=0.5), 4, 10, 2, 0.5),
    ("onecycle_peak", ScheduleConfig(name=ScheduleName.ONECYCLE, pct_start=0.5), 10, 10, 2, 1.0),
    ("onecycle_fall", ScheduleConfig(name=ScheduleName.ONECYCLE, pct_start=0.5), 15, 10, 2, 0.5),
    ("warmup", ScheduleConfig(name=ScheduleName.NONE, warmup_epochs=2), 4, 10, 5, 0.25),
    (
        "warmup_done",
        ScheduleConfig(name=ScheduleName.COSINE, warmup_epochs=1),
        9,
        10,
        2,
        0.5 * (1 + math.cos(math.pi * 9 / 20)),
    ),
]


@pytest.mark.parametrize(
    ("cfg", "step", "spe", "epochs", "expected"),
    [c[1:] for c in SCHEDULES],
    ids=[c[0] for c in SCHEDULES],
)
def test_lr_factor(cfg, step, spe, epochs, expected):
    assert lr_factor(cfg, step, spe, epochs) == pytest.approx(expected, rel=1e-12)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
            resolve_device("cuda")


# --- optimizer construction -------------------------------------------------------------------


def test_build_optimizer_passes_every_kfac_keyword(monkeypatch):
    import inspect

    from kfac_tn import KFAC
    from kfac_tn.training import train as train_module

    seen = {}

    def recorder(model, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(train_module, "KFAC", recorder)
    cfg = load_config(None, ["optimizer.factor_dtype=float64", "optimizer.kfac_approx=reduce"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model = torch.nn.Linear(2, 2)
    train_module.build_optimizer(cfg, model, reconstruction=True, grad_scaler=scaler)
    assert set(seen) == set(inspect.signature(KFAC).parameters) - {"model", "params"}
    assert seen["loss"] == "mse" and seen["loss_reduction"] == "mean"
    assert seen["grad_scaler"] is scaler and seen["factor_dtype"] is torch.float64
    assert seen["kfac_approx"] == "reduce" and seen["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_build_optimizer_torch_optimizers(name):
    from kfac_tn.training.config import OPTIMIZER_KEYS, OptimizerName
    from kfac_tn.training.train import build_optimizer

    extra = ["optimizer.momentum=0.9"] if name == "sgd" else ["optimizer.betas=[0.8, 0.9]"]
    cfg = load_config(None, [f"optimizer.name={name}", "optimizer.lr=0.01", *extra])
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model, reconstruction=False)
    assert type(opt).__name__.lower() == name
    group = opt.param_groups[0]
    for key in OPTIMIZER_KEYS[OptimizerName(name)]:
        assert group[key] == getattr(cfg.optimizer, key), key


# --- end to end --------------------------------------------------------------------------------


def test_run_directory_contents(tmp_path):
    cfg = load_config(
        None, tiny(tmp_path, "epochs=2", "run_name=r", "optimizer.inverse_update_period=2")
    )
    result = train(cfg)
    run = tmp_path / "r"
    assert result.run_dir == run
    assert {p.name for p in run.iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pt",
        "curves.png",
        "train.log",
    }
    rows = read_metrics(run)
    assert rows == result.metrics and [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) == ROW_KEYS | KFAC_ROW_KEYS
        assert all(math.isfinite(row[k]) for k in ROW_KEYS - {"max_memory_mib"})
        assert row["damping"] >= START_DAMPING["qmodel"] and 0 < row["step_scale"] <= 1
        assert row["skipped_steps"] == 0 and math.isfinite(row["rho"])
        assert row["max_memory_mib"] is None  # CPU run
        assert 0 <= row["test_acc"] <= 1 and row["images_per_s"] > 0
    assert rows[1]["wall_clock_s"] > rows[0]["wall_clock_s"]
    assert rows[-1]["lr"] < cfg.optimizer.lr  # cosine decayed
    assert load_config(run / "config.yaml") == cfg
    assert "epoch 2/2" in (run / "train.log").read_text()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run directory is not silently overwritten
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg)


def test_training_learns_digits(tmp_path):
    """A few hundred KFAC steps on the real digits reach a clearly non-trivial accuracy."""
    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path}",
            "quiet=true",
            "epochs=2",
            "data.train_subset=640",
            "checkpoint_period=0",
        ],
    )
    rows = train(cfg).metrics
    assert rows[-1]["test_acc"] > 0.8, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


RESUME_CASES = [
    ("kfac_empirical", ["optimizer.name=kfac", "optimizer.inverse_update_period=2"]),
    (
        "kfac_mc_reduce",
        [
            "optimizer.name=kfac",
            "optimizer.fisher_type=mc",
            "optimizer.kfac_approx=reduce",
            "optimizer.inverse_update_period=3",
        ],
    ),
    ("sgd", ["optimizer.name=sgd"]),
    (
        "adam_dropout",
        [
            "optimizer.name=adam",
            "optimizer.lr=1e-3",
            "model.name=allcnnc",
            "model.width=0.1",
            "data.image_size=16",
            "model.dropout=0.5",
        ],
    ),
]


@pytest.mark.parametrize("extra", [c[1] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_equals_uninterrupted(tmp_path, extra):
    straight = train(
        load_config(None, tiny(tmp_path, "epochs=2", "run_name=straight", *extra))
    ).metrics
    cfg = load_config(None, tiny(tmp_path, "epochs=2", "run_name=split", *extra))
    first = train(cfg, stop_after=1).metrics
    assert len(first) == 1
    resumed = train(cfg, resume=tmp_path / "split").metrics
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == b[key], (key, a, b)  # exact on CPU
    assert read_metrics(tmp_path / "split") == resumed


def test_resume_drops_rows_after_checkpoint_and_extends(tmp_path):
    cfg = load_config(
        None, tiny(tmp_path, "epochs=2", "run_name=r", "optimizer.name=sgd", "checkpoint_period=0")
    )
    train(cfg, stop_after=1)  # checkpoint at epoch 1 (end of this invocation)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # a crashed run wrote more rows
        f.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n")
    rows = train(
        load_config(tmp_path / "r" / "config.yaml", ["epochs=3"]), resume=tmp_path / "r"
    ).metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert read_metrics(tmp_path / "r") == rows


def test_resume_mismatch_and_corruption(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "epochs=1", "run_name=r", "optimizer.name=sgd"))
    train(cfg)
    other = load_config(
        None, tiny(tmp_path, "epochs=2", "run_name=r", "optimizer.name=sgd", "optimizer.lr=0.5")
    )
    with pytest.raises(
        CheckpointError,
        match=r"belongs to a different run:\n  optimizer.lr: checkpoint has 0.05, config has 0.5",
    ):
        train(other, resume=tmp_path / "r")
    wider = load_config(
        None, tiny(tmp_path, "epochs=2", "run_name=r", "optimizer.name=sgd", "model.width=2.0")
    )
    with pytest.raises(CheckpointError, match="model.width: checkpoint has 1.0, config has 2.0"):
        train(wider, resume=tmp_path / "r")
    ck = tmp_path / "r" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is corrupt"):
        train(
            load_config(None, tiny(tmp_path, "epochs=2", "run_name=r", "optimizer.name=sgd")),
            resume=tmp_path / "r",
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, resume=tmp_path / "nowhere")


def test_fp16_and_bf16_autocast_on_cpu(tmp_path):
    for prec in ("bf16", "fp16"):
        rows = train(
            load_config(
                None,
                tiny(
                    tmp_path,
                    "epochs=1",
                    f"run_name={prec}",
                    f"precision={prec}",
                    "data.limit_batches=2",
                ),
            )
        ).metrics
        assert math.isfinite(rows[0]["train_loss"]) and math.isfinite(rows[0]["test_loss"])
    ck = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0


def test_sampled_backprop_wired(tmp_path, monkeypatch):
    import kfac_tn.nn as knn

    calls = []
    real = knn.convert_sampled

    def spy(model, **kw):
        calls.append(kw)
        return real(model, **kw)

    monkeypatch.setattr(knn, "convert_sampled", spy)
    cfg = load_config(
        None,
        tiny(
            tmp_path,
            "epochs=1",
            "run_name=s",
            "sampled_backprop.enabled=true",
            "sampled_backprop.keep_prob=0.5",
            "sampled_backprop.layers=features.*",
            "optimizer.name=sgd",
        ),
    )
    rows = train(cfg).metrics
    assert calls == [{"keep_prob": 0.5, "axis": "spatial", "layers": "features.*"}]
    assert math.isfinite(rows[0]["train_loss"])


# --- every shipped config runs one short epoch on tiny data in its real on-disk format ---------

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))

SMOKE = {  # tiny-model overrides per shipped config
    "cifar10_resnet18_kfac": [
        "model.width=0.0625",
        "optimizer.factor_update_period=1",
        "optimizer.inverse_update_period=1",
    ],
    "cifar10_resnet18_sgd": ["model.width=0.0625"],
    "cifar100_allcnnc_kfac": ["model.width=0.1", "optimizer.factor_update_period=1"],
    "imagenet_resnet50_kfac": [
        "model.width=0.0625",
        "data.image_size=32",
        "distributed=off",
        "optimizer.factor_update_period=1",
        "optimizer.inverse_update_period=1",
    ],
}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_runs_one_short_epoch(path, tmp_path):
    from test_data import write_cifar, write_image_folder

    name = yaml.safe_load(path.read_text())["data"]["name"]
    data_root = tmp_path / "data"
    extra = []
    if name in ("cifar10", "cifar100"):
        write_cifar(data_root, name, n_train=16, n_test=8)
        extra = [f"data.root={data_root}"]
    elif name == "imagenet":
        write_image_folder(data_root, per_class=3)
        extra = [f"data.root={data_root}"]
    overrides = [
        *extra,
        *SMOKE.get(path.stem, []),
        "epochs=1",
        "batch_size=8",
        "test_batch_size=8",
        "data.limit_batches=2",
        "data.train_subset=64",
        "data.test_subset=16",
        "data.num_workers=0",
        "device=cpu",
        "quiet=true",
        f"out_dir={tmp_path / 'runs'}",
        "run_name=smoke",
    ]
    cfg = load_config(path, overrides)
    rows = train(cfg).metrics
    assert (
        len(rows) == 1
        and math.isfinite(rows[0]["train_loss"])
        and math.isfinite(rows[0]["test_loss"])
    )
    if cfg.model.name == "autoencoder":
        assert rows[0]["test_acc"] is None
    else:
        assert 0 <= rows[0]["test_acc"] <= 1
    assert (tmp_path / "runs" / "smoke" / "checkpoint.pt").is_file()


def test_ddp_needs_torchrun(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, tiny(tmp_path, "distributed=ddp", "epochs=1"))
    with pytest.raises(ValueError, match="torchrun"):
        train(cfg)


@pytest.mark.parametrize("fails", [False, True], ids=["success", "failure"])
def test_distributed_run_closes_its_groups(tmp_path, monkeypatch, fails):
    """Regression: a finished DDP run waits for its peers before it destroys the groups (see
    ``close_process_group``); a failed one closes without waiting."""
    import kfac_tn.distributed as kd
    import kfac_tn.training.train as tr

    closed: list[bool] = []

    def fake_train(*args, **kwargs):
        if fails:
            raise RuntimeError("peer died")
        return tr.RunResult(None, [])

    monkeypatch.setattr(
        tr, "_init_distributed", lambda cfg: (tr.DistContext(True, 1, 2, 1), torch.device("cpu"))
    )
    monkeypatch.setattr(tr, "_train", fake_train)
    monkeypatch.setattr(kd, "close_process_group", lambda *, finished: closed.append(finished))
    cfg = load_config(None, tiny(tmp_path, "distributed=ddp"))
    if fails:
        with pytest.raises(tr.DistributedRunError, match="rank 1: distributed training aborted"):
            train(cfg)
    else:
        train(cfg)
    assert closed == [not fails]


def test_build_optimizer_passes_every_kfac_key():
    """Every ``optimizer`` KFAC key reaches the optimizer (here: EKFAC and norm blocks)."""
    from kfac_tn.training.config import config_from_dict
    from kfac_tn.training.train import build_optimizer

    raw = {"optimizer": {"preconditioner": "ekfac", "norm_block": "diagonal", "damping": 0.3}}
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(config_from_dict(raw), model, reconstruction=False)
    assert (opt.defaults["preconditioner"], opt.defaults["norm_block"]) == ("ekfac", "diagonal")
    assert opt.defaults["damping"] == 0.3
    assert [b.name for b in opt.blocks] == ["0", "1"]


def test_metrics_of_other_optimizers_have_no_self_tuning_keys(tmp_path):
    cfg = load_config(None, tiny(tmp_path, "epochs=1", "run_name=s", "optimizer=sgd"))
    rows = train(cfg).metrics
    assert set(rows[0]) == ROW_KEYS


# --- hardening (#10 §2, §3): nothing half-written, resume folders, checked checkpoints ---------

FAST = ["data.limit_batches=1", "optimizer.name=sgd"]


AFTER_VALIDATION = [  # configs that validate (the folders exist) but whose data cannot be built
    ("cifar_empty", "cifar10", ["cifar-10-batches-py"], "lacks cifar-10-batches-py/data_batch_1"),
    ("imagenet_empty", "imagenet", ["train", "val"], "is not an ImageFolder root"),
]


@pytest.mark.parametrize(
    ("data", "folders", "message"),
    [c[1:] for c in AFTER_VALIDATION],
    ids=[c[0] for c in AFTER_VALIDATION],
)
def test_failure_after_validation_leaves_no_run_dir(tmp_path, data, folders, message):
    from kfac_tn.training.cli import main

    for folder in folders:
        (tmp_path / "data" / folder).mkdir(parents=True)
    out = tmp_path / "out"
    argv = ["train", f"data.name={data}", f"data.root={tmp_path / 'data'}", "model.name=2c2d"]
    assert main([*argv, "--out", str(out), "--run-name", "r", "--quiet"]) == 2
    assert not out.exists()  # not even out_dir: it did not exist before
    with pytest.raises(ValueError, match=message):
        train(load_config(None, [*argv[1:], f"out_dir={out}"]))


def test_failure_before_the_first_epoch_removes_only_what_the_run_created(tmp_path, monkeypatch):
    from kfac_tn.training import train as train_module

    run = tmp_path / "r"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")  # an existing directory without a run in it

    def broken(self, stop_after=None):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_module.Run, "execute", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(load_config(None, tiny(tmp_path, "run_name=r", *FAST)))
    assert [p.name for p in run.iterdir()] == ["notes.txt"]  # config.yaml, train.log removed


def test_build_warnings_reach_train_log(tmp_path):
    """Records logged while the run is built (before its directory exists) end up in train.log."""
    import logging

    from kfac_tn.training import train as train_module

    original = train_module.Run.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        logging.getLogger("kfac_tn.training.train").warning("built; a warning from the build")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module.Run, "__init__", init)
        train(load_config(None, tiny(tmp_path, "run_name=r", "epochs=1", *FAST)))
    assert "a warning from the build" in (tmp_path / "r" / "train.log").read_text()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """One finished tiny SGD run (2 epochs, 1 step each) and its overrides."""
    out = tmp_path_factory.mktemp("finished")
    overrides = [*TINY_DIGITS, f"out_dir={out}", "run_name=r", "epochs=2", *FAST]
    torch.set_num_threads(1)
    train(load_config(None, overrides), stop_after=1)
    return out / "r", overrides


def _mutate(state, path, value):
    node = state
    for part in path[:-1]:
        node = node[part]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node.get(path[-1])) if callable(value) else value


BAD_CHECKPOINTS = [
    ("no_rng", ("rng",), KeyError, "entry 'rng' is missing"),
    ("epoch_text", ("epoch",), "two", "entry 'epoch': 'two' is not an int >= 0"),
    ("numpy_pos_text", ("rng", "numpy", "pos"), "x", "entry 'rng.numpy.pos': 'x' is not"),
    (
        "short_torch_rng",
        ("rng", "torch"),
        lambda t: t.float(),
        "entry 'rng.torch': a torch.float32",
    ),
    ("metrics_rows", ("metrics",), [], "entry 'metrics': 0 rows for epoch 1"),
    ("no_model", ("model",), KeyError, "entry 'model' is missing"),
    (
        "missing_model_key",
        ("model", "features.0.weight"),
        KeyError,
        "entry model['features.0.weight'] is missing",
    ),
    (
        "extra_model_key",
        ("model", "bogus.weight"),
        torch.zeros(1),
        "entry model['bogus.weight'] is not in the configured model",
    ),
    (
        "wrong_shape",
        ("model", "features.0.weight"),
        lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]),
        "entry model['features.0.weight'] has shape (",
    ),
    (
        "momentum_shape",
        ("optimizer", "state", 0, "momentum_buffer"),
        lambda t: torch.zeros(3),
        "entry optimizer['state'][0]['momentum_buffer'] has shape (3,); its parameter's is (",
    ),
    ("scheduler_text", ("scheduler", "last_epoch"), "x", "entry 'scheduler': {"),
]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [c[1:] for c in BAD_CHECKPOINTS],
    ids=[c[0] for c in BAD_CHECKPOINTS],
)
def test_malformed_checkpoint_is_refused_before_resuming(
    finished_run, tmp_path, path, value, message
):
    """A checkpoint that loads with weights_only=True but is incomplete or does not fit."""
    import shutil

    from kfac_tn.training.checkpoint import load_checkpoint

    source, overrides = finished_run
    run = tmp_path / "r"
    shutil.copytree(source, run)
    state = load_checkpoint(run / "checkpoint.pt")
    del state["format_version"]
    _mutate(state, path, value)
    torch.save({"format_version": 1, **state}, run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    cfg = load_config(None, [*overrides[:-3], f"out_dir={tmp_path}", "epochs=2", *FAST])
    with pytest.raises(CheckpointError) as info:
        train(cfg, resume=run)
    assert message in str(info.value) and str(run / "checkpoint.pt") in str(info.value)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing resumed/written


def test_resume_given_the_out_folder_resumes_the_newest_run(finished_run, tmp_path, caplog):
    import logging
    import os
    import shutil

    from kfac_tn.training.cli import main

    source, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(source, out / "new")
    (out / "old").mkdir()
    (out / "old" / "checkpoint.pt").write_bytes(b"not even read")
    (out / "plots").mkdir()  # not a run: ignored
    os.utime(out / "old" / "checkpoint.pt", (1e9, 1e9))
    with caplog.at_level(logging.INFO, logger="kfac_tn"):
        assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "new")] == [1, 2]
    assert f"resuming the newest checkpoint, {out / 'new'} (runs: new (" in caplog.text


def test_resume_folder_errors_list_the_runs(tmp_path):
    import os

    from kfac_tn.training.train import resolve_resume_dir

    (tmp_path / "empty").mkdir()
    (tmp_path / "x" / "notes").mkdir(parents=True)
    with pytest.raises(
        CheckpointError, match=r"nor a folder of runs .*subdirectories: \['notes'\]"
    ):
        resolve_resume_dir(tmp_path / "x")
    for name in ("a", "b"):
        (tmp_path / "tie" / name).mkdir(parents=True)
        (tmp_path / "tie" / name / "checkpoint.pt").write_bytes(b"")
        os.utime(tmp_path / "tie" / name / "checkpoint.pt", ns=(10**18, 10**18))
    with pytest.raises(CheckpointError, match=r"same time \(a, b\); pass one of them: "):
        resolve_resume_dir(tmp_path / "tie")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume_dir(tmp_path / "nowhere")
    assert resolve_resume_dir(tmp_path / "tie" / "a") == tmp_path / "tie" / "a"
