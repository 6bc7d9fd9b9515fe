"""The HTTP API through the official ``openai`` client, against a real server on port 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from tests.helpers import RunningServer

PROMPT = "The "


@pytest.fixture
def http_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(scope="module", http_port=0)


@pytest.fixture
def oai(http_server: RunningServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{http_server.server.http_port}/v1", api_key="unused", max_retries=0, timeout=60
    )
    yield client
    client.close()


def test_non_streamed_completion_has_text_finish_reason_and_usage(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=3)
    assert done.object == "text_completion" and done.model == "tiny" and done.id.startswith("cmpl-")
    choice = done.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text and choice.logprobs is None
    assert done.usage is not None and done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12


def test_streamed_completion_grows_text_and_ends_with_usage(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, seed=5, temperature=0.9)
    chunks = list(
        oai.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=40,
            seed=5,
            temperature=0.9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0] for c in chunks if c.choices]
    assert len(texts) >= 2
    assert all(c.finish_reason is None for c in texts[:-1]) and texts[-1].finish_reason == "length"
    assert "".join(c.text for c in texts) == whole.choices[0].text
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 40


def test_stop_ends_the_text_before_the_stop_string(oai: openai.OpenAI) -> None:
    free = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, seed=11, temperature=0)
    text = free.choices[0].text
    stop = text[10:12]
    assert stop and stop in text
    done = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, seed=11, temperature=0, stop=[stop])
    assert done.choices[0].finish_reason == "stop"
    assert done.choices[0].text == text[: text.index(stop)]


def test_a_seeded_request_gives_the_grpc_text(oai: openai.OpenAI, http_server: RunningServer) -> None:
    over_http = oai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=50, temperature=0.8, top_p=0.9, seed=1234, extra_body={"top_k": 20}
    )
    with http_server.client() as client:
        over_grpc = client.complete(
            PROMPT, model="tiny", max_tokens=50, temperature=0.8, top_p=0.9, top_k=20, seed=1234
        )
    assert over_http.choices[0].text == over_grpc.text and len(over_grpc.text) > 0


def test_model_version_can_be_pinned_and_logprobs_come_with_the_tokens(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="tiny:1", prompt=PROMPT, max_tokens=6, seed=2, logprobs=0)
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and len(logprobs.tokens) == 6
    assert logprobs.token_logprobs is not None and all(p <= 0 for p in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == done.choices[0].text


def test_a_bad_temperature_is_a_bad_request_naming_the_field(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert caught.value.status_code == 400
    assert "temperature" in caught.value.message and "-1" in caught.value.message
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "temperature" and body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"n": 2}, "n"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"logprobs": 3}, "logprobs"),
        ({"max_tokens": 10**9}, "max_tokens"),
    ],
)
def test_unsupported_or_out_of_range_fields_are_a_bad_request(
    oai: openai.OpenAI, extra: dict[str, object], field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="tiny", prompt=PROMPT, **extra)  # type: ignore[call-overload]
    assert field in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == field


def test_unknown_fields_and_user_are_ignored(oai: openai.OpenAI) -> None:
    done = oai.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, user="someone", extra_body={"no_such_field": 1}
    )
    assert done.usage is not None and done.usage.completion_tokens == 3


def test_an_unknown_model_is_not_found(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="no-such-model", prompt=PROMPT)
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.message


def test_chat_completions_is_not_found_and_says_why(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "plain completions" in caught.value.message


def test_models_lists_the_loaded_models(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "textgen"


def test_requests_are_counted_with_the_protocol(oai: openai.OpenAI, http_server: RunningServer) -> None:
    before = http_server.sample("textgen_requests_total", {"protocol": "http", "code": "OK", "model": "tiny"})
    oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    with http_server.client() as client:
        client.complete(PROMPT, max_tokens=2)
    after = http_server.sample("textgen_requests_total", {"protocol": "http", "code": "OK", "model": "tiny"})
    assert after == before + 1
    assert http_server.sample("textgen_requests_total", {"protocol": "grpc", "code": "OK"}) >= 1
    assert http_server.sample("textgen_request_duration_seconds_count", {"protocol": "http"}) >= 1
