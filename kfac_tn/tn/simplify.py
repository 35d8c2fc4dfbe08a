"""Symbolic simplification: the networks ``impl="tn_simplified"`` contracts, from shapes alone.

Starting from a routine's plain network (:mod:`kfac_tn.tn.expressions`), every index pattern
is removed symbolically, using only the hyperparameters:

* **window** (Π contracted with a data operand, its output leg kept): after zero padding,
  ``Σ_i Π[k, o, i] x[i] = x_pad[S·o + D·k]`` is a strided view with legs ``(o, k)``.  A dense
  dimension (``K = S``, no padding) is the reshape ``i -> (o, k)``; a down-sampling dimension
  (``S > K``) the strided slice ``x[:O·S].view(O, S)[:, :K]``; a general one an overlapping
  window view; unused trailing inputs are sliced off (no divisibility condition).
* **Σ_o** (the output leg private to Π, as in KFAC-reduce): Π becomes ``Π̄ = Σ_o Π``
  ``[K, I]`` (a 0/1 band matrix); a one-tap dimension without padding is a strided sum.
* **place / fold** (Π contracted over ``o``, its input leg kept — transposed convolution,
  input VJP, col2im, Toeplitz matrix): the contraction is done on ``(o, k)`` and the result
  written through a strided view of a zero buffer (``place``: one write, no overlaps;
  ``fold``: one accumulation per kernel tap, taps may overlap).

Then legs of size one are squeezed (``g`` for ``G = 1``, ``k`` of a 1×1 kernel) and legs that
always appear together in the same order are merged (``o0 o1 -> o0·o1``), which turns most
routines into one batched matmul.  The transforms are listed on the expression.
"""

from __future__ import annotations

import functools

import torch

from kfac_tn.tn._common import names
from kfac_tn.tn.expressions import Expression
from kfac_tn.tn.spec import ConvSpec, DimCategory

__all__ = ["merge_legs", "simplified_expression", "squeeze_legs"]


