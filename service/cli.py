"""The ``textgen`` command: dispatches a subcommand to the module that owns it.

``textgen train``     training.cli      (fit a model, export a version)
``textgen serve``     service.server    (the gRPC server)
``textgen generate``  service.local with ``--model DIR`` (local, no server),
                      service.client with ``--target HOST:PORT`` (remote)
``textgen check``     training.check    (the contract check the server runs on load)
``textgen bench``     benchmarks.bench  (the performance harness)

Each subcommand parses its own flags; imports happen only for the one chosen
so ``textgen generate --target`` never loads TensorFlow. For the others,
TensorFlow is imported first at the ``--log-level`` the arguments ask for
(``serve``: or ``TEXTGEN_LOG_LEVEL``), with its start-up noise held back
(``training.tf_runtime``).
"""

from __future__ import annotations

import importlib
import os
import sys

from service.config import ENV_PREFIX
from training.tf_runtime import quiet_start

USAGE = """usage: textgen {train,serve,generate,check,bench} [flags]

  train      fit a character- or word-level LSTM and export the next version
  serve      serve exported versions over gRPC with continuous batching
  generate   stream text: --model DIR (local, no server) or --target HOST:PORT
  check      check version folders against the SavedModel contract, as the server does on load
  bench      measure tokens/s and latency against baselines

'textgen COMMAND --help' lists a command's flags."""

COMMANDS = {
    "train": "training.cli",
    "serve": "service.server",
    "check": "training.check",
    "bench": "benchmarks.bench",
}


def _module_for(command: str, rest: list[str]) -> str:
    if command == "generate":
        # --target means a server (whose client also takes --model NAME); --model DIR alone means local.
        remote = any(a == "--target" or a.startswith("--target=") for a in rest)
        local = not remote and any(a == "--model" or a.startswith("--model=") for a in rest)
        return "service.local" if local else "service.client"
    return COMMANDS[command]


# The subcommand modules that never import TensorFlow.
# Modules whose commands import TensorFlow themselves, if at all: ``serve`` only in the process
# that runs the model (with --frontends, the engine process).
WITHOUT_TENSORFLOW = frozenset({"service.client", "service.server"})
# The environment variable that also sets a subcommand's --log-level (flags win).
LOG_LEVEL_ENV = {"serve": ENV_PREFIX + "LOG_LEVEL"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command != "generate" and command not in COMMANDS:
        print(f"textgen: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    name = _module_for(command, rest)
    if name not in WITHOUT_TENSORFLOW:
        quiet_start(rest, os.environ, LOG_LEVEL_ENV.get(command, ""))
    module = importlib.import_module(name)
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
