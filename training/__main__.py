"""``python -m training``: the same job as ``textgen train``."""

import sys

from training.cli import main

sys.exit(main())
