"""`python -m reference.train ...`: see `reference/train/cli.py`."""

import sys

from .cli import main

sys.exit(main())
