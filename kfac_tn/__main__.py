"""``python -m kfac_tn`` = the ``kfac-tn`` command."""

from kfac_tn.cli import console_main

console_main()
