"""Run ``kfac-tn train`` with its N-th checkpoint write frozen at a chosen point (for kill -9).

Used by tests/training/test_checkpoint.py as a subprocess: ``python _checkpoint_killer.py
POINT N MARKER -- <kfac-tn train arguments>``. POINT is ``write:F`` (the temporary file holds
the first fraction F of the checkpoint's bytes, flushed to disk) or ``replace`` (the temporary
is complete and fsync'ed, the rename has not happened). At that point the process writes
MARKER and sleeps until the test kills it with SIGKILL. The hook lives here, in the test's
child process; the package has none.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import torch

from kfac_tn.training import checkpoint
from kfac_tn.training.cli import main


def _freeze(marker: Path, what: str) -> None:
    marker.write_text(what)
    while True:  # until SIGKILL
        time.sleep(60)


def install(point: str, n: int, marker: Path) -> None:
    """Freeze the ``n``-th checkpoint write (1-based) at ``point``."""
    real_save, real_replace = torch.save, os.replace
    writes = 0

    def save(obj, f, *args, **kwargs):
        nonlocal writes
        writes += 1
        if writes != n or not point.startswith("write:"):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        cut = int(len(data) * float(point.split(":")[1]))
        f.write(data[:cut])
        f.flush()
        os.fsync(f.fileno())
        _freeze(marker, f"{cut}/{len(data)}")

    def replace(src, dst, *args, **kwargs):
        if writes == n and point == "replace" and Path(dst).name == checkpoint.CHECKPOINT_NAME:
            _freeze(marker, "replace")
        return real_replace(src, dst, *args, **kwargs)

    checkpoint.torch.save = save
    checkpoint.os.replace = replace


if __name__ == "__main__":
    point, n, marker, sep, *argv = sys.argv[1:]
    assert sep == "--"
    install(point, int(n), Path(marker))
    sys.exit(main(argv))
