from __future__ import annotations

import os
import random

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
