"""Tunes the C allocator (glibc's malloc) so that memory freed after a large batch goes back to the OS.

TensorFlow allocates each step's tensors with ``malloc``. A batch of 1000 rows of a
512-unit LSTM makes several 8 MB buffers per step. glibc serves a block above its
mmap threshold (128 KiB at start) with its own ``mmap`` and unmaps it on ``free``,
but every such free also *raises* the threshold to that block's size (glibc's
"dynamic mmap threshold"). From then on the 8 MB buffers come from the heap
arenas, which keep freed memory mapped, and a server that once ran a large batch
keeps that memory in its RSS, fragmented across one arena per thread.

Setting ``M_MMAP_THRESHOLD`` with ``mallopt`` fixes the threshold (it turns the
dynamic adjustment off): blocks above it are always mapped and unmapped, so
the server's RSS follows its live batch. Each mapping is page-faulted afresh, so
the threshold (1 MiB by default) sits above the buffers of the batches that run
most: a decode call's buffers at 64 rows of a 512-unit model are under 1 MiB
(benchmarks/README.md has the measurements).
``MALLOC_MMAP_THRESHOLD_`` in the environment does the same for any process; when an
operator has set it, glibc has applied it at start-up and this module leaves it alone.
"""

from __future__ import annotations

import ctypes
import logging
import platform
from collections.abc import Mapping

log = logging.getLogger(__name__)

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
# glibc refuses thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
MIN_MMAP_THRESHOLD = 4096
# glibc's own environment variable for the same setting (read once, when the process starts).
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"


def uses_glibc() -> bool:
    """True when this Python runs on glibc, the only C library whose ``mallopt`` this module knows."""
    return platform.libc_ver()[0] == "glibc"


def set_mmap_threshold(threshold: int, environ: Mapping[str, str]) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False (and nothing changed) where that is not possible.

    ``threshold`` 0 leaves the allocator alone, and so does ``MALLOC_MMAP_THRESHOLD_`` in
    ``environ`` (the operator's own setting, which glibc read at start-up). Values outside
    ``[MIN_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD]`` raise ``ValueError``.
    """
    if threshold == 0:
        return False
    if environ.get(ENV_OVERRIDE):
        log.info("%s=%s is set: glibc's mmap threshold is left as that", ENV_OVERRIDE, environ[ENV_OVERRIDE])
        return False
    if not MIN_MMAP_THRESHOLD <= threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"mmap threshold must be 0 (off) or in [{MIN_MMAP_THRESHOLD}, {MAX_MMAP_THRESHOLD}] bytes, got {threshold}"
        )
    if not uses_glibc():
        log.info("not on glibc (%s): the allocator is left as it is", platform.libc_ver()[0] or "unknown libc")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, glibc's among them
    except (OSError, AttributeError) as exc:
        log.warning("mallopt is not available (%s): the allocator is left as it is", exc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not mallopt(M_MMAP_THRESHOLD, threshold):
        log.warning("glibc refused an mmap threshold of %d bytes: the allocator is left as it is", threshold)
        return False
    return True
