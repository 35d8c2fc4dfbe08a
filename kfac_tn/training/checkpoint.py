"""Checkpoints: atomic writes, safe loads, RNG state capture.

A checkpoint is a plain dict of tensors and builtin types, so it loads with
``torch.load(..., weights_only=True)`` (a file from elsewhere cannot run code). Writes go to a
temporary file in the same directory, are flushed and fsync'ed, then ``os.replace``'d over the old
file: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the checkpoint inside a run directory."""

FORMAT_VERSION = 1
"""Bumped whenever the checkpoint layout changes."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not belong to the configured run."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (temp file in the same dir, fsync, ``os.replace``).

    Args:
        state: plain dict of tensors / builtin types (``format_version`` is added).
        path: destination file.

    Raises:
        OSError / RuntimeError: whatever the write raised; the old file at ``path`` is untouched
            and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # persist the rename itself
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - not all file systems allow fsync on directories
        pass
    logger.debug("wrote checkpoint %s", path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Args:
        path: checkpoint file.
        map_location: device for the loaded tensors.

    Returns:
        The state dict.

    Raises:
        CheckpointError: if the file is missing, unreadable/corrupt, or not a kfac_tn checkpoint
            of a supported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbled zips and pickles
        raise CheckpointError(
            f"checkpoint: {str(path)!r} is corrupt or not a kfac_tn checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a kfac_tn checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint: {str(path)!r} has format_version {state['format_version']!r}; "
            f"this version reads {FORMAT_VERSION}"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the torch (CPU and CUDA), numpy and python RNGs as tensors / plain types.

    Returns:
        ``{"torch", "cuda", "numpy", "python"}`` states that ``torch.load(weights_only=True)``
        reads back; :func:`restore_rng_state` restores them.
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNGs captured by :func:`capture_rng_state`.

    Args:
        state: The captured states (CUDA states only for the devices present).
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:n]])
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate(
        (py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"])
    )
