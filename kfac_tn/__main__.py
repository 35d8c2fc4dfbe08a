"""``python -m kfac_tn`` = the ``kfac-tn`` command."""

from kfac_tn.training.cli import console_main

console_main()
