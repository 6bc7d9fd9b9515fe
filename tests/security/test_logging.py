"""What the server logs about a request: counts and codes, never the prompt, the generated text or a token."""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from service.api import textgen_pb2_grpc
from service.client import TextGenClient, build_request
from tests.helpers import RunningServer, ServerProcess, wait_until

SECRET_PROMPT = "my password is hunter2 and my card is 4111"


def test_logs_hold_no_prompt_or_generated_text_and_cannot_be_forged(
    serving: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with serving.client() as client:
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


def test_bearer_tokens_are_never_logged_even_at_debug(
    start_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """``textgen serve --log-level debug`` as a real process: good, bad and rotated tokens, and file problems."""
    good, bad, rotated = (f"tok-{kind}-{secrets.token_hex(16)}" for kind in ("good", "bad", "rotated"))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# serving tokens\n{good}\n", encoding="utf-8")
    server = start_process("--log-level", "debug", "--auth-token-file", str(tokens))
    proc = server.proc
    target = server.target
    try:
        server.wait_serving()
        with TextGenClient(target, token=good, timeout=60) as client:
            assert client.complete("The ", max_tokens=5, seed=1).usage.completion_tokens == 5
            assert list(client.generate("The ", max_tokens=5, seed=2))[-1].usage.completion_tokens == 5
            assert client.list_models().models
        with grpc.insecure_channel(target) as channel:
            stub = textgen_pb2_grpc.TextGenerationStub(channel)
            for metadata in (
                (("authorization", f"Bearer {bad}"),),
                (("authorization", f"Bearer {good[:-1]}"),),
                (("authorization", f"Basic {good}"),),
                (("authorization", good),),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Complete(build_request("The ", max_tokens=2), metadata=metadata, timeout=30)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Rotation, a missing file and a file with no token: each is logged, with counts and the path only.
        replacement = tmp_path / "tokens.new"
        replacement.write_text(f"{rotated}\n", encoding="utf-8")
        os.replace(replacement, tokens)
        with TextGenClient(target, token=rotated, timeout=60) as client:
            assert client.complete("The ", max_tokens=2, seed=3).usage.completion_tokens == 2
            tokens.unlink()
            assert client.complete("The ", max_tokens=2, seed=4).usage.completion_tokens == 2
            tokens.write_text(f"# {bad} was revoked\n", encoding="utf-8")
            assert client.complete("The ", max_tokens=2, seed=5).usage.completion_tokens == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = server.log()
    # The log is at DEBUG and holds the request lines and the token file's reload and problems ...
    assert " DEBUG " in text
    assert len(re.findall(r" INFO service\.servicer: request ", text)) == 5, text[-3000:]  # refusals: counted only
    assert "reloaded 1 tokens from --auth-token-file" in text
    assert "is missing; keeping the 1 tokens" in text and "holds no token" in text
    # ... and no token, nor the random half of one.
    for token in (good, bad, rotated):
        assert token not in text
        assert token.rsplit("-", 1)[1][:16] not in text
