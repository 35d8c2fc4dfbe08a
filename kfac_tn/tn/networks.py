"""The plain tensor network of every routine, built from shapes and the spec alone.

One builder per routine, ``(spec, *data_shapes) -> Expression``, named after the routine;
:func:`~kfac_tn.tn.expressions.routine_expression` caches its result per shapes.  The
equations (``k o i (per dim)`` is one index pattern Π per spatial dimension):

=========================== ====================================================================
conv (and its JVPs)         ``n g c_in i…, k o i, g c_out c_in k… -> n g c_out o…``
conv_transpose              ``n g c_in o…, k o i, g c_in c_out k… -> n g c_out i…``
unfold / unfold_transpose   ``n c i…, k o i -> n c k… o…`` / ``n c o…, k o i -> n c k… i…``
fold                        ``n c k… o…, k o i -> n c i…``
kernel_unfold               ``g c_out c_in k…, k o i -> g c_out o… c_in i…``
conv_input_vjp              ``n g c_out o…, k o i, g c_out c_in k… -> n g c_in i…``
conv_weight_vjp             ``n g c_in i…, k o i, n g c_out o… -> g c_out c_in k…``
per_sample_weight_grad      ``n g c_in i…, k o i, n g c_out o… -> n g c_out c_in k…``
                            (transposed: ``n g c_out i…, k o i, n g c_in o… -> n g c_in c_out k…``)
kfac_expand/reduce_factor   two copies of ``n g c i…, k o i`` sharing ``n`` (and ``o`` for
                            expand) ``-> g c k… c_ k…_``
grad_expand/reduce_factor   ``n g c o…, n g c_ o… -> g c c_`` (reduce: private ``o…_``)
ggn_diagonal                ``n g c_in i…, k o i, m n g c_out o… -> m n g c_out c_in k…``, then
                            squared and summed over ``m, n``
hessian_diagonal_*          the weight / input VJP networks with ``x⊙x`` / ``W⊙W``
=========================== ====================================================================
"""

from __future__ import annotations

from kfac_tn.tn._common import Shape, join, names, prod
from kfac_tn.tn.expressions import Expression
from kfac_tn.tn.spec import ConvSpec

__all__ = [
    "conv",
    "conv_input_jvp",
    "conv_input_vjp",
    "conv_transpose",
    "conv_weight_jvp",
    "conv_weight_vjp",
    "factor_column_sum",
    "fold",
    "ggn_diagonal",
    "grad_expand_factor",
    "grad_reduce_factor",
    "hessian_diagonal_input",
    "hessian_diagonal_weight",
    "kernel_unfold",
    "kfac_expand_factor",
    "kfac_reduce_factor",
    "per_sample_weight_grad",
    "unfold",
    "unfold_transpose",
]

_Operand = tuple[str, Shape]


def _patterns(spec: ConvSpec) -> tuple[list[str], list[_Operand]]:
    """Terms ``k<j> o<j> i<j>`` and operands ``pi<j>: [K_j, O_j, I_j]`` of every Π."""
    nd = spec.ndim
    k, o, i = names("k", nd), names("o", nd), names("i", nd)
    terms = [f"{k[j]} {o[j]} {i[j]}" for j in range(nd)]
    ops = [(f"pi{j}", (d.kernel, d.out_size, d.in_size)) for j, d in enumerate(spec.dims)]
    return terms, ops


def _rename(expr: Expression, renamed: dict[int, str]) -> Expression:
    """``expr`` with the operands at the given positions renamed (same network)."""
    ops = tuple((renamed.get(j, name), shape) for j, (name, shape) in enumerate(expr.operands))
    return Expression(expr.routine, expr.equation, ops, expr.shape, expr.result_shape)


def _conv(routine: str, spec: ConvSpec, x_shape: Shape, w_shape: Shape) -> Expression:
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    c_out = w_shape[0]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
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