@functools.lru_cache(maxsize=4096)
def simplified_expression(
    routine: str, spec: ConvSpec, shapes: tuple[tuple[int, ...], ...]
) -> Expression:
    """Build (and cache) the simplified network of ``routine``.

    Args:
        routine: A routine name (see :data:`kfac_tn.tn.expressions.ROUTINES`).
        spec: The validated spec.
        shapes: Shapes of the routine's data arguments (as for ``routine_expression``).

    Returns:
        An :class:`~kfac_tn.tn.expressions.Expression` without index patterns Π (``pibar<j>``
        operands ``[K_j, I_j]`` or ``[K_j, O_j]`` may remain for KFAC-reduce); its
        ``transforms`` describe the strided views / writes replacing them.
    """
    from kfac_tn.tn.expressions import routine_expression

    plain = routine_expression(routine, spec, shapes)
    nd = spec.ndim
    i, o, k = names("i", nd), names("o", nd), names("k", nd)
    i_, o_, k_ = names("i", nd, "_"), names("o", nd, "_"), names("k", nd, "_")
    terms = [t.split() for t in plain.equation.split("->")[0].split(",")]
    out = plain.equation.split("->")[1].split()
    sizes = _leg_sizes(plain)
    data = [(name, t) for (name, _), t in zip(plain.operands, terms) if not name.startswith("pi")]
    transforms: list[str] = []
    new_terms: list[list[str]] = []
    new_ops: list[str] = []

    def window(name: str, legs: list[str], ii, oo, kk) -> None:
        pos = legs.index(ii[0])
        legs = legs[:pos] + list(oo) + list(kk) + legs[pos + nd :]
        new_terms.append(legs)
        new_ops.append(f"{name}▷window")
        transforms.append(f"{name}▷window: {_window_text(spec, ii, oo, kk)}")
        for a, b, d in zip(oo, kk, spec.dims):
            sizes[a], sizes[b] = d.out_size, d.kernel

    def summed(name: str, legs: list[str], ii, kk, over: str) -> None:
        pos = legs.index(ii[0])
        new_legs, extra_terms, extra_ops = list(legs), [], []
        for j, d in enumerate(spec.dims):
            if over == "o" and d.kernel == 1 and d.category is not DimCategory.GENERAL:
                new_legs[pos + j] = kk[j]
                sizes[kk[j]] = 1
                transforms.append(f"{name}: dim {j} one-tap strided sum {ii[j]} -> {kk[j]}")
            else:
                extra_terms.append([kk[j], ii[j]])
                extra_ops.append(f"pibar{j}" if over == "o" else f"pibar_i{j}")
                sizes[kk[j]] = d.kernel
        new_terms.extend([new_legs, *extra_terms])
        new_ops.extend([name, *extra_ops])

    tn_out = out
    if routine in (
        "conv",
        "conv_input_jvp",
        "conv_weight_jvp",
        "conv_weight_vjp",
        "ggn_diagonal",
        "hessian_diagonal_weight",
    ):
        x_name, x_legs = data[0]
        window(x_name, x_legs, i, o, k)
        for name, legs in data[1:]:
            new_terms.append(legs)
            new_ops.append(name)
    elif routine == "unfold":
        window("x", data[0][1], i, o, k)
    elif routine == "kfac_expand_factor" and not spec.transpose:
        window("x", data[0][1], i, o, k)
        window("x", data[1][1], i_, o, k_)
    elif routine == "kfac_expand_factor":
        for legs, kk in ((data[0][1], k), (data[1][1], k_)):
            pos = legs.index(o[0] if kk is k else o_[0])
            new_terms.append(legs[:pos] + list(kk) + list(i) + legs[pos + nd :])
            new_ops.append("x▷place")
        transforms.append(f"x▷place: one strided write {_place_text(spec)}")
        for a, d in zip(i, spec.dims):
            sizes[a] = d.in_size
    elif routine == "kfac_reduce_factor":
        over = "i" if spec.transpose else "o"  # Π̄ sums the leg private to each copy
        summed("x", data[0][1], o if spec.transpose else i, k, over)
        summed("x", data[1][1], o_ if spec.transpose else i_, k_, over)
    elif routine in ("conv_transpose", "conv_input_vjp", "hessian_diagonal_input"):
        # contract on (o, k), then col2im (fold) into i
        for name, legs in data:
            new_terms.append(legs)
            new_ops.append(name)
        pos = out.index(i[0])
        tn_out = out[:pos] + list(o) + list(k) + out[pos + nd :]
        transforms.append(f"result▷fold: {_fold_text(spec)}")
    elif routine == "fold":
        new_terms, new_ops, tn_out = [data[0][1]], ["cols"], list(data[0][1])
        transforms.append(f"result▷fold: {_fold_text(spec)}")
    elif routine in ("unfold_transpose", "kernel_unfold"):
        # no contraction: the operand is written (broadcast over the missing leg) through a
        # strided view of a zero buffer
        name, legs = data[0]
        new_terms, new_ops, tn_out = [legs], [name], list(legs)
        transforms.append(f"result▷place: one strided write {_place_text(spec)}")
    else:  # gradient factors: no Π
        new_terms = [list(t) for t in terms]
        new_ops = [name for name, _ in plain.operands]

    for a, d in zip(k, spec.dims):
        sizes.setdefault(a, d.kernel)
    equation = f"{', '.join(' '.join(t) for t in new_terms)} -> {' '.join(tn_out)}"
    equation, legs_sizes = squeeze_legs(equation, sizes)
    equation, legs_sizes = merge_legs(equation, legs_sizes)
    lhs, rhs = equation.split("->")
    op_shapes = tuple(
        (name, tuple(legs_sizes[leg] for leg in term.split()))
        for name, term in zip(new_ops, lhs.split(","))
    )
    shape = tuple(legs_sizes[leg] for leg in rhs.split())
    return Expression(
        routine,
        equation,
        op_shapes,
        shape,
        plain.result_shape,
        plain.scale,
        plain.post,
        tuple(transforms),
        spec,
    )


