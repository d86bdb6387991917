"""`python -m engine.serve`: the HTTP service (`engine.serve.app.main`)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
