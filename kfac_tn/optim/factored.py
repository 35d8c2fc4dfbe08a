r"""Factored gradients: which blocks may be preconditioned from their captured outer products.

A dense layer's batch gradient is :math:`M = \sum_r g_r x_r^\top` over its ``R`` input rows. With
fewer rows than features, preconditioning it in that form is cheaper than the dense product
(:mod:`kfac_tn.linalg`, factored gradients): on 3c3d's 1153x512 dense layer at batch 128, 7.9
against 24 ms per step on one CPU thread. The statistics collector keeps the rows
(:meth:`~kfac_tn.optim.statistics.StatisticsCollector.take_gradient_rows`); this module decides,
per step and block, whether the gradient the optimizer is given still *is* their sum. It is not
when you changed it after ``backward()`` (clipping, an extra loss term whose backward skipped the
hooks, gradients written by hand) or accumulated passes the hooks did not see; then the block
takes the dense path, with the same result up to rounding either way.

The test (:func:`kfac_tn.linalg.factored_matches`) compares ``M z`` with the rows' product along
two fixed probe vectors: a few matrix-vector products, no host synchronisation of its own (the
optimizer reads it with its finiteness check, one sync per step).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from kfac_tn import linalg
from kfac_tn.blocks import KroneckerBlock

__all__ = ["FactoredCheck", "Rows"]

Rows = tuple[Tensor, Tensor]
"""``(g_rows [R, d_G], x_rows [R, d_A])`` of one block."""

_PROBE_SEED = 0


class FactoredCheck:
    """Decides which blocks' gradients are their captured rows' sums (module docstring).

    The probe vectors are fixed (a seeded generator, not the global one): the same on every
    run and device, created once per size, dtype and device.
    """

    def __init__(self) -> None:
        self._probes: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def checks(
        self,
        blocks: list[KroneckerBlock],
        rows: Mapping[int, Rows],
        state: Mapping[Tensor, dict],
    ) -> list[tuple[KroneckerBlock, Tensor]]:
        """Return ``(block, matches)`` for the blocks that could take the factored path.

        Args:
            blocks: The step's blocks.
            rows: ``{id(block): rows}`` captured since the last step.
            state: The optimizer state (the block needs a one-group Cholesky inverse,
                :meth:`KroneckerBlock.takes_rows`).

        Returns:
            One 0-dim bool tensor per candidate (not yet read: no host sync here).
        """
        out = []
        for block in blocks:
            block_rows = rows.get(id(block))
            layer_state = state.get(block.weight)
            if block_rows is None or layer_state is None or not block.takes_rows(layer_state):
                continue
            g_rows, x_rows = block_rows
            weight_grad = block.weight.grad
            probes = self._probe(x_rows.shape[1], weight_grad.dtype, weight_grad.device)
            product = block.gradient_times([p.grad for p in block.params], probes)  # [d_G, k]
            out.append((block, linalg.factored_matches(product, g_rows, x_rows, probes)))
        return out

    def _probe(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (size, dtype, device)
        if key not in self._probes:
            generator = torch.Generator().manual_seed(_PROBE_SEED)
            z = torch.randn(size, linalg.FACTORED_PROBES, generator=generator, dtype=torch.float64)
            self._probes[key] = z.to(device=device, dtype=dtype)
        return self._probes[key]
