"""`python -m service` as a real process: SIGTERM lets running streams finish, rejects new ones, exits 0."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api import textgen_pb2
from service.client import TextGenClient
from tests.helpers import RunningServer, ServerProcess

LIMIT = {"TEXTGEN_MAX_TOKENS_LIMIT": "50000"}


@pytest.fixture
def process_factory(start_process: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """``python -m service *flags`` on the tiny model with --max-tokens-limit 50000."""
    return lambda *flags: start_process(*flags, env=LIMIT)


def _shutdown_observed(target: str) -> bool:
    """True once health says NOT_SERVING or the server no longer answers health checks."""
    try:
        with grpc.insecure_channel(target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30).status
        return bool(status == health_pb2.HealthCheckResponse.NOT_SERVING)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_lets_running_streams_finish_rejects_new_requests_and_exits_0(
    process_factory: Callable[..., ServerProcess],
) -> None:
    server = process_factory("--grace-seconds", "60")
    server.wait_serving()
    n_tokens = 6000
    results: list[tuple[int, int, str]] = []  # (messages, completion_tokens, finish_reason)
    errors: list[BaseException] = []
    first_message = threading.Barrier(4)

    def stream(i: int) -> None:
        try:
            with TextGenClient(server.target, timeout=120) as c:
                responses = []
                for response in c.generate(f"stream {i} ", max_tokens=n_tokens, temperature=1.0, seed=i):
                    if not responses:
                        first_message.wait(timeout=60)
                    responses.append(response)
                last = responses[-1]
                results.append(
                    (len(responses), last.usage.completion_tokens, textgen_pb2.FinishReason.Name(last.finish_reason))
                )
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    first_message.wait(timeout=60)  # all three are streaming
    server.proc.send_signal(signal.SIGTERM)

    end = time.monotonic() + 30
    while not _shutdown_observed(server.target) and time.monotonic() < end:
        time.sleep(0.05)
    still_running = sum(t.is_alive() for t in threads)
    with TextGenClient(server.target, timeout=10) as late:
        with pytest.raises(grpc.RpcError) as caught:
            late.complete("too late", max_tokens=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()

    for t in threads:
        t.join(timeout=120)
    assert not errors, f"a running stream failed during shutdown: {errors!r}\n{server.log()}"
    assert still_running > 0, "the streams ended before the shutdown began; the test proved nothing"
    assert sorted(r[1] for r in results) == [n_tokens] * 3
    assert {r[2] for r in results} == {"FINISH_REASON_LENGTH"}
    assert server.proc.wait(timeout=60) == 0, server.log()
    assert "shutting down" in server.log()


def test_sigint_past_the_grace_period_cancels_what_is_left_and_exits_0(
    process_factory: Callable[..., ServerProcess],
) -> None:
    server = process_factory("--grace-seconds", "0.5")
    server.wait_serving()
    with TextGenClient(server.target, timeout=120) as c:
        responses = c.generate("forever ", max_tokens=50000, temperature=1.0)
        next(responses)
        server.proc.send_signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in responses:
                pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert server.proc.wait(timeout=60) == 0, server.log()


def test_in_process_shutdown_turns_health_not_serving_and_lets_the_stream_finish(
    start_server: Callable[..., RunningServer],
) -> None:
    running = start_server(grace_seconds=60.0, max_tokens_limit=50000)
    n_tokens = 4000
    with running.channel() as channel, running.client(timeout=120) as c:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="textgen.v1.TextGeneration"), timeout=120
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = c.generate("The ", max_tokens=n_tokens, temperature=1.0, seed=4)
        received = [next(stream)]
        shutdown = asyncio.run_coroutine_threadsafe(running.server.shutdown(), running.loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with TextGenClient(running.target, timeout=10) as late:
            with pytest.raises(grpc.RpcError) as caught:
                late.complete("too late", max_tokens=1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not shutdown.done(), "shutdown finished before the running stream did"
        received.extend(stream)
    assert received[-1].usage.completion_tokens == n_tokens
    assert received[-1].finish_reason == textgen_pb2.FINISH_REASON_LENGTH
    shutdown.result(timeout=60)


def test_streams_cut_at_the_end_of_the_grace_are_counted_as_the_client_saw_them(
    start_server: Callable[..., RunningServer],
) -> None:
    running = start_server(grace_seconds=0.5, max_tokens_limit=50000)
    registry = running.server.metrics.registry
    with running.client(timeout=120) as c:
        stream = c.generate("The ", max_tokens=50000, temperature=1.0, seed=4)
        next(stream)
        shutdown = asyncio.run_coroutine_threadsafe(running.server.shutdown(), running.loop)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
    shutdown.result(timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    counted = {
        code: registry.get_sample_value("textgen_requests_total", {"model": "tiny", "code": code, "protocol": "grpc"})
        or 0.0
        for code in ("UNAVAILABLE", "CANCELLED")
    }
    assert counted == {"UNAVAILABLE": 1.0, "CANCELLED": 0.0}


def test_sigterm_during_the_first_model_load_exits_without_waiting_for_it(
    tmp_path: Path, tiny_model_repo: Path, start_process: Callable[..., ServerProcess]
) -> None:
    models = tmp_path / "many"
    for i in range(40):  # loading 40 versions one after another takes far longer than a drain
        shutil.copytree(tiny_model_repo / "tiny" / "1", models / f"m{i:02d}" / "1")
    server = start_process("--grace-seconds", "1", models=models, env=LIMIT)
    server.proc.send_signal(signal.SIGTERM)  # the port is bound; the first load has begun
    assert server.proc.wait(timeout=60) == 0, server.log()
    log = server.log()
    # One process says it of its load; with frontend processes the supervisor or the engine does.
    assert re.search(
        "exiting while (the first model load is still running|the engine process is still starting)", log
    ), log
    assert "ready: serving" not in log
