"""Deprecated alias of :mod:`kfac_tn.training.models`, kept for one release."""

import sys
import warnings

from kfac_tn.training import models as _module

warnings.warn(
    "kfac_tn.models moved to kfac_tn.training.models (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
