"""Threads whose name the OS sees too: ``top -H``, ``ps -L`` and ``/proc/<pid>/task/<tid>/comm`` show it.

Python names a thread only for itself; every thread it starts is ``python`` to the OS, like the
threads TensorFlow starts to run a model. ``NamedThread`` gives its OS thread the first 15 bytes of
its Python name (Linux's limit) as it starts, so an operator can tell the engine thread from the
model's and ``benchmarks/threads.py`` can split a server's CPU by thread. Elsewhere than Linux, and
when ``prctl`` fails, it is a plain ``threading.Thread``.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

PR_SET_NAME = 15  # prctl's option that names the calling thread (linux/prctl.h)
OS_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one the terminating NUL


def os_thread_name(name: str) -> bytes:
    """The bytes the OS keeps of ``name``: UTF-8, cut to ``OS_NAME_BYTES`` without splitting a character."""
    return name.encode()[:OS_NAME_BYTES].decode(errors="ignore").encode()


def name_os_thread(name: str) -> None:
    """Give the calling OS thread ``name`` (cut to what the OS keeps); does nothing off Linux or on failure."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(os_thread_name(name)), 0, 0, 0)


class NamedThread(threading.Thread):
    """A ``threading.Thread`` that names its OS thread after its own ``name`` when it starts."""

    def run(self) -> None:
        name_os_thread(self.name)
        super().run()
