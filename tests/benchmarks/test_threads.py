"""``python -m benchmarks.threads``: a server's CPU per token thread by thread."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.threads import thread_rows

ROOT = Path(__file__).resolve().parents[2]


def test_rows_sum_each_role_and_name_and_count_new_threads_from_zero() -> None:
    before = {
        ("engine", 10, 10): ("main", 5),
        ("engine", 10, 11): ("textgen-engine", 100),
        ("frontends", 20, 21): ("event_engine", 1),
    }
    after = {
        ("engine", 10, 10): ("main", 5),  # idle: no row
        ("engine", 10, 11): ("textgen-engine", 400),
        ("frontends", 20, 21): ("event_engine", 3),
        ("frontends", 20, 22): ("event_engine", 4),  # started in between
        ("engine", 10, 12): ("python", 100),
    }
    rows = thread_rows(before, after, tokens=1000, ticks_per_second=100.0)
    assert [(r["role"], r["thread"], r["cpu_seconds"]) for r in rows] == [
        ("engine", "textgen-engine", 3.0),
        ("engine", "python", 1.0),
        ("frontends", "event_engine", 0.06),
    ]
    assert rows[0]["cpu_us_per_token"] == pytest.approx(3000.0)


@pytest.mark.timeout(400)
def test_quick_run_finds_the_engine_thread_and_the_frontends_loop(tmp_path: Path) -> None:
    out = tmp_path / "threads.json"
    argv = [sys.executable, "-m", "benchmarks.threads", "--quick", "--streams", "8", "--tokens", "64", "--levels", "2"]
    argv += ["--server-arg=--frontends=1", "--out-json", str(out)]
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=380, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tokens"] == 2 * 8 * 64
    found = {(row["role"], row["thread"]): row for row in result["threads"]}
    assert found[("engine", "textgen-engine")]["cpu_seconds"] > 0  # the engine thread, named for the OS
    assert found[("frontends", "main")]["cpu_seconds"] > 0  # a frontend's event loop
    # The live threads' CPU is the tree's, less what ended threads took with them (and tick rounding).
    assert sum(row["cpu_seconds"] for row in result["threads"]) <= result["tree_cpu_seconds"] + 0.05
    assert "us/token" in proc.stdout
