"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) naming the field, value and limit; the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from service.api import textgen_pb2
from service.client import TextGenClient, build_request
from service.errors import CapacityError, EngineClosedError, ModelNotFoundError, NoModelLoadedError
from service.servicer import RequestError, RequestLimits, _status_of, validate_request
from tests.helpers import RunningServer

LIMITS = RequestLimits(
    max_tokens_limit=100, default_max_tokens=7, max_prompt_bytes=10, max_stop_sequences=3, max_stop_length=5
)


def _rejection(request: textgen_pb2.GenerateRequest) -> RequestError:
    with pytest.raises(RequestError) as caught:
        validate_request(request, LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


# ---------------------------------------------------------------------- the pure function
@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, -math.inf])
def test_temperature_must_be_finite_and_not_negative(value: float) -> None:
    error = _rejection(build_request("a", temperature=value))
    assert "temperature" in error.message
    assert repr(value) in error.message  # -0.5, nan, inf, -inf


@pytest.mark.parametrize("value", [-0.25, 1.5, math.nan, math.inf])
def test_top_p_must_lie_in_zero_one(value: float) -> None:
    error = _rejection(build_request("a", top_p=value))
    assert "top_p" in error.message and "[0, 1]" in error.message
    assert repr(value) in error.message


def test_max_tokens_over_the_limit_names_value_and_limit() -> None:
    error = _rejection(build_request("a", max_tokens=101))
    assert "max_tokens" in error.message and "101" in error.message and "100" in error.message


def test_prompt_limit_counts_utf8_bytes_not_characters() -> None:
    validate_request(build_request("0123456789"), LIMITS)  # 10 bytes: at the limit
    error = _rejection(build_request("€€€€"))  # 4 characters, 12 bytes
    assert "prompt" in error.message and "12 bytes" in error.message and "10" in error.message


def test_stop_sequences_count_length_and_emptiness() -> None:
    validate_request(build_request("a", stop=["a", "bb", "ccccc"]), LIMITS)
    many = _rejection(build_request("a", stop=[f"s{i}" for i in range(300)]))
    assert "stop" in many.message and "300" in many.message and "3" in many.message
    long = _rejection(build_request("a", stop=["ok", "toolong"]))
    assert "stop[1]" in long.message and "7" in long.message and "5" in long.message
    empty = _rejection(build_request("a", stop=[""]))
    assert "stop[0]" in empty.message


def test_defaults_resolve_to_sampling_params() -> None:
    params = validate_request(textgen_pb2.GenerateRequest(prompt="x"), LIMITS)
    assert params.max_tokens == 7  # 0 -> the server default
    assert params.temperature == 0.0  # proto default: greedy
    assert params.top_p == 1.0  # 0 -> off
    assert params.top_k == 0
    assert params.seed is None
    seeded = validate_request(build_request("x", seed=0, top_p=0.5, top_k=3, stop=["q"], max_tokens=9), LIMITS)
    assert (seeded.seed, seeded.top_p, seeded.top_k, seeded.stop, seeded.max_tokens) == (0, 0.5, 3, ("q",), 9)


