"""Checking a state dict before :meth:`kfac_tn.KFAC.load_state_dict` changes anything.

A state dict from another optimizer, from a model of another shape, or from a tampered file is
refused with a ``ValueError`` that names the entry (param group and key, or layer and tensor);
the optimizer is left exactly as it was. Checked: the structure, the param groups (the keys of a
KFAC group present and valid under :data:`kfac_tn.optim.hyperparams.RULES`, the same number of
parameters), the settings of the whole optimizer, and for every parameter the shapes of its
momentum buffer and, for a layer weight, of its factors, inverse and EKFAC scalings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kfac_tn import linalg
from kfac_tn.blocks import KroneckerBlock
from kfac_tn.enums import Inversion
from kfac_tn.optim import hyperparams

__all__ = ["CURVATURE_KEYS", "REQUIRED_GROUP_KEYS", "check_state_dict"]

CURVATURE_KEYS = (
    "A",
    "G",
    "factors_valid",
    "skipped_factor_updates",
    "inverse",
    "inverse_kind",  # a str: torch's load_state_dict would turn it into a generator
    "scalings",
    "scalings_valid",
)
"""Keys of a layer's state that belong to the curvature (kept in their dtype on load)."""

REQUIRED_GROUP_KEYS = (
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "damping",
    "factor_decay",
    "factor_update_period",
    "inverse_update_period",
    "kfac_approx",
    "inversion",
    "kl_clip",
)
"""Keys every KFAC param group has had since the first release (others default on load)."""


def check_state_dict(
    state_dict: Any,
    param_groups: Sequence[Mapping[str, Any]],
    blocks: Sequence[KroneckerBlock],
    defaults: Mapping[str, Any],
    global_keys: Sequence[str],
) -> None:
    """Raise ``ValueError`` naming the first problem of ``state_dict``; change nothing.

    Args:
        state_dict: The candidate (as returned by ``KFAC.state_dict()``).
        param_groups: The optimizer's current param groups.
        blocks: Its blocks.
        defaults: Its defaults (the whole-optimizer settings are compared with them).
        global_keys: The names of those settings.

    Raises:
        ValueError: ``Invalid state_dict: <where>: <what>``.
    """
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        _fail("", "not an optimizer state dict (needs 'state' and 'param_groups')")
    saved = state_dict["param_groups"]
    if not isinstance(saved, Sequence) or len(saved) != len(param_groups):
        _fail("param_groups", f"{_len(saved)} groups, the optimizer has {len(param_groups)}")
    for i, (group, mine) in enumerate(zip(saved, param_groups)):
        _check_group(i, group, len(mine["params"]), defaults, global_keys)
    if not isinstance(state_dict["state"], Mapping):
        _fail("state", "not a mapping")
    params = {i: p for i, p in enumerate(p for g in param_groups for p in g["params"])}
    ids = [i for g in saved for i in g["params"]]
    index_of = dict(zip(ids, params))
    names = {id(b.weight): b for b in blocks}
    for key, entry in state_dict["state"].items():
        if key not in index_of:
            continue  # not a parameter's state (e.g. the optimizer's own counters)
        param = params[index_of[key]]
        _check_param_state(key, entry, param, names.get(id(param)))


def _check_group(
    i: int,
    group: Any,
    n_params: int,
    defaults: Mapping[str, Any],
    global_keys: Sequence[str],
) -> None:
    where = f"param_groups[{i}]"
    if not isinstance(group, Mapping) or "params" not in group:
        _fail(where, "not a param group (needs 'params')")
    missing = [k for k in REQUIRED_GROUP_KEYS if k not in group]
    if missing:
        _fail(where, f"lacks {', '.join(map(repr, missing))}: not a KFAC state dict")
    if len(group["params"]) != n_params:
        _fail(where, f"{len(group['params'])} parameters, the optimizer's group has {n_params}")
    found = hyperparams.problems({k: v for k, v in group.items() if k != "params"})
    if found:
        p = found[0]
        _fail(f"{where}.{p.key}", f"{p.value!r} is {p.reason}; allowed: {p.allowed}")
    for key in global_keys:
        if key in group and hyperparams.normalized({key: group[key]})[key] != defaults[key]:
            _fail(
                f"{where}.{key}",
                f"{group[key]!r}, but this optimizer has {defaults[key]!r} "
                "(a setting of the whole optimizer)",
            )


def _check_param_state(key: Any, entry: Any, param: Tensor, block: KroneckerBlock | None) -> None:
    where = f"state[{key!r}]" + (f" (layer {block.name!r})" if block is not None else "")
    if not isinstance(entry, Mapping):
        _fail(where, "not a mapping")
    buf = entry.get("momentum_buffer")
    if buf is not None and (not isinstance(buf, Tensor) or buf.shape != param.shape):
        _fail(f"{where}.momentum_buffer", f"shape {_shape(buf)}, the parameter is {_shape(param)}")
    if block is None or "A" not in entry:
        return
    d_a, d_g = block.dims
    expected = {"A": (block.groups, d_a, d_a), "G": (block.groups, d_g, d_g)}
    if "scalings" in entry:
        expected["scalings"] = (block.groups, d_g, d_a)
    for name, shape in expected.items():
        if _shape(entry.get(name)) != shape:
            _fail(f"{where}.{name}", f"shape {_shape(entry.get(name))}, expected {shape}")
    if "inverse" in entry:
        _check_inverse(where, entry, block.groups, d_a, d_g)
    for name in ("A", "G", "inverse", "scalings"):
        tensors = entry.get(name, [])
        for t in tensors if isinstance(tensors, list) else [tensors]:
            if not bool(torch.isfinite(t).all()):
                _fail(f"{where}.{name}", "has non-finite values")


def _check_inverse(where: str, entry: Mapping[str, Any], groups: int, d_a: int, d_g: int) -> None:
    kind = entry.get("inverse_kind")
    if kind not in [k.value for k in Inversion]:
        _fail(f"{where}.inverse_kind", f"{kind!r}; allowed: {Inversion.allowed()}")
    tensors = entry["inverse"]
    probe = linalg.empty_inverse(kind, groups, d_a, d_g, dtype=None, device="meta")
    shapes = [_shape(t) for t in tensors] if isinstance(tensors, Sequence) else None
    if shapes != [tuple(t.shape) for t in probe]:
        _fail(f"{where}.inverse", f"shapes {shapes}, expected {[tuple(t.shape) for t in probe]}")


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _len(value: Any) -> int | str:
    return len(value) if isinstance(value, Sequence) else type(value).__name__


def _fail(where: str, what: str) -> None:
    raise ValueError(f"Invalid state_dict: {where + ': ' if where else ''}{what}")
