"""``python -m service``: the same as ``textgen serve`` (TensorFlow imported quietly first)."""

from __future__ import annotations

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
