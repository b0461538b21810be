"""``python -m splitlab ...``: the same as the ``splitlab`` command (where it is not on PATH)."""

import sys

from splitlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