def _leg_sizes(expr: Expression) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for (_, shape), term in zip(expr.operands, expr.equation.split("->")[0].split(",")):
        for leg, size in zip(term.split(), shape):
            sizes[leg] = size
    return sizes


def _window_text(spec: ConvSpec, ii, oo, kk) -> str:
    parts = []
    for j, d in enumerate(spec.dims):
        kind = {DimCategory.DENSE: "reshape", DimCategory.DOWN: "strided slice"}.get(
            d.category, "window"
        )
        pad = f", pad ({d.pad_left}, {d.pad_right})" if d.pad_left or d.pad_right else ""
        parts.append(
            f"{ii[j]} -> ({oo[j]}, {kk[j]}) {kind} [stride {d.stride}, dilation {d.dilation}{pad}]"
        )
    return "; ".join(parts)


def _place_text(spec: ConvSpec) -> str:
    return "; ".join(
        f"(o{j}, k{j}) -> i{j} = {d.stride}·o{j} + {d.dilation}·k{j} - {d.pad_left}"
        for j, d in enumerate(spec.dims)
    )


def _fold_text(spec: ConvSpec) -> str:
    return "; ".join(
        f"(o{j}, k{j}) -> i{j} = {d.stride}·o{j} + {d.dilation}·k{j} - {d.pad_left}, summed"
        for j, d in enumerate(spec.dims)
    )


def squeeze_legs(equation: str, sizes: dict[str, int]) -> tuple[str, dict[str, int]]:
    """Drop legs of size one from every term of a named equation.

    Returns:
        The equation and the sizes of the remaining legs.
    """
    lhs, rhs = equation.split("->")

    def keep(term: str) -> str:
        return " ".join(leg for leg in term.split() if sizes.get(leg, 1) != 1)

    eq = ", ".join(keep(t) for t in lhs.split(",")) + " -> " + keep(rhs)
    return eq, {leg: s for leg, s in sizes.items() if s != 1}


def merge_legs(equation: str, sizes: dict[str, int]) -> tuple[str, dict[str, int]]:
    """Merge legs that always appear together, adjacent and in the same order (``a b -> a·b``).

    Returns:
        The equation with merged legs and the sizes of all legs (merged ones multiplied).
    """
    lhs, rhs = equation.split("->")
    terms = [t.split() for t in lhs.split(",")] + [rhs.split()]
    sizes = dict(sizes)
    changed = True
    while changed:
        changed = False
        for t in terms:
            for a, b in zip(t, t[1:]):
                if _always_adjacent(terms, a, b):
                    merged = f"{a}·{b}"
                    sizes[merged] = sizes[a] * sizes[b]
                    for u in terms:
                        if a in u:
                            p = u.index(a)
                            u[p : p + 2] = [merged]
                    changed = True
                    break
            if changed:
                break
    eq = ", ".join(" ".join(t) for t in terms[:-1]) + " -> " + " ".join(terms[-1])
    return eq, sizes


def _always_adjacent(terms: list[list[str]], a: str, b: str) -> bool:
    for t in terms:
        if (a in t) != (b in t):
            return False
        if a in t and (t.index(b) != t.index(a) + 1):
            return False
    return True


