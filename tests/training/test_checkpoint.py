from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_tn.training import checkpoint as ckpt
from kfac_tn.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    state = {
        "epoch": 3,
        "w": torch.randn(4, 5, dtype=torch.float64),
        "rows": [{"a": 1.5, "b": None}],
        "rng": capture_rng_state(),
    }
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 3 and loaded["rows"] == [{"a": 1.5, "b": None}]
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["format_version"] == ckpt.FORMAT_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


def test_failed_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_interrupted_replace_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


CORRUPT = [
    ("truncated", lambda good: good[: len(good) // 2]),
    ("garbage", lambda good: os.urandom(256)),
    ("empty", lambda good: b""),
]


@pytest.mark.parametrize("mangle", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_checkpoint(tmp_path, mangle):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1, "w": torch.randn(100)}, path)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(CheckpointError, match="is corrupt or not a kfac_tn checkpoint"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (Payload(), r"holds an object that is not a tensor or builtin value \(posix.system\)"),
        ([1, 2, 3], "is not a kfac_tn checkpoint"),
        ({"epoch": 1}, "is not a kfac_tn checkpoint"),
        ({"format_version": 99}, "has format_version 99"),
    ],
    ids=["code_execution_refused", "not_a_dict", "no_version", "future_version"],
)
def test_foreign_files_rejected(tmp_path, obj, message):
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and str(path) in str(info.value)
    assert info.value.__cause__ is None  # torch's advice is not chained into the traceback


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_restored_through_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    (
        torch.randn(3),
        np.random.randn(2),
        random.random(),
        np.random.standard_normal(),
    )  # advance, cache gauss
    random.gauss(0, 1)
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "c.pt")
    expected = (
        torch.randn(5),
        np.random.randn(5),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    )
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (
        torch.randn(5),
        np.random.randn(5),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
    )
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


# --- stale temporaries and kill -9 during a write (#10 §3) ------------------------------------

TEMPORARY_NAMES = [  # (id, file name, removed?)
    ("ours", ".checkpoint.pt.k2x_9abc.tmp", True),
    ("ours_other", ".checkpoint.pt.zz.tmp", True),
    ("no_random_part", ".checkpoint.pt.tmp", False),
    ("not_hidden", "checkpoint.pt.k2x_9abc.tmp", False),
    ("other_file", ".metrics.jsonl.k2x_9abc.tmp", False),
    ("other_suffix", ".checkpoint.pt.k2x_9abc.bak", False),
    ("space", ".checkpoint.pt.a b.tmp", False),
    ("nested_dot", ".checkpoint.pt.a.b.tmp", False),
]


def test_stale_temporaries_are_removed_before_a_write(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep\n")
    run = tmp_path / "run"
    run.mkdir()
    for _, name, _ in TEMPORARY_NAMES:
        (run / name).write_bytes(b"PK\x03\x04 half a zip")
    (run / ".checkpoint.pt.link.tmp").symlink_to(outside)  # a link is never followed or removed
    (run / ".checkpoint.pt.dir.tmp").mkdir()
    save_checkpoint({"epoch": 1}, run / "checkpoint.pt")
    left = {p.name for p in run.iterdir()}
    for case, name, removed in TEMPORARY_NAMES:
        assert (name not in left) == removed, case
    assert {".checkpoint.pt.link.tmp", ".checkpoint.pt.dir.tmp", "checkpoint.pt"} <= left
    assert outside.read_text() == "keep\n"
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_clean_stale_temporaries_reports_what_it_removed(tmp_path):
    (tmp_path / ".checkpoint.pt.abc.tmp").write_bytes(b"")
    (tmp_path / ".c.pt.abc.tmp").write_bytes(b"")  # another checkpoint's: not this one's
    removed = ckpt.clean_stale_temporaries(tmp_path / "checkpoint.pt")
    assert removed == [tmp_path / ".checkpoint.pt.abc.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == [".c.pt.abc.tmp"]


KILLER = Path(__file__).with_name("_checkpoint_killer.py")
ROOT = Path(__file__).resolve().parents[2]


def _child_env() -> dict[str, str]:
    """The child imports this checkout's kfac_tn (not another installed copy), one thread."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


KILL_RUN = [  # tiny: 1 step per epoch, a checkpoint after each
    "data.train_subset=64",
    "data.test_subset=32",
    "batch_size=32",
    "test_batch_size=32",
    "data.limit_batches=1",
    "checkpoint_period=1",
    "optimizer.inverse_update_period=1",
    "epochs=3",
]


def _kill_during_write(tmp_path: Path, point: str, n: int) -> Path:
    """Start a run, SIGKILL it while its ``n``-th checkpoint write is frozen at ``point``."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "frozen"
    argv = [*KILL_RUN, "--out", str(tmp_path), "--run-name", "k", "--quiet", "--threads", "1"]
    env = _child_env()
    cmd = [sys.executable, str(KILLER), point, str(n), str(marker), "--", "train", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return tmp_path / "k"


def _check_killed_run_recovers(run: Path, done: int) -> None:
    """The last complete checkpoint loads; --resume finishes the run and leaves no temporary."""
    from kfac_tn.training.cli import main
    from kfac_tn.training.train import read_metrics

    state = load_checkpoint(run / "checkpoint.pt")
    ckpt.check_run_checkpoint(state, run / "checkpoint.pt")
    assert state["epoch"] == done
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.usefixtures("one_thread")
def test_kill_9_mid_checkpoint_write_then_resume(tmp_path):
    """kill -9 with the 2nd checkpoint half written: the 1st loads, resume completes the run."""
    run = _kill_during_write(tmp_path, "write:0.5", 2)
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # the write was cut off
    _check_killed_run_recovers(run, done=1)


KILL_POINTS = [  # (id, point, n-th write); seeded fractions of the checkpoint's bytes
    ("empty_temp", "write:0.0", 2),
    *[
        (f"write_{f:.3f}", f"write:{f}", n)
        for f, n in zip(sorted(random.Random(10).uniform(0.01, 0.99) for _ in range(3)), (2, 3, 2))
    ],
    ("complete_before_rename", "replace", 3),
]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("point", "n"), [c[1:] for c in KILL_POINTS], ids=[c[0] for c in KILL_POINTS]
)
def test_kill_9_at_seeded_points_then_resume(tmp_path, point, n):
    run = _kill_during_write(tmp_path, point, n)
    _check_killed_run_recovers(run, done=n - 1)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_after_random_delay_then_resume(tmp_path, seed):
    """No hook at all: SIGKILL at a seeded random moment of a run that checkpoints every step."""
    import signal
    import subprocess
    import sys
    import time

    from kfac_tn.training.cli import main
    from kfac_tn.training.train import read_metrics

    args = [a for a in KILL_RUN if not a.startswith("epochs=")] + ["epochs=40"]
    argv = [*args, "--out", str(tmp_path), "--run-name", "k", "--quiet", "--threads", "1"]
    env = _child_env()
    cmd = [sys.executable, "-m", "kfac_tn", "train", *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run = tmp_path / "k"
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    state = load_checkpoint(run / "checkpoint.pt")
    ckpt.check_run_checkpoint(state, run / "checkpoint.pt")
    assert 1 <= state["epoch"] <= 40
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, 41))
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
