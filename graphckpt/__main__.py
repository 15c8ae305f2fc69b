"""``python -m graphckpt``: the command-line interface (see graphckpt/cli.py)."""

import sys

from graphckpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
