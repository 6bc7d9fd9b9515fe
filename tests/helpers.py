"""Helpers every test folder shares: servers (in-process and as a process), polling, ports, RSS, tools.

* ``RunningServer``: a ``service.server.Server`` on its own event loop in a thread, on port 0.
* ``ServerProcess``: ``python -m service`` as a child process on port 0, its output in a log file.
* ``make_config`` / ``engine_config``: the configuration the tests' servers and engines run.
* ``wait_until``: polls a condition; its timeout only bounds a hang, it never asserts speed.
* ``child_env``, ``free_ports``, ``rss_mb``, ``metric_sample``, ``need_tool``.

The fixtures built on these (``serving``, ``start_server``, ``start_process``, the tiny model
repositories) live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.client import TextGenClient
from service.config import EngineConfig, ServerConfig

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 120.0  # a server's start-up (model load and warm-up) on a loaded machine
WAIT_TIMEOUT = 30.0  # wait_until's default: what "eventually" means in these tests
LOOP_THREAD = "test-server-loop"  # the name of a RunningServer's event-loop thread


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` seconds pass; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def engine_config(wake_interval: float | None = None, **flags: Any) -> EngineConfig:
    """The engine configuration a server started with these flags runs (the server's defaults otherwise)."""
    config = ServerConfig(**flags).engine
    return config if wake_interval is None else dataclasses.replace(config, wake_interval=wake_interval)


def make_config(models: Path | str, **overrides: Any) -> ServerConfig:
    """A loopback server on port 0 with small limits: batch 32, 64 concurrent + 64 queued, 4096 prompt bytes."""
    base = ServerConfig(
        models=str(models),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=0,
        max_concurrent=64,
        max_queue=64,
        max_batch_size=32,
        max_tokens_limit=100_000,
        default_max_tokens=16,
        max_prompt_bytes=4096,
        max_stop_sequences=8,
        max_stop_length=32,
        grace_seconds=5.0,
        poll_seconds=0.0,
        request_timeout=60.0,
    )
    return dataclasses.replace(base, **overrides)


def metric_sample(exposition: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent), summed over unlisted labels."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


def scrape(metrics_port: int) -> str:
    """The ``/metrics`` text of a server on this machine."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode("utf-8")


def health_status(target: str, service: str = "", timeout: float = 10.0) -> int | None:
    """The health service's answer for ``service`` (None when the server does not answer)."""
    try:
        with grpc.insecure_channel(target) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status)
    except grpc.RpcError:
        return None


class RunningServer:
    """A ``service.server.Server`` running on an event loop in a background thread.

    The constructor returns once the server is ready (a model loaded), or, with ``wait_ready=False``,
    once it listens.
    """

    def __init__(self, config: ServerConfig, wait_ready: bool = True) -> None:
        from service.server import Server

        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=LOOP_THREAD, daemon=True)
        self._thread.start()
        try:
            self.server = Server(config)  # built here, off the loop: it configures TensorFlow's devices
            self.call(self.server.start())
            self.target = f"127.0.0.1:{self.server.port}"
            if wait_ready:
                self.call(asyncio.wait_for(self.server.ready.wait(), READY_TIMEOUT))
        except BaseException:
            self._close_loop()
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = READY_TIMEOUT) -> T:
        """Runs a coroutine on the server's loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, timeout: float | None = 60.0) -> TextGenClient:
        return TextGenClient(self.target, timeout=timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def metrics_text(self) -> str:
        return scrape(self.server.metrics_port)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one sample in the scraped exposition (0 when absent), summed over unlisted labels."""
        return metric_sample(self.metrics_text(), name, labels)

    def stop(self, grace: float = 1.0) -> None:
        """Shuts the server down (no-op once stopped)."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.shutdown(grace=grace))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class ServerProcess:
    """``python -m service`` on port 0 (gRPC and metrics) as a child process; stdout and stderr go to
    ``log_path`` so no pipe can fill up. The constructor returns once the server has printed its ports.

    Inherited ``TEXTGEN_*`` variables are dropped; ``env`` adds variables of the test's own.
    """

    def __init__(self, models: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
        environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        environ.update(env or {})
        self.log_path = log_path
        argv = [sys.executable, "-m", "service", "--models", str(models), "--host", "127.0.0.1"]
        argv += ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--poll-seconds", "0", *flags]
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
        try:
            self.port, self.metrics_port = self._read_ports()
        except BaseException:
            self.close()
            raise
        self.target = f"127.0.0.1:{self.port}"

    def _read_ports(self) -> tuple[int, int]:
        end = time.monotonic() + READY_TIMEOUT
        while True:
            match = re.search(r"listening on port (\d+), metrics on port (\d+)", self.log())
            if match:
                return int(match.group(1)), int(match.group(2))
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"the server printed no port (exit code {self.proc.poll()}); log:\n{self.log()}")
            time.sleep(0.05)

    def wait_serving(self, timeout: float = READY_TIMEOUT) -> None:
        """Returns once health says SERVING; fails with the log if the process exits or the time runs out."""
        serving = health_pb2.HealthCheckResponse.SERVING
        if not wait_until(
            lambda: health_status(self.target, timeout=5) == serving or self.proc.poll() is not None, timeout
        ):
            raise AssertionError(f"the server never became SERVING; log:\n{self.log()}")
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}; log:\n{self.log()}")

    def client(self, timeout: float | None = 60.0) -> TextGenClient:
        return TextGenClient(self.target, timeout=timeout)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_sample(scrape(self.metrics_port), name, labels)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        """SIGTERM, then SIGKILL if the process is still there after 15 s (no-op once it has exited)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def child_env() -> dict[str, str]:
    """The environment for a child ``python -m training`` or ``textgen``: this one's without TF_CONFIG
    (no cluster), with TensorFlow's C++ log quiet."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct loopback ports free right now (for programs that cannot take port 0)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rss_mb(pid: int | str = "self") -> float:
    """The resident set size of a process (this one by default), in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def in_ci() -> bool:
    """Whether the run is CI's (``CI=true``): there a missing required tool fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


# Tools a test may need: the package that has them, and whether CI must have them.
TOOLS = {
    "promtool": ("Debian package 'prometheus'; scripts/test.sh installs it", True),
    "prometheus": ("Debian package 'prometheus'; scripts/test.sh installs it", True),
    # Debian's kubernetes-client is too old to render the overlays; CI images may lack kubectl.
    "kubectl": ("a kubectl new enough for `kubectl kustomize` of the overlays", False),
}
MISSING = " is not installed"  # in the skip reason; tests/conftest.py lists those skips at the end of the run


def need_tool(name: str) -> str:
    """The path of the program ``name``. Missing: the test is skipped, or fails under ``CI=true`` when CI
    must have it (``TOOLS``)."""
    path = shutil.which(name)
    if path is not None:
        return path
    where, required_in_ci = TOOLS[name]
    if required_in_ci and in_ci():
        pytest.fail(f"{name}{MISSING} ({where}), and CI=true requires it", pytrace=False)
    pytest.skip(f"{name}{MISSING} ({where})")
