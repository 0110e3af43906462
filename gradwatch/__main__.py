"""``python -m gradwatch``: the same command as ``gradwatch``."""

import sys

from gradwatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
