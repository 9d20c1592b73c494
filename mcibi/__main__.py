"""``python -m mcibi`` = the ``mcibi`` console script."""

import sys

from mcibi.cli import main

sys.exit(main())
