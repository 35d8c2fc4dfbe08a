"""Deprecated alias of :mod:`kfac_tn.training.cli`, kept for one release.

``python -m kfac_tn`` and the ``kfac-tn`` console script use the new module directly.
"""

import sys
import warnings

from kfac_tn.training import cli as _module

if __name__ == "__main__":  # ``python -m kfac_tn.cli``, as before
    _module.console_main()
warnings.warn(
    "kfac_tn.cli moved to kfac_tn.training.cli (old path removed next release)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _module
