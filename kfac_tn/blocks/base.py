r"""Kronecker-factored curvature blocks: the base class and the layer registry.

A block approximates the curvature of one layer's parameters, viewed per channel group ``g`` as
one matrix :math:`\tilde W_g = [W_g \; b_g] \in \mathbb{R}^{d_G \times d_A}` (the bias, if any, is
the last column), by :math:`A_g \otimes G_g`.

Scale convention (written for a loss :math:`L = r \sum_n \ell_n` over ``N`` samples, with
:math:`r = 1/N` for ``cross_entropy``/``"mean"``, :math:`r = 1/(N C)` for ``mse``/``"mean"`` with
``C`` output entries per sample — torch's ``mse_loss`` averages over all entries — and :math:`r = 1`
for ``"sum"``; :math:`u_{n,o}` are the (bias-augmented) unfolded layer inputs at output position
``o`` of ``O``, :math:`\hat g_{n,o}` the gradients of the *per-sample* loss :math:`\ell_n` w.r.t.
the layer output):

* KFAC-expand: :math:`A = \frac{1}{N O} \sum_{n,o} u_{n,o} u_{n,o}^\top`,
  :math:`G = r \sum_{n,o} \hat g_{n,o} \hat g_{n,o}^\top`;
* KFAC-reduce: :math:`A = \frac{1}{N} \sum_n \bar u_n \bar u_n^\top` with
  :math:`\bar u_n = \frac{1}{O}\sum_o u_{n,o}`,
  :math:`G = r \sum_n (\sum_o \hat g_{n,o})(\sum_o \hat g_{n,o})^\top`.

Then :math:`A \otimes G` approximates the GGN / Fisher of :math:`L` itself (as used for the
gradient), so a damping value means the same for every batch size. The backpropagated gradients
are :math:`g = r \hat g`, so the empirical Fisher uses :math:`G = \frac{1}{r}\sum g g^\top`;
Monte-Carlo and type-2 backward passes produce :math:`\hat g` directly. Statistics of several
forward/backward
passes before one optimizer step (gradient accumulation) are combined as one batch (input
factors: the per-pass means weighted by their sample counts; gradient statistics: summed, ``N``
counting all samples), so accumulation over micro-batches equals one large batch.

Subclasses implement only the layer-specific parts (:meth:`KroneckerBlock._input_factor`,
:meth:`KroneckerBlock._grad_factor`, :meth:`KroneckerBlock._to_matrix`,
:meth:`KroneckerBlock._from_matrix`); the public template methods own accumulation, EMA, scaling,
damping and the inversion safeguards. Blocks hold no persistent state: factors and inverses live
in the optimizer's ``state[weight]`` dict that is passed in.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kfac_tn import linalg
from kfac_tn.blocks.ekfac import (
    EigenBasis,
    ekfac_precondition,
    kronecker_scalings,
    rotate_scalings,
    scalings,
)
from kfac_tn.enums import Inversion, KFACApprox, NormBlock, Preconditioner
from kfac_tn.faults import log_fault

logger = logging.getLogger(__name__)

__all__ = [
    "STATISTICS",
    "EigenBasis",
    "Forward",
    "KFACApprox",
    "KroneckerBlock",
    "block_class_for",
    "register_block",
    "registered_types",
]

STATISTICS: dict[str, bool] = {"G": True, "scalings": False}
"""Gradient statistics a block may queue per backward pass, and whether each is symmetric
(``[..., d, d]``: only its upper triangle travels in the distributed average): the factor
``G`` and the EKFAC ``scalings`` ``[groups, d_G, d_A]``."""


@dataclass
class Forward:
    """What one forward pass of a layer leaves for its backward statistics.

    Attributes:
        a_mean: Input statistic in mean form ``[groups, d_A, d_A]`` (a fresh tensor).
        samples: Number of samples ``N`` it covers.
        x: The (detached) layer input when the backward statistics need it (EKFAC, norm
            blocks), else ``None``.
    """

    a_mean: Tensor
    samples: int
    x: Tensor | None = None


_REGISTRY: dict[type[nn.Module], type[KroneckerBlock]] = {}


def register_block(
    *module_types: type[nn.Module],
) -> Callable[[type[KroneckerBlock]], type[KroneckerBlock]]:
    """Class decorator registering a block class for one or more module types.

    Example::

        @register_block(MyLayer)
        class MyBlock(KroneckerBlock): ...

    Args:
        *module_types: ``nn.Module`` subclasses the block handles (subclasses of them too,
            unless they are registered themselves).

    Returns:
        The decorator.
    """

    def decorator(cls: type[KroneckerBlock]) -> type[KroneckerBlock]:
        for module_type in module_types:
            _REGISTRY[module_type] = cls
        return cls

    return decorator


def block_class_for(module: nn.Module) -> type[KroneckerBlock] | None:
    """Look up the block class for ``module`` (exact type first, then its base classes)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def registered_types() -> tuple[type[nn.Module], ...]:
    """All module types with a registered block."""
    return tuple(_REGISTRY)


