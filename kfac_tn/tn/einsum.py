"""Named-index einsum with cached contraction paths.

Equations are written with readable, space-separated index names, e.g.
``"n g c_in i0 i1, k0 o0 i0, k1 o1 i1 -> n g c_in k0 k1 o0 o1"``; :func:`to_letters`
translates them into single symbols (no 26- or 52-letter cap: opt_einsum remaps symbols
for each pairwise contraction). :func:`contract` looks up a cached
:class:`opt_einsum.contract.ContractExpression` per (equation, shapes, path strategy), so
the path search runs once per shape.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import opt_einsum
import torch


def to_letters(equation: str) -> str:
    """Translate a named-index equation into opt_einsum's single-symbol form.

    Args:
        equation: Operands separated by ``,``, output after ``->``; indices separated by spaces.

    Returns:
        The same equation with one symbol per distinct index name.
    """
    return _to_letters(equation)


@functools.lru_cache(maxsize=4096)
def _to_letters(equation: str) -> str:
    lhs, rhs = equation.split("->")
    names: dict[str, str] = {}

    def convert(term: str) -> str:
        out = []
        for name in term.split():
            if name not in names:
                names[name] = opt_einsum.get_symbol(len(names))
            out.append(names[name])
        return "".join(out)

    return ",".join(convert(t) for t in lhs.split(",")) + "->" + convert(rhs)


@functools.lru_cache(maxsize=4096)
def _expression(
    equation: str, shapes: tuple[tuple[int, ...], ...], optimize: str
) -> opt_einsum.contract.ContractExpression:
    return opt_einsum.contract_expression(to_letters(equation), *shapes, optimize=optimize)


def contract(equation: str, *operands: torch.Tensor, optimize: str = "dp") -> torch.Tensor:
    """Contract operands along a named-index equation with a cached path.

    Args:
        equation: Named-index equation (see module docstring).
        *operands: Tensors, one per operand in the equation.
        optimize: opt_einsum path strategy (``'dp'``, ``'optimal'``, ``'greedy'``, ...).

    Returns:
        The contraction result.
    """
    shapes = tuple(tuple(op.shape) for op in operands)
    return _expression(equation, shapes, optimize)(*operands, backend="torch")


def contraction_path(
    equation: str, shapes: Sequence[Sequence[int]], optimize: str = "dp"
) -> opt_einsum.contract.PathInfo:
    """Return opt_einsum's path info (FLOPs, largest intermediate) for inspection.

    Args:
        equation: Named-index equation (see module docstring).
        shapes: One shape per operand.
        optimize: opt_einsum path strategy.

    Returns:
        opt_einsum's ``PathInfo`` (``opt_cost``, ``largest_intermediate``, ``size_list``, ...).
    """
    _, info = opt_einsum.contract_path(
        to_letters(equation), *[tuple(s) for s in shapes], shapes=True, optimize=optimize
    )
    return info
