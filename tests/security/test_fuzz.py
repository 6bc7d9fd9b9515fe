"""Property-based fuzzing of a real server: whatever a client sends, no UNKNOWN, no INTERNAL, no leak.

Hypothesis generates a few hundred requests (random unicode prompts up to 100 KB, NaN,
infinities, negative and huge floats, integers up to the top of their protobuf types,
random stop sequences, odd model names and versions, undecodable bytes) and sends them
to one in-process server with small limits over a real channel. Every answer must be OK
or a documented client-error code; afterwards the server is still SERVING and the
scraped ``textgen_active_sequences`` / ``textgen_waiting_requests`` are back at 0.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import textgen_pb2, textgen_pb2_grpc
from service.client import build_request
from tests.helpers import RunningServer, wait_until

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # the receive-size limit (grpc's own answer) or capacity
}
MAX_TOKENS_LIMIT = 6
MAX_PROMPT_BYTES = 4096
MAX_RECEIVE = MAX_PROMPT_BYTES + 4096  # the smallest the config accepts, so big prompts hit grpc's own limit

U32 = 2**32 - 1
U64 = 2**64 - 1

# Floats as a client in any language could send them; protobuf narrows to float32 (huge -> inf).
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, -1.0, float("nan"), float("inf"), float("-inf"), 1e39, -1e39, 3.4e38]),
    st.floats(min_value=0.0, max_value=2.0),
)
small_or_huge = st.one_of(st.integers(0, MAX_TOKENS_LIMIT + 2), st.integers(0, U32), st.just(U32))
# Prompts: short random text, or a random piece repeated up to ~100 KB (fast to generate, any plane).
prompts = st.one_of(
    st.text(max_size=64),
    st.builds(lambda piece, n: (piece * n)[:100_000], st.text(min_size=1, max_size=40), st.integers(1, 5000)),
)
models = st.one_of(
    st.sampled_from(["", "tiny", "TINY", "tiny/1", "../tiny", "nope", " ", "\x00", "tiny\n", "a" * 10_000]),
    st.text(max_size=40),
)
versions = st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, U64))
wild = st.fixed_dictionaries(
    {
        "prompt": prompts,
        "max_tokens": small_or_huge,
        "temperature": floats,
        "top_k": st.one_of(st.integers(0, 100), st.integers(0, U32)),
        "top_p": floats,
        "seed": st.one_of(st.none(), st.integers(0, U64)),
        "stop": st.lists(st.one_of(st.text(max_size=8), st.text(min_size=30, max_size=300)), max_size=20),
        "model": models,
        "model_version": versions,
        "include_tokens": st.booleans(),
        "request_id": st.text(max_size=200),
    }
)
# Requests that pass validation, with every field still at its edges: they reach the engine and sampler.
plausible = st.fixed_dictionaries(
    {
        "prompt": st.one_of(st.text(max_size=64), st.text(min_size=500, max_size=1000)),
        "max_tokens": st.integers(0, MAX_TOKENS_LIMIT),
        "temperature": st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e30), st.just(1e-30)),
        "top_k": st.one_of(st.integers(0, 100), st.integers(0, U32)),
        "top_p": st.floats(min_value=0.0, max_value=1.0),
        "seed": st.one_of(st.none(), st.integers(0, U64)),
        "stop": st.lists(st.text(min_size=1, max_size=32), max_size=8),
        "model": st.sampled_from(["", "tiny"]),
        "model_version": st.sampled_from([0, 1]),
        "include_tokens": st.booleans(),
        "request_id": st.text(max_size=128),
    }
)
# Valid requests for models and versions that may not exist (names of any kind, versions up to 2**64-1).
odd_model = plausible.flatmap(
    lambda fields: st.fixed_dictionaries({"model": models, "model_version": versions}).map(
        lambda named: {**fields, **named}
    )
)
requests = st.one_of(wild, plausible, odd_model)


@pytest.fixture
def fuzz_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """One server with small limits, shared by the module's tests."""
    return start_server(
        scope="module",
        max_tokens_limit=MAX_TOKENS_LIMIT,
        default_max_tokens=4,
        max_prompt_bytes=MAX_PROMPT_BYTES,
        max_receive_message_bytes=MAX_RECEIVE,
        max_stop_sequences=8,
        max_stop_length=32,
    )


@pytest.fixture
def channel(fuzz_server: RunningServer) -> Iterator[grpc.Channel]:
    with fuzz_server.channel() as ch:
        yield ch


def _code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_clean(fuzz_server: RunningServer, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    engine = fuzz_server.server.engine
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0, 30)
    assert wait_until(lambda: fuzz_server.sample("textgen_active_sequences") == 0, 30)
    assert fuzz_server.sample("textgen_waiting_requests") == 0


def test_any_request_gets_a_documented_status_and_the_server_stays_clean(
    fuzz_server: RunningServer, channel: grpc.Channel
) -> None:
    """300 generated requests, each OK or a documented client error; then the mix held every kind,
    nothing leaked, health is SERVING and the limits are still enforced."""
    stub = textgen_pb2_grpc.TextGenerationStub(channel)
    seen: collections.Counter[str] = collections.Counter()  # status codes the generated requests got

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(fields=requests, streaming=st.booleans())
    def any_request(fields: dict[str, Any], streaming: bool) -> None:
        request = build_request(**fields)  # protobuf narrows floats to float32; integers are in range by construction
        if streaming:
            code, details = _code_of(lambda: list(stub.Generate(request, timeout=60)))
        else:
            code, details = _code_of(lambda: stub.Complete(request, timeout=60))
        seen[code.name] += 1
        assert code in ALLOWED, f"{code.name}: {details} for {fields!r:.500}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert details, "an INVALID_ARGUMENT must say what is wrong"

    any_request()
    print(f"fuzz: status codes of the generated requests: {dict(seen)}")
    assert sum(seen.values()) >= 300, seen
    # Valid requests ran through the engine, and bad ones were refused.
    assert seen["OK"] >= 40 and seen["INVALID_ARGUMENT"] >= 30 and seen["NOT_FOUND"] >= 10, seen
    _assert_clean(fuzz_server, channel)
    code, details = _code_of(lambda: stub.Complete(build_request("x", max_tokens=MAX_TOKENS_LIMIT + 1), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and str(MAX_TOKENS_LIMIT) in details
    code, details = _code_of(lambda: stub.Complete(build_request("x" * (MAX_RECEIVE + 10)), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    done = stub.Complete(build_request("The ", max_tokens=MAX_TOKENS_LIMIT, seed=5), timeout=30)
    assert done.usage.completion_tokens == MAX_TOKENS_LIMIT
    assert isinstance(done, textgen_pb2.GenerateResponse)


def test_undecodable_bytes_are_invalid_argument(fuzz_server: RunningServer, channel: grpc.Channel) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(payload=st.binary(max_size=2000), method=st.sampled_from(["Generate", "Complete", "ListModels"]))
    def undecodable(payload: bytes, method: str) -> None:
        path = f"/textgen.v1.TextGeneration/{method}"
        if method == "Generate":
            call = channel.unary_stream(path)
            code, details = _code_of(lambda: list(call(payload, timeout=60)))
        else:
            unary = channel.unary_unary(path)
            code, details = _code_of(lambda: unary(payload, timeout=60))
        assert code in ALLOWED, f"{code.name}: {details} for {payload!r:.200}"

    undecodable()
    _assert_clean(fuzz_server, channel)
