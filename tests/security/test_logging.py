"""What the server logs about a request: counts and codes, never the prompt or the generated text."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.service.conftest import RunningServer, make_config, wait_until

SECRET_PROMPT = "my password is hunter2 and my card is 4111"


@pytest.fixture(scope="module")
def server(tiny_model_repo: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(tiny_model_repo))
    yield running
    running.stop(grace=0)


def test_logs_hold_no_prompt_or_generated_text_and_cannot_be_forged(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with server.client() as client:
        done = client.complete(SECRET_PROMPT, max_tokens=30, seed=1, request_id="ok-id")
        forged = "x\nINFO service.servicer: request admin code=OK"
        streamed = list(client.generate(SECRET_PROMPT, max_tokens=5, seed=2, request_id=forged))
        with pytest.raises(grpc.RpcError):
            client.complete(SECRET_PROMPT, max_tokens=10**6)
    assert wait_until(lambda: sum("request " in r.getMessage() for r in caplog.records) >= 3, 10)
    messages = [r.getMessage() for r in caplog.records]
    request_lines = [m for m in messages if m.startswith("request ")]
    assert any(m.startswith("request ok-id ") and "completion_tokens=30" in m for m in request_lines)
    assert any("INVALID_ARGUMENT" in m for m in request_lines)
    for message in messages:
        assert "hunter2" not in message
        assert done.text not in message or len(done.text) < 8  # too short to mean anything
        assert "\n" not in message or "Traceback" in message  # one record, one line
    # The forged id is escaped in the log line and in the response.
    assert streamed[-1].request_id == "x\\nINFO service.servicer: request admin code=OK"
    assert any(m.startswith("request x\\nINFO") for m in request_lines)
