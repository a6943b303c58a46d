"""`python -m mqbroker`: the same command line as the `mqbroker` script."""

import sys

from mqbroker.cli import main

if __name__ == "__main__":
    sys.exit(main())
