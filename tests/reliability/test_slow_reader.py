"""A client that stops reading its stream: after ``--stream-write-timeout`` the server ends it.

Real server, real model, real HTTP/2 flow control: the stalled client opens a stream with a
small receive window (no BDP probing, 1 KiB lookahead) and stops reading, so the server's
writes wait on flow control within a few messages. Then, while that client still reads
nothing, its sequence must leave the batch, its RPC must be counted RESOURCE_EXHAUSTED and
other clients are served; when it reads again it gets the messages already sent, then the
status naming the flag. A reader that keeps reading is never cut off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from service.api import textgen_pb2_grpc
from service.client import TextGenClient, build_request
from service.config import ConfigError, parse_config
from tests.helpers import RunningServer, wait_until

# A small HTTP/2 receive window: a client that does not read blocks the server's writes at once.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
TIMEOUT = 0.5
LONG = 100_000  # make_config's --max-tokens-limit; the tiny model needs several seconds for it


def test_a_stalled_stream_is_ended_and_frees_its_row_while_the_client_reads_nothing(
    start_server: Callable[..., RunningServer],
) -> None:
    grace = 60.0
    running = start_server(stream_write_timeout=TIMEOUT, grace_seconds=grace)
    try:
        with grpc.insecure_channel(running.target, options=SMALL_WINDOW) as channel:
            stalled = textgen_pb2_grpc.TextGenerationStub(channel).Generate(
                build_request("The ", max_tokens=LONG, seed=11, include_tokens=True), timeout=120
            )
            first = next(stalled)  # one message read, then nothing until the end of the test
            # Another client is served normally meanwhile.
            with running.client() as other:
                done = list(other.generate("The ", max_tokens=200, seed=12))
                assert done[-1].usage.completion_tokens == 200
            # While the stalled client still reads nothing, its sequence leaves the batch long before
            # max_tokens, and its RPC has ended (the handler finished: the request is counted).
            assert wait_until(lambda: running.sample("textgen_active_sequences") == 0, 30)
            assert wait_until(lambda: running.sample("textgen_requests_total", {"code": "RESOURCE_EXHAUSTED"}) == 1, 30)
            assert running.sample("textgen_requests_total", {"code": "OK"}) == 1  # the other client
            engine = running.server.engine
            assert engine.active == 0 and engine.waiting == 0
            assert running.sample("textgen_generated_tokens_total") < 200 + LONG
            # Graceful shutdown is not held up by the stalled RPC (nor waits out the grace).
            started = time.monotonic()
            running.stop(grace=grace)
            assert time.monotonic() - started < grace / 2
            # Reading again: the messages already sent, then the documented status.
            responses = [first]
            with pytest.raises(grpc.RpcError) as info:
                for response in stalled:
                    responses.append(response)
    finally:
        running.stop(grace=0)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    assert "--stream-write-timeout" in details and f"{TIMEOUT:g} s" in details, details
    # Every token the message counts reached the client, in order, and none after.
    received = sum(len(r.tokens) for r in responses)
    assert f"ended after {received} tokens" in details, (received, details)
    assert 0 < received < LONG
    assert "".join(r.text for r in responses) == "".join(t.text for r in responses for t in r.tokens)


ENDED = ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
WRITE_TIMEOUT = 1.0
DEADLINE = 4.0  # after the write timeout, and time enough for each call's first message on a loaded machine


def test_a_deadline_that_passes_while_the_status_waits_ends_quietly_and_is_counted(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The write times out (1 s after it blocks), the status then waits behind unread messages, and
    the client's deadline (4 s) passes meanwhile: no error is logged, and each request is counted
    DEADLINE_EXCEEDED, as the client sees it, unless grpc took its status before the deadline
    (then the server sent RESOURCE_EXHAUSTED; which of the two happens is grpc's timing)."""
    running = start_server(stream_write_timeout=WRITE_TIMEOUT)
    caplog.set_level("WARNING")
    try:
        with grpc.insecure_channel(running.target, options=SMALL_WINDOW) as channel:
            stub = textgen_pb2_grpc.TextGenerationStub(channel)
            sent = time.monotonic()
            calls = [stub.Generate(build_request("The ", max_tokens=LONG, seed=i), timeout=DEADLINE) for i in range(4)]
            for call in calls:
                next(call)  # one message each, then nothing

            def ended() -> float:
                return sum(running.sample("textgen_requests_total", {"code": c}) for c in ENDED)

            assert wait_until(lambda: ended() == 4), {
                c: running.sample("textgen_requests_total", {"code": c}) for c in ENDED
            }
            assert running.sample("textgen_requests_total") == 4  # no other code
            assert wait_until(lambda: running.server.engine.active == 0)
            # The client reads again only once its deadline has passed.
            time.sleep(max(0.0, sent + DEADLINE + 0.5 - time.monotonic()))
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        running.stop(grace=0)
    errors = [r for r in caplog.records if r.levelno >= 40]
    assert not errors, [r.getMessage()[:200] for r in errors]


