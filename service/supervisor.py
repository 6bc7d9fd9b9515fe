"""``textgen serve`` with frontend processes: the supervisor that starts, watches and stops the others.

The process ``textgen serve`` starts as (with ``--frontends`` of 1 or more):

* resolves each port once: a port of 0 becomes one free port, held here with ``SO_REUSEPORT`` and
  shared by every frontend, which binds it with ``SO_REUSEPORT`` too;
* starts one engine process (``service/engine_host.py``: models, batches, TensorFlow with the
  cores the frontends leave) and N frontend processes (``service/frontend.py``: gRPC and HTTP);
* serves ``/metrics`` for all of them (``prometheus_client``'s multiprocess mode: every process
  writes its samples to files in a private folder, read here at each scrape);
* restarts a frontend that dies (and tells the engine, which ends its rows); if the engine dies,
  stops the frontends (they have already failed their streams UNAVAILABLE) and exits 1, so
  Kubernetes restarts the pod;
* on SIGTERM/SIGINT, has every frontend drain its streams (``--grace-seconds``), then stops the
  engine, and exits 0 when every process did.

Processes start with ``multiprocessing``'s spawn method: each is a fresh interpreter, and only the
engine imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from service import ipc
from service.config import ServerConfig

log = logging.getLogger(__name__)

# A frontend that dies this many times within RESTART_WINDOW seconds is not restarted again: the
# server exits 1 (a frontend that cannot bind its port, say, would otherwise restart forever).
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
START_TIMEOUT = 120.0  # for the first frontends to bind their ports
STOP_EXTRA = 10.0  # beyond --grace-seconds, for processes to exit after SIGTERM before SIGKILL


def frontend_count(config: ServerConfig, cores: int) -> int:
    """``--frontends``, with -1 (automatic) resolved: one per usable core but the engine's, at least 1."""
    return config.frontends if config.frontends >= 0 else max(1, cores - 1)


def reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """A port of 0 becomes a free one, held by a bound (not listening) ``SO_REUSEPORT`` socket until exit."""
    if port != 0:
        return port, None
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    return int(sock.getsockname()[1]), sock


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Linux: this process gets ``sig`` when its parent (the supervisor) dies, so no process outlives the pod's."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts the engine and the frontends, restarts dead frontends, serves metrics, owns the exit code."""

    def __init__(self, config: ServerConfig, frontends: int) -> None:
        self.config = config
        self.frontends = frontends
        self.run_dir = tempfile.mkdtemp(prefix="textgen-")
        self.metrics_dir = os.path.join(self.run_dir, "metrics")
        os.mkdir(self.metrics_dir)
        self._context = multiprocessing.get_context("spawn")
        self._held: list[socket.socket] = []
        self._engine: BaseProcess | None = None
        self._frontends: dict[int, BaseProcess] = {}
        self._generation: dict[int, int] = {}
        self._restarts: list[float] = []
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self._engine_up: Any = None  # a multiprocessing Event, set once the engine process has bound its socket
        self.child_config = config

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or the engine's death; returns the exit code."""
        # Before any child starts: each process then writes its metric samples to files here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        try:
            return self._run()
        finally:
            self._kill_all()
            for sock in self._held:
                sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _run(self) -> int:
        config = self.config
        ports: dict[str, Any] = {}
        for name in ("port", "http_port", "health_port"):
            value = getattr(config, name)
            if value < 0:
                continue
            try:
                ports[name], held = reserve_port(config.host, value)
            except OSError as exc:
                print(f"textgen serve: error: could not reserve a {name.replace('_', ' ')}: {exc}", file=sys.stderr)
                return 1
            if held is not None:
                self._held.append(held)
        self.child_config = dataclasses.replace(config, **ports)
        metrics_port = self._serve_metrics()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        bound = self._context.SimpleQueue()
        self._engine_up = self._context.Event()
        self._engine = self._context.Process(
            target=_engine_main,
            args=(self.child_config, self.run_dir, self.frontends, self._engine_up),
            name="textgen-engine",
        )
        self._engine.start()
        for index in range(self.frontends):
            self._start_frontend(index, bound)
        if not self._wait_bound(bound):
            return 1
        c = self.child_config
        print(
            f"textgen: listening on port {c.port}, metrics on port {metrics_port}, http on port {max(c.http_port, 0)}",
            flush=True,
        )
        log.info(
            "textgen serving gRPC on %s:%d with %d frontend processes, metrics on port %d",
            c.host,
            c.port,
            self.frontends,
            metrics_port,
        )
        return self._watch(bound)

    def _serve_metrics(self) -> int:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        server, _ = start_http_server(self.config.metrics_port, addr=self.config.host.strip("[]"), registry=registry)
        return int(server.server_port)

    def _start_frontend(self, index: int, bound: Any) -> None:
        generation = self._generation.get(index, -1) + 1
        self._generation[index] = generation
        name = ipc.frontend_id(index, generation)
        process = self._context.Process(
            target=_frontend_main,
            args=(self.child_config, ipc.engine_endpoint(self.run_dir), name, bound),
            name=f"textgen-frontend-{index}",
        )
        process.start()
        self._frontends[index] = process

    def _wait_bound(self, bound: Any) -> bool:
        """Waits until every frontend bound its ports; False when one died first or the wait ran out."""
        waiting = {ipc.frontend_id(i, self._generation[i]): i for i in self._frontends}
        deadline = time.monotonic() + START_TIMEOUT
        while waiting:
            if self._stopping:
                return True
            if time.monotonic() > deadline:
                log.error("frontends %s did not bind their ports in %.0f s", sorted(waiting), START_TIMEOUT)
                return False
            for index in waiting.values():
                process = self._frontends[index]
                if not process.is_alive():
                    log.error("frontend %d exited with %s while starting", index, process.exitcode)
                    return False
            if self._engine is not None and not self._engine.is_alive():
                log.error("the engine process exited with %s while starting", self._engine.exitcode)
                return False
            multiprocessing.connection.wait([bound._reader, self._wake_r], timeout=0.2)
            while not bound.empty():
                waiting.pop(bound.get(), None)
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _watch(self, bound: Any) -> int:
        """Until a signal or the engine's death: restart frontends that die."""
        engine = self._engine
        assert engine is not None
        notices = zmq.Context.instance().socket(zmq.DEALER)
        notices.setsockopt(zmq.ROUTING_ID, ipc.SUPERVISOR_ID)
        notices.setsockopt(zmq.LINGER, 1000)
        notices.connect(ipc.engine_endpoint(self.run_dir))
        try:
            while not self._stopping:
                sentinels: dict[Any, int] = {p.sentinel: i for i, p in self._frontends.items()}
                ready = multiprocessing.connection.wait(
                    [engine.sentinel, self._wake_r, bound._reader, *sentinels], timeout=1.0
                )
                while not bound.empty():
                    bound.get()
                if engine.sentinel in ready or not engine.is_alive():
                    log.error("the engine process exited with %s: stopping the frontends", engine.exitcode)
                    self._stop_frontends(grace=1.0)
                    return 1
                for sentinel in ready:
                    index = sentinels.get(sentinel)
                    if index is None:
                        continue
                    process = self._frontends[index]
                    process.join()
                    name = ipc.frontend_id(index, self._generation[index])
                    log.error("frontend %d exited with %s: starting a new one", index, process.exitcode)
                    notices.send_multipart(ipc.encode_gone(name))
                    self._process_dead(process)
                    if not self._may_restart():
                        log.error("frontends died %d times in %.0f s: giving up", MAX_RESTARTS, RESTART_WINDOW)
                        return 1
                    self._start_frontend(index, bound)
            log.info("shutting down: %d frontends drain their streams", len(self._frontends))
            clean = self._stop_frontends(grace=self.config.grace_seconds)
            if not self._engine_up.is_set():
                # Still importing TensorFlow or binding: no request can have reached it.
                log.warning("exiting while the engine process is still starting (the first model load)")
                engine.kill()
                engine.join(STOP_EXTRA)
                return 0 if clean else 1
            notices.send_multipart(ipc.encode_stop())
            engine.join(STOP_EXTRA)
            if engine.is_alive():
                log.error("the engine process did not stop in %.0f s: killing it", STOP_EXTRA)
            return 0 if clean and engine.exitcode == 0 else 1
        finally:
            notices.close(0)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        return len(self._restarts) <= MAX_RESTARTS

    def _process_dead(self, process: BaseProcess) -> None:
        """A dead process's live gauges leave the metrics (its counters stay: they never go down)."""
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid, self.metrics_dir)

    def _stop_frontends(self, grace: float) -> bool:
        """SIGTERM every frontend and wait for it; True when all exited 0."""
        for process in self._frontends.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + STOP_EXTRA
        clean = True
        for index, process in self._frontends.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("frontend %d did not exit after SIGTERM: killing it", index)
                process.kill()
                process.join(5.0)
            clean = clean and process.exitcode == 0
            self._process_dead(process)
        return clean

    def _kill_all(self) -> None:
        for process in [*self._frontends.values(), *([self._engine] if self._engine else [])]:
            if process.is_alive():
                process.kill()
                process.join(5.0)


def _child_logging(config: ServerConfig) -> None:
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s [%(processName)s] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _engine_main(config: ServerConfig, run_dir: str, frontends: int, up: Any) -> None:
    set_parent_death_signal(signal.SIGKILL)  # it ignores SIGTERM (see engine_host.run)
    from training.tf_runtime import import_tensorflow_quietly

    import_tensorflow_quietly(config.log_level.lower())
    _child_logging(config)
    from service import engine_host
    from service.server import configure_process

    threads = configure_process(config, os.environ, frontends)
    if threads is not None:
        log.info("TensorFlow uses %d intra-op thread(s) beside %d frontend processes", threads, frontends)
    code = engine_host.run(config, run_dir, up)
    # A first model load may still run in its daemon thread, inside TensorFlow, which cannot be
    # interrupted; finalising the interpreter under it can crash the exit. Leave at once.
    logging.shutdown()
    os._exit(code)


def _frontend_main(config: ServerConfig, endpoint: str, name: bytes, bound: Any) -> None:
    set_parent_death_signal()
    _child_logging(config)
    from service import frontend

    sys.exit(frontend.run(config, endpoint, name, bound))
