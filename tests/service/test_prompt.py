"""Untrusted prompt and stop text: the Stream-Safe bound, stop normalisation, encoding off the event loop."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from service.api import textgen_pb2
from service.prompt import (
    INLINE_ENCODE_CHARS,
    MAX_NONSTARTERS,
    UnsafeTextError,
    check_stream_safe,
    encode_prompt,
    normalize_stops,
)
from service.sampling import StoppingCriteria
from training.tokenizer import Tokenizer

# 65,533 bytes of UTF-8: inside the default --max-prompt-bytes, and about half a second to NFC-normalise.
QUADRATIC_PROMPT = "e" + "\u0301\u0316" * 16383


def test_a_run_of_combining_marks_longer_than_the_limit_is_refused_naming_the_field():
    check_stream_safe("prompt", "e" + "\u0301" * MAX_NONSTARTERS)  # at the limit: fine
    with pytest.raises(UnsafeTextError) as info:
        check_stream_safe("prompt", "ab" + "\u0301" * (MAX_NONSTARTERS + 1))
    message = str(info.value)
    assert message.startswith("prompt must be Stream-Safe text")
    assert f"at most {MAX_NONSTARTERS}" in message and f"got {MAX_NONSTARTERS + 1} from character 2" in message


def test_ordinary_text_in_many_scripts_is_stream_safe():
    for text in ("plain ASCII", "café naïve", "Ελληνικά", "日本語のテキスト", "e\u0301\u0316 x\u0308", "🙂" * 50):
        check_stream_safe("prompt", text)


def test_stop_sequences_are_normalised_like_the_models_text():
    tokenizer = Tokenizer(level="char").fit_on_texts(["café au lait"])
    stops = normalize_stops(tokenizer, ["e\u0301", "x"])
    assert stops == ("\u00e9", "x")
    criteria = StoppingCriteria(100, stops)
    emitted = [criteria(piece) for piece in tokenizer.decode(tokenizer.encode("café au lait"))]
    assert "".join(e for e, _ in emitted) == "caf" and emitted[-1][1] == "stop"
    with pytest.raises(UnsafeTextError, match=r"^stop\[1\] must be Stream-Safe"):
        normalize_stops(tokenizer, ["ok", "a" + "\u0301" * 40])


def test_long_prompts_are_encoded_off_the_event_loop():
    seen: list[str] = []

    class Recording(Tokenizer):
        def encode(self, text: str) -> list[int]:
            seen.append(threading.current_thread().name)
            return super().encode(text)

    tokenizer = Recording(level="char").fit_on_texts(["abc "])

    async def run() -> tuple[list[int], list[int]]:
        short = await encode_prompt(tokenizer, "abc")
        long = await encode_prompt(tokenizer, "abc " * INLINE_ENCODE_CHARS)
        return short, long

    short, long = asyncio.run(run())
    assert short == tokenizer.encode("abc") and len(long) == 4 * INLINE_ENCODE_CHARS
    assert seen[0] == "MainThread" and seen[1] != "MainThread"


def test_the_quadratic_prompt_is_refused_and_running_streams_go_on(client):
    running = client.generate("The ", max_tokens=2000, temperature=1.0, seed=3)
    first = next(running)
    assert first.text
    with pytest.raises(grpc.RpcError) as info:
        client.complete(QUADRATIC_PROMPT[:2001], max_tokens=4)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt must be Stream-Safe text" in info.value.details()
    rest = list(running)
    assert rest[-1].finish_reason == textgen_pb2.FINISH_REASON_LENGTH


def test_stop_sequences_go_through_the_same_check_over_grpc(client):
    with pytest.raises(grpc.RpcError) as info:
        client.complete("The ", max_tokens=4, stop=["ok", "a" + "\u0301" * 31])  # 32 characters: within the limit
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("stop[1] must be Stream-Safe text")
