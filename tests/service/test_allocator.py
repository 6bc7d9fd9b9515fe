"""The allocator setting: a fixed mmap threshold hands freed large blocks back to the OS; bad values are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.allocator import set_mmap_threshold, uses_glibc
from service.config import ConfigError, parse_config

# Frees one 8 MiB block (glibc then raises its dynamic threshold above 4 MiB), then
# allocates 32 blocks of 4 MiB with a smaller block after each, frees the large ones
# and prints how much of the 128 MiB is still resident.
PROBE = """
import ctypes, os, sys
from service.allocator import set_mmap_threshold
if sys.argv[1] == "fixed":
    assert set_mmap_threshold(131072, {})
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
first = libc.malloc(8 << 20)
ctypes.memset(first, 1, 8 << 20)
libc.free(first)
before = rss()
blocks, pins = [], []
for _ in range(32):
    block = libc.malloc(4 << 20)
    ctypes.memset(block, 1, 4 << 20)
    blocks.append(block)
    pins.append(libc.malloc(200_000))
for block in blocks:
    libc.free(block)
print(rss() - before)
"""


def _retained_after_free(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(not uses_glibc(), reason="mallopt's mmap threshold is a glibc setting")
def test_fixed_threshold_returns_freed_large_blocks_to_the_os() -> None:
    mib = 1 << 20
    # glibc's own behaviour (the control: this is what the setting exists to change)
    assert _retained_after_free("dynamic") > 64 * mib
    assert _retained_after_free("fixed") < 8 * mib


def test_zero_or_the_glibc_variable_leave_the_allocator_alone_and_bad_values_are_refused() -> None:
    assert set_mmap_threshold(0, {}) is False
    # The operator's own glibc variable wins (glibc applied it at start-up).
    assert set_mmap_threshold(131072, {"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
    with pytest.raises(ValueError, match=r"mmap threshold must be 0 \(off\) or in \[4096, 33554432\] bytes, got 100"):
        set_mmap_threshold(100, {})
    with pytest.raises(ConfigError, match=r"--malloc-mmap-threshold must be 0 \(off\) or in .* got 67108864"):
        parse_config(["--malloc-mmap-threshold", str(64 << 20)], {})
    assert parse_config([], {"TEXTGEN_MALLOC_MMAP_THRESHOLD": "0"}).malloc_mmap_threshold == 0
    assert parse_config([], {}).malloc_mmap_threshold == 1048576
