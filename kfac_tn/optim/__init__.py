"""The optimizer wing: hyperparameters, layer discovery, statistics capture, placement, step.

Data flow of one step (see ``docs/architecture.md``): :mod:`.hooks` capture layer inputs and
output gradients -> :mod:`.statistics` turns them into block statistics -> the blocks
(:mod:`kfac_tn.blocks`, with the TN engine :mod:`kfac_tn.tn`) fold them into Kronecker factors ->
:mod:`.placement` inverts (:mod:`kfac_tn.linalg`) and preconditions, locally or across workers ->
:class:`~kfac_tn.optim.optimizer.KFAC` clips and applies the update.
"""

from kfac_tn.optim.optimizer import KFAC

__all__ = ["KFAC"]
