"""kfac_tn: KFAC for convolutional networks with a tensor-network curvature engine."""

__version__ = "0.1.0"
