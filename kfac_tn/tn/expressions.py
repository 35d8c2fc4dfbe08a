"""Symbolic (plain) tensor networks of every routine, and their cached evaluation.

Every routine of :mod:`kfac_tn.tn` has one plain tensor network: its data operands
(``x``, ``weight``, ``v``, ...) reshaped to expose channel groups, plus one index pattern
``pi<j>`` (Π of spatial dimension ``j``, ``[K_j, O_j, I_j]``) per occurrence.  An
:class:`Expression` records it with readable index names; :func:`evaluate` contracts it with
a cached opt_einsum path (this is ``impl="tn"``).  :func:`symbolic` builds the expression of a
routine from the same arguments the routine takes, where tensors may be replaced by shapes.

Index names: ``n`` batch, ``g`` group, ``c_in`` / ``c_out`` channels of a group, ``i<j>`` /
``o<j>`` / ``k<j>`` input / output / kernel position of dimension ``j``; a trailing ``_``
marks the second copy in the KFAC factors, ``m`` the loss-Hessian square-root columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from kfac_tn.tn._common import join, names, prod
from kfac_tn.tn.einsum import contract
from kfac_tn.tn.patterns import cached_index_pattern
from kfac_tn.tn.spec import ConvSpec

__all__ = ["ROUTINES", "Expression", "evaluate", "routine_expression", "symbolic"]


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

    def __iter__(self):
        """Unpack as ``(equation, operands, shape)`` like einconv's ``einsum_expression``."""
        return iter((self.equation, self.operands, self.result_shape))


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


def _pis(spec: ConvSpec, suffix_k: str = "", suffix_o: str = "", suffix_i: str = ""):
    nd = spec.ndim
    k, o, i = names("k", nd, suffix_k), names("o", nd, suffix_o), names("i", nd, suffix_i)
    terms = [f"{k[j]} {o[j]} {i[j]}" for j in range(nd)]
    ops = [(f"pi{j}", (d.kernel, d.out_size, d.in_size)) for j, d in enumerate(spec.dims)]
    return terms, ops


@functools.lru_cache(maxsize=4096)
def routine_expression(
    routine: str, spec: ConvSpec, shapes: tuple[tuple[int, ...], ...]
) -> Expression:
    """Build (and cache) the plain tensor network of ``routine``.

    Args:
        routine: One of the names in :data:`ROUTINES`.
        spec: The validated spec (geometry of the associated convolution).
        shapes: Shapes of the routine's data arguments, in the routine's argument order
            (e.g. ``(x.shape, weight.shape)`` for ``conv``).

    Returns:
        The :class:`Expression`.

    Raises:
        ValueError: If ``routine`` is unknown.
    """
    if routine not in _BUILDERS:
        raise ValueError(f"Invalid routine: {routine!r} (allowed: {', '.join(ROUTINES)})")
    return replace(_BUILDERS[routine](routine, spec, *shapes), spec=spec)


