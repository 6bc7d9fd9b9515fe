"""``python -m service``: the same as ``textgen serve``."""

from __future__ import annotations

import sys

from service.server import main

if __name__ == "__main__":
    sys.exit(main())
