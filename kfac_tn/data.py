"""Deprecated alias of :mod:`kfac_tn.training.data`, kept for one release."""

import sys
import warnings

from kfac_tn.training import data as _module

warnings.warn(
    "kfac_tn.data moved to kfac_tn.training.data (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
