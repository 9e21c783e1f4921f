"""``python -m sgkernels``: the command line (see :mod:`sgkernels.cli`)."""
import sys

from .cli import main

sys.exit(main())
