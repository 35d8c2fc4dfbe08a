"""``python -m kfac_tn`` = the ``kfac-tn`` command."""

import sys

from kfac_tn.cli import main

sys.exit(main())
