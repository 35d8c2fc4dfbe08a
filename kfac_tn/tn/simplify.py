"""Symbolic simplification: the networks ``impl="tn_simplified"`` contracts, from shapes alone.

Starting from a routine's plain network (:mod:`kfac_tn.tn.networks`), every index pattern
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

Which of these applies is a property of the routine's network: one :class:`Simplification`
rule per kind (:data:`WINDOW`, :data:`EXPAND_PAIR`, :data:`REDUCE_PAIR`, :data:`FOLD_RESULT`,
:data:`FOLD_COLUMNS`, :data:`PLACE_PATCHES`, :data:`PLACE_KERNEL`, :data:`KEEP`); the routine
registry (:mod:`kfac_tn.tn.symbolic`) names each routine's rule.  Then legs of size one are
squeezed (``g`` for ``G = 1``, ``k`` of a 1×1 kernel) and legs that always appear together in
the same order are merged (``o0 o1 -> o0·o1``), which turns most routines into one batched
matmul.  The transforms are listed on the expression (:mod:`kfac_tn.tn.views` runs them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from kfac_tn.tn._common import Shape, names
from kfac_tn.tn.einsum import contract
from kfac_tn.tn.expressions import Expression, Network, routine_expression
from kfac_tn.tn.patterns import cached_summed_index_pattern
from kfac_tn.tn.spec import ConvSpec, DimCategory
from kfac_tn.tn.views import fold_patches, patch_view, scatter_kernel, scatter_patches

__all__ = [
    "EXPAND_PAIR",
    "FOLD_COLUMNS",
    "FOLD_RESULT",
    "KEEP",
    "PLACE_KERNEL",
    "PLACE_PATCHES",
    "REDUCE_PAIR",
    "WINDOW",
    "SimplifiedExpression",
    "Simplification",
    "evaluate_simplified",
    "merge_legs",
    "simplified_expression",
    "squeeze_legs",
]


@dataclass
class _Rewrite:
    """A simplified network while a :class:`Simplification` rewrites the plain one.

    Attributes:
        spec: The spec.
        data: The plain network's data operands (not Π) with their legs, in order.
        out: Legs of the contraction result (a rule may replace them).
        sizes: Size of every leg (a rule adds the new ones).
        terms: Legs of each operand of the simplified network.
        ops: Names of those operands (``x▷window``, ``pibar0``, ...).
        transforms: Readable descriptions of the views / writes that replaced Π.
    """

    spec: ConvSpec
    data: list[tuple[str, list[str]]]
    out: list[str]
    sizes: dict[str, int]
    terms: list[list[str]] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    transforms: list[str] = field(default_factory=list)

    def legs(self, kind: str, suffix: str = "") -> list[str]:
        """Spatial leg names ``kind<j>suffix`` (``kind`` one of ``'i'``, ``'o'``, ``'k'``)."""
        return names(kind, self.spec.ndim, suffix)

    def keep(self, name: str, legs: list[str]) -> None:
        """Add a data operand unchanged."""
        self.terms.append(legs)
        self.ops.append(name)

    def window(self, name: str, legs: list[str], suffix: str = "") -> None:
        """Replace the input legs ``i…<suffix>`` of ``name`` and their Π by its window view.

        The window has legs ``(o…, k…<suffix>)``; the output legs ``o`` are shared by the copies.
        """
        ii, oo, kk = self.legs("i", suffix), self.legs("o"), self.legs("k", suffix)
        pos, nd = legs.index(ii[0]), self.spec.ndim
        self.keep(f"{name}▷window", legs[:pos] + oo + kk + legs[pos + nd :])
        self.transforms.append(f"{name}▷window: {_window_text(self.spec, ii, oo, kk)}")
        for a, b, d in zip(oo, kk, self.spec.dims):
            self.sizes[a], self.sizes[b] = d.out_size, d.kernel

    def summed(self, name: str, legs: list[str], over: str, suffix: str = "") -> None:
        """Sum each Π of ``name`` over its private leg ``over`` (``'o'`` or ``'i'``) first.

        One-tap dimensions without padding become a strided sum of the operand (when summing
        over ``o``); every other dimension contracts with ``Π̄`` (``pibar<j>`` or
        ``pibar_i<j>``).
        """
        ii = self.legs("o" if over == "i" else "i", suffix)
        kk = self.legs("k", suffix)
        pos = legs.index(ii[0])
        new_legs, extra_terms, extra_ops = list(legs), [], []
        for j, d in enumerate(self.spec.dims):
            if over == "o" and d.kernel == 1 and d.category is not DimCategory.GENERAL:
                new_legs[pos + j] = kk[j]
                self.sizes[kk[j]] = 1
                self.transforms.append(f"{name}: dim {j} one-tap strided sum {ii[j]} -> {kk[j]}")
            else:
                extra_terms.append([kk[j], ii[j]])
                extra_ops.append(f"pibar{j}" if over == "o" else f"pibar_i{j}")
                self.sizes[kk[j]] = d.kernel
        self.terms.extend([new_legs, *extra_terms])
        self.ops.extend([name, *extra_ops])

    def place(self, legs: list[str], suffix: str) -> None:
        """Replace the legs ``o…<suffix>`` of a transposed factor copy by ``(k…<suffix>, i…)``."""
        oo, kk, ii = self.legs("o", suffix), self.legs("k", suffix), self.legs("i")
        pos, nd = legs.index(oo[0]), self.spec.ndim
        self.keep("x▷place", legs[:pos] + kk + ii + legs[pos + nd :])
        for a, d in zip(ii, self.spec.dims):
            self.sizes[a] = d.in_size


class Simplification:
    """How a kind of plain network loses its index patterns (one instance per kind).

    Attributes:
        contracts: Whether the simplified network is contracted (``False``: a pure write).
    """

    contracts: bool = True

    def rewrite(self, net: _Rewrite) -> None:
        """Rewrite the data operands of ``net`` (every rule overrides this).

        Args:
            net: The network being simplified.
        """
        raise NotImplementedError

    def finish(self, out: torch.Tensor, source: Expression, spec: ConvSpec) -> torch.Tensor:
        """Turn the contraction result into the plain network's result legs.

        Args:
            out: The contraction result (the first operand if not :attr:`contracts`).
            source: The plain network.
            spec: The spec.

        Returns:
            ``out`` with the plain network's contraction shape (before ``post``/``scale``).
        """
        return out


class _WindowFirst(Simplification):
    """The first data operand meets Π through its input legs (a window); the rest as is."""

    def rewrite(self, net: _Rewrite) -> None:
        (name, legs), *rest = net.data
        net.window(name, legs)
        for other in rest:
            net.keep(*other)


class _ExpandPair(Simplification):
    """KFAC-expand: both copies windows sharing ``o``; transposed, both placed sharing ``i``."""

    def rewrite(self, net: _Rewrite) -> None:
        (_, first), (_, second) = net.data
        if not net.spec.transpose:
            net.window("x", first)
            net.window("x", second, "_")
            return
        net.place(first, "")
        net.place(second, "_")
        net.transforms.append(f"x▷place: one strided write {_place_text(net.spec)}")


class _ReducePair(Simplification):
    """KFAC-reduce: each copy's Π summed over the leg private to it (``Π̄``)."""

    def rewrite(self, net: _Rewrite) -> None:
        over = "i" if net.spec.transpose else "o"
        (_, first), (_, second) = net.data
        net.summed("x", first, over)
        net.summed("x", second, over, "_")


