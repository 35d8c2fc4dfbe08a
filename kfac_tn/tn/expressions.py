"""Plain tensor networks as data, and their cached evaluation (``impl="tn"``).

Every routine of :mod:`kfac_tn.tn` has one plain tensor network: its data operands
(``x``, ``weight``, ``v``, ...) reshaped to expose channel groups, plus one index pattern
``pi<j>`` (Π of spatial dimension ``j``, ``[K_j, O_j, I_j]``) per occurrence.  An
:class:`Expression` records it with readable index names; :mod:`kfac_tn.tn.networks` builds
the network of each routine and :func:`routine_expression` caches it per shapes;
:func:`evaluate` contracts it with a cached opt_einsum path.

Index names: ``n`` batch, ``g`` group, ``c_in`` / ``c_out`` channels of a group, ``i<j>`` /
``o<j>`` / ``k<j>`` input / output / kernel position of dimension ``j``; a trailing ``_``
marks the second copy in the KFAC factors, ``m`` the loss-Hessian square-root columns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from kfac_tn.tn.einsum import contract
from kfac_tn.tn.patterns import cached_index_pattern
from kfac_tn.tn.spec import ConvSpec

__all__ = ["Expression", "Network", "evaluate", "routine_expression"]


@dataclass(frozen=True)
class Expression:
    """A routine's plain tensor network.

    Attributes:
        routine: Routine name.
        equation: Named-index einsum equation (space-separated names, ``,`` between operands).
        operands: ``(name, shape)`` per operand: data operands by argument name (reshaped to
            expose groups), index patterns as ``pi<j>`` with shape ``[K_j, O_j, I_j]``.
        shape: Shape of the contraction result (named legs of the equation's output).
        result_shape: Shape the routine returns after reshaping (merging legs).
        scale: Constant factor applied to the contraction (e.g. ``1/(N·ΠO)`` for KFC).
        post: Element-wise post-processing after the contraction, ``''`` if none
            (``'square_sum_m_n'`` for the GGN diagonal: square, then sum over ``m`` and ``n``).
        spec: The spec the expression was built for (its ``dims`` give the Π's).
        transforms: For simplified expressions (:mod:`kfac_tn.tn.simplify`), the strided
            views / writes that replaced the index patterns; empty for plain networks.
    """

    routine: str
    equation: str
    operands: tuple[tuple[str, tuple[int, ...]], ...]
    shape: tuple[int, ...]
    result_shape: tuple[int, ...]
    scale: float = 1.0
    post: str = ""
    transforms: tuple[str, ...] = ()
    spec: ConvSpec | None = field(default=None, repr=False, compare=False)

    def __iter__(self) -> Iterator:
        """Unpack as ``(equation, operands, result_shape)`` like einconv's ``einsum_expression``.

        Returns:
            An iterator over the three values.
        """
        return iter((self.equation, self.operands, self.result_shape))


Network = Callable[..., Expression]
"""Builder of a routine's plain network: ``(spec, *data_shapes) -> Expression``
(see :mod:`kfac_tn.tn.networks`)."""


@functools.lru_cache(maxsize=4096)
def routine_expression(
    network: Network, spec: ConvSpec, shapes: tuple[tuple[int, ...], ...]
) -> Expression:
    """Build (and cache) a routine's plain tensor network.

    Args:
        network: The routine's builder in :mod:`kfac_tn.tn.networks`.
        spec: The validated spec (geometry of the associated convolution).
        shapes: Shapes of the routine's data arguments, in the routine's argument order
            (e.g. ``(x.shape, weight.shape)`` for ``conv``).

    Returns:
        The :class:`Expression`, with ``spec`` attached.
    """
    return replace(network(spec, *shapes), spec=spec)


def evaluate(expr: Expression, spec: ConvSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Contract a plain tensor network with a cached path (``impl='tn'``).

    Args:
        expr: The expression (see :func:`routine_expression`).
        spec: Spec whose dims give the index patterns ``pi<j>``.
        tensors: Data operands by name; each is reshaped to the expression's operand shape.

    Returns:
        The routine's result, ``expr.result_shape``.
    """
    ref = next(iter(tensors.values()))
    ops = []
    for name, shape in expr.operands:
        if name.startswith("pi"):
            ops.append(cached_index_pattern(spec.dims[int(name[2:])], ref.dtype, ref.device))
        else:
            ops.append(tensors[name].reshape(shape))
    out = contract(expr.equation, *ops)
    if expr.post == "square_sum_m_n":
        out = out.square().sum(dim=(0, 1))
    if expr.scale != 1.0:
        out = out.mul_(expr.scale)  # the contraction result is a fresh tensor
    return out.reshape(expr.result_shape)
