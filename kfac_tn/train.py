"""Deprecated alias of :mod:`kfac_tn.training.train`, kept for one release."""

import sys
import warnings

from kfac_tn.training import train as _module

warnings.warn(
    "kfac_tn.train moved to kfac_tn.training.train (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
