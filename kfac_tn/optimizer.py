"""Old location of :class:`kfac_tn.KFAC` (now :mod:`kfac_tn.optim.optimizer`), kept a release."""

from kfac_tn.enums import DistributedStrategy
from kfac_tn.optim.optimizer import KFAC

__all__ = ["KFAC", "DistributedStrategy"]
