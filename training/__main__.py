"""``python -m training``: the same job as ``textgen train`` (TensorFlow started quietly first)."""

import sys

from training.tf_runtime import quiet_start


def _main() -> int:
    quiet_start(sys.argv[1:])
    from training.cli import main

    return main()


sys.exit(_main())
