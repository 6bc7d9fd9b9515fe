"""The /proc tree sum on a real tree: a child that starts a busy grandchild, then reaps it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.proc_cpu import read_stat, tree_cpu_seconds, tree_pids

BUSY_SECONDS = 0.5
# Burns BUSY_SECONDS of its own CPU, then exits.
GRANDCHILD = f"import time\nwhile time.process_time() < {BUSY_SECONDS}:\n    pass\n"
# Starts the grandchild, says its pid, reaps it when told to, then exits when told to; idle otherwise.
CHILD = (
    "import subprocess, sys\n"
    f"g = subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}])\n"
    "print(g.pid, flush=True)\n"
    "sys.stdin.readline()\n"
    "g.wait()\n"
    "print('reaped', flush=True)\n"
    "sys.stdin.readline()\n"
)


def _own_seconds(pid: int) -> float:
    stat = read_stat(pid)
    assert stat is not None
    return (stat.utime + stat.stime) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(120)
def test_tree_sum_counts_a_busy_grandchild_alive_and_after_it_is_reaped() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        grandchild = int(child.stdout.readline())
        assert tree_pids(child.pid) == [child.pid, grandchild]
        assert tree_pids(os.getpid())[0] == os.getpid()
        assert {child.pid, grandchild} <= set(tree_pids(os.getpid()))

        # While it runs (or waits unreaped), its own time is in the sum.
        deadline = time.monotonic() + 60.0
        while _own_seconds(grandchild) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _own_seconds(grandchild) >= 0.3
        during = tree_cpu_seconds(child.pid)
        assert during is not None and during >= _own_seconds(child.pid) + 0.3

        # Reaped, it has left the tree and its time is in the child's cutime: the sum keeps it.
        child.stdin.write("reap\n")
        assert child.stdout.readline().strip() == "reaped"
        assert tree_pids(child.pid) == [child.pid]
        after = tree_cpu_seconds(child.pid)
        assert after is not None and after >= during
        assert after - _own_seconds(child.pid) >= BUSY_SECONDS - 0.1
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert tree_cpu_seconds(child.pid) is None
    assert tree_pids(child.pid) == []