class _FoldResult(Simplification):
    """Π contracted over ``o``, ``i`` kept: contract on ``(o, k)``, then col2im (fold)."""

    def rewrite(self, net: _Rewrite) -> None:
        for operand in net.data:
            net.keep(*operand)
        i, nd = net.legs("i"), net.spec.ndim
        pos = net.out.index(i[0])
        net.out = net.out[:pos] + net.legs("o") + net.legs("k") + net.out[pos + nd :]
        net.transforms.append(f"result▷fold: {_fold_text(net.spec)}")

    def finish(self, out: torch.Tensor, source: Expression, spec: ConvSpec) -> torch.Tensor:
        lead = source.shape[: len(source.shape) - spec.ndim]
        return fold_patches(out.reshape(*lead, *spec.out_spatial, *spec.kernel_size), spec)


class _FoldColumns(Simplification):
    """``fold``: no contraction, the columns are accumulated into ``i`` (col2im)."""

    contracts = False

    def rewrite(self, net: _Rewrite) -> None:
        ((name, legs),) = net.data
        net.keep(name, legs)
        net.out = list(legs)
        net.transforms.append(f"result▷fold: {_fold_text(net.spec)}")

    def finish(self, out: torch.Tensor, source: Expression, spec: ConvSpec) -> torch.Tensor:
        n, c, nd = source.shape[0], source.shape[1], spec.ndim
        cols = out.reshape(n, c, *spec.kernel_size, *spec.out_spatial)
        perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
        return fold_patches(cols.permute(perm), spec)


class _Place(Simplification):
    """No contraction: the operand is written through a strided view of a zero buffer.

    The operand is broadcast over the leg it lacks (``k`` for the transposed unfold, ``o`` for
    the Toeplitz matrix).
    """

    contracts = False

    def rewrite(self, net: _Rewrite) -> None:
        ((name, legs),) = net.data
        net.keep(name, legs)
        net.out = list(legs)
        net.transforms.append(f"result▷place: one strided write {_place_text(net.spec)}")


