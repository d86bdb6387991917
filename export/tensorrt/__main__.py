"""`python -m export.tensorrt`: the CLI of `export.tensorrt.cli`."""

import sys

from .cli import main

sys.exit(main())
