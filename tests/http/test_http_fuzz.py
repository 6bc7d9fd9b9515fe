"""Property-based fuzzing of the HTTP API: whatever JSON a client sends, an OpenAI-shaped answer, never a 500.

Hypothesis sends a few hundred ``/v1/completions`` bodies (each field absent, of the right
type, of a wrong type, NaN, infinite or huge; odd model names; any JSON value as the body;
bytes that are not JSON) to one in-process server with small limits. Every answer is a 200
or a documented client error with the error shape; afterwards health is still 200 and no
sequence is left in the batch.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import RunningServer, wait_until

ALLOWED = {200, 400, 404, 413, 415, 429}
MAX_PROMPT_BYTES = 4096

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70)
FIELDS: dict[str, Any] = {
    "model": st.sampled_from(["tiny", "tiny:1", "tiny:9", "nope", "", ":", "tiny:", "x" * 300]) | json_values,
    "prompt": st.text(max_size=300) | st.text(min_size=4000, max_size=5000) | json_values,
    "max_tokens": st.integers(-5, 12) | numbers | json_values,
    "temperature": numbers | json_values,
    "top_p": numbers | json_values,
    "top_k": st.integers(-3, 2**40) | json_values,
    "seed": st.integers(-(2**70), 2**70) | json_values,
    "stop": st.text(max_size=40) | st.lists(st.text(max_size=40), max_size=12) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "logprobs": st.integers(-1, 3) | json_values,
    "n": st.integers(0, 3) | json_values,
    "echo": st.booleans(),
    "best_of": st.integers(0, 3),
    "logit_bias": st.dictionaries(st.text(max_size=4), st.integers(-100, 100), max_size=2),
    "user": json_values,
}
bodies = st.fixed_dictionaries({}, optional=FIELDS).map(lambda d: {"prompt": "The ", "max_tokens": 4, **d})


def _encode(body: Any) -> bytes:
    # Python's json writes NaN and Infinity, as a sloppy client might.
    return json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass")


def _check(response: http.client.HTTPResponse) -> None:
    data = response.read()
    assert response.status in ALLOWED, (response.status, data[:300])
    if response.status != 200:
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert len(error["message"]) < 1000  # client strings are quoted cut short


@pytest.fixture
def fuzz_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(
        scope="module",
        http_port=0,
        max_tokens_limit=8,
        default_max_tokens=8,
        max_prompt_bytes=MAX_PROMPT_BYTES,
        max_stop_length=16,
    )


def test_any_completion_body_gets_a_documented_answer(fuzz_server: RunningServer) -> None:
    port = fuzz_server.server.http_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies | json_values)
    def post(body: Any) -> None:
        conn.request("POST", "/v1/completions", body=_encode(body), headers={"Content-Type": "application/json"})
        _check(conn.getresponse())

    post()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
    def raw(payload: bytes, content_type: str) -> None:
        conn.request("POST", "/v1/completions", body=payload, headers={"Content-Type": content_type})
        _check(conn.getresponse())

    raw()
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "SERVING"}
    engine = fuzz_server.server.engine
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)
    assert fuzz_server.sample("textgen_requests_total", {"code": "INTERNAL"}) == 0
    assert fuzz_server.sample("textgen_requests_total", {"protocol": "http"}) >= 200  # each one counted
