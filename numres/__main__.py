"""``python -m numres`` runs the command line (see :mod:`numres.cli`)."""

import sys

from .cli import main

sys.exit(main())
