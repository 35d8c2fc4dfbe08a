from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kfac_tn.training.cli import build_parser, main

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def fake_run(path: Path, accs, losses, recon=False) -> Path:
    path.mkdir(parents=True)
    rows = [
        {
            "epoch": i + 1,
            "train_loss": loss,
            "train_acc": None if recon else acc,
            "test_loss": loss * 1.1,
            "test_acc": None if recon else acc,
            "wall_clock_s": 2.0 * (i + 1),
            "lr": 0.1,
            "images_per_s": 100.0,
        }
        for i, (acc, loss) in enumerate(zip(accs, losses))
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_documents_everything(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--epochs",
        "--out",
        "--device",
        "--resume",
        "--run-name",
        "--stop-after",
        "--threads",
        "--quiet",
        "CONFIG.yaml",
        "key=value",
        "torchrun",
        "kfac-tn reference",
    ):
        assert flag in text, flag
    for cmd in ("train", "compare", "reference"):
        assert cmd in build_parser().format_help()


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "kfac_tn", "compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--out FILE.png" in out.stdout


BAD_CLI = [
    (
        "bad_choice",
        ["train", "optimizer.kfac_approx=expnd"],
        "optimizer.kfac_approx: 'expnd' is not one of ['expand', 'reduce']",
    ),
    ("unknown_key", ["train", "optimizer.dampnig=0.1"], "optimizer.dampnig: unknown key"),
    ("wrong_type", ["train", "--epochs", "0"], "epochs: 0 is out of range"),
    ("missing_config", ["train", "no/such.yaml"], "config: 'no/such.yaml' is not an existing file"),
    ("two_configs", ["train", "a.yaml", "b.yaml"], "names more than one config file"),
    (
        "missing_data",
        ["train", "data.name=cifar10", "data.root=/no/where"],
        "data.root: '/no/where' does not contain cifar-10-batches-py/",
    ),
    ("bad_override", ["train", "=3"], "is not of the form dotted.key=value"),
    ("compare_not_a_run", ["compare", "."], "has no metrics.jsonl"),
    ("threads", ["train", "--threads", "0"], "--threads: 0 is out of range"),
    ("sgd_inf_lr", ["train", "optimizer=sgd", "optimizer.lr=.inf"], "optimizer.lr: inf is not"),
    ("inf_width", ["train", "model.width=.inf"], "model.width: inf is not finite; allowed: > 0"),
    ("inf_timeout", ["train", "dist_timeout_s=.inf"], "dist_timeout_s: inf is not finite"),
    ("nan_damping", ["train", "optimizer.damping=.nan"], "optimizer.damping: nan is not finite"),
    ("type_and_range", ["train", "epochs=abc", "batch_size=0"], "batch_size: 0 is out of range"),
    (
        "override_after_option",
        ["train", "--epochs", "2", "optimizer.kfac_approx=x"],
        "'x' is not one of",
    ),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in BAD_CLI], ids=[c[0] for c in BAD_CLI])
def test_errors_exit_2_with_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "runs").exists()  # rejected before any work