def _total(parts: list[Tensor]) -> Tensor:
    """Sum of the queued statistics (no copy for the usual single part)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _weighted_mean(parts: list[Tensor], counts: list[int]) -> Tensor:
    """``Σ_i n_i·A_i / Σ_i n_i`` of per-pass means ``A_i`` (no copy for the usual single part)."""
    if len(parts) == 1:
        return parts[0]
    total = sum(counts)
    if total == 0:  # only empty passes: no statistic (non-finite, so the update is skipped)
        return torch.full_like(parts[0], float("nan"))
    return torch.stack([a * (n / total) for a, n in zip(parts, counts)]).sum(0)


def _ema_(old: Tensor, new: Tensor, weight: Tensor, finite: Tensor) -> None:
    """``old ← old + weight·(new − old)`` in place, unless ``new`` is not ``finite``.

    A non-finite batch statistic is replaced by the old value (an EMA no-op), in place in the
    (fresh) batch buffer ``new``: no factor-sized temporaries. On the CPU the flag is read
    directly (no device synchronisation), which saves the select pass.
    """
    if old.device.type == "cpu":
        if bool(finite):
            old.lerp_(new, weight)
    else:
        old.lerp_(torch.where(finite, new, old, out=new), weight)


class KroneckerBlock(ABC):
    """Curvature block of one layer: factors ``A [groups, d_A, d_A]``, ``G [groups, d_G, d_G]``.

    Args:
        module: The layer.
        name: Its qualified name in the model (the distributed layer key).

    Attributes:
        module: The layer.
        name: Its qualified name.
        groups: Number of independent Kronecker blocks (channel groups).
        per_sample_budget_bytes: Bytes of per-sample tensors (gradients, unfolded inputs) one
            chunk of samples may use when the EKFAC scalings are computed.
        has_gradient_rows: Whether :meth:`gradient_rows` gives a pass gradient's outer
            products (factored gradients, :mod:`kfac_tn.linalg`).
    """

    groups: int = 1
    per_sample_budget_bytes: int = 128 * 2**20
    has_gradient_rows: bool = False

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self._a_parts: list[Tensor] = []  # per-pass means A_i
        self._a_counts: list[int] = []  # their sample counts n_i
        self._g_parts: dict[str, list[Tensor]] = {}  # gradient statistics by STATISTICS key
        self._samples = 0
        self._seen: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (x, output) shapes
        self._step_samples = 0  # samples of the last factor update (accumulated passes)

    # ------------------------------------------------------------------ layer-specific parts
    @abstractmethod
    def _input_factor(self, x: Tensor, output: Tensor, approx: KFACApprox) -> tuple[Tensor, int]:
        """Input factor of one forward pass, normalised as in the module docstring.

        Args:
            x: The layer input as passed to ``forward`` (already in the factor dtype).
            output: The layer output (only its shape may be used).
            approx: Expand or reduce.

        Returns:
            ``(A [groups, d_A, d_A], N)``: bias-augmented input factor and number of samples.
        """

    @abstractmethod
    def _grad_factor(self, g: Tensor, approx: KFACApprox, x: Tensor | None) -> Tensor:
        r"""Unnormalised output-gradient factor :math:`\sum_{n,o} g g^\top` (expand) or reduce form.

        Args:
            g: Gradient w.r.t. the layer output, same shape as the output (factor dtype).
            approx: Expand or reduce.
            x: The layer input (factor dtype) if the block keeps it (:meth:`_keeps_input`).

        Returns:
            ``[groups, d_G, d_G]``.
        """

    # ------------------------------------------------------------------ per-sample parts (EKFAC)
    def _columns(self, x: Tensor, g: Tensor) -> Tensor:
        """Unfolded, bias-augmented inputs ``[N, groups, S, d_A]`` (``g`` gives output shapes)."""
        raise NotImplementedError(f"{type(self).__name__} has no EKFAC scalings")

    def _grad_rows(self, g: Tensor) -> Tensor:
        """Output gradients as rows ``[N, groups, S, d_G]``."""
        raise NotImplementedError(f"{type(self).__name__} has no EKFAC scalings")

    def _grad_from_rows(self, rows: Tensor, like: Tensor) -> Tensor:
        """Invert :meth:`_grad_rows`: ``[N, groups, S, d_G]`` back into the layout of ``like``."""
        raise NotImplementedError(f"{type(self).__name__} has no EKFAC scalings")

    def _per_sample_grads(self, x: Tensor, g: Tensor) -> Tensor:
        """Per-sample gradients ``[N, groups, d_G, d_A]`` of the layer (bias column included)."""
        raise NotImplementedError(f"{type(self).__name__} has no EKFAC scalings")

    # ------------------------------------------------------------------ settings a block reads
    def uses_ekfac(self, preconditioner: Preconditioner | str) -> bool:
        """Whether the block rescales in its eigenbasis (:mod:`kfac_tn.blocks.ekfac`)."""
        return Preconditioner(preconditioner) is Preconditioner.EKFAC

    def inversion_for(self, inversion: Inversion | str) -> Inversion:
        """How the block's factors are inverted for the configured ``inversion``."""
        return Inversion(inversion)

    def skipped(self, norm_block: NormBlock | str) -> bool:
        """Whether the block is switched off (then its parameters get momentum SGD)."""
        return False

    def _input_positions(self, x_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> float:
        """Columns of the input factor per sample and group (default: the output positions)."""
        return self._output_positions(output_shape)

    def _output_positions(self, output_shape: tuple[int, ...]) -> float:
        """Rows of the gradient factor per sample and group: the output's entries per channel."""
        n = output_shape[0] if output_shape else 1
        return max(math.prod(output_shape) / max(n * self.groups * self.dims[1], 1), 1.0)

    def input_factor_work(self, approx: KFACApprox) -> float | None:
        """Modeled work (flops) of the input factor at the last captured shapes.

        ``None`` (default): the cost model's Gram formula applies
        (:func:`kfac_tn.optim.schedule.modeled_costs`); convolutions return the TN engine's
        own estimate of the expand path it takes.
        """
        return None

    def seen_positions(self) -> tuple[int, float, float] | None:
        """``(N, P_A, P_G)`` of the last factor update (the cost model's shapes).

        Samples of all the step's passes (so accumulated micro-batches count as one large
        batch), input-factor columns and gradient-factor rows per sample and group of the last
        captured pass (:func:`kfac_tn.optim.schedule.modeled_costs`); ``None`` before the first.
        """
        if self._seen is None:
            return None
        x_shape, output_shape = self._seen
        n = self._step_samples or (output_shape[0] if output_shape else 1)
        p_a = self._input_positions(x_shape, output_shape)
        return n, p_a, self._output_positions(output_shape)

    def gradient_rows(self, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor] | None:
        r"""Return the pass's weight-gradient matrix as outer products, if the layer has that form.

        Args:
            x: The layer input of one pass.
            g: The gradient w.r.t. its output.

        Returns:
            ``(g_rows [R, d_G], x_rows [R, d_A])`` with :math:`\sum_r g_r x_r^\top` the pass's
            ``[d_G, d_A]`` gradient matrix (one group; :mod:`kfac_tn.linalg`, factored
            gradients), or ``None``: the layer has no such form (this base class; a subclass
            with it sets :attr:`has_gradient_rows`), or it would not pay for these shapes
            (:func:`kfac_tn.linalg.factored_pays`).
        """
        return None

    def gradient_times(self, grads: list[Tensor], z: Tensor) -> Tensor:
        """Return ``M z`` for the one-group gradient matrix ``M`` of ``grads`` and ``z [d_A, k]``.

        Returns:
            ``[d_G, k]``. This base class forms ``M`` (:meth:`to_matrix`); a subclass may avoid
            the copy.
        """
        return self.to_matrix(grads)[0] @ z

    def _keeps_input(self, basis: EigenBasis | None) -> bool:
        """Whether the backward statistics need the layer input (EKFAC: with a basis)."""
        return basis is not None

    @abstractmethod
    def _to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Arrange weight-shaped (and bias-shaped) tensors as ``[groups, d_G, d_A]`` matrices."""

    @abstractmethod
    def _from_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Invert :meth:`_to_matrix`: ``[groups, d_G, d_A]`` -> (weight-like, bias-like | None)."""

    # ------------------------------------------------------------------ parameters
    @property
    def weight(self) -> Tensor:
        """The layer weight (its optimizer state holds the block's factors)."""
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        """The layer bias, or ``None``."""
        return getattr(self.module, "bias", None)

    @property
    def params(self) -> list[Tensor]:
        """Parameters preconditioned by the block: ``[weight]`` or ``[weight, bias]``."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def dims(self) -> tuple[int, int]:
        """``(d_A, d_G)``, the per-group factor sizes."""
        d_g, d_a = self._to_matrix(self.weight.detach(), self._bias_detached()).shape[-2:]
        return d_a, d_g

    def to_matrix(self, tensors: list[Tensor]) -> Tensor:
        """Arrange parameter-shaped tensors (``[weight-like]`` or ``[weight-like, bias-like]``).

        Returns:
            ``[groups, d_G, d_A]``, the layout the factors act on (``G M A``).
        """
        return self._to_matrix(tensors[0], tensors[1] if len(tensors) > 1 else None)

    def curvature_quadratic(self, state: dict, tensors: list[Tensor]) -> Tensor:
        r"""Evaluate the block's curvature as a quadratic form on parameter-shaped ``tensors``.

        :math:`\langle M, G M A\rangle` (KFAC), or :math:`\sum s \odot (Q_G^\top M Q_A)^2`
        with EKFAC scalings in ``state`` (the curvature EKFAC preconditions with), undamped.

        Args:
            state: The optimizer state of the layer weight (needs the factors).
            tensors: ``[weight-like]`` or ``[weight-like, bias-like]``.

        Returns:
            A scalar in the factor dtype.
        """
        m = self.to_matrix(tensors).to(state["A"].dtype)
        if "scalings" in state:
            q_a, q_g = (q.to(m.dtype) for q in self.eigenbasis(state))
            return (state["scalings"] * (q_g.mT @ m @ q_a).square()).sum()
        return (m * (state["G"] @ m @ state["A"])).sum()

    def _bias_detached(self) -> Tensor | None:
        return None if self.bias is None else self.bias.detach()

    def inversion_cost(self) -> float:
        """Relative cost of inverting both factors, ``groups·(d_A³ + d_G³)`` (load balancing)."""
        d_a, d_g = self.dims
        return float(self.groups * (d_a**3 + d_g**3))

    # ------------------------------------------------------------------ capture (called from hooks)
    def forward_statistic(
        self,
        x: Tensor,
        output: Tensor,
        approx: KFACApprox,
        dtype: torch.dtype,
        basis: EigenBasis | None = None,
    ) -> Forward:
        """Compute the input statistic of one forward pass (mean form), and keep what's needed.

        Returns ``A``, ``N`` and, if the backward statistics need it, the layer input.

        Args:
            x: Layer input.
            output: Layer output.
            approx: Expand or reduce.
            dtype: Factor dtype (the input is cast before any arithmetic, so bf16/fp16 activations
                give float32 factors by default).
            basis: The EKFAC eigenbasis of the coming backward statistics, if any.

        Returns:
            The :class:`Forward`; its ``a_mean`` is a fresh tensor (it may be updated in place).
        """
        self._seen = (tuple(x.shape), tuple(output.shape))
        with torch.autocast(x.device.type, enabled=False):  # factors in ``dtype``, not bf16
            a_mean, n = self._input_factor(x.detach().to(dtype), output, approx)
        return Forward(a_mean, n, x.detach() if self._keeps_input(basis) else None)

    def backward_statistics(
        self,
        forward: Forward,
        g: Tensor,
        approx: KFACApprox,
        dtype: torch.dtype,
        basis: EigenBasis | None = None,
    ) -> dict[str, Tensor]:
        r"""Unnormalised gradient statistics of one backward pass (keys of :data:`STATISTICS`).

        Args:
            forward: The layer's forward pass (:meth:`forward_statistic`).
            g: Gradient w.r.t. the layer output.
            approx: Expand or reduce.
            dtype: Factor dtype.
            basis: The EKFAC eigenbasis ``(Q_A, Q_G)``, or ``None``.

        Returns:
            ``{"G": [groups, d_G, d_G]}``, with a basis also ``"scalings"``:
            :math:`\sum_n (Q_G^\top M_n Q_A)^2` ``[groups, d_G, d_A]`` (:mod:`.ekfac`).
        """
        with torch.autocast(g.device.type, enabled=False):
            g = g.detach().to(dtype)
            x = None if forward.x is None else forward.x.to(dtype)
            out = {"G": self._grad_factor(g, approx, x)}
            if basis is not None and x is not None:
                out["scalings"] = scalings(self, x, g, basis, self.per_sample_budget_bytes)
        return out

    def add_statistics(self, a_mean: Tensor | None, n: int, stats: Mapping[str, Tensor]) -> None:
        """Queue the statistics of one forward/backward pair until the next factor update.

        Args:
            a_mean: Input statistic in mean form (``None`` if an earlier backward of the same
                forward already added it, e.g. a second Monte-Carlo sample).
            n: Number of samples it covers (0 with ``a_mean=None``).
            stats: Unnormalised gradient statistics (:meth:`backward_statistics`).

        The block takes the tensors over: the next factor update may overwrite them in place.
        """
        if a_mean is not None:
            self._a_parts.append(a_mean)
            self._a_counts.append(n)
            self._samples += n
        for key, value in stats.items():
            self._g_parts.setdefault(key, []).append(value)

    @property
    def samples(self) -> int:
        """Number of samples of the statistics queued since the last factor update."""
        return self._samples

    @property
    def has_statistics(self) -> bool:
        """Whether statistics were captured since the last factor update."""
        return bool(self._a_parts) and bool(self._g_parts.get("G"))

    def pending_statistics(self) -> list[Tensor]:
        """Return the queued statistic tensors."""
        return self._a_parts + [t for parts in self._g_parts.values() for t in parts]

    def clear_statistics(self) -> None:
        """Drop captured statistics (after a factor update, or a skipped / aborted step)."""
        self._a_parts, self._a_counts, self._g_parts, self._samples = [], [], {}, 0

    # ------------------------------------------------------------------ template: factors
    def update_factors(self, state: dict, *, decay: float, grad_scale: float) -> None:
        r"""Fold the captured statistics into the factors' exponential moving average.

        :math:`A \leftarrow \beta A + (1-\beta) A_{\text{batch}}` (likewise ``G`` and the EKFAC
        ``scalings``); the first update initialises the factors. ``grad_scale`` turns the
        captured gradient sums into ``G`` and the scalings (see the module docstring: :math:`1/r`
        for the empirical Fisher, ``r / samples`` for MC). A batch statistic with a non-finite
        entry leaves every factor unchanged and increments ``state["skipped_factor_updates"]``;
        on accelerators the check runs on the device (no host sync).

        Args:
            state: The optimizer state of the layer weight.
            decay: EMA factor ``β`` in ``[0, 1)``.
            grad_scale: Multiplier of the gradient statistics (may involve the sample count).
        """
        if not self.has_statistics:
            return
        # the batch statistics are fresh tensors (queued by the hooks): updated in place below
        a_new = _weighted_mean(self._a_parts, self._a_counts)
        grads = {key: _total(parts) for key, parts in self._g_parts.items()}
        if grad_scale != 1.0:
            grads = {key: t * grad_scale for key, t in grads.items()}
        self._step_samples = self._samples  # of all the step's passes (cost model)
        self.clear_statistics()
        # one reduction per statistic: a sum is finite iff every entry is (non-overflowing sums)
        finite = torch.isfinite(a_new.sum() + sum(t.sum() for t in grads.values()))
        g_new = grads["G"]
        if "A" not in state:
            # first update: initialise from the batch (zeros if it is not finite, flagged below)
            state["A"] = torch.where(finite, a_new, 0.0)
            state["G"] = torch.where(finite, g_new, 0.0)
            state["factors_valid"] = finite.clone()
            state["skipped_factor_updates"] = (~finite).to(torch.int64)
            return
        a_old, g_old = self._factors_in(state, a_new.dtype)
        # weight of the new batch: 1 - β, or 1 while no finite batch has been seen yet
        weight = 1.0 - decay * state["factors_valid"].to(a_old.dtype)  # device-side, no copy
        _ema_(a_old, a_new, weight, finite)
        _ema_(g_old, g_new, weight, finite)
        if "scalings" in grads and "scalings" in state:
            self._update_scalings(state, grads["scalings"], decay, finite)
        state["factors_valid"] = state["factors_valid"] | finite
        state["skipped_factor_updates"] = state["skipped_factor_updates"] + (~finite).to(
            torch.int64
        )

    @staticmethod
    def _update_scalings(state: dict, s_new: Tensor, decay: float, finite: Tensor) -> None:
        """EMA of the EKFAC scalings; a batch replaces the Kronecker-eigenvalue placeholder."""
        if state["scalings"].dtype != s_new.dtype:
            state["scalings"] = state["scalings"].to(s_new.dtype)
        valid = state["scalings_valid"]
        _ema_(state["scalings"], s_new, 1.0 - decay * valid.to(s_new.dtype), finite)
        state["scalings_valid"] = valid | finite

    @staticmethod
    def _factors_in(state: dict, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Return the factors, cast to the statistics' dtype first if it changed.

        Factors follow the factor dtype of the layer (the parameters' dtype unless
        ``factor_dtype`` is set), e.g. after ``model.to(torch.float64)``.
        """
        if state["A"].dtype != dtype:
            state["A"], state["G"] = state["A"].to(dtype), state["G"].to(dtype)
        return state["A"], state["G"]

    def reset_factors(self, state: dict) -> None:
        """Mark the factors invalid after they became non-finite: rebuilt from the next batch.

        The factors are zeroed and ``factors_valid`` cleared (so the next finite batch replaces
        them, see :meth:`update_factors`), the inverse (and EKFAC scalings) computed from them
        are dropped (so they are recomputed as soon as the factors are rebuilt), and
        ``state["invalid_factors"]`` counts the event. Until then the layer gets the plain
        gradient.
        """
        state["A"].zero_()
        state["G"].zero_()
        state["factors_valid"] = torch.zeros_like(state["factors_valid"])
        for key in ("inverse", "inverse_kind", "scalings", "scalings_valid"):
            state.pop(key, None)
        state["invalid_factors"] = state.get("invalid_factors", 0) + 1
        log_fault(
            logger,
            state["invalid_factors"],
            "Layer %s: non-finite Kronecker factors, rebuilt from the next finite batch",
            self.name,
        )

    # ------------------------------------------------------------------ template: inverses
    def update_inverses(
        self,
        state: dict,
        *,
        inversion: Inversion | str,
        damping: float,
        dtype: torch.dtype,
        preconditioner: Preconditioner | str = Preconditioner.KFAC,
        norm_block: NormBlock | str = NormBlock.UNITWISE,
        result: linalg.InverseResult | None = None,
    ) -> list[Tensor] | None:
        """Recompute the inverse representation from the current factors.

        On failure (after the float64 retry) the last good inverse is kept. Counts in ``state``:
        ``inverse_updates``, ``fallback_inversions``, ``failed_inversions``; fallbacks and
        failures are logged per layer with their count, at counts 1, 2, 4, ... (no flood).
        With EKFAC the scalings move to the new eigenbasis (:mod:`kfac_tn.blocks.ekfac`);
        without, they are dropped.

        Args:
            state: The optimizer state of the layer weight (needs ``A``/``G``).
            inversion: ``"eigen"`` or ``"cholesky"`` (see :meth:`inversion_for`).
            damping: Damping ``δ``.
            dtype: Inverse dtype.
            preconditioner: ``"kfac"`` or ``"ekfac"`` (see :meth:`uses_ekfac`).
            norm_block: The norm-block mode (read by :class:`~kfac_tn.blocks.norm.NormBlock`).
            result: The inversion of :meth:`inverse_inputs` if it was computed elsewhere
                (batched over several blocks, see :mod:`kfac_tn.optim.inverses`); ``None``
                computes it here with :func:`kfac_tn.linalg.compute_inverse`.

        Returns:
            The new inverse in its stored form (``state["inverse"]``, a list of the tensors of
            the :mod:`kfac_tn.linalg` named tuple), or ``None`` if the inversion failed or no
            factors exist yet.
        """
        if "A" not in state:
            return None
        kind = self.inversion_for(inversion)
        if result is None:
            A, G = self.inverse_inputs(state, norm_block)
            result = linalg.compute_inverse(A, G, inversion=kind, damping=damping, dtype=dtype)
        state["inverse_updates"] = state.get("inverse_updates", 0) + 1
        state["fallback_inversions"] = state.get("fallback_inversions", 0) + int(result.fallback)
        if result.fallback:
            log_fault(
                logger,
                state["fallback_inversions"],
                "Layer %s: %s; the float64 retry succeeded",
                self.name,
                result.error,
            )
        if result.tensors is None:
            state["failed_inversions"] = state.get("failed_inversions", 0) + 1
            log_fault(
                logger,
                state["failed_inversions"],
                "Layer %s: inversion failed (%s), keeping the previous inverse",
                self.name,
                result.error,
            )
            return None
        old = state.get("inverse") if state.get("inverse_kind") == Inversion.EIGEN.value else None
        state["inverse"] = list(result.tensors)  # stored form (see kfac_tn.linalg)
        state["inverse_kind"] = kind.value
        state["inverse_damping"] = float(damping)
        if self.uses_ekfac(preconditioner):
            self._refresh_scalings(state, old, result.tensors)
        else:
            state.pop("scalings", None)
            state.pop("scalings_valid", None)
        return state["inverse"]

    def inverse_inputs(
        self, state: dict, norm_block: NormBlock | str = NormBlock.UNITWISE
    ) -> tuple[Tensor, Tensor]:
        """Return the factors the inverse is computed from (norm blocks may drop off-diagonals).

        Args:
            state: The optimizer state of the layer weight (needs ``A``/``G``).
            norm_block: The norm-block mode (read by :class:`~kfac_tn.blocks.norm.NormBlock`).

        Returns:
            ``(A, G)``, ``[groups, d_A, d_A]`` and ``[groups, d_G, d_G]``.
        """
        return state["A"], state["G"]

    @staticmethod
    def _refresh_scalings(state: dict, old: list[Tensor] | None, new: linalg.EigenInverse) -> None:
        """Move the EKFAC scalings into the ``new`` basis, or start them at ``λ_G λ_Aᵀ``."""
        dtype = state["A"].dtype
        fresh = kronecker_scalings(new.evals_a, new.evals_g).to(dtype)
        if old is None or "scalings" not in state:
            state["scalings"] = fresh
            state["scalings_valid"] = torch.zeros((), dtype=torch.bool, device=fresh.device)
            return
        rotated = rotate_scalings(state["scalings"], (old[1], old[3]), (new.evecs_a, new.evecs_g))
        # no host sync: scalings never corrected by a batch restart from the new eigenvalues
        state["scalings"] = torch.where(state["scalings_valid"], rotated.to(dtype), fresh)

    def eigenbasis(self, state: dict) -> EigenBasis | None:
        """``(Q_A, Q_G)`` of the stored eigen inverse (the EKFAC capture basis), or ``None``."""
        if state.get("inverse_kind") != Inversion.EIGEN.value or "inverse" not in state:
            return None
        inverse = state["inverse"]
        return inverse[1], inverse[3]

    def prepare_receive(
        self,
        state: dict,
        *,
        inversion: Inversion | str,
        preconditioner: Preconditioner | str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Make ``state`` hold buffers shaped like an owner's :meth:`broadcast_tensors`.

        A rank that receives a broadcast inverse calls this first: missing or mismatched
        inverse tensors are allocated (zeros), EKFAC scalings too (in the factor dtype, marked
        as not yet corrected by a batch, as on the owner), and scalings are dropped without EKFAC.

        Args:
            state: The optimizer state of the layer weight.
            inversion: The configured inversion (see :meth:`inversion_for`).
            preconditioner: The configured preconditioner (see :meth:`uses_ekfac`).
            dtype: Inverse dtype.
            device: Device of the buffers.
        """
        kind = self.inversion_for(inversion)
        if "inverse" not in state or state.get("inverse_kind") != kind.value:
            d_a, d_g = self.dims
            empty = linalg.empty_inverse(kind, self.groups, d_a, d_g, dtype=dtype, device=device)
            state["inverse"] = list(empty)
            state["inverse_kind"] = kind.value
        if not self.uses_ekfac(preconditioner):
            state.pop("scalings", None)
            state.pop("scalings_valid", None)
        elif "scalings" not in state:
            factor_dtype = state["A"].dtype if "A" in state else dtype
            d_a, d_g = self.dims
            state["scalings"] = torch.zeros(
                self.groups, d_g, d_a, dtype=factor_dtype, device=device
            )
            state["scalings_valid"] = torch.zeros((), dtype=torch.bool, device=device)

    @staticmethod
    def broadcast_tensors(state: dict) -> list[Tensor]:
        """Return what an owner sends after an inverse update: the inverse (and EKFAC scalings)."""
        return state["inverse"] + ([state["scalings"]] if "scalings" in state else [])

    def has_inverse(self, state: dict) -> bool:
        """Whether ``state`` holds a usable inverse."""
        return "inverse" in state

    # ------------------------------------------------------------------ template: preconditioning
    def precondition(
        self,
        state: dict,
        grads: list[Tensor],
        *,
        damping: float,
        rows: tuple[Tensor, Tensor] | None = None,
    ) -> list[Tensor]:
        r"""Precondition the layer's gradients with the damped inverse Kronecker block.

        With EKFAC scalings in ``state`` the step is
        :math:`Q_G [(Q_G^\top M Q_A) \oslash (s + \delta)] Q_A^\top` (:mod:`.ekfac`).

        Args:
            state: The optimizer state of the layer weight (needs an inverse).
            grads: Gradients ``[grad_weight]`` or ``[grad_weight, grad_bias]``.
            damping: Damping ``δ`` (``"eigen"`` uses it here; ``"cholesky"`` baked in the damping
                of its last inverse update).
            rows: ``(g_rows [R, d_G], x_rows [R, d_A])`` whose outer products sum to the gradient
                matrix (checked by the caller, :func:`kfac_tn.linalg.factored_matches`), or
                ``None``. Used with a Cholesky inverse (:meth:`takes_rows`).

        Returns:
            Preconditioned tensors, shaped like ``grads``.
        """
        bias = grads[1] if len(grads) > 1 else None
        if rows is not None and self.takes_rows(state):
            inverse = linalg.inverse_from_tensors(state["inverse"], state["inverse_kind"])
            out = linalg.factored_precondition(*rows, inverse).to(grads[0].dtype)
            weight, bias_out = self._from_matrix(out)
            return [weight] if bias_out is None else [weight, bias_out]
        matrix = self._to_matrix(grads[0], bias)
        if "scalings" in state:
            basis = self.eigenbasis(state)
            out = ekfac_precondition(matrix, basis, state["scalings"], damping=damping)
        else:
            inverse = linalg.inverse_from_tensors(state["inverse"], state["inverse_kind"])
            out = linalg.precondition(matrix, inverse, damping=damping)
        weight, bias_out = self._from_matrix(out)
        return [weight] if bias_out is None else [weight, bias_out]

    def takes_rows(self, state: dict) -> bool:
        """Whether :meth:`precondition` can use factored gradient rows with this state.

        A block with :meth:`gradient_rows` and a one-group Cholesky inverse (the eigen and EKFAC
        forms divide element-wise in the eigenbasis, which does not keep the sum of outer
        products).
        """
        return (
            self.has_gradient_rows
            and self.groups == 1
            and state.get("inverse_kind") == Inversion.CHOLESKY.value
            and "scalings" not in state
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, groups={self.groups})"