class _PlacePatches(_Place):
    """``unfold_transpose``: ``out[n, c, k, S·o + D·k - P] = x[n, c, o]``."""

    def finish(self, out: torch.Tensor, source: Expression, spec: ConvSpec) -> torch.Tensor:
        n, c = source.shape[:2]
        return scatter_patches(out.reshape(n, c, *spec.out_spatial), spec)


class _PlaceKernel(_Place):
    """``kernel_unfold``: ``T[g, d, o, c, S·o + D·k - P] = W[g, d, c, k]``."""

    def finish(self, out: torch.Tensor, source: Expression, spec: ConvSpec) -> torch.Tensor:
        g, c_out, c_in, *kernel = source.operands[0][1]
        return scatter_kernel(out.reshape(g * c_out, c_in, *kernel), spec)


class _Keep(Simplification):
    """No index pattern to remove (the gradient factors)."""

    def rewrite(self, net: _Rewrite) -> None:
        for operand in net.data:
            net.keep(*operand)


WINDOW: Simplification = _WindowFirst()
"""conv, its JVPs, weight VJP, unfold, GGN diagonal, Hessian diagonal (weight part)."""
EXPAND_PAIR: Simplification = _ExpandPair()
"""KFAC-expand input factor."""
REDUCE_PAIR: Simplification = _ReducePair()
"""KFAC-reduce input factor."""
FOLD_RESULT: Simplification = _FoldResult()
"""conv_transpose, input VJP, Hessian diagonal (input part)."""
FOLD_COLUMNS: Simplification = _FoldColumns()
"""fold (col2im)."""
PLACE_PATCHES: Simplification = _PlacePatches()
"""unfold_transpose."""
PLACE_KERNEL: Simplification = _PlaceKernel()
"""kernel_unfold (Toeplitz matrix)."""
KEEP: Simplification = _Keep()
"""Gradient factors (no Π)."""


@dataclass(frozen=True)
class SimplifiedExpression(Expression):
    """A simplified network (no index patterns Π): an :class:`Expression` that knows its origin.

    Attributes:
        source: The plain network it was simplified from.
        rule: The :class:`Simplification` that produced it.
    """

    source: Expression | None = field(default=None, repr=False, compare=False)
    rule: Simplification | None = field(default=None, repr=False, compare=False)


@functools.lru_cache(maxsize=4096)
def simplified_expression(
    network: Network, rule: Simplification, spec: ConvSpec, shapes: tuple[Shape, ...]
) -> SimplifiedExpression:
    """Build (and cache) the simplified network of a routine.

    Args:
        network: The routine's plain-network builder (:mod:`kfac_tn.tn.networks`).
        rule: The routine's :class:`Simplification`.
        spec: The validated spec.
        shapes: Shapes of the routine's data arguments (as for
            :func:`~kfac_tn.tn.expressions.routine_expression`).

    Returns:
        An expression without index patterns Π (``pibar<j>`` operands ``[K_j, I_j]`` or
        ``[K_j, O_j]`` may remain for KFAC-reduce); its ``transforms`` describe the strided
        views / writes replacing them.
    """
    plain = routine_expression(network, spec, shapes)
    lhs, rhs = plain.equation.split("->")
    terms = [t.split() for t in lhs.split(",")]
    data = [(name, t) for (name, _), t in zip(plain.operands, terms) if not name.startswith("pi")]
    net = _Rewrite(spec, data, rhs.split(), _leg_sizes(plain))
    rule.rewrite(net)
    return _contracted(net, plain, rule)


def _contracted(net: _Rewrite, plain: Expression, rule: Simplification) -> SimplifiedExpression:
    """Return the rewritten network as an expression (size-1 legs squeezed, legs merged)."""
    for a, d in zip(net.legs("k"), net.spec.dims):
        net.sizes.setdefault(a, d.kernel)
    equation = f"{', '.join(' '.join(t) for t in net.terms)} -> {' '.join(net.out)}"
    equation, sizes = merge_legs(*squeeze_legs(equation, net.sizes))
    lhs, rhs = equation.split("->")
    operands = tuple(
        (name, tuple(sizes[leg] for leg in term.split()))
        for name, term in zip(net.ops, lhs.split(","))
    )
    return SimplifiedExpression(
        plain.routine,
        equation,
        operands,
        tuple(sizes[leg] for leg in rhs.split()),
        plain.result_shape,
        plain.scale,
        plain.post,
        tuple(net.transforms),
        net.spec,
        source=plain,
        rule=rule,
    )


