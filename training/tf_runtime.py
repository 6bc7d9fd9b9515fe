"""How a ``textgen`` command starts TensorFlow: the ``--log-level`` flag and a quiet start.

TensorFlow writes some lines to file descriptor 2 whatever ``TF_CPP_MIN_LOG_LEVEL``
says: while its libraries load (absl's "before absl::InitializeLog()" notice, oneDNN
and CPU-feature notes), when it looks for a GPU ("failed call to cuInit" on a machine
without one) and once at the first graph that holds a non-float oneDNN op ("oneDNN
supports DT_BOOL only on platforms with AVX-512"). ``quiet_start`` therefore points fd 2
at a pipe read by a small filter process before TensorFlow is imported. The filter
copies every line to the real stderr except, unless the level is debug, TensorFlow's
C++ log lines below the level and the known start-up notices (``is_startup_noise``).
Lines it drops before TensorFlow has imported and listed its devices are held: if the
import fails, or the process dies first, they are written after all, so a broken install
still shows its own error. Being a process of its own, the filter also passes on what a
crashing process wrote last.

Levels: ``debug`` shows everything; at ``info`` (the default) the command's own INFO
lines show, TensorFlow's C++ log from WARNING up, its Python and absl loggers from
WARNING up; ``warning`` and ``error`` raise all of these to that level.

This module imports only the standard library, so the ``textgen`` dispatcher can use it
before choosing a subcommand (``textgen generate --target`` never imports TensorFlow).
Run as a script, it is the filter process.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
LOG_LEVEL_FLAG = "--log-level"

# TF_CPP_MIN_LOG_LEVEL: 0 all, 1 from WARNING, 2 from ERROR, 3 FATAL only.
_TF_CPP_MIN_LOG_LEVEL = {"debug": 0, "info": 1, "warning": 1, "error": 2}

# A line of TensorFlow's C++ log: severity, MMDD, time (seconds since the epoch before absl's
# logging is initialised), thread, file:line] message.
_CPP_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] (.*)$")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}

# What TensorFlow prints on a machine without a GPU (or CUDA libraries), and oneDNN's notes:
# notices, not faults, some of them logged as errors. Matched in a C++ log line's message.
_NOTICES = re.compile(
    "|".join(
        (
            r"failed call to cuInit",
            r"Could not find cuda drivers",
            r"Could not load dynamic library",
            r"Cannot dlopen some GPU libraries",
            r"oneDNN custom operations are on",
            r"oneDNN supports DT_\w+ only on platforms with AVX-512",
            r"This TensorFlow binary is optimized to use available CPU instructions",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"computation placer already registered",
            r"TF-TRT Warning: Could not find TensorRT",
        )
    )
)
# Notices outside the C++ log format: absl's, and the second line of the CPU-feature note.
_PLAIN_NOTICES = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"
)
_PLAIN_NOTICE_STARTS = ("WARNING: All log messages", "To enable the following")

# Written by the command to the filter (never shown): TensorFlow has started, drop what was held.
_STARTED = b"\x00textgen: TensorFlow started\n"


def add_log_level_flag(parser: argparse.ArgumentParser) -> None:
    """``--log-level {debug,info,warning,error}`` (default info; any case) on ``parser``."""
    parser.add_argument(
        LOG_LEVEL_FLAG,
        type=str.lower,
        choices=LOG_LEVELS,
        default=DEFAULT_LOG_LEVEL,
        help="debug shows TensorFlow's start-up notices and all its C++ log; info (default) shows "
        "TensorFlow's log from WARNING up; warning and error show less",
    )


def log_level_from_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None, env_var: str = "") -> str:
    """The level ``argv`` asks for (its last ``--log-level``), else ``environ[env_var]``, else the default.

    A value that is not a level gives the default here; the command's own parser rejects it.
    """
    value = environ.get(env_var, "") if environ is not None and env_var else ""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == LOG_LEVEL_FLAG and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(LOG_LEVEL_FLAG + "="):
            value = arg.split("=", 1)[1]
    value = value.lower()
    return value if value in LOG_LEVELS else DEFAULT_LOG_LEVEL


def is_startup_noise(line: str, level: str) -> bool:
    """True for a line of TensorFlow's that ``level`` does not show: a known notice, or C++ log below the level."""
    if level == "debug":
        return False
    if _PLAIN_NOTICES.match(line):
        return True
    match = _CPP_LINE.match(line)
    if match is None:
        return False
    return _SEVERITY[match.group(1)] < _TF_CPP_MIN_LOG_LEVEL[level] or bool(_NOTICES.search(match.group(2)))


def _could_become_noise(partial: str) -> bool:
    """Whether the start of a line, still without its newline, may turn out to be noise."""
    if re.match(r"[IWEF](\d|$)", partial):
        return True
    return any(s.startswith(partial) or partial.startswith(s) for s in _PLAIN_NOTICE_STARTS)


