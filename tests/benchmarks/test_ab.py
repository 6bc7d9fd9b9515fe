"""``python -m benchmarks.ab --quick``: two servers from one tree, interleaved, medians per tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.ab import interference_ratio, main, summary

ROOT = Path(__file__).resolve().parents[2]


def test_the_interference_ratio_is_p99_with_arrivals_over_p50_without() -> None:
    result = {"with_arrivals": {"itl_ms_p99": 6.0}, "without_arrivals": {"itl_ms_p50": 2.0}}
    assert interference_ratio(result) == 3.0
    assert interference_ratio({"with_arrivals": {}, "without_arrivals": {"itl_ms_p50": 2.0}}) is None


def test_summary_takes_medians_and_leaves_unmeasured_figures_none() -> None:
    runs = {"a": {"tokens_per_s": [3.0, 1.0, 2.0], "interference_ratio": []}}
    assert summary(runs) == {"a": {"tokens_per_s": 2.0, "interference_ratio": None}}


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--tree-arg=three=--frontends=0", "--tree-arg names no --tree: three"),
        ("--tree-arg=one", "--tree-arg takes NAME=FLAG"),
        ("--tree-arg=one=frontends", "--tree-arg takes NAME=FLAG"),
    ],
)
def test_a_tree_arg_names_a_tree_and_a_flag(flag: str, says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--tree", f"one={ROOT}", "--tree", f"two={ROOT}", flag])
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.timeout(400)
def test_quick_ab_runs_every_tree_every_round(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    argv = [sys.executable, "-m", "benchmarks.ab", "--quick", "--rounds", "2", "--streams", "4", "--tokens", "16"]
    argv += ["--tree", f"one={ROOT}", "--tree", f"two={ROOT}", "--server-arg=--frontends=0", "--out-json", str(out)]
    argv += ["--tree-arg=two=--max-steps-per-call=16"]
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=380, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["server_args"] == ["--frontends=0"]
    assert result["flags"] == {"one": ["--frontends=0"], "two": ["--frontends=0", "--max-steps-per-call=16"]}
    for name in ("one", "two"):
        assert len(result["runs"][name]["tokens_per_s"]) == 2
        assert all(t > 0 for t in result["runs"][name]["tokens_per_s"])
        assert result["medians"][name]["tokens_per_s"] > 0
        # Each role's CPU per token, every round; together they are the server's.
        runs = result["runs"][name]
        roles = [runs[f"{role}_us_per_token"] for role in ("engine", "frontends", "other")]
        assert all(len(values) == 2 for values in roles)
        assert [sum(parts) for parts in zip(*roles, strict=True)] == pytest.approx(runs["cpu_us_per_token"])
    assert "medians over 2 rounds" in proc.stdout