def evaluate_simplified(expr: Expression, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Contract a simplified network on real tensors (inspection and tests).

    Builds each operand from its transform (strided window view, one-tap strided sum, ``Π̄``),
    contracts the simplified equation and applies the result transform (``fold`` / ``place``).
    The routines' ``impl="tn_simplified"`` paths run the same views with hand-fused kernels.
    (Not for the ``hessian_diagonal_*`` expressions, whose operands are derived tensors: they
    are the weight / input VJP networks with ``x⊙x`` / ``W⊙W``.)

    Args:
        expr: A simplified expression (see :func:`simplified_expression`).
        tensors: Data operands by name (as for :func:`~kfac_tn.tn.expressions.evaluate`).

    Returns:
        The routine's result, ``expr.result_shape``.
    """
    from kfac_tn.tn._common import fold_patches, patch_view, scatter_patches
    from kfac_tn.tn.convolution import _kernel_unfold_simplified
    from kfac_tn.tn.einsum import contract
    from kfac_tn.tn.expressions import routine_expression
    from kfac_tn.tn.patterns import cached_summed_index_pattern

    spec = expr.spec
    plain = routine_expression(expr.routine, spec, tuple(_data_shapes(expr, tensors)))
    plain_shapes = {name: shape for name, shape in plain.operands}
    ref = next(iter(tensors.values()))
    ops = []
    for name, shape in expr.operands:
        base = name.split("▷")[0]
        if name.startswith("pibar_i"):
            d = spec.dims[int(name[len("pibar_i") :])]
            ops.append(cached_summed_index_pattern(d, ref.dtype, ref.device, over="i"))
            continue
        if name.startswith("pibar"):
            d = spec.dims[int(name[len("pibar") :])]
            ops.append(cached_summed_index_pattern(d, ref.dtype, ref.device, over="o"))
            continue
        t = tensors[base].reshape(plain_shapes[base])
        if name.endswith("▷window"):
            t = patch_view(t, spec)
        elif name.endswith("▷place"):
            t = scatter_patches(t, spec)
        elif any(tr.startswith(f"{base}: dim ") for tr in expr.transforms):
            nd = spec.ndim
            for j, d in enumerate(spec.dims):
                if d.kernel == 1 and d.category is not DimCategory.GENERAL:
                    axis = t.ndim - nd + j
                    t = t.narrow(axis, 0, d.stride * (d.out_size - 1) + 1)
                    t = t[(slice(None),) * axis + (slice(None, None, d.stride),)]
                    t = t.sum(axis, keepdim=True)
        ops.append(t.reshape(shape))
    if expr.routine in ("unfold_transpose", "kernel_unfold", "fold"):
        src = ops[0]
    else:
        src = contract(expr.equation, *ops)
    nd = spec.ndim
    if expr.routine in ("conv_transpose", "conv_input_vjp", "hessian_diagonal_input", "fold"):
        lead = plain.shape[: len(plain.shape) - nd]
        if expr.routine == "fold":
            n, c = plain.shape[:2]
            cols = src.reshape(n, c, *spec.kernel_size, *spec.out_spatial)
            perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
            out = fold_patches(cols.permute(perm), spec)
        else:
            out = fold_patches(src.reshape(*lead, *spec.out_spatial, *spec.kernel_size), spec)
    elif expr.routine == "unfold_transpose":
        n, c = plain.shape[:2]
        out = scatter_patches(src.reshape(n, c, *spec.out_spatial), spec)
    elif expr.routine == "kernel_unfold":
        out = _kernel_unfold_simplified(tensors["weight"], spec)
    else:
        out = src
    if expr.post == "square_sum_m_n":
        out = out.reshape(plain.shape).square().sum(dim=(0, 1))
    if expr.scale != 1.0:
        out = out * expr.scale
    return out.reshape(expr.result_shape)


def _data_shapes(expr: Expression, tensors: dict[str, torch.Tensor]):
    """Shapes of the routine's data arguments, in argument order, for the plain network."""
    order = {
        "conv": ("x", "weight"),
        "conv_input_jvp": ("x_dot", "weight"),
        "conv_weight_jvp": ("x", "weight_dot"),
        "conv_transpose": ("x", "weight"),
        "unfold": ("x",),
        "fold": ("cols",),
        "unfold_transpose": ("x",),
        "kernel_unfold": ("weight",),
        "conv_input_vjp": ("v", "weight"),
        "conv_weight_vjp": ("x", "v"),
        "kfac_expand_factor": ("x",),
        "kfac_reduce_factor": ("x",),
        "grad_expand_factor": ("g",),
        "grad_reduce_factor": ("g",),
        "ggn_diagonal": ("x", "s"),
    }[expr.routine]
    return [tuple(tensors[name].shape) for name in order]
