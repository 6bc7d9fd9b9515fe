"""``python -m benchmarks.burst --quick`` end to end: both servers, how every stream ended, what the servers counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.burst import QUICK, markdown_lines


@pytest.mark.timeout(300)
def test_quick_burst_reports_how_every_stream_ended_and_what_the_server_counted(tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.burst", "--quick", "--out-json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    admitted, refusing = result["admitted"], result["refusing"]
    assert admitted["server_args"] == f"--max-concurrent {QUICK.max_concurrent} --max-queue {QUICK.streams}"
    assert admitted["codes"] == {"OK": QUICK.streams}  # the queue holds the whole burst
    assert refusing["refused"] > 0 and refusing["completed"] > 0  # 4 run, 4 wait, the rest are refused
    assert refusing["completed"] + refusing["refused"] == QUICK.streams
    assert refusing["last_refusal_s"] > 0
    for phase in (admitted, refusing):
        assert phase["streams"] == QUICK.streams and phase["other_errors"] == 0
        assert phase["counted"] == phase["codes"] and phase["unseen"] == 0 and phase["accounted"] is True
        assert phase["server_rss_kb_peak"] > 0
    table = "\n".join(markdown_lines(result))
    assert f"### Burst ({QUICK.streams:,} streams of {QUICK.max_tokens} tokens opened at once)" in table
