"""Which layers of a model get a Kronecker block, and which ``layer_settings`` entry each takes.

Resolved once, when the optimizer is built: a layer gets a block if a block class is registered
for its type (:func:`kfac_tn.blocks.block_class_for`), it has a weight, it is not marked
``"skip"`` (for norm layers: ``norm_block="skip"``, from its ``layer_settings`` entry or its param
group), and its weight (and bias) are optimised, in one param group. A weight shared by
several layers is preconditioned by the first layer that uses it. Everything else is trained
with the plain momentum-SGD update.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kfac_tn.blocks import KroneckerBlock, block_class_for
from kfac_tn.optim.hyperparams import layer_override

__all__ = ["find_blocks"]

logger = logging.getLogger(__name__)

Override = Mapping[str, Any] | None


def find_blocks(
    model: nn.Module,
    param_groups: Sequence[Mapping[str, Any]],
    layer_settings: Mapping[str, Mapping[str, Any] | str],
) -> list[tuple[KroneckerBlock, Override]]:
    """Make the blocks of ``model`` with their resolved ``layer_settings`` overrides.

    Args:
        model: The model; layers are found in ``model.named_modules()``.
        param_groups: The optimizer's param groups.
        layer_settings: Validated ``{pattern: overrides | "skip"}``.

    Returns:
        ``(block, override)`` pairs in module order (``override`` is ``None`` without a match).

    Raises:
        ValueError: If a layer's weight and bias are in different param groups.
    """
    group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
    found: list[tuple[KroneckerBlock, Override]] = []
    owner: dict[int, str] = {}  # id(weight) -> the layer that preconditions it
    for name, module in model.named_modules():
        cls = block_class_for(module)
        if cls is None or getattr(module, "weight", None) is None:
            continue
        override = layer_override(name, layer_settings)
        if override == "skip":
            logger.info("Layer %s: skipped by layer_settings, trained with SGD", name)
            continue
        block = cls(module, name)
        if not _optimised_once(block, group_of, owner):
            continue
        norm_block = (override or {}).get("norm_block")
        if norm_block is None:
            norm_block = param_groups[group_of[id(block.weight)]]["norm_block"]
        if block.skipped(norm_block):
            continue  # norm layers are skipped by default: no log line per layer
        owner[id(block.weight)] = name
        found.append((block, override))
    _warn_unmatched(model, layer_settings)
    return found


def _warn_unmatched(model: nn.Module, layer_settings: Mapping[str, Any]) -> None:
    """Warn once per ``layer_settings`` pattern that matches no module name of ``model``."""
    names = [name for name, _ in model.named_modules()]
    for pattern in layer_settings:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            logger.warning("layer_settings pattern %r matches no module of the model", pattern)


def _optimised_once(block: KroneckerBlock, group_of: dict[int, int], owner: dict[int, str]) -> bool:
    """Whether ``block``'s parameters are all optimised, in one group, and not shared."""
    params = block.params
    shared_with = owner.get(id(block.weight))
    if shared_with is not None:
        logger.warning(
            "Layer %s: its weight is shared with layer %s and preconditioned with the curvature "
            "of %s only%s",
            block.name,
            shared_with,
            shared_with,
            "; its own bias is trained with SGD" if block.bias is not None else "",
        )
        return False
    if not all(id(p) in group_of for p in params):
        if any(id(p) in group_of for p in params):
            logger.warning(
                "Layer %s: weight and bias are not both optimised; its optimised parameters "
                "are trained with SGD",
                block.name,
            )
        return False
    if len({group_of[id(p)] for p in params}) > 1:
        raise ValueError(
            f"Invalid params: weight and bias of layer {block.name!r} are in different param "
            "groups (a Kronecker block needs one group)"
        )
    return True