def _leg_sizes(expr: Expression) -> dict[str, int]:
    """Size of every leg of ``expr``'s operands."""
    sizes: dict[str, int] = {}
    for (_, shape), term in zip(expr.operands, expr.equation.split("->")[0].split(",")):
        for leg, size in zip(term.split(), shape):
            sizes[leg] = size
    return sizes


def _window_text(spec: ConvSpec, ii: list[str], oo: list[str], kk: list[str]) -> str:
    """Readable description of a window view, one entry per dimension."""
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
    """Readable description of a strided write ``(o, k) -> i``."""
    return "; ".join(
        f"(o{j}, k{j}) -> i{j} = {d.stride}·o{j} + {d.dilation}·k{j} - {d.pad_left}"
        for j, d in enumerate(spec.dims)
    )


def _fold_text(spec: ConvSpec) -> str:
    """Readable description of a strided accumulation ``(o, k) -> i``."""
    return "; ".join(
        f"(o{j}, k{j}) -> i{j} = {d.stride}·o{j} + {d.dilation}·k{j} - {d.pad_left}, summed"
        for j, d in enumerate(spec.dims)
    )


def squeeze_legs(equation: str, sizes: dict[str, int]) -> tuple[str, dict[str, int]]:
    """Drop legs of size one from every term of a named equation.

    Args:
        equation: Named-index equation.
        sizes: Size of every leg (legs not listed count as size one).

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

    Args:
        equation: Named-index equation.
        sizes: Size of every leg.

    Returns:
        The equation with merged legs and the sizes of all legs (merged ones multiplied).
    """
    lhs, rhs = equation.split("->")
    terms = [t.split() for t in lhs.split(",")] + [rhs.split()]
    sizes = dict(sizes)
    while (pair := _mergeable_pair(terms)) is not None:
        a, b = pair
        merged = f"{a}·{b}"
        sizes[merged] = sizes[a] * sizes[b]
        for u in terms:
            if a in u:
                p = u.index(a)
                u[p : p + 2] = [merged]
    eq = ", ".join(" ".join(t) for t in terms[:-1]) + " -> " + " ".join(terms[-1])
    return eq, sizes


def _mergeable_pair(terms: list[list[str]]) -> tuple[str, str] | None:
    """Find the first adjacent pair of legs (in term order) that always appears together."""
    for t in terms:
        for a, b in zip(t, t[1:]):
            if _always_adjacent(terms, a, b):
                return a, b
    return None


def _always_adjacent(terms: list[list[str]], a: str, b: str) -> bool:
    """Whether every term has both ``a`` and ``b`` next to each other in that order, or neither."""
    for t in terms:
        if (a in t) != (b in t):
            return False
        if a in t and (t.index(b) != t.index(a) + 1):
            return False
    return True


def evaluate_simplified(
    expr: SimplifiedExpression, tensors: dict[str, torch.Tensor]
) -> torch.Tensor:
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
    source, rule, spec = expr.source, expr.rule, expr.spec
    ops = [_operand(name, shape, expr, tensors) for name, shape in expr.operands]
    out = rule.finish(contract(expr.equation, *ops) if rule.contracts else ops[0], source, spec)
    if expr.post == "square_sum_m_n":
        out = out.reshape(source.shape).square().sum(dim=(0, 1))
    if expr.scale != 1.0:
        out = out * expr.scale
    return out.reshape(expr.result_shape)


def _operand(
    name: str, shape: Shape, expr: SimplifiedExpression, tensors: dict[str, torch.Tensor]
) -> torch.Tensor:
    """One operand of a simplified network: ``Π̄``, or a data tensor through its transform."""
    spec = expr.spec
    ref = next(iter(tensors.values()))
    if name.startswith("pibar"):
        over, j = ("i", name[len("pibar_i") :]) if name.startswith("pibar_i") else ("o", name[5:])
        return cached_summed_index_pattern(spec.dims[int(j)], ref.dtype, ref.device, over=over)
    base = name.split("▷")[0]
    t = tensors[base].reshape(dict(expr.source.operands)[base])
    if name.endswith("▷window"):
        t = patch_view(t, spec)
    elif name.endswith("▷place"):
        t = scatter_patches(t, spec)
    elif any(tr.startswith(f"{base}: dim ") for tr in expr.transforms):
        t = _one_tap_sums(t, spec)
    return t.reshape(shape)


def _one_tap_sums(t: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Sum the one-tap dense / down-sampling dimensions of ``t: [*lead, *I]`` on strided views."""
    nd = spec.ndim
    for j, d in enumerate(spec.dims):
        if d.kernel == 1 and d.category is not DimCategory.GENERAL:
            axis = t.ndim - nd + j
            t = t.narrow(axis, 0, d.stride * (d.out_size - 1) + 1)
            t = t[(slice(None),) * axis + (slice(None, None, d.stride),)]
            t = t.sum(axis, keepdim=True)
    return t
