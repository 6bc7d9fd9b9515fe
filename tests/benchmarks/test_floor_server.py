"""The floor server: message plans, the messages' shape, and a real load against it counted as the server's."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.e2e_bench import measure_level
from benchmarks.floor_server import FloorProcess, FloorSpec, build_messages, message_sizes
from service.api import textgen_pb2


@pytest.mark.parametrize(
    ("max_tokens", "per_message", "sizes"),
    [
        (64, 8.0, [8] * 8),
        (10, 3.0, [4, 3, 3]),
        (64, 5.3, [6] * 4 + [5] * 8),  # 12 messages
        (5, 0.5, [1] * 5),  # never more messages than tokens
        (3, 100.0, [3]),  # never fewer than one
    ],
)
def test_message_sizes_split_the_tokens_evenly(max_tokens: int, per_message: float, sizes: list[int]) -> None:
    assert message_sizes(max_tokens, per_message) == sizes


def test_messages_are_shaped_as_the_servers() -> None:
    messages = build_messages(10, 3.0, "bench", prompt_tokens=16)
    assert [len(m.text) for m in messages] == [4, 3, 3]
    assert len({m.request_id for m in messages}) == 1 and len(messages[0].request_id) == 32
    assert all((m.model, m.model_version) == ("bench", 1) for m in messages)
    assert all(m.finish_reason == textgen_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (16, 10)
    assert last.usage.time_to_first_token_seconds > 0 and last.usage.total_seconds > 0


@pytest.mark.timeout(120)
def test_the_load_generator_measures_the_floor_as_a_server(tmp_path: Path) -> None:
    with FloorProcess(FloorSpec(tokens_per_message=3.0), str(tmp_path / "floor.log")) as floor:
        assert floor.target.startswith("127.0.0.1:") and not floor.target.endswith(":0")
        level = measure_level(floor, streams=4, max_tokens=10, prompt_chars=16, timeout=30.0)
        with pytest.raises(ValueError, match="no HTTP API"):
            measure_level(floor, 1, 1, 16, 30.0, protocol="http")
    assert level["errors"] == 0 and level["completed"] == level["requests"] == 4
    assert level["tokens"] == 40 and level["messages"] == 12
    assert level["tokens_per_message"] == pytest.approx(40 / 12)
    assert level["server_processes"] == 1
    cpu = level["server_cpu_seconds"]
    assert cpu is not None and cpu >= 0
    assert level["cpu_us_per_token"] == pytest.approx(1e6 * cpu / 40)
    assert level["cpu_ms_per_request"] == pytest.approx(1e3 * cpu / 4)
    assert level["server_rss_kb_peak"] > 0
    assert "server_mean_batch" not in level  # no /metrics to scrape
