"""Deprecated alias of :mod:`kfac_tn.training.plots`, kept for one release."""

import sys
import warnings

from kfac_tn.training import plots as _module

warnings.warn(
    "kfac_tn.plots moved to kfac_tn.training.plots (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