def _conv(routine, spec, x_shape, w_shape):
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    c_out = w_shape[0]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = (
        f"{join('n g c_in', i)}, {', '.join(terms)}, {join('g c_out c_in', k)}"
        f" -> {join('n g c_out', o)}"
    )
    ops = (
        ("x", (n, g, c_in // g, *spec.in_spatial)),
        *pis,
        ("weight", (g, c_out // g, c_in // g, *spec.kernel_size)),
    )
    shape = (n, g, c_out // g, *spec.out_spatial)
    return Expression(routine, eq, ops, shape, (n, c_out, *spec.out_spatial))


def _conv_jvp_weight(routine, spec, x_shape, w_shape):
    e = _conv(routine, spec, x_shape, w_shape)
    return Expression(
        routine,
        e.equation,
        (e.operands[0], *e.operands[1:-1], ("weight_dot", e.operands[-1][1])),
        e.shape,
        e.result_shape,
    )


def _conv_jvp_input(routine, spec, x_shape, w_shape):
    e = _conv(routine, spec, x_shape, w_shape)
    return Expression(
        routine, e.equation, (("x_dot", e.operands[0][1]), *e.operands[1:]), e.shape, e.result_shape
    )


def _conv_transpose(routine, spec, x_shape, w_shape):
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    c_out = w_shape[1] * g
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = (
        f"{join('n g c_in', o)}, {', '.join(terms)}, {join('g c_in c_out', k)}"
        f" -> {join('n g c_out', i)}"
    )
    ops = (
        ("x", (n, g, c_in // g, *spec.out_spatial)),
        *pis,
        ("weight", (g, c_in // g, c_out // g, *spec.kernel_size)),
    )
    shape = (n, g, c_out // g, *spec.in_spatial)
    return Expression(routine, eq, ops, shape, (n, c_out, *spec.in_spatial))


def _unfold(routine, spec, x_shape, *, transpose=False):
    """Unfold ``[N, C, *I] -> [N, C, *K, *O]``; ``transpose``: ``[N, C, *O] -> [N, C, *K, *I]``."""
    nd = spec.ndim
    n, c = x_shape[:2]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    src, dst = (o, i) if transpose else (i, o)
    src_size, dst_size = (
        (spec.out_spatial, spec.in_spatial) if transpose else (spec.in_spatial, spec.out_spatial)
    )
    terms, pis = _pis(spec)
    eq = f"{join('n c', src)}, {', '.join(terms)} -> {join('n c', k, dst)}"
    ops = (("x", (n, c, *src_size)), *pis)
    shape = (n, c, *spec.kernel_size, *dst_size)
    return Expression(routine, eq, ops, shape, (n, c * prod(spec.kernel_size), prod(dst_size)))


def _fold(routine, spec, cols_shape):
    nd = spec.ndim
    n = cols_shape[0]
    c = cols_shape[1] // prod(spec.kernel_size)
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = f"{join('n c', k, o)}, {', '.join(terms)} -> {join('n c', i)}"
    ops = (("cols", (n, c, *spec.kernel_size, *spec.out_spatial)), *pis)
    shape = (n, c, *spec.in_spatial)
    return Expression(routine, eq, ops, shape, shape)


def _kernel_unfold(routine, spec, w_shape):
    nd, g = spec.ndim, spec.groups
    c_out, c_in = w_shape[0] // g, w_shape[1]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = f"{join('g c_out c_in', k)}, {', '.join(terms)} -> {join('g c_out', o, 'c_in', i)}"
    ops = (("weight", (g, c_out, c_in, *spec.kernel_size)), *pis)
    shape = (g, c_out, *spec.out_spatial, c_in, *spec.in_spatial)
    result = (g, c_out * prod(spec.out_spatial), c_in * prod(spec.in_spatial))
    return Expression(routine, eq, ops, shape, result)


def _input_vjp(routine, spec, v_shape, w_shape, data="weight"):
    nd, g = spec.ndim, spec.groups
    n, c_out = v_shape[:2]
    c_in = w_shape[1]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = (
        f"{join('n g c_out', o)}, {', '.join(terms)}, {join('g c_out c_in', k)}"
        f" -> {join('n g c_in', i)}"
    )
    ops = (
        ("v", (n, g, c_out // g, *spec.out_spatial)),
        *pis,
        (data, (g, c_out // g, c_in, *spec.kernel_size)),
    )
    shape = (n, g, c_in, *spec.in_spatial)
    return Expression(routine, eq, ops, shape, (n, g * c_in, *spec.in_spatial))


def _weight_vjp(routine, spec, x_shape, v_shape, data="x"):
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    c_out = v_shape[1]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = (
        f"{join('n g c_in', i)}, {', '.join(terms)}, {join('n g c_out', o)}"
        f" -> {join('g c_out c_in', k)}"
    )
    ops = (
        (data, (n, g, c_in // g, *spec.in_spatial)),
        *pis,
        ("v", (n, g, c_out // g, *spec.out_spatial)),
    )
    shape = (g, c_out // g, c_in // g, *spec.kernel_size)
    return Expression(routine, eq, ops, shape, (c_out, c_in // g, *spec.kernel_size))


def _ggn_diagonal(routine, spec, x_shape, s_shape):
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    m, c_out = s_shape[0], s_shape[2]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _pis(spec)
    eq = (
        f"{join('n g c_in', i)}, {', '.join(terms)}, {join('m n g c_out', o)}"
        f" -> {join('m n g c_out c_in', k)}"
    )
    ops = (
        ("x", (n, g, c_in // g, *spec.in_spatial)),
        *pis,
        ("s", (m, n, g, c_out // g, *spec.out_spatial)),
    )
    shape = (m, n, g, c_out // g, c_in // g, *spec.kernel_size)
    result = (c_out, c_in // g, *spec.kernel_size)
    return Expression(routine, eq, ops, shape, result, post="square_sum_m_n")


def _hessian_weight(routine, spec, x_shape, w_shape, h_shape):
    e = _weight_vjp(routine, spec, x_shape, h_shape, data="x_squared")
    ops = (*e.operands[:-1], ("h", e.operands[-1][1]))
    return Expression(routine, e.equation, ops, e.shape, e.result_shape)


def _hessian_input(routine, spec, x_shape, w_shape, h_shape):
    e = _input_vjp(routine, spec, h_shape, w_shape, data="weight_squared")
    ops = (("h", e.operands[0][1]), *e.operands[1:])
    return Expression(routine, e.equation, ops, e.shape, e.result_shape)


def _factor_terms(spec, x_shape, suffix, share):
    n, c = x_shape[:2]
    g, nd = spec.groups, spec.ndim
    i = names("i", nd, "" if share == "i" else suffix)
    o = names("o", nd, "" if share == "o" else suffix)
    k = names("k", nd, suffix)
    x_legs = o if spec.transpose else i
    x_sp = spec.out_spatial if spec.transpose else spec.in_spatial
    terms = [join("n g", "c" + suffix, x_legs)] + [f"{k[j]} {o[j]} {i[j]}" for j in range(nd)]
    ops = [("x", (n, g, c // g, *x_sp))] + [
        (f"pi{j}", (d.kernel, d.out_size, d.in_size)) for j, d in enumerate(spec.dims)
    ]
    return terms, ops, join("c" + suffix, k)


def _kfac(routine, spec, x_shape):
    share = ("i" if spec.transpose else "o") if routine == "kfac_expand_factor" else ""
    t1, ops1, out1 = _factor_terms(spec, x_shape, "", share)
    t2, ops2, out2 = _factor_terms(spec, x_shape, "_", share)
    eq = f"{', '.join(t1 + t2)} -> {join('g', out1, out2)}"
    n, c = x_shape[:2]
    g = spec.groups
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    scale = 1.0 / (n * positions) if share else 1.0 / (n * positions**2)
    shape = (g, c // g, *spec.kernel_size, c // g, *spec.kernel_size)
    d = c // g * prod(spec.kernel_size)
    return Expression(routine, eq, tuple(ops1 + ops2), shape, (g, d, d), scale=scale)


def _grad_factor(routine, spec, g_shape):
    n, c = g_shape[:2]
    nd, g = len(g_shape) - 2, spec.groups
    o = names("o", nd)
    o_ = o if routine == "grad_expand_factor" else names("o", nd, "_")
    eq = f"{join('n g c', o)}, {join('n g c_', o_)} -> g c c_"
    op = ("g", (n, g, c // g, *g_shape[2:]))
    return Expression(routine, eq, (op, op), (g, c // g, c // g), (g, c // g, c // g))


_BUILDERS = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "unfold": _unfold,
    "fold": _fold,
    "unfold_transpose": functools.partial(_unfold, transpose=True),
    "kernel_unfold": _kernel_unfold,
    "conv_input_vjp": _input_vjp,
    "conv_weight_vjp": _weight_vjp,
    "conv_input_jvp": _conv_jvp_input,
    "conv_weight_jvp": _conv_jvp_weight,
    "kfac_expand_factor": _kfac,
    "kfac_reduce_factor": _kfac,
    "grad_expand_factor": _grad_factor,
    "grad_reduce_factor": _grad_factor,
    "ggn_diagonal": _ggn_diagonal,
    "hessian_diagonal_weight": _hessian_weight,
    "hessian_diagonal_input": _hessian_input,
}
ROUTINES: tuple[str, ...] = tuple(_BUILDERS)


# number of leading positional tensor arguments of each routine (they may be given as shapes)
DATA_ARGS = {
    "conv": 2,
    "conv_transpose": 2,
    "unfold": 1,
    "fold": 1,
    "unfold_transpose": 1,
    "kernel_unfold": 1,
    "conv_input_vjp": 2,
    "conv_weight_vjp": 2,
    "conv_input_jvp": 2,
    "conv_weight_jvp": 2,
    "kfac_expand_factor": 1,
    "kfac_reduce_factor": 1,
    "grad_expand_factor": 1,
    "grad_reduce_factor": 1,
    "ggn_diagonal": 2,
    "hessian_diagonal_weight": 3,
    "hessian_diagonal_input": 3,
}


def symbolic(routine: str, *args, simplify: bool = False, **kwargs) -> Expression:
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
        The :class:`Expression`.

    Raises:
        ValueError: If ``routine`` is unknown or the arguments are invalid.
    """
    if routine not in _BUILDERS:
        raise ValueError(f"Invalid routine: {routine!r} (allowed: {', '.join(ROUTINES)})")
    from kfac_tn.tn import convolution as conv
    from kfac_tn.tn import derivatives, diagonal, kfac
    from kfac_tn.tn import unfolding as unfold

    prepare = {
        "conv": conv.prepare_conv,
        "conv_transpose": conv.prepare_conv_transpose,
        "kernel_unfold": conv.prepare_kernel_unfold,
        "unfold": unfold.prepare_unfold,
        "fold": unfold.prepare_fold,
        "unfold_transpose": unfold.prepare_unfold_transpose,
        "conv_input_vjp": derivatives.prepare_input_vjp,
        "conv_weight_vjp": derivatives.prepare_weight_vjp,
        "conv_input_jvp": conv.prepare_conv,
        "conv_weight_jvp": conv.prepare_conv,
        "kfac_expand_factor": kfac.prepare_factor,
        "kfac_reduce_factor": kfac.prepare_factor,
        "grad_expand_factor": kfac.prepare_grad_factor,
        "grad_reduce_factor": kfac.prepare_grad_factor,
        "ggn_diagonal": diagonal.prepare_ggn_diagonal,
        "hessian_diagonal_weight": diagonal.prepare_hessian_diagonal,
        "hessian_diagonal_input": diagonal.prepare_hessian_diagonal,
    }[routine]
    n_data = DATA_ARGS[routine]
    args = tuple(
        _Shape(a.shape if isinstance(a, torch.Tensor) else a) if j < n_data else a
        for j, a in enumerate(args)
    )
    kwargs.pop("impl", None)
    spec, shapes = prepare(*args, **kwargs)
    if simplify:
        from kfac_tn.tn.simplify import simplified_expression

        return simplified_expression(routine, spec, shapes)
    return routine_expression(routine, spec, shapes)


class _Shape:
    """Stand-in for a tensor when only its shape is known (used by :func:`symbolic`)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)
        self.ndim = len(self.shape)