def test_request_id_length_is_bounded() -> None:
    error = _rejection(build_request("a", request_id="x" * 129))
    assert "request_id" in error.message and "129" in error.message


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RequestError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFoundError("model 'x' is not loaded"), grpc.StatusCode.NOT_FOUND),
        (NoModelLoadedError("no model is loaded yet"), grpc.StatusCode.UNAVAILABLE),
        (CapacityError("at capacity"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EngineClosedError("shutting down"), grpc.StatusCode.UNAVAILABLE),
        (ZeroDivisionError("a bug"), grpc.StatusCode.INTERNAL),
        (KeyError("k"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_maps_to_a_documented_code_never_unknown(
    error: Exception, code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    got, message = _status_of(error, "req-1")
    assert got == code and got != grpc.StatusCode.UNKNOWN
    assert message
    logged = [r for r in caplog.records if "req-1" in r.getMessage()]
    if code == grpc.StatusCode.INTERNAL:
        assert "req-1" in message and type(error).__name__ in message
        assert len(logged) == 1 and logged[0].exc_info is not None  # logged once, with its traceback
    else:
        assert not logged


# ---------------------------------------------------------------------- through a real server
BAD_REQUESTS = {
    "temperature negative": dict(temperature=-1.0),
    "temperature nan": dict(temperature=math.nan),
    "temperature inf": dict(temperature=math.inf),
    "top_p negative": dict(top_p=-0.1),
    "top_p above one": dict(top_p=1.01),
    "max_tokens over limit": dict(max_tokens=100_001),
    "stop hundreds of sequences": dict(stop=[f"stop{i}" for i in range(300)]),
    "stop too long": dict(stop=["x" * 33]),
}


def _assert_still_serving(client: TextGenClient) -> None:
    response = client.complete("The ", max_tokens=3, temperature=0)
    assert response.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 3


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_arguments_get_invalid_argument_and_the_server_keeps_serving(client: TextGenClient, case: str) -> None:
    field = case.split()[0]
    for call in (
        lambda: client.complete("The ", **BAD_REQUESTS[case]),
        lambda: list(client.generate("The ", **BAD_REQUESTS[case])),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert field in caught.value.details()
    _assert_still_serving(client)


def test_prompt_over_the_byte_limit(client: TextGenClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.complete("é" * 2049, max_tokens=1)  # 4098 bytes > 4096
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4098 bytes" in caught.value.details() and "4096" in caught.value.details()
    _assert_still_serving(client)


def test_unknown_model_or_version_is_not_found(client: TextGenClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.complete("The ", model="no-such-model", max_tokens=1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        list(client.generate("The ", model="tiny", model_version=99, max_tokens=1))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "99" in caught.value.details()
    _assert_still_serving(client)


@pytest.mark.parametrize(
    "prompt",
    ["nul\x00inside", "\u0301\u0308 lone combining marks", "emoji 🦜🧪 and a ZWJ 👩‍🔬", "", "\U0010ffff"],
    ids=["nul", "combining", "emoji", "empty", "max-codepoint"],
)
def test_unusual_prompts_succeed(client: TextGenClient, prompt: str) -> None:
    response = client.complete(prompt, max_tokens=4, temperature=0)
    assert response.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 4
    assert response.usage.prompt_tokens >= 0


def test_stop_sequences_at_the_limit_are_accepted(client: TextGenClient) -> None:
    response = client.complete("The ", max_tokens=5, temperature=0, stop=[f"~{i}~" for i in range(8)])
    assert response.usage.completion_tokens == 5


def test_list_models_reports_the_tiny_model_and_limits(serving: RunningServer, client: TextGenClient) -> None:
    listing = client.list_models()
    assert [(m.name, m.version, m.level) for m in listing.models] == [("tiny", 1, "char")]
    assert listing.models[0].vocab_size > 10
    assert listing.models[0].units == 32 and listing.models[0].layers == 1
    assert listing.models[0].metadata["fixture"] == "tiny"
    assert (listing.max_tokens_limit, listing.max_prompt_bytes) == (100_000, 4096)


@pytest.mark.parametrize(
    "raw",
    [bytes([0x0A, 0x02, 0xFF, 0xFE, 0x10, 0x03]), b"\xff\xff\xff"],
    ids=["prompt-not-utf8", "not-protobuf"],
)
def test_malformed_request_bytes_are_invalid_argument_not_unknown(
    serving: RunningServer, client: TextGenClient, raw: bytes
) -> None:
    """Clients in other languages can send bytes that do not parse (invalid UTF-8 in prompt, say)."""
    with serving.channel() as channel:
        complete = channel.unary_unary("/textgen.v1.TextGeneration/Complete")
        generate = channel.unary_stream("/textgen.v1.TextGeneration/Generate")
        list_models = channel.unary_unary("/textgen.v1.TextGeneration/ListModels")
        for call in (lambda: complete(raw, timeout=10), lambda: list(generate(raw, timeout=10))):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert "textgen.v1.GenerateRequest" in caught.value.details()
        if raw == b"\xff\xff\xff":  # (the other is a ListModelsRequest with an unknown field: fine)
            with pytest.raises(grpc.RpcError) as caught:
                list_models(raw, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_still_serving(client)


@pytest.mark.parametrize(
    "params",
    [
        dict(top_k=4294967295),
        dict(seed=2**64 - 1),
        dict(temperature=1e30),
        dict(temperature=1e-30),
        dict(top_p=1e-30),
        dict(top_p=1.0, top_k=1),
    ],
    ids=["top_k-max", "seed-max", "temperature-huge", "temperature-tiny", "top_p-tiny", "top_p-one"],
)
def test_extreme_but_valid_parameters_succeed(client: TextGenClient, params: dict[str, float]) -> None:
    response = client.complete("The ", max_tokens=5, **params)
    assert response.finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    assert response.usage.completion_tokens == 5
