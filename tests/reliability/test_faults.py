"""Fault isolation against a real server serving a real model (``tiny``) and a test-only faulty one.

* a step (or prefill) that raises fails only the requests of that step, with INTERNAL and a
  message (no server traceback), and the engine goes on serving;
* a real TensorFlow out-of-memory error gives RESOURCE_EXHAUSTED for the requests it hit;
* a client that never reads its stream does not stall the others, the engine's buffering for it
  is bounded by max_tokens, and the stalled stream ends with the documented status.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import TextGenClient
from tests.helpers import RunningServer, wait_until
from tests.reliability.faulty_model import FAULT, OOM, export_faulty

# Streams of the faulty model that a fault must end long before they end by themselves.
VICTIM_TOKENS = 1_000_000


@pytest.fixture(scope="module")
def two_models(tiny_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("faultrepo")
    shutil.copytree(tiny_model_repo / "tiny", repo / "tiny")
    export_faulty(repo / "faulty")
    return repo


@pytest.fixture
def server(start_server: Callable[..., RunningServer], two_models: Path) -> RunningServer:
    """One server for the module's tests, serving ``tiny`` (the default) and ``faulty``."""
    return start_server(two_models, scope="module", default_model="tiny", max_tokens_limit=VICTIM_TOKENS)


class Background:
    """A stream on another thread, read as it comes; ``join()`` returns its responses or raises its error."""

    def __init__(self, client: TextGenClient, prompt: str, **params: object) -> None:
        self.responses: list = []
        self.error: grpc.RpcError | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, prompt, params), daemon=True)
        self._thread.start()

    def _run(self, client: TextGenClient, prompt: str, params: dict) -> None:
        try:
            for response in client.generate(prompt, timeout=120, **params):
                self.responses.append(response)
                self.started.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()

    def join(self) -> list:
        self._thread.join(150)
        assert not self._thread.is_alive()
        return self.responses


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_healthy(server: RunningServer) -> None:
    with server.channel() as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    engine = server.server.engine
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0, 30)
    assert wait_until(lambda: server.sample("textgen_active_sequences") == 0, 30)


def test_the_faulty_model_serves_clean_prompts(server: RunningServer) -> None:
    with server.client() as client:
        done = client.complete("abc", model="faulty", max_tokens=20, seed=1)
        assert done.usage.completion_tokens == 20
        assert FAULT not in done.text and OOM not in done.text


def test_a_step_that_raises_fails_only_the_requests_in_that_step(server: RunningServer) -> None:
    internal_before = server.sample("textgen_requests_total", {"code": "INTERNAL"})
    with server.client() as client:
        # Another model's stream runs throughout: a different batch, untouched by the fault.
        other = Background(client, "The ", model="tiny", max_tokens=3000, seed=3)
        # A stream of the faulty model is running, so the next prompt rides in its step (not prefill).
        victim = Background(client, "abc", model="faulty", max_tokens=VICTIM_TOKENS, seed=4)
        assert victim.started.wait(60) and other.started.wait(60)
        code, details = _code(lambda: client.complete(f"ab{FAULT}cd", model="faulty", max_tokens=5))
        assert code == grpc.StatusCode.INTERNAL
        assert "fault injected" in details and "request_id=" in details
        assert "File " not in details and "Traceback" not in details  # no server internals leak
        # The engine reads a prompt that joins a running batch inside the batch's own decode steps,
        # and a step that raises ends every row of its batch: the running faulty stream fails with
        # the same status, long before its max_tokens.
        victim.join()
        assert victim.error is not None, f"the victim was not ended by the fault ({len(victim.responses)} messages)"
        assert victim.error.code() == grpc.StatusCode.INTERNAL, victim.error
        assert "fault injected" in (victim.error.details() or "")
        # The other model's stream finishes whole.
        responses = other.join()
        assert other.error is None, other.error
        assert responses[-1].usage.completion_tokens == 3000
        # The engine keeps serving the faulty model too.
        assert client.complete("abc", model="faulty", max_tokens=7, seed=5).usage.completion_tokens == 7
    assert server.sample("textgen_requests_total", {"code": "INTERNAL"}) == internal_before + 2
    _assert_healthy(server)


def test_a_prefill_that_raises_is_internal_and_the_next_request_is_served(server: RunningServer) -> None:
    with server.client() as client:
        code, details = _code(lambda: list(client.generate(f"{FAULT}", model="faulty", max_tokens=5)))
        assert code == grpc.StatusCode.INTERNAL and "fault injected" in details
        assert client.complete("abc", model="faulty", max_tokens=3, seed=1).usage.completion_tokens == 3
    _assert_healthy(server)


def test_out_of_memory_is_resource_exhausted_for_the_requests_it_hit(server: RunningServer) -> None:
    with server.client() as client:
        other = Background(client, "The ", model="tiny", max_tokens=2000, seed=8)
        assert other.started.wait(60)
        # TensorFlow's CPU allocator retries for ~10 s before it gives up: a real OOM, not a simulated one.
        code, details = _code(lambda: client.complete(f"ab{OOM}", model="faulty", max_tokens=5, timeout=120))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "OOM" in details and "out of memory" in details
        responses = other.join()
        assert other.error is None, other.error
        assert responses[-1].usage.completion_tokens == 2000
        assert client.complete("abc", model="faulty", max_tokens=4, seed=2).usage.completion_tokens == 4
    _assert_healthy(server)


def test_a_client_that_never_reads_cannot_stall_others(
    start_server: Callable[..., RunningServer], two_models: Path
) -> None:
    """The engine never waits for a reader; the stalled RPC ends when its connection's age + grace run out."""
    running = start_server(two_models, default_model="tiny", max_connection_age=3.0, grace_seconds=1.0)
    try:
        n = 5000
        # A small HTTP/2 receive window, never read: the server's writes block on flow control at once.
        small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
        with grpc.insecure_channel(running.target, options=small_window) as stalled_channel:
            stalled = TextGenClient(running.target, channel=stalled_channel)
            call = stalled.generate("The ", max_tokens=n, seed=11)
            next(call)  # one message read, then never again
            with running.client() as other:
                for seed in range(3):
                    done = other.complete("The ", max_tokens=200, seed=seed)
                    assert done.usage.completion_tokens == 200
            # The stalled stream's row left the batch unread (at max_tokens, or when its RPC was ended):
            # the engine buffered at most max_tokens tokens for it.
            engine = running.server.engine
            assert wait_until(lambda: engine.active == 0 and engine.waiting == 0, 60)
            assert 3 * 200 < running.sample("textgen_generated_tokens_total") <= n + 3 * 200
            # The server ends the stalled RPC itself (connection age + grace), freeing what it held.
            assert wait_until(lambda: running.sample("textgen_requests_total") == 4, 60)
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.sample("textgen_active_sequences") == 0
    finally:
        running.stop(grace=0)