def test_train_resume_and_compare(tmp_path, capsys):
    common = [
        "data.train_subset=64",
        "data.test_subset=32",
        "batch_size=32",
        "optimizer.name=sgd",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(["train", *common, "--epochs", "2", "--run-name", "a", "--stop-after", "1"]) == 0
    assert "run " in capsys.readouterr().out
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 1
    # config from the run dir; overrides may also follow options
    assert main(["train", "--resume", str(tmp_path / "a"), "--quiet", "data.num_workers=0"]) == 0
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", "--resume", str(tmp_path / "a"), "optimizer.lr=0.3"]) == 2
    assert "optimizer.lr: checkpoint has 0.05, config has 0.3" in capsys.readouterr().err
    b = fake_run(tmp_path / "b", [0.5, 0.9, 0.95], [1.0, 0.3, 0.1])
    out = tmp_path / "plots" / "cmp.png"
    assert main(["compare", str(tmp_path / "a"), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG


def test_train_with_optimizer_group(tmp_path, capsys):
    """`kfac-tn train CONFIG optimizer=adam optimizer.lr=...` switches optimizers in one go."""
    import yaml

    sgd = Path(__file__).resolve().parents[2] / "configs" / "digits_sgd.yaml"
    argv = ["train", str(sgd), "optimizer=adam", "optimizer.lr=1e-3", "data.train_subset=64"]
    argv += ["data.test_subset=32", "--epochs", "1", "--out", str(tmp_path), "--run-name", "g"]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "g" / "config.yaml").read_text())["optimizer"]
    assert saved["name"] == "adam" and saved["lr"] == 0.001 and "momentum" not in saved
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "optimizer=adam optimizer.lr=1e-3" in capsys.readouterr().out


def test_compare_summary_table(tmp_path, capsys):
    a = fake_run(tmp_path / "kfac", [0.9, 0.97, 0.99], [1.0, 0.3, 0.1])
    b = fake_run(tmp_path / "sgd", [0.5, 0.9, 0.95], [2.0, 0.5, 0.2])
    assert (
        main(["compare", str(a), str(b), "--target", "0.97", "--out", str(tmp_path / "c.png")]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["kfac", "3", "0.9900", "2", "4.0"]
    assert lines[2].split() == ["sgd", "3", "0.9500", "-", "-"]
    assert main(["compare", str(a), "--target", "97"]) == 2
    assert "target: 97.0 is out of range" in capsys.readouterr().err


def test_compare_reconstruction_runs(tmp_path):
    a = fake_run(tmp_path / "a", [0] * 3, [1.0, 0.5, 0.2], recon=True)
    b = fake_run(tmp_path / "b", [0] * 2, [1.0, 0.4], recon=True)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


def test_reference_lists_keys(capsys):
    assert main(["reference"]) == 0
    text = capsys.readouterr().out
    assert "| `optimizer.kfac_approx` |" in text and "| `sampled_backprop.keep_prob` |" in text
    assert main(["reference", "--format", "yaml"]) == 0
    import yaml

    from kfac_tn.training.config import TrainConfig, config_from_dict

    assert config_from_dict(yaml.safe_load(capsys.readouterr().out)) == TrainConfig()


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_RUNS = [
    ("quickstart", ["quickstart.py", "--epochs", "1"], "epoch 1: test loss"),
    (
        "cifar_fake",
        [
            "train_cifar.py",
            "--fake-data",
            "--epochs",
            "1",
            "--limit-batches",
            "2",
            "--batch-size",
            "8",
            "--workers",
            "0",
        ],
        "epoch 1:",
    ),
    (
        "imagenet_fake",
        [
            "train_imagenet.py",
            "--fake-data",
            "--epochs",
            "1",
            "--limit-batches",
            "1",
            "--batch-size",
            "4",
            "--image-size",
            "64",
            "--workers",
            "0",
        ],
        "top-1",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in EXAMPLE_RUNS], ids=[c[0] for c in EXAMPLE_RUNS]
)
def test_examples_run(argv, expected):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert expected in out.stdout


@pytest.mark.slow
def test_ddp_under_torchrun(tmp_path):
    """Two gloo workers on CPU: rank 0 writes the run, metrics are global (summed over shards)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "-m",
        "kfac_tn",
        "train",
        "distributed=ddp",
        "data.train_subset=256",
        "data.test_subset=101",
        "epochs=1",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        "--run-name",
        "ddp",
        "--quiet",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 1
    assert round(rows[0]["test_acc"] * 101) == pytest.approx(
        rows[0]["test_acc"] * 101, abs=1e-9
    )  # over all 101
    assert (tmp_path / "ddp" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_dead_peer_gives_clear_error(tmp_path):
    """Rank 1 is killed mid-run: rank 0 must exit (status 1) with a clear error, not hang."""
    import os
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "kfac_tn",
            "train",
            "distributed=ddp",
            "dist_timeout_s=60",
            "epochs=50",
            "optimizer.name=sgd",
            "--out",
            str(tmp_path),
            "--run-name",
            "r",
            "--quiet",
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:
        _, err = procs[0].communicate(timeout=180)
    finally:
        procs[0].kill()
    assert procs[0].returncode == 1, err[-3000:]
    assert "distributed training aborted" in err


@pytest.mark.parametrize("status", [0, 2, 1], ids=["ok", "config_error", "distributed_failure"])
def test_console_main_exit_status(status, monkeypatch):
    """A failed distributed run leaves via os._exit (no interpreter shutdown), others sys.exit."""
    from kfac_tn.training import cli

    class HardExit(Exception):
        pass

    def fake_exit(code):
        raise HardExit(code)

    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)  # keep pytest's handlers
    if status == cli.EXIT_DISTRIBUTED_FAILURE:
        with pytest.raises(HardExit) as info:
            cli.console_main()
        assert info.value.args == (1,)
    else:
        with pytest.raises(SystemExit) as info:
            cli.console_main()
        assert info.value.code == status


# --- hardening (#10 §2) ---------------------------------------------------------------------------

ESCAPING_RUN_NAMES = [
    ("parent", ["--run-name", "../victim"], "'../victim'"),
    ("absolute", ["--run-name", "{victim}"], "is not a single directory name"),
    ("nested", ["--run-name", "a/b"], "'a/b'"),
    ("dot", ["--run-name", "."], "'.'"),
    ("dotdot", ["run_name=.."], "'..'"),
    ("empty_flag", ["--run-name", ""], "run_name: ''"),
    ("yaml_parent", ["{yaml}"], "'../victim'"),
]


@pytest.mark.parametrize(
    ("args", "shown"), [c[1:] for c in ESCAPING_RUN_NAMES], ids=[c[0] for c in ESCAPING_RUN_NAMES]
)
def test_run_name_cannot_leave_out_dir(args, shown, tmp_path, capsys):
    """`--run-name ../victim` (or in YAML) is refused before anything is written."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "config.yaml").write_text("precious\n")
    config = tmp_path / "c.yaml"
    config.write_text("run_name: ../victim\n")
    args = [a.format(victim=victim, yaml=config) for a in args]
    tiny = ["data.train_subset=32", "data.test_subset=32", "--epochs", "1"]  # if it ran anyway
    assert main(["train", *args, *tiny, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run_name: " in err and shown in err and "allowed: null or a name" in err
    assert (victim / "config.yaml").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "victim"]  # no out/ either


BAD_METRICS = [
    ("truncated", b'{"epoch": 1, "test_acc": 0.5}\n{"epoch": 2, "test_', "line 2: not valid JSON"),
    ("not_an_object", b'{"epoch": 1}\n[1, 2]\n', "line 2: '[1, 2]' is not a JSON object"),
    ("not_utf8", b'{"epoch": 1}\n\n{"epoch": "\xff"}\n', "line 3: not UTF-8 text"),
]


@pytest.mark.parametrize(
    ("content", "message"), [c[1:] for c in BAD_METRICS], ids=[c[0] for c in BAD_METRICS]
)
def test_compare_names_file_and_line_of_a_corrupt_metrics_file(content, message, tmp_path, capsys):
    run = fake_run(tmp_path / "r", [0.5], [1.0])
    (run / "metrics.jsonl").write_bytes(content)
    assert main(["compare", str(run), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert f"metrics: {str(run / 'metrics.jsonl')!r} {message}" in err
    assert not (tmp_path / "c.png").exists()


def test_help_documents_layer_override_forms(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "optimizer.layer_settings.conv1.damping=0.01" in text
    assert "'optimizer.layer_settings[layer1.0.conv1].damping=0.01'" in text
