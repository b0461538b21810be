"""``python -m splitlab.serve ...``: the same as ``splitlab serve ...``."""

import sys

from splitlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
