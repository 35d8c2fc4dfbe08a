"""kfac_tn: KFAC for convolutional networks with a tensor-network curvature engine."""

from kfac_tn.optim import KFAC

__version__ = "0.1.0"

__all__ = ["KFAC", "__version__"]
