"""Deprecated alias of :mod:`kfac_tn.training.config`, kept for one release."""

import sys
import warnings

from kfac_tn.training import config as _module

warnings.warn(
    "kfac_tn.config moved to kfac_tn.training.config (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
