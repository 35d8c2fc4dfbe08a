r"""The momentum-SGD update of every parameter, proposed first and applied second.

Per parameter ``p`` of a group with learning rate :math:`\eta`, momentum :math:`\mu` and weight
decay :math:`\lambda`, from the (preconditioned, clipped) direction :math:`d_0` — or the plain
gradient where no block preconditions ``p``:

.. math::
    d = d_0 + \lambda p, \qquad b \leftarrow \mu b + d, \qquad
    \Delta = -\eta\,(d + \mu b \text{ if Nesterov else } b).

:func:`propose` computes every :math:`\Delta` and new buffer :math:`b` without touching the
parameters, so that the step can be judged (and rescaled) on its quadratic model before
:meth:`Update.apply` writes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Update", "propose"]


@dataclass
class Update:
    r"""A proposed step: parameter changes and momentum buffers, by parameter.

    Attributes:
        params: The parameters that move (those with a gradient), in param-group order.
        steps: :math:`\\Delta` by ``id(param)``, shaped like the parameter.
        buffers: The new momentum buffer by ``id(param)`` (momentum > 0 only).
        group_of: The index of each parameter's param group, by ``id(param)``.
    """

    params: list[Tensor] = field(default_factory=list)
    steps: dict[int, Tensor] = field(default_factory=dict)
    buffers: dict[int, Tensor] = field(default_factory=dict)
    group_of: dict[int, int] = field(default_factory=dict)

    def scale(self, alpha: float) -> None:
        """Multiply every step and momentum buffer by ``alpha``."""
        for key in self.steps:
            self.steps[key].mul_(alpha)
        for key in self.buffers:
            self.buffers[key].mul_(alpha)

    def by_group(self, param_groups: Sequence[Mapping[str, Any]]) -> Iterator[tuple[dict, Tensor]]:
        """``(group, param)`` pairs of the moving parameters."""
        for p in self.params:
            yield param_groups[self.group_of[id(p)]], p

    def apply(self, state: Mapping[Tensor, dict[str, Any]]) -> None:
        """Write the steps into the parameters and the buffers into ``state[p]``."""
        for p in self.params:
            p.add_(self.steps[id(p)])
            if id(p) in self.buffers:
                state[p]["momentum_buffer"] = self.buffers[id(p)]


def propose(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, dict[str, Any]],
    directions: Mapping[int, Tensor],
) -> Update:
    """Compute the update of every parameter with a gradient (module docstring).

    Args:
        param_groups: The optimizer's param groups.
        state: Its state (``momentum_buffer`` is read, not written).
        directions: Preconditioned directions by ``id(param)``; others use their gradient.

    Returns:
        The :class:`Update` (fresh tensors; nothing is modified).
    """
    update = Update()
    for index, group in enumerate(param_groups):
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = directions.get(id(p), p.grad)
            if weight_decay != 0:
                d = d.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = state[p].get("momentum_buffer") if p in state else None
                if buf is None or buf.dtype != p.dtype:  # new, or the model changed dtype
                    buf = d.detach().clone()
                else:
                    buf = buf.mul(momentum).add_(d)
                update.buffers[id(p)] = buf
                d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
            update.params.append(p)
            update.steps[id(p)] = d.mul(-group["lr"])
            update.group_of[id(p)] = index
    return update
