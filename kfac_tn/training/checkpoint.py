"""Checkpoints: atomic writes, safe loads, RNG state capture.

A checkpoint is a plain dict of tensors and builtin types, so it loads with
``torch.load(..., weights_only=True)`` (a file from elsewhere cannot run code). Writes go to a
temporary file in the same directory, are flushed and fsync'ed, then ``os.replace``'d over the old
file: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
import re
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
    "check_run_checkpoint",
    "clean_stale_temporaries",
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


_TMP_SUFFIX = ".tmp"


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """Names :func:`save_checkpoint` gives its temporaries: ``.<name>.<mkstemp letters>.tmp``."""
    return re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+{re.escape(_TMP_SUFFIX)}")


def clean_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove temporaries that an interrupted :func:`save_checkpoint` of ``path`` left behind.

    Only regular files next to ``path`` named exactly like its temporaries
    (``.checkpoint.pt.<letters>.tmp`` for ``checkpoint.pt``) are removed; nothing else, and no
    link, is touched. One process writes a run's checkpoint at a time, so a temporary that
    exists when a write starts (or a run starts or resumes) is stale.

    Args:
        path: The checkpoint file (it need not exist).

    Returns:
        The removed files.
    """
    path = Path(path)
    pattern = _temporary_pattern(path)
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return []
    for p in candidates:
        if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    if removed:
        logger.warning(
            "removed %d stale checkpoint temporar%s left by an interrupted write: %s",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            ", ".join(p.name for p in removed),
        )
    return removed


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (temp file in the same dir, fsync, ``os.replace``).

    Args:
        state: plain dict of tensors / builtin types (``format_version`` is added).
        path: destination file.

    Stale temporaries of ``path`` from an interrupted earlier write are removed first
    (:func:`clean_stale_temporaries`).

    Raises:
        OSError / RuntimeError: whatever the write raised; the old file at ``path`` is untouched
            and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)  # left by a writer killed mid-write (kill -9, power loss)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
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
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False, i.e. running the file's code: not passed on
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"checkpoint: {str(path)!r} holds an object that is not a tensor or builtin "
                f"value ({found.group(1)}); a kfac_tn checkpoint holds only those, and loading "
                f"the object would run code from the file, so it was not loaded"
            ) from None
        detail = re.search(r"(Unsupported [^\n]*|invalid load key[^\n]*)", str(exc))
        raise CheckpointError(
            f"checkpoint: {str(path)!r} is corrupt or not a kfac_tn checkpoint (unpickling "
            f"failed{': ' + detail.group(1).strip() if detail else ''})"
        ) from None
    except Exception as exc:  # torch raises many types for truncated/garbled zips and pickles
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"checkpoint: {str(path)!r} is corrupt or not a kfac_tn checkpoint "
            f"({type(exc).__name__}: {first})"
        ) from None
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


# ---------------------------------------------------------------------------------------------
# Structure of a training-run checkpoint (kfac_tn.training.train)
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tensor(dtype: torch.dtype, ndim: int | None = 1) -> Any:
    def check(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.dtype == dtype and (ndim is None or v.ndim == ndim)

    return check


def _dict_of(check: Any) -> Any:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


_RUN_ENTRIES: dict[str, tuple[Any, str]] = {
    "epoch": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "config": (lambda v: isinstance(v, dict), "a mapping (the run's config)"),
    "model": (
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())
        ),
        "a mapping of parameter/buffer names to tensors",
    ),
    "optimizer": (lambda v: isinstance(v, dict), "an optimizer state dict"),
    "scheduler": (
        lambda v: (
            isinstance(v, dict)
            and _is_int(v.get("last_epoch"))
            and isinstance(v.get("base_lrs"), list)
            and all(_is_number(x) for x in v["base_lrs"])
        ),
        "a scheduler state dict (int last_epoch, list of base_lrs)",
    ),
    "scaler": (lambda v: v is None or isinstance(v, dict), "null or a GradScaler state dict"),
    "rng": (lambda v: isinstance(v, dict), "the RNG states"),
    "rng.torch": (_tensor(torch.uint8), "a uint8 tensor (torch.get_rng_state())"),
    "rng.cuda": (
        lambda v: isinstance(v, list) and all(_tensor(torch.uint8)(t) for t in v),
        "a list of uint8 tensors",
    ),
    "rng.numpy": (lambda v: isinstance(v, dict), "numpy's MT19937 state"),
    "rng.numpy.keys": (
        lambda v: _tensor(torch.int64)(v) and v.numel() == 624,
        "an int64 tensor of 624 words",
    ),
    "rng.numpy.pos": (lambda v: _is_int(v) and 0 <= v <= 624, "an int in [0, 624]"),
    "rng.numpy.has_gauss": (lambda v: v in (0, 1) and _is_int(v), "0 or 1"),
    "rng.numpy.cached_gaussian": (_is_number, "a float"),
    "rng.python": (lambda v: isinstance(v, dict), "python's random state"),
    "rng.python.version": (_is_int, "an int"),
    "rng.python.internal": (
        lambda v: _tensor(torch.int64)(v) and v.numel() == 625,
        "an int64 tensor of 625 words",
    ),
    "rng.python.gauss_next": (lambda v: v is None or _is_number(v), "null or a float"),
    "elapsed_s": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "metrics": (
        lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
        "a list of metrics rows (mappings)",
    ),
}
"""Every entry of a training checkpoint (dotted: nested), with its check and description."""


def check_run_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Check that a loaded checkpoint has every entry a training run restores, well-typed.

    Run after :func:`load_checkpoint` and before anything is restored, so that a checkpoint
    that loads but is incomplete or malformed (no ``rng``, ``epoch: "two"``, a truncated RNG
    state) is refused up front instead of failing mid-restore or mid-training. Whether the
    tensors fit the configured model and optimizer is checked by the training loop.

    Args:
        state: The loaded checkpoint.
        path: Its file (for the message).

    Raises:
        CheckpointError: ``checkpoint: 'path' entry 'rng.numpy.pos': <value> is not ...``,
            naming the first missing or malformed entry.
    """
    for entry, (check, allowed) in _RUN_ENTRIES.items():
        node: Any = state
        for part in entry.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(
                    f"checkpoint: {str(path)!r} entry {entry!r} is missing; allowed: {allowed} "
                    f"(the file is not a complete kfac_tn training checkpoint)"
                )
            node = node[part]
        if not check(node):
            shown = _short(node)
            raise CheckpointError(
                f"checkpoint: {str(path)!r} entry {entry!r}: {shown} is not {allowed}"
            )
    if len(state["metrics"]) != state["epoch"]:
        raise CheckpointError(
            f"checkpoint: {str(path)!r} entry 'metrics': {len(state['metrics'])} rows for epoch "
            f"{state['epoch']}; allowed: one row per epoch done"
        )


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