class NoiseFilter:
    """What the filter process does, without the process: bytes in, the bytes to show out.

    Lines dropped before ``started`` are held, and ``end`` returns them with whatever is left.
    """

    def __init__(self, level: str) -> None:
        self.level = level
        self._pending = b""
        self._held: list[bytes] | None = []

    def feed(self, data: bytes) -> bytes:
        """The complete lines of ``data`` (after what came before) that ``level`` shows."""
        *lines, self._pending = (self._pending + data).split(b"\n")
        shown = []
        for raw in lines:
            line = raw + b"\n"
            if line == _STARTED:
                self._held = None
            elif is_startup_noise(raw.decode("utf-8", errors="replace").rstrip("\r"), self.level):
                if self._held is not None:
                    self._held.append(line)
            else:
                shown.append(line)
        if self._pending and not _could_become_noise(self._pending.decode("utf-8", errors="replace")):
            shown.append(self._pending)  # a prompt or progress text without a newline yet: show it now
            self._pending = b""
        return b"".join(shown)

    def end(self) -> bytes:
        """At the end of the input: the unfinished last line and, if TensorFlow never started, the held lines."""
        rest = self._pending + b"".join(self._held or ())
        self._pending, self._held = b"", None
        return rest


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:  # the real stderr is gone; keep reading so the command never blocks
            return


def _run_filter(level: str) -> None:
    """The filter process: stdin (the command's fd 2) to stdout (the real stderr) until stdin ends."""
    noise = NoiseFilter(level)
    while chunk := os.read(0, 65536):
        _write_all(1, noise.feed(chunk))
    _write_all(1, noise.end())


class _FilterProcess:
    """The running filter and the real stderr it writes to; fd 2 of this process is the pipe to it."""

    def __init__(self, level: str) -> None:
        self.real_stderr = os.dup(2)
        read, write = os.pipe()
        try:
            # -I -S: the standard library only, whatever the working folder or PYTHONPATH.
            # A session of its own: Ctrl-C stops the command, and the filter then shows its last lines.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), level],
                stdin=read,
                stdout=self.real_stderr,
                stderr=self.real_stderr,
                start_new_session=True,
            )
        except BaseException:
            os.close(write)
            os.close(self.real_stderr)
            raise
        finally:
            os.close(read)
        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        atexit.register(self.stop)

    def started(self) -> None:
        sys.stderr.flush()
        os.write(2, _STARTED)

    def stop(self, timeout: float = 2.0) -> None:
        """Give fd 2 back to the real stderr; the filter reads to the end of the pipe, writes and exits."""
        if self.real_stderr < 0:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real_stderr, 2)
        os.close(self.real_stderr)
        self.real_stderr = -1
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # a child process still holds the pipe: the filter ends with it
            pass


def set_log_levels(level: str) -> None:
    """Python's root logger at ``level``; TensorFlow's and absl's Python loggers at least WARNING unless debug."""
    python_level = getattr(logging, level.upper())
    library_level = python_level if level == "debug" else max(python_level, logging.WARNING)
    logging.getLogger().setLevel(python_level)
    logging.getLogger("tensorflow").setLevel(library_level)
    logging.getLogger("absl").setLevel(library_level)
    if "absl.logging" in sys.modules:  # absl counts its own levels: pass the name, not Python's number
        sys.modules["absl.logging"].set_verbosity(logging.getLevelName(library_level).lower())


def import_tensorflow_quietly(level: str = DEFAULT_LOG_LEVEL) -> ModuleType:
    """For a command's process: start the stderr filter, import TensorFlow and list its devices at ``level``.

    Sets ``TF_CPP_MIN_LOG_LEVEL`` from the level first (debug: 0, info and warning: 1, error: 2);
    at debug no filter runs. Once TensorFlow is imported, only the Python log levels are set again.
    The filter serves the whole process: call this from a command's entry point, not from a library.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL_FLAG} must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(_TF_CPP_MIN_LOG_LEVEL[level])
        noise_filter = None
        if level != "debug":
            try:
                noise_filter = _FilterProcess(level)
            except OSError:  # no stderr, or no process to spare: TensorFlow's lines stay
                noise_filter = None
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # loads the GPU platform: "failed call to cuInit" and the like
        except BaseException:
            if noise_filter is not None:
                noise_filter.stop()  # it writes everything it held back
            raise
        if noise_filter is not None:
            noise_filter.started()
    set_log_levels(level)
    return sys.modules["tensorflow"]


def quiet_start(argv: Sequence[str], environ: Mapping[str, str] | None = None, env_var: str = "") -> None:
    """A command's entry point, before it loads TensorFlow: ``import_tensorflow_quietly`` at the level ``argv`` asks."""
    import_tensorflow_quietly(log_level_from_argv(argv, environ, env_var))


if __name__ == "__main__":
    _run_filter(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_LOG_LEVEL)
