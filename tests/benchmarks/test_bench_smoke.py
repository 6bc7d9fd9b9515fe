"""The benchmark harness end to end at tiny sizes, and its statistics on hand-made arrivals.

``textgen bench --quick`` builds a 16-unit model, measures the engine and both
baselines, starts real servers (batched and ``--max-batch-size 1``) as
subprocesses, drives them with the load generator over real gRPC and writes
the report; the test checks every figure the report promises is there.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import parse_config
from benchmarks.e2e_bench import StreamRecord, percentile, strip_local_paths, summarize, summarize_profile
from benchmarks.floor_server import message_sizes
from benchmarks.interference import itl_in_window
from benchmarks.proc_cpu import ROLES
from benchmarks.report import targets
from benchmarks.untrusted_prompts import largest_gap_ms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_percentile_interpolates_and_handles_empty() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_coalesced_message_counts_as_spread_tokens() -> None:
    # first message at 0.1 s (1 token), then 3 tokens together 0.3 s later
    record = StreamRecord(start=0.0, arrivals=[(0.1, 1), (0.4, 3)], completion_tokens=4, finished=True)
    assert record.ttft == pytest.approx(0.1)
    assert record.itl_samples() == pytest.approx([0.1, 0.1, 0.1])
    failed = StreamRecord(start=0.0, error="RESOURCE_EXHAUSTED")
    summary = summarize([record, failed])
    assert summary["tokens"] == 4
    assert summary["errors"] == 1
    assert summary["error_codes"] == {"RESOURCE_EXHAUSTED": 1}
    assert summary["completed"] == 1
    assert summary["tokens_per_s"] == pytest.approx(4 / 0.4)
    assert summary["ttft_ms_p50"] == pytest.approx(100.0)


def test_interference_window_keeps_only_gaps_ending_inside() -> None:
    record = StreamRecord(start=0.0, arrivals=[(1.0, 1), (1.5, 1), (2.5, 2), (4.0, 1)])
    assert itl_in_window([record], 1.2, 3.0) == pytest.approx([500.0, 500.0, 500.0])


def test_profile_summary_ranks_self_and_inclusive_time(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "run (a/engine.py:10);step (a/engine.py:20);decode (tf/def_function.py:5) 6\n"
        "run (a/engine.py:10);piece (t/tokenizer.py:3) 3\n"
        "select (x/selectors.py:1) 1\n"
    )
    summary = summarize_profile(str(raw))
    assert summary["samples"] == 10
    assert summary["self"][0] == ["decode (tf/def_function.py)", 0.6]
    assert summary["inclusive"][0] == ["run (a/engine.py)", 0.9]
    assert summary["threads"] == [["main thread (asyncio event loop: gRPC, servicer)", 1.0]]
    raw.write_text(
        "Thread._bootstrap (t.py:1);Thread.run (threading.py:9);Engine._run (s/engine.py:4) 3\nmain (m.py:1) 1\n"
    )
    assert summarize_profile(str(raw))["threads"][0] == ["Engine._run (s/engine.py)", 0.75]
    # py-spy --subprocesses: a frame per process from the root down; a command line may hold ";".
    child = "python -c from multiprocessing.spawn import main; main()"
    raw.write_text(
        f'process 7:"python -m service";process 9:"{child}";step (s/engine.py:4) 3\n'
        'process 7:"python -m service";main (m.py:1) 1\n'
    )
    summary = summarize_profile(str(raw))
    assert summary["threads"] == [
        ["pid 9: main thread (asyncio event loop: gRPC, servicer)", 0.75],
        ["pid 7: main thread (asyncio event loop: gRPC, servicer)", 0.25],
    ]
    assert summary["self"][0] == ["step (s/engine.py)", 0.75]
    assert summary["processes"] == {"7": "python -m service", "9": child}


def test_a_kept_profile_names_no_local_path(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        'process 7:"/opt/venv/bin/python -m service --models /srv/out/models";step (s/engine.py:4) 3\n'
        'process 7:"/opt/venv/bin/python -m service --models /srv/out/models";main (m.py:1) 1\n'
    )
    strip_local_paths(str(raw), {"/opt/venv/bin/python": "python", "/srv/out": "OUT", "/srv": "X"})
    assert raw.read_text().count('process 7:"python -m service --models OUT/models";') == 2
    assert summarize_profile(str(raw))["processes"] == {"7": "python -m service --models OUT/models"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--units", "0"], "--units must be at least 1, got 0"),
        (["--layers", "-1"], "--layers must be at least 1, got -1"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--streams", "64,0"], "expected positive integers, got '64,0'"),
        (["--steps-per-call", "0"], "--steps-per-call must be at least 1, got 0"),
        (["--row-steps-per-call", "-1"], "--row-steps-per-call must be at least 0, got -1"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_and_value(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(["--out", str(tmp_path), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_default_config_is_the_issue_run(tmp_path: Path) -> None:
    config = parse_config(["--out", str(tmp_path)])
    assert (config.model.units, config.model.layers) == (512, 1)
    assert config.engine.batch_sizes == (1, 8, 32, 64, 128, 512)
    assert config.e2e.streams == (1, 16, 64, 256, 1000)
    assert (config.interference.streams, config.interference.arrival_prompt_chars) == (32, 512)
    assert config.interference.interval == pytest.approx(0.1)


def test_every_server_of_a_run_gets_the_same_k_flags_and_a_ceiling_never_below_k(tmp_path: Path) -> None:
    from service.config import ServerConfig
    from service.config import parse_config as parse_server_config

    flags = parse_config(
        ["--out", str(tmp_path), "--steps-per-call", "64", "--row-steps-per-call", "0"]
    ).e2e.server_flags()
    server = parse_server_config(["--models", str(tmp_path), *flags], {})  # a server would start with them
    assert (server.steps_per_call, server.max_steps_per_call, server.row_steps_per_call) == (64, 64, 0)
    defaults = parse_server_config(
        ["--models", str(tmp_path), *parse_config(["--out", str(tmp_path)]).e2e.server_flags()], {}
    )
    own = ServerConfig()  # the bench runs the server's defaults unless told otherwise
    assert (defaults.steps_per_call, defaults.max_steps_per_call, defaults.row_steps_per_call) == (
        own.steps_per_call,
        own.max_steps_per_call,
        own.row_steps_per_call,
    )
    assert defaults.call_budget_ms == own.call_budget_ms


def _results(
    e2e_64: float,
    mbs1_64: float,
    engine_64: float,
    seeds: float,
    p99_with: float,
    p50_without: float,
    http_64: float,
    cpu_us: float = 4.0,
    floor_cpu_us: float = 2.0,
):
    level = {
        "streams": 64,
        "tokens_per_s": e2e_64,
        "errors": 0,
        "server_rss_kb_per_stream_since_warmup": 10.0,
        "cpu_us_per_token": cpu_us,
    }
    return {
        "config": {"reference_streams": 64, "capacity_streams": 1000},
        "engine": {
            "batched": {"rows": [{"batch": 64, "tokens_per_s": engine_64}]},
            "seed_loop": {"tokens_per_s": seeds},
        },
        "e2e": {
            "batched": {
                "levels": [level, dict(level, streams=1000, errors=3, server_rss_kb_per_stream_since_warmup=70.0)],
                "http": dict(level, tokens_per_s=http_64),
            },
            "floor": {"levels": [{"streams": 64, "cpu_us_per_token": floor_cpu_us}]},
            "max_batch_size_1": {"levels": [{"streams": 64, "tokens_per_s": mbs1_64}]},
        },
        "interference": {"with_arrivals": {"itl_ms_p99": p99_with}, "without_arrivals": {"itl_ms_p50": p50_without}},
    }


def test_targets_pass_and_fail_on_the_issue_thresholds() -> None:
    good = {t.name: t for t in targets(_results(10_000, 1_000, 15_000, 10, 3.9, 2.0, 7_000))}
    assert [t.passed for t in good.values()] == [True, True, True, True, True, True, False, False]
    assert good["64 streams: server CPU per token / the floor's"].value == pytest.approx(2.0)
    bad = [t.passed for t in targets(_results(7_000, 1_000, 12_000, 10, 4.1, 2.0, 4_800, cpu_us=4.1))]
    assert bad[:6] == [False, False, False, False, False, False]
    missing = targets({"config": {"reference_streams": 64, "capacity_streams": 1000}})
    assert all(t.passed is None for t in missing)


@pytest.mark.timeout(600)
def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "bench", "--out", str(out), "--quick"],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    engine = results["engine"]
    assert [r["batch"] for r in engine["batched"]["rows"]] == [1, 4]
    assert all(r["tokens_per_s"] > 0 for r in engine["batched"]["rows"])
    assert "LoadedModel.decode" in engine["batched"]["decode_fn"]  # the serving step, not the stand-in
    variants = engine["variants"]["rows"]
    assert {(r["steps_per_call"], r["sampler"]) for r in variants} == {(1, False), (4, True)}
    assert all(r["tokens_per_s"] > 0 for r in variants)
    assert engine["seed_loop"]["ms_per_token"] > 0
    assert engine["onestep"]["ms_per_token"] > 0

    for key in ("batched", "max_batch_size_1", "floor"):
        part = results["e2e"][key]
        assert "error" not in part
        assert [lv["streams"] for lv in part["levels"]] == [1, 4]
        for level in part["levels"]:
            assert level["errors"] == 0, level["error_codes"]
            assert level["completed"] == level["requests"] == level["streams"]
            assert level["tokens"] == level["streams"] * level["max_tokens"]
            assert level["tokens_per_s"] > 0
            # The CPU of the server's whole process tree, per token and per request.
            assert level["server_processes"] >= 1
            cpu = level["server_cpu_seconds"]
            assert cpu is not None and cpu >= 0
            assert level["cpu_us_per_token"] == pytest.approx(1e6 * cpu / level["tokens"])
            assert level["cpu_ms_per_request"] == pytest.approx(1e3 * cpu / level["requests"])
            # Split by role when a process loads TensorFlow (not the floor); one reading, so the parts add up.
            by_role = level["cpu_us_per_token_by_role"]
            if key == "floor":
                assert by_role is None
            else:
                assert tuple(by_role) == ROLES and all(v >= 0 for v in by_role.values())
                assert sum(by_role.values()) == pytest.approx(level["cpu_us_per_token"])
            for field in (
                "ttft_ms_p50",
                "ttft_ms_p99",
                "itl_ms_p50",
                "itl_ms_p99",
                "server_rss_kb_per_stream_since_warmup",
            ):
                assert level[field] is not None and level[field] >= 0, field
            assert level["server_rss_kb_peak"] > 0

    inter = results["interference"]
    assert inter["with_arrivals"]["arrivals"] > 0 and inter["without_arrivals"]["arrivals"] == 0
    for phase in ("with_arrivals", "without_arrivals"):
        assert inter[phase]["itl_samples"] > 0
        assert inter[phase]["running_errors"] == 0
    assert inter["with_arrivals"]["arrival_errors"] == 0
    assert results["untrusted_prompts"]["codes"] == {"INVALID_ARGUMENT": 8}
    assert "### Untrusted prompts" in (out / "table.md").read_text()

    http = results["e2e"]["batched"]["http"]  # the same load over HTTP SSE at the reference level
    assert http["streams"] == 4 and http["errors"] == 0 and http["completed"] == 4
    assert http["tokens"] == 4 * http["max_tokens"] and http["tokens_per_s"] > 0
    # The floor sends what the batched server sent: as many messages per stream, as many tokens each.
    for served, floor in zip(results["e2e"]["batched"]["levels"], results["e2e"]["floor"]["levels"], strict=True):
        assert floor["max_tokens"] == served["max_tokens"]
        assert floor["tokens_per_message_sent"] == served["tokens_per_message"]
        per_stream = len(message_sizes(floor["max_tokens"], served["tokens_per_message"]))
        assert floor["messages"] == floor["streams"] * per_stream
    assert http["server_cpu_seconds"] is not None and http["cpu_us_per_token"] is not None
    assert len(results["targets"]) == 8
    # Every target was measured; the floor's 64 tokens may take less CPU than one clock tick (no ratio then).
    floor_cpu = results["e2e"]["floor"]["levels"][-1]["server_cpu_seconds"]
    unmeasured = {t["name"] for t in results["targets"] if t["passed"] is None}
    assert unmeasured <= ({"4 streams: server CPU per token / the floor's"} if floor_cpu == 0 else set())
    assert results["machine"]["nproc"] >= 1
    table = (out / "table.md").read_text()
    assert "### Targets" in table
    assert "### Server CPU per token and per request" in table
    assert "| CPU µs/token: engine / frontends / other |" in table
    for png in ("throughput.png", "latency.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png


def test_largest_gap_spans_one_streams_calls_and_keeps_gaps_ending_inside() -> None:
    first = StreamRecord(start=0.0, arrivals=[(1.0, 1), (1.5, 1), (2.9, 1)])
    second = StreamRecord(start=3.0, arrivals=[(3.2, 1), (3.4, 1), (9.0, 1)])  # from one call to the next is no gap
    assert largest_gap_ms([first, second], 1.2, 4.0) == pytest.approx(1400.0)
    assert largest_gap_ms([first, second], 3.5, 8.0) is None


@pytest.mark.timeout(300)
def test_untrusted_prompts_quick_run_reports_both_phases_and_the_refusals(tmp_path: Path) -> None:
    out = tmp_path / "untrusted.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.untrusted_prompts", "--quick", "--out-json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["prompt_bytes"] == 65_533
    assert result["config"]["streams"] == 4 and result["config"]["clients"] == 8
    for phase in ("quiet", "attacked"):
        part = result[phase]
        assert len(part["largest_gap_ms"]) == 4 and all(g is not None and g > 0 for g in part["largest_gap_ms"])
        assert part["median_ms"] == pytest.approx(statistics.median(part["largest_gap_ms"]))
        assert part["max_ms"] == max(part["largest_gap_ms"])
        assert part["stream_errors"] == {}
    assert result["ratio_median"] == pytest.approx(result["attacked"]["median_ms"] / result["quiet"]["median_ms"])
    assert result["ratio_max"] == pytest.approx(result["attacked"]["max_ms"] / result["quiet"]["max_ms"])
    assert result["codes"] == result["attacked"]["codes"] == {"INVALID_ARGUMENT": 8}
    assert "codes {'INVALID_ARGUMENT': 8}" in proc.stdout
