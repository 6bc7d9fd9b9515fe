"""A real in-process textgen server on port 0 (its own event loop in a thread) and channels to it.

``serving`` is one server for the whole session serving ``tiny_model_repo``;
``start_server(**overrides)`` starts more (with small limits, say) and stops them
when the test ends. Tests talk to them over real gRPC channels and scrape the real
``/metrics`` HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import TextGenClient
from service.config import EngineConfig, ServerConfig

T = TypeVar("T")

READY_TIMEOUT = 120.0


def engine_config(wake_interval: float | None = None, **flags: Any) -> EngineConfig:
    """The engine configuration a server started with these flags runs (the server's defaults otherwise)."""
    config = ServerConfig(**flags).engine
    return config if wake_interval is None else dataclasses.replace(config, wake_interval=wake_interval)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` seconds pass; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class RunningServer:
    """A ``service.server.Server`` running on an event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        from service.server import Server

        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()
        self.server = Server(config)  # built here, off the loop: it configures TensorFlow's devices
        self.call(self.server.start())
        self.call(asyncio.wait_for(self.server.ready.wait(), READY_TIMEOUT))
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = READY_TIMEOUT) -> T:
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, timeout: float | None = 60.0) -> TextGenClient:
        return TextGenClient(self.target, timeout=timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
        return body.decode("utf-8")

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one sample in the scraped exposition (0 when absent), summed over unlisted labels."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.shutdown(grace=grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


def make_config(models: Path, **overrides: Any) -> ServerConfig:
    base = ServerConfig(
        models=str(models),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_concurrent=64,
        max_queue=64,
        max_batch_size=32,
        max_tokens_limit=20000,
        default_max_tokens=16,
        max_prompt_bytes=4096,
        max_stop_sequences=8,
        max_stop_length=32,
        grace_seconds=5.0,
        poll_seconds=0.0,
        request_timeout=60.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def serving(tiny_model_repo: Path) -> Iterator[RunningServer]:
    """The session's shared server (max_concurrent 64, batch 32, max_tokens_limit 20000, 4096 prompt bytes)."""
    running = RunningServer(make_config(tiny_model_repo))
    yield running
    running.stop()


@pytest.fixture
def client(serving: RunningServer) -> Iterator[TextGenClient]:
    with serving.client() as c:
        yield c


@pytest.fixture
def start_server(tiny_model_repo: Path) -> Iterator[Callable[..., RunningServer]]:
    """Starts extra servers with config overrides; stops them after the test."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        running = RunningServer(make_config(tiny_model_repo, **overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop(grace=0)
