"""Which layers of a model get a Kronecker block, and which ``layer_settings`` entry each takes.

Resolved once, when the optimizer is built: a layer gets a block if a block class is registered
for its type (:func:`kfac_tn.blocks.block_class_for`), it has a weight, it is not marked
``"skip"``, and its weight (and bias) are optimised, in one param group. A weight shared by
several layers is preconditioned by the first layer that uses it. Everything else is trained
with the plain momentum-SGD update.
"""

from __future__ import annotations

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
    seen: set[int] = set()
    for name, module in model.named_modules():
        cls = block_class_for(module)
        if cls is None or getattr(module, "weight", None) is None:
            continue
        override = layer_override(name, layer_settings)
        if override == "skip":
            logger.info("Layer %s: skipped by layer_settings, trained with SGD", name)
            continue
        block = cls(module, name)
        if not _optimised_once(block, group_of, seen):
            continue
        seen.add(id(block.weight))
        found.append((block, override))
    return found


def _optimised_once(block: KroneckerBlock, group_of: dict[int, int], seen: set[int]) -> bool:
    """Whether ``block``'s parameters are all optimised, in one group, and not shared."""
    params = block.params
    if not all(id(p) in group_of for p in params) or id(block.weight) in seen:
        if any(id(p) in group_of for p in params):
            logger.warning(
                "Layer %s: weight and bias are not both optimised (or the weight is shared)"
                "; its optimised parameters are trained with SGD",
                block.name,
            )
        return False
    if len({group_of[id(p)] for p in params}) > 1:
        raise ValueError(
            f"Invalid params: weight and bias of layer {block.name!r} are in different param "
            "groups (a Kronecker block needs one group)"
        )
    return True
