"""Deprecated alias of :mod:`kfac_tn.training.checkpoint`, kept for one release."""

import sys
import warnings

from kfac_tn.training import checkpoint as _module

warnings.warn(
    "kfac_tn.checkpoint moved to kfac_tn.training.checkpoint (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
