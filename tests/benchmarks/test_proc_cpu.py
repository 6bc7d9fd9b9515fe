"""The /proc tree sum on a real tree (a child that starts a busy grandchild, then reaps it) and its split by role."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.proc_cpu import (
    ROLES,
    find_engine,
    process_role,
    read_cmdline,
    read_stat,
    tree_cpu_seconds,
    tree_cpu_seconds_by_role,
    tree_pids,
)

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


# A server's shape: a root that starts, with multiprocessing's spawn method, an engine that imports
# TensorFlow and a frontend that burns BUSY_SECONDS (and so the resource tracker, for the lock), plus
# a plain subprocess like the stderr filter. It prints the pids once the engine has TensorFlow and the
# frontend is done burning, then waits for a line on stdin.
SERVER_SHAPE = f"""
import json, multiprocessing, subprocess, sys, time

def engine(ready):
    import tensorflow
    ready.set()
    time.sleep(600)

def frontend(ready):
    while time.process_time() < {BUSY_SECONDS}:
        pass
    ready.set()
    time.sleep(600)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    engine_ready, frontend_ready = ctx.Event(), ctx.Event()
    children = [ctx.Process(target=engine, args=(engine_ready,)), ctx.Process(target=frontend, args=(frontend_ready,))]
    for child in children:
        child.start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    assert engine_ready.wait(300) and frontend_ready.wait(300)
    print(json.dumps({{"engine": children[0].pid, "frontend": children[1].pid, "filter": sleeper.pid}}), flush=True)
    sys.stdin.readline()
    for child in children:
        child.kill()
        child.join()
    sleeper.kill()
    sleeper.wait()
"""

SPAWN_CMDLINE = ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()", "--multiprocessing-fork"]
TRACKER_CMDLINE = ["python", "-B", "-c", "from multiprocessing.resource_tracker import main;main(3)"]


def test_process_role_names_the_engine_the_roots_spawned_children_and_the_rest() -> None:
    assert process_role(20, 10, SPAWN_CMDLINE, root=10, engine=20) == "engine"
    assert process_role(21, 10, SPAWN_CMDLINE, root=10, engine=20) == "frontends"
    assert process_role(10, 1, ["python", "-m", "service"], root=10, engine=20) == "other"  # the supervisor
    assert process_role(22, 10, TRACKER_CMDLINE, root=10, engine=20) == "other"
    assert process_role(23, 10, ["python", "-c", "filter"], root=10, engine=20) == "other"
    assert process_role(24, 21, SPAWN_CMDLINE, root=10, engine=20) == "other"  # not the root's child
    # One process: the root is the engine; its stderr filter is the rest.
    assert process_role(10, 1, ["python", "-m", "service"], root=10, engine=10) == "engine"
    assert process_role(23, 10, ["python", "-c", "filter"], root=10, engine=10) == "other"


@pytest.mark.timeout(300)
def test_split_by_role_on_a_real_engine_frontend_tracker_and_filter(tmp_path: Path) -> None:
    script = tmp_path / "server_shape.py"  # spawn children re-import the main module: it must be a file
    script.write_text(SERVER_SHAPE)
    root = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert root.stdin is not None and root.stdout is not None
    try:
        pids = json.loads(root.stdout.readline())
        assert find_engine(root.pid) == pids["engine"]
        tracker = [p for p in tree_pids(root.pid) if any("resource_tracker" in a for a in read_cmdline(p))]
        assert len(tracker) == 1
        roles = {}
        for pid in tree_pids(root.pid):
            stat = read_stat(pid)
            assert stat is not None
            roles[pid] = process_role(pid, stat.ppid, read_cmdline(pid), root.pid, pids["engine"])
        assert roles == {
            root.pid: "other",
            pids["engine"]: "engine",
            pids["frontend"]: "frontends",
            tracker[0]: "other",
            pids["filter"]: "other",
        }

        by_role = tree_cpu_seconds_by_role(root.pid, pids["engine"])
        total = tree_cpu_seconds(root.pid)
        assert by_role is not None and total is not None and tuple(by_role) == ROLES
        assert by_role["frontends"] >= BUSY_SECONDS - 0.05
        assert by_role["engine"] > 0  # importing TensorFlow
        assert sum(by_role.values()) == pytest.approx(total, abs=0.1)  # two readings; the tree is idle
    finally:
        root.stdin.close()
        root.wait(timeout=60)
    assert tree_cpu_seconds_by_role(root.pid, None) is None
