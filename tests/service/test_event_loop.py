"""The asyncio event loop never runs TensorFlow: every Python and C call on the loop's thread is watched.

``threading.setprofile`` installs a profiler in the threads a ``RunningServer`` starts; it stays only
in the event loop's thread (named by ``tests/helpers.py``) and records every call into a
``tensorflow`` or ``keras`` module made there, from start-up through requests of every kind and a new
version taking over, to shutdown.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api import textgen_pb2_grpc
from service.client import build_request
from tests.helpers import LOOP_THREAD, RunningServer, wait_until

TENSORFLOW_MODULES = ("tensorflow", "keras", "tf_keras")


class LoopWatch:
    """A profiler that keeps to the event loop's thread and records the modules of the calls made there."""

    def __init__(self) -> None:
        self.modules: Counter[str] = Counter()
        self.tensorflow_calls: list[str] = []
        self.threads: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if threading.current_thread().name != LOOP_THREAD:
            sys.setprofile(None)  # another thread of the server: not watched
            return
        if event == "call":
            module = str(frame.f_globals.get("__name__", ""))
            name = f"{module}.{frame.f_code.co_qualname}"
        elif event == "c_call":
            module = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__module__ or ""
            name = f"{module}.{getattr(arg, '__qualname__', repr(arg))}"
        else:
            return
        self.threads.add(threading.current_thread().name)
        self.modules[module] += 1
        if module.startswith(TENSORFLOW_MODULES) and len(self.tensorflow_calls) < 50:
            self.tensorflow_calls.append(name)


def _traffic(running: RunningServer) -> None:
    """Streams, completions, listings and every kind of failure, several at once."""
    errors: list[BaseException] = []

    def streams(seed: int) -> None:
        try:
            with running.client() as client:
                for i in range(4):
                    parts = list(
                        client.generate(
                            "The " * (seed + 1),
                            max_tokens=60,
                            seed=seed * 10 + i,
                            top_k=5 if i % 2 else 0,
                            top_p=0.9 if i % 3 == 0 else 0.0,
                            stop=["zq"],
                            include_tokens=i == 1,
                        )
                    )
                    assert parts[-1].usage.completion_tokens > 0
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=streams, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    with running.client() as client:
        assert client.complete("x" * 3000, max_tokens=5, seed=1).usage.completion_tokens == 5  # encoded off the loop
        assert client.complete("The ", max_tokens=30, temperature=0).usage.completion_tokens == 30
        assert client.list_models().models[0].name == "tiny"
        for params, code in (
            ({"model": "nosuch"}, grpc.StatusCode.NOT_FOUND),
            ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"max_tokens": 100_000, "timeout": 0.2}, grpc.StatusCode.DEADLINE_EXCEEDED),
        ):
            with pytest.raises(grpc.RpcError) as info:
                client.complete("The ", **params)
            assert info.value.code() == code
    with running.channel() as channel:
        cancelled = textgen_pb2_grpc.TextGenerationStub(channel).Generate(build_request("The ", max_tokens=100_000))
        next(cancelled)
        cancelled.cancel()  # the row leaves the batch
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_the_event_loop_never_runs_tensorflow(
    tiny_model_repo: Path, tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_model_repo / "tiny" / "1", repo / "tiny" / "1")
    watch = LoopWatch()
    threading.setprofile(watch)
    try:
        running = start_server(repo, poll_seconds=0.2)
    finally:
        threading.setprofile(None)  # threads started later (grpc's, the test's) are not watched
    try:
        _traffic(running)
        # A new version loads, takes the traffic, and the old one is retired, while requests run.
        shutil.copytree(repo / "tiny" / "1", repo / "tiny" / ".2.tmp")
        (repo / "tiny" / ".2.tmp").rename(repo / "tiny" / "2")
        with running.client() as client:
            assert wait_until(lambda: client.list_models().models[0].version == 2, 120)
        _traffic(running)
        engine = running.server.engine
        assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)
    finally:
        running.stop(grace=1.0)
    # The watch saw the loop's thread, and only it, run the server: start-up, the servicer, shutdown.
    assert watch.threads == {LOOP_THREAD}
    for module in ("service.server", "service.servicer", "service.stream", "grpc.aio._server"):
        assert watch.modules[module] > 0, (module, watch.modules.most_common(20))
    assert watch.tensorflow_calls == []
