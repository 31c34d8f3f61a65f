"""``python -m pyrossm ...``: the same as the ``pyrossm`` console script."""

import sys

from pyrossm.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
