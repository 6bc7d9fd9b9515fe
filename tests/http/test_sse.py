"""The HTTP API without a client library: SSE framing, errors in OpenAI's shape, disconnects, SIGTERM."""

from __future__ import annotations

import http.client
import json
import logging
import re
import signal
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import RunningServer, ServerProcess, wait_until


def _post(port: int, body: bytes, content_type: str = "application/json") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": content_type})
    return conn.getresponse()


def _events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking that every event is one ``data:`` line and a blank line."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    events = raw.decode("utf-8").split("\n\n")[:-1]
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: ") :] for event in events]


def _error(response: http.client.HTTPResponse) -> dict[str, Any]:
    body = json.loads(response.read())
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


@pytest.fixture
def http_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(scope="module", http_port=0)


def test_a_stream_is_framed_as_server_sent_events_and_ends_with_done(http_server: RunningServer) -> None:
    body = {"prompt": "The ", "max_tokens": 30, "seed": 4, "stream": True, "stream_options": {"include_usage": True}}
    response = _post(http_server.server.http_port, json.dumps(body).encode())
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream")
    events = _events(response.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text_chunks, usage = chunks[:-1], chunks[-1]
    assert all(c["object"] == "text_completion" and c["model"] == "tiny" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 30
    assert len({c["id"] for c in chunks}) == 1


def test_an_error_in_the_middle_of_a_stream_is_an_error_event_then_done(
    start_server: Callable[..., RunningServer],
) -> None:
    running = start_server(http_port=0, request_timeout=0.5)
    body = {"prompt": "The ", "max_tokens": 100_000, "stream": True}
    response = _post(running.server.http_port, json.dumps(body).encode())
    assert response.status == 200
    events = _events(response.read())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "deadline_exceeded" and "deadline" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"prompt=x", "application/x-www-form-urlencoded", 415, "application/json"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (json.dumps({"prompt": ["a", "b"]}).encode(), "application/json", 400, "prompt must be a string"),
        (json.dumps({"prompt": "x", "top_k": -5}).encode(), "application/json", 400, "top_k"),
        (json.dumps({"prompt": "x", "stop": "y" * 500}).encode(), "application/json", 400, "--max-stop-length"),
        (b'{"prompt": "' + b"x" * 1_100_000 + b'"}', "application/json", 413, "--max-receive-message-bytes"),
    ],
)
def test_bad_bodies_get_openai_errors_never_a_traceback(
    http_server: RunningServer, body: bytes, content_type: str, status: int, words: str
) -> None:
    response = _post(http_server.server.http_port, body, content_type)
    assert response.status == status
    assert words in _error(response)["message"]


def test_a_long_client_string_is_cut_short_in_the_message(http_server: RunningServer) -> None:
    response = _post(http_server.server.http_port, json.dumps({"prompt": "x", "temperature": "h" * 5000}).encode())
    assert response.status == 400
    message = _error(response)["message"]
    assert "temperature" in message and "(5000 characters)" in message and len(message) < 300


def test_at_capacity_the_answer_is_429_with_retry_after(start_server: Callable[..., RunningServer]) -> None:
    running = start_server(http_port=0, max_concurrent=1, max_queue=0)
    port = running.server.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=60) as busy:
        _send(busy, {"prompt": "The ", "max_tokens": 100_000, "stream": True})
        _read_first_event(busy)
        response = _post(port, json.dumps({"prompt": "x"}).encode())
        assert response.status == 429 and response.getheader("Retry-After") == "1"
        assert "capacity" in _error(response)["message"]


def test_health_and_unknown_paths(http_server: RunningServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", http_server.server.http_port, timeout=30)
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "SERVING"}
    conn.request("GET", "/v1/nothing-here")
    response = conn.getresponse()
    assert response.status == 404 and _error(response)["type"] == "not_found_error"
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200 and b"/v1/completions" in response.read()


def _send(sock: socket.socket, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)


def _read_first_event(sock: socket.socket) -> None:
    received = b""
    while b"data: {" not in received or b"\n\n" not in received.split(b"data: {", 1)[1]:
        part = sock.recv(65536)
        assert part, received
        received += part


@pytest.mark.parametrize("streamed", [True, False])
def test_clients_that_disconnect_free_their_rows(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture, streamed: bool
) -> None:
    running = start_server(http_port=0)
    caplog.set_level(logging.WARNING)
    engine = running.server.engine
    socks = [socket.create_connection(("127.0.0.1", running.server.http_port), timeout=60) for _ in range(16)]
    try:
        for sock in socks:
            _send(sock, {"prompt": "The ", "max_tokens": 100_000, "stream": streamed})
        if streamed:
            for sock in socks:
                _read_first_event(sock)  # each is mid-way through its stream
        assert wait_until(lambda: engine.active == 16)
    finally:
        for sock in socks:
            sock.close()
    # Within one model call of the disconnect (a step of this model takes milliseconds).
    assert wait_until(lambda: running.sample("textgen_active_sequences") == 0, 1.0)
    assert wait_until(lambda: running.sample("textgen_requests_total", {"code": "CANCELLED", "protocol": "http"}) == 16)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_sigterm_lets_running_http_streams_finish(start_process: Callable[..., ServerProcess]) -> None:
    server = start_process()
    server.wait_serving()
    match = re.search(r"http on port (\d+)", server.log())
    assert match, server.log()
    port = int(match.group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        _send(sock, {"prompt": "The ", "max_tokens": 2000, "stream": True, "seed": 1})
        _read_first_event(sock)
        server.proc.send_signal(signal.SIGTERM)
        received = b""
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
            part = sock.recv(65536)
            assert part, received[-300:]
            received += part
    assert b'"finish_reason":"length"' in received and b"data: [DONE]\n\n" in received
    assert server.proc.wait(timeout=60) == 0


def test_a_client_that_stops_reading_is_cut_after_the_stream_write_timeout(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    # No --request-timeout: however slowly this machine fills the buffers, only the stall ends the stream.
    running = start_server(http_port=0, stream_write_timeout=1.0, max_tokens_limit=400_000, request_timeout=0)
    caplog.set_level(logging.WARNING)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once, as a stalled client's would
    try:
        sock.connect(("127.0.0.1", running.server.http_port))
        _send(sock, {"prompt": "The ", "max_tokens": 400_000, "stream": True, "logprobs": 0})
        _read_first_event(sock)  # then never read again
        exhausted = {"code": "RESOURCE_EXHAUSTED", "protocol": "http"}
        assert wait_until(lambda: running.sample("textgen_requests_total", exhausted) == 1, 300)
        assert wait_until(lambda: running.server.engine.active == 0)
        # The row left the batch long before max_tokens.
        assert running.sample("textgen_generated_tokens_total") < 400_000
    finally:
        sock.close()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
