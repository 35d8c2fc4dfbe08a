"""Inspection: the registry of routines, and :func:`symbolic`, the network of any call.

Every routine is one :class:`Routine` record in :data:`REGISTRY`: how its arguments are
validated (``prepare``, from the routine's module), how its plain network is built
(``network``, :mod:`kfac_tn.tn.networks`), which leading arguments are tensors (``data``) and
how its network simplifies (``simplification``, :mod:`kfac_tn.tn.simplify`).  The routines
themselves never look a record up: they call their own ``prepare`` and network builder, and
this module sits on top of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfac_tn.tn import networks
from kfac_tn.tn._common import Shape, ShapeOnly
from kfac_tn.tn.convolution import prepare_conv, prepare_conv_transpose, prepare_kernel_unfold
from kfac_tn.tn.derivatives import prepare_input_vjp, prepare_weight_vjp
from kfac_tn.tn.diagonal import prepare_ggn_diagonal, prepare_hessian_diagonal
from kfac_tn.tn.expressions import Expression, Network, routine_expression
from kfac_tn.tn.kfac import prepare_factor, prepare_grad_factor
from kfac_tn.tn.per_sample import prepare_per_sample_weight_grad
from kfac_tn.tn.simplify import (
    EXPAND_PAIR,
    FOLD_COLUMNS,
    FOLD_RESULT,
    KEEP,
    PLACE_KERNEL,
    PLACE_PATCHES,
    REDUCE_PAIR,
    WINDOW,
    Simplification,
    simplified_expression,
)
from kfac_tn.tn.spec import ConvSpec
from kfac_tn.tn.unfolding import prepare_fold, prepare_unfold, prepare_unfold_transpose

__all__ = ["REGISTRY", "ROUTINES", "Routine", "symbolic"]

Prepare = Callable[..., tuple[ConvSpec, tuple[Shape, ...]]]
"""A routine's argument check: the routine's arguments -> ``(spec, data shapes)``."""


@dataclass(frozen=True)
class Routine:
    """One routine of the engine, as :func:`symbolic` sees it.

    Attributes:
        name: The routine's name (that of its function in :mod:`kfac_tn.tn`, except for the
            two halves ``hessian_diagonal_weight`` / ``_input`` of ``hessian_diagonal``).
        prepare: Validates the routine's arguments (tensors or :class:`ShapeOnly`) and returns
            ``(spec, data shapes)``.
        network: Builds the plain network from ``(spec, *data shapes)``.
        data: Names of the routine's leading tensor arguments (those that may be shapes).
        simplification: How the plain network loses its index patterns.
    """

    name: str
    prepare: Prepare
    network: Network
    data: tuple[str, ...]
    simplification: Simplification

    def expression(self, spec: ConvSpec, shapes: tuple[Shape, ...]) -> Expression:
        """Return the (cached) plain network for a spec and data shapes.

        Args:
            spec: The validated spec.
            shapes: Shapes of the data arguments, in argument order.

        Returns:
            The plain :class:`~kfac_tn.tn.expressions.Expression`.
        """
        return routine_expression(self.network, spec, shapes)

    def simplified(self, spec: ConvSpec, shapes: tuple[Shape, ...]) -> Expression:
        """Return the (cached) simplified network for a spec and data shapes.

        Args:
            spec: The validated spec.
            shapes: Shapes of the data arguments, in argument order.

        Returns:
            The :class:`~kfac_tn.tn.simplify.SimplifiedExpression`.
        """
        return simplified_expression(self.network, self.simplification, spec, shapes)


def _registry(*routines: Routine) -> dict[str, Routine]:
    return {r.name: r for r in routines}


_X, _XW, _HESSIAN = ("x",), ("x", "weight"), ("x", "weight", "h")

REGISTRY: dict[str, Routine] = _registry(
    Routine("conv", prepare_conv, networks.conv, _XW, WINDOW),
    Routine("conv_transpose", prepare_conv_transpose, networks.conv_transpose, _XW, FOLD_RESULT),
    Routine("unfold", prepare_unfold, networks.unfold, _X, WINDOW),
    Routine("fold", prepare_fold, networks.fold, ("cols",), FOLD_COLUMNS),
    Routine(
        "unfold_transpose", prepare_unfold_transpose, networks.unfold_transpose, _X, PLACE_PATCHES
    ),
    Routine(
        "kernel_unfold", prepare_kernel_unfold, networks.kernel_unfold, ("weight",), PLACE_KERNEL
    ),
    Routine(
        "conv_input_vjp", prepare_input_vjp, networks.conv_input_vjp, ("v", "weight"), FOLD_RESULT
    ),
    Routine("conv_weight_vjp", prepare_weight_vjp, networks.conv_weight_vjp, ("x", "v"), WINDOW),
    Routine(
        "per_sample_weight_grad",
        prepare_per_sample_weight_grad,
        networks.per_sample_weight_grad,
        ("x", "v"),
        WINDOW,
    ),
    Routine("conv_input_jvp", prepare_conv, networks.conv_input_jvp, ("x_dot", "weight"), WINDOW),
    Routine("conv_weight_jvp", prepare_conv, networks.conv_weight_jvp, ("x", "weight_dot"), WINDOW),
    Routine("kfac_expand_factor", prepare_factor, networks.kfac_expand_factor, _X, EXPAND_PAIR),
    Routine("kfac_reduce_factor", prepare_factor, networks.kfac_reduce_factor, _X, REDUCE_PAIR),
    Routine("grad_expand_factor", prepare_grad_factor, networks.grad_expand_factor, ("g",), KEEP),
    Routine("grad_reduce_factor", prepare_grad_factor, networks.grad_reduce_factor, ("g",), KEEP),
    Routine("ggn_diagonal", prepare_ggn_diagonal, networks.ggn_diagonal, ("x", "s"), WINDOW),
    Routine(
        "hessian_diagonal_weight",
        prepare_hessian_diagonal,
        networks.hessian_diagonal_weight,
        _HESSIAN,
        WINDOW,
    ),
    Routine(
        "hessian_diagonal_input",
        prepare_hessian_diagonal,
        networks.hessian_diagonal_input,
        _HESSIAN,
        FOLD_RESULT,
    ),
)
"""Every routine :func:`symbolic` knows, by name."""

ROUTINES: tuple[str, ...] = tuple(REGISTRY)
"""Names of the routines in :data:`REGISTRY`."""


def symbolic(routine: str, *args: Any, simplify: bool = False, **kwargs: Any) -> Expression:
    """Show the plain tensor network of a routine, from the routine's own arguments.

    The leading tensor arguments (``x``, ``weight``, ...; positional) may be given as tensors
    or as shapes; the hyperparameters are those of the routine.
    ``'hessian_diagonal_weight'`` and ``'hessian_diagonal_input'`` give the two contractions
    of :func:`~kfac_tn.tn.hessian_diagonal`.  Nothing is computed.  With ``simplify=True``
    the simplified network (no index patterns; see :mod:`kfac_tn.tn.simplify`) is returned.

    Example:
        >>> expr = symbolic("conv", (2, 3, 8, 8), (4, 3, 3, 3), padding=1)
        >>> expr.equation
        'n g c_in i0 i1, k0 o0 i0, k1 o1 i1, g c_out c_in k0 k1 -> n g c_out o0 o1'
        >>> equation, operands, shape = expr  # einconv-style unpacking

    Args:
        routine: One of :data:`ROUTINES`.
        *args: The routine's positional arguments (tensors or shapes first).
        simplify: Return the simplified network instead of the plain one.
        **kwargs: The routine's keyword arguments (``impl`` is ignored).

    Returns:
        The :class:`~kfac_tn.tn.expressions.Expression`.

    Raises:
        ValueError: If ``routine`` is unknown or the arguments are invalid.
    """
    if routine not in REGISTRY:
        raise ValueError(f"Invalid routine: {routine!r} (allowed: {', '.join(ROUTINES)})")
    record = REGISTRY[routine]
    n_data = len(record.data)
    args = tuple(ShapeOnly(getattr(a, "shape", a)) if j < n_data else a for j, a in enumerate(args))
    kwargs.pop("impl", None)
    spec, shapes = record.prepare(*args, **kwargs)
    return record.simplified(spec, shapes) if simplify else record.expression(spec, shapes)