READER_TIMEOUT = 10.0  # far above any stall of a loaded machine between a reader's reads


def test_a_reader_that_keeps_reading_is_never_cut_off(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(stream_write_timeout=READER_TIMEOUT)
    n = 3000
    before = server.sample("textgen_requests_total", {"code": "RESOURCE_EXHAUSTED"})
    # The same small window: every write waits for the client to read, but it does read.
    with TextGenClient(server.target, channel=grpc.insecure_channel(server.target, options=SMALL_WINDOW)) as client:
        responses = list(client.generate("The ", max_tokens=n, seed=5, include_tokens=True, timeout=120))
        assert responses[-1].usage.completion_tokens == n
        assert sum(len(r.tokens) for r in responses) == n
        # Pauses shorter than the timeout between reads are fine too.
        paused = []
        for response in client.generate("The ", max_tokens=300, seed=6, include_tokens=True, timeout=120):
            paused.append(response)
            if len(paused) <= 3:
                time.sleep(READER_TIMEOUT / 20)
        assert paused[-1].usage.completion_tokens == 300
        # Complete (one message, written by grpc) is not affected by the stream timeout.
        whole = client.complete("The ", max_tokens=n, seed=5, include_tokens=True, timeout=120)
        assert whole.text == "".join(r.text for r in responses)
        assert len(whole.tokens) == n
    assert server.sample("textgen_requests_total", {"code": "RESOURCE_EXHAUSTED"}) == before
    assert wait_until(lambda: server.sample("textgen_active_sequences") == 0, 30)


def test_zero_turns_the_timeout_off(start_server: Callable[..., RunningServer]) -> None:
    running = start_server(stream_write_timeout=0.0)
    try:
        with grpc.insecure_channel(running.target, options=SMALL_WINDOW) as channel:
            stalled = textgen_pb2_grpc.TextGenerationStub(channel).Generate(
                build_request("The ", max_tokens=LONG, seed=13, include_tokens=True), timeout=120
            )
            next(stalled)
            time.sleep(2 * TIMEOUT)  # twice what ends a stalled stream on the other servers
            assert running.sample("textgen_requests_total") == 0  # still open
            # The client cancelling a stalled stream ends it as CANCELLED.
            stalled.cancel()
            assert wait_until(lambda: running.sample("textgen_requests_total", {"code": "CANCELLED"}) == 1, 30)
            assert wait_until(lambda: running.sample("textgen_active_sequences") == 0, 30)
    finally:
        running.stop(grace=0)


def test_the_flag_and_its_environment_variable() -> None:
    assert parse_config([], {}).stream_write_timeout == 30.0
    assert parse_config(["--stream-write-timeout", "0"], {}).stream_write_timeout == 0.0
    assert parse_config([], {"TEXTGEN_STREAM_WRITE_TIMEOUT": "2.5"}).stream_write_timeout == 2.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="--stream-write-timeout"):
            parse_config(["--stream-write-timeout", bad], {})