def conv(spec: ConvSpec, x_shape: Shape, w_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.conv`.

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C_in, *I]``.
        w_shape: ``[C_out, C_in/G, *K]``.

    Returns:
        The plain network, result ``[N, C_out, *O]``.
    """
    return _conv("conv", spec, x_shape, w_shape)


def conv_input_jvp(spec: ConvSpec, x_dot_shape: Shape, w_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.conv_input_jvp`: :func:`conv`'s with ``x_dot`` for ``x``.

    Args:
        spec: The convolution's spec.
        x_dot_shape: ``[N, C_in, *I]``.
        w_shape: ``[C_out, C_in/G, *K]``.

    Returns:
        The plain network, result ``[N, C_out, *O]``.
    """
    return _rename(_conv("conv_input_jvp", spec, x_dot_shape, w_shape), {0: "x_dot"})


def conv_weight_jvp(spec: ConvSpec, x_shape: Shape, w_dot_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.conv_weight_jvp`: :func:`conv`'s with ``weight_dot``.

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C_in, *I]``.
        w_dot_shape: ``[C_out, C_in/G, *K]``.

    Returns:
        The plain network, result ``[N, C_out, *O]``.
    """
    expr = _conv("conv_weight_jvp", spec, x_shape, w_dot_shape)
    return _rename(expr, {len(expr.operands) - 1: "weight_dot"})


def conv_transpose(spec: ConvSpec, x_shape: Shape, w_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.conv_transpose`.

    Args:
        spec: The transposed convolution's spec.
        x_shape: ``[N, C_in, *O]``.
        w_shape: ``[C_in, C_out/G, *K]``.

    Returns:
        The plain network, result ``[N, C_out, *I]``.
    """
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    c_out = w_shape[1] * g
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
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
    return Expression("conv_transpose", eq, ops, shape, (n, c_out, *spec.in_spatial))


def _unfold(routine: str, spec: ConvSpec, x_shape: Shape, *, transpose: bool) -> Expression:
    """Unfold ``[N, C, *I] -> [N, C, *K, *O]``; ``transpose``: ``[N, C, *O] -> [N, C, *K, *I]``."""
    nd = spec.ndim
    n, c = x_shape[:2]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    src, dst = (o, i) if transpose else (i, o)
    src_size, dst_size = (
        (spec.out_spatial, spec.in_spatial) if transpose else (spec.in_spatial, spec.out_spatial)
    )
    terms, pis = _patterns(spec)
    eq = f"{join('n c', src)}, {', '.join(terms)} -> {join('n c', k, dst)}"
    ops = (("x", (n, c, *src_size)), *pis)
    shape = (n, c, *spec.kernel_size, *dst_size)
    return Expression(routine, eq, ops, shape, (n, c * prod(spec.kernel_size), prod(dst_size)))


def unfold(spec: ConvSpec, x_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.unfold`.

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C, *I]``.

    Returns:
        The plain network, result ``[N, C·ΠK, ΠO]``.
    """
    return _unfold("unfold", spec, x_shape, transpose=False)


def unfold_transpose(spec: ConvSpec, x_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.unfold_transpose`.

    Args:
        spec: The transposed convolution's spec.
        x_shape: ``[N, C, *O]``.

    Returns:
        The plain network, result ``[N, C·ΠK, ΠI]``.
    """
    return _unfold("unfold_transpose", spec, x_shape, transpose=True)


def fold(spec: ConvSpec, cols_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.fold`.

    Args:
        spec: The convolution's spec.
        cols_shape: ``[N, C·ΠK, ΠO]``.

    Returns:
        The plain network, result ``[N, C, *I]``.
    """
    nd = spec.ndim
    n = cols_shape[0]
    c = cols_shape[1] // prod(spec.kernel_size)
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
    eq = f"{join('n c', k, o)}, {', '.join(terms)} -> {join('n c', i)}"
    ops = (("cols", (n, c, *spec.kernel_size, *spec.out_spatial)), *pis)
    shape = (n, c, *spec.in_spatial)
    return Expression("fold", eq, ops, shape, shape)


def kernel_unfold(spec: ConvSpec, w_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.kernel_unfold` (the Toeplitz matrix).

    Args:
        spec: The convolution's spec.
        w_shape: ``[C_out, C_in/G, *K]``.

    Returns:
        The plain network, result ``[G, C_out/G·ΠO, C_in/G·ΠI]``.
    """
    nd, g = spec.ndim, spec.groups
    c_out, c_in = w_shape[0] // g, w_shape[1]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
    eq = f"{join('g c_out c_in', k)}, {', '.join(terms)} -> {join('g c_out', o, 'c_in', i)}"
    ops = (("weight", (g, c_out, c_in, *spec.kernel_size)), *pis)
    shape = (g, c_out, *spec.out_spatial, c_in, *spec.in_spatial)
    result = (g, c_out * prod(spec.out_spatial), c_in * prod(spec.in_spatial))
    return Expression("kernel_unfold", eq, ops, shape, result)


def _input_vjp(routine: str, spec: ConvSpec, v_shape: Shape, w_shape: Shape) -> Expression:
    nd, g = spec.ndim, spec.groups
    n, c_out = v_shape[:2]
    c_in = w_shape[1]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
    eq = (
        f"{join('n g c_out', o)}, {', '.join(terms)}, {join('g c_out c_in', k)}"
        f" -> {join('n g c_in', i)}"
    )
    ops = (
        ("v", (n, g, c_out // g, *spec.out_spatial)),
        *pis,
        ("weight", (g, c_out // g, c_in, *spec.kernel_size)),
    )
    shape = (n, g, c_in, *spec.in_spatial)
    return Expression(routine, eq, ops, shape, (n, g * c_in, *spec.in_spatial))


def conv_input_vjp(spec: ConvSpec, v_shape: Shape, w_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.conv_input_vjp`.

    Args:
        spec: The convolution's spec.
        v_shape: ``[N, C_out, *O]``.
        w_shape: ``[C_out, C_in/G, *K]``.

    Returns:
        The plain network, result ``[N, C_in, *I]``.
    """
    return _input_vjp("conv_input_vjp", spec, v_shape, w_shape)


def _weight_vjp(routine: str, spec: ConvSpec, x_shape: Shape, v_shape: Shape) -> Expression:
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    c_out = v_shape[1]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
    eq = (
        f"{join('n g c_in', i)}, {', '.join(terms)}, {join('n g c_out', o)}"
        f" -> {join('g c_out c_in', k)}"
    )
    ops = (
        ("x", (n, g, c_in // g, *spec.in_spatial)),
        *pis,
        ("v", (n, g, c_out // g, *spec.out_spatial)),
    )
    shape = (g, c_out // g, c_in // g, *spec.kernel_size)
    return Expression(routine, eq, ops, shape, (c_out, c_in // g, *spec.kernel_size))


def conv_weight_vjp(spec: ConvSpec, x_shape: Shape, v_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.conv_weight_vjp`.

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C_in, *I]``.
        v_shape: ``[N, C_out, *O]``.

    Returns:
        The plain network, result ``[C_out, C_in/G, *K]``.
    """
    return _weight_vjp("conv_weight_vjp", spec, x_shape, v_shape)


def per_sample_weight_grad(spec: ConvSpec, x_shape: Shape, v_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.per_sample_weight_grad`: the weight VJP keeping ``n``.

    The operand with the input legs ``i`` comes first (``x``, or ``v`` for a transposed
    convolution), so that the window simplification applies to it.

    Args:
        spec: The (transposed) convolution's spec.
        x_shape: Layer input ``[N, C_in, *I]`` (transposed: ``[N, C_in, *O]``).
        v_shape: Output cotangent ``[N, C_out, *O]`` (transposed: ``[N, C_out, *I]``).

    Returns:
        The plain network, result ``[N, C_out, C_in/G, *K]`` (transposed:
        ``[N, C_in, C_out/G, *K]``).
    """
    nd, g = spec.ndim, spec.groups
    # (operand, its channel leg, shape): the windowed one (legs i) first
    if spec.transpose:
        windowed, other = ("v", "c_out", v_shape), ("x", "c_in", x_shape)
    else:
        windowed, other = ("x", "c_in", x_shape), ("v", "c_out", v_shape)
    n, cw, co = windowed[2][0], windowed[2][1] // g, other[2][1] // g
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
    eq = (
        f"{join('n g', windowed[1], i)}, {', '.join(terms)}, {join('n g', other[1], o)}"
        f" -> {join('n g', other[1], windowed[1], k)}"
    )
    ops = (
        (windowed[0], (n, g, cw, *spec.in_spatial)),
        *pis,
        (other[0], (n, g, co, *spec.out_spatial)),
    )
    shape = (n, g, co, cw, *spec.kernel_size)
    result = (n, g * co, cw, *spec.kernel_size)
    return Expression("per_sample_weight_grad", eq, ops, shape, result)


def ggn_diagonal(spec: ConvSpec, x_shape: Shape, s_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.ggn_diagonal` (then squared and summed over ``m, n``).

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C_in, *I]``.
        s_shape: ``[M, N, C_out, *O]``.

    Returns:
        The plain network, result ``[C_out, C_in/G, *K]``.
    """
    nd, g = spec.ndim, spec.groups
    n, c_in = x_shape[:2]
    m, c_out = s_shape[0], s_shape[2]
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    terms, pis = _patterns(spec)
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
    return Expression("ggn_diagonal", eq, ops, shape, result, post="square_sum_m_n")


def hessian_diagonal_weight(
    spec: ConvSpec, x_shape: Shape, w_shape: Shape, h_shape: Shape
) -> Expression:
    """Weight part of :func:`~kfac_tn.tn.hessian_diagonal`: the weight VJP of ``h`` with ``x⊙x``.

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C_in, *I]``.
        w_shape: ``[C_out, C_in/G, *K]`` (unused: the network does not contain the weight).
        h_shape: ``[N, C_out, *O]``.

    Returns:
        The plain network on ``x_squared`` and ``h``, result ``[C_out, C_in/G, *K]``.
    """
    expr = _weight_vjp("hessian_diagonal_weight", spec, x_shape, h_shape)
    return _rename(expr, {0: "x_squared", len(expr.operands) - 1: "h"})


def hessian_diagonal_input(
    spec: ConvSpec, x_shape: Shape, w_shape: Shape, h_shape: Shape
) -> Expression:
    """Input part of :func:`~kfac_tn.tn.hessian_diagonal`: the input VJP of ``h`` with ``W⊙W``.

    Args:
        spec: The convolution's spec.
        x_shape: ``[N, C_in, *I]`` (unused: only its spec matters).
        w_shape: ``[C_out, C_in/G, *K]``.
        h_shape: ``[N, C_out, *O]``.

    Returns:
        The plain network on ``h`` and ``weight_squared``, result ``[N, C_in, *I]``.
    """
    expr = _input_vjp("hessian_diagonal_input", spec, h_shape, w_shape)
    return _rename(expr, {0: "h", len(expr.operands) - 1: "weight_squared"})


def _factor_copy(
    spec: ConvSpec, x_shape: Shape, suffix: str, share: str
) -> tuple[list[str], list[_Operand], str]:
    """Terms, operands and free legs of one copy of the unfolded input (``x`` with its Π's).

    ``share`` names the leg the two copies share (``'o'`` for conv expand, ``'i'`` for
    transpose expand, ``''`` for reduce: all private).
    """
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


def _kfac(routine: str, spec: ConvSpec, x_shape: Shape, share: str) -> Expression:
    t1, ops1, out1 = _factor_copy(spec, x_shape, "", share)
    t2, ops2, out2 = _factor_copy(spec, x_shape, "_", share)
    eq = f"{', '.join(t1 + t2)} -> {join('g', out1, out2)}"
    n, c = x_shape[:2]
    g = spec.groups
    positions = prod(spec.in_spatial if spec.transpose else spec.out_spatial)
    scale = 1.0 / (n * positions) if share else 1.0 / (n * positions**2)
    shape = (g, c // g, *spec.kernel_size, c // g, *spec.kernel_size)
    d = c // g * prod(spec.kernel_size)
    return Expression(routine, eq, tuple(ops1 + ops2), shape, (g, d, d), scale=scale)


def kfac_expand_factor(spec: ConvSpec, x_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.kfac_expand_factor` (two copies sharing ``n`` and ``o``).

    Args:
        spec: The (transposed) convolution's spec.
        x_shape: ``[N, C_in, *spatial]``.

    Returns:
        The plain network (no bias), result ``[G, C_in/G·ΠK, C_in/G·ΠK]``.
    """
    share = "i" if spec.transpose else "o"
    return _kfac("kfac_expand_factor", spec, x_shape, share)


def kfac_reduce_factor(spec: ConvSpec, x_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.kfac_reduce_factor` (two copies sharing only ``n``).

    Args:
        spec: The (transposed) convolution's spec.
        x_shape: ``[N, C_in, *spatial]``.

    Returns:
        The plain network (no bias), result ``[G, C_in/G·ΠK, C_in/G·ΠK]``.
    """
    return _kfac("kfac_reduce_factor", spec, x_shape, "")


def factor_column_sum(spec: ConvSpec, x_shape: Shape) -> Expression:
    """Unfolded input summed over its positions (the bias entries of the KFAC factors).

    Args:
        spec: The (transposed) convolution's spec.
        x_shape: ``[N, C_in, *spatial]``.

    Returns:
        The plain network ``n g c i…, k o i -> n g c k…``, result ``[N, G, C_in/G, *K]``.
    """
    terms, ops, out = _factor_copy(spec, x_shape, "", "")
    n, c = x_shape[:2]
    shape = (n, spec.groups, c // spec.groups, *spec.kernel_size)
    eq = f"{', '.join(terms)} -> {join('n g', out)}"
    return Expression("factor_column_sum", eq, tuple(ops), shape, shape)


def _grad_factor(routine: str, spec: ConvSpec, g_shape: Shape, *, shared: bool) -> Expression:
    n, c = g_shape[:2]
    nd, g = len(g_shape) - 2, spec.groups
    o = names("o", nd)
    o_ = o if shared else names("o", nd, "_")
    eq = f"{join('n g c', o)}, {join('n g c_', o_)} -> g c c_"
    op = ("g", (n, g, c // g, *g_shape[2:]))
    return Expression(routine, eq, (op, op), (g, c // g, c // g), (g, c // g, c // g))


def grad_expand_factor(spec: ConvSpec, g_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.grad_expand_factor` (no Π).

    Args:
        spec: A 1×1 spec on ``g``'s spatial size (it carries ``groups``).
        g_shape: ``[N, C_out, *O]``.

    Returns:
        The plain network, result ``[G, C_out/G, C_out/G]``.
    """
    return _grad_factor("grad_expand_factor", spec, g_shape, shared=True)


def grad_reduce_factor(spec: ConvSpec, g_shape: Shape) -> Expression:
    """Network of :func:`~kfac_tn.tn.grad_reduce_factor` (no Π, private positions).

    Args:
        spec: A 1×1 spec on ``g``'s spatial size (it carries ``groups``).
        g_shape: ``[N, C_out, *O]``.

    Returns:
        The plain network, result ``[G, C_out/G, C_out/G]``.
    """
    return _grad_factor("grad_reduce_factor", spec, g_shape, shared=False)
