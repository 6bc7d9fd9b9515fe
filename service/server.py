"""``textgen serve``: the grpc.aio server with health, reflection, Prometheus metrics and graceful shutdown.

``Server(config)`` wires one model repository, one engine, the gRPC servicer, the HTTP
frontend (``service/http_frontend.py``, on the same loop) and one metrics registry together;
``await server.start()`` binds the ports (port 0 picks free ones, reported as ``server.port``,
``server.http_port`` and ``server.metrics_port``), loads the models
in a worker thread (never on the event loop) and turns health SERVING when one is
loaded. ``await server.shutdown()`` is the SIGTERM path: health NOT_SERVING, new
RPCs UNAVAILABLE, running streams get ``grace_seconds`` to finish. Nothing lives in
module globals, so tests run two servers in one process.

    python -m service --models models --port 50051 --metrics-port 8000
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from service import prompt
from service.allocator import set_mmap_threshold
from service.api import textgen_pb2
from service.auth import TokenAuthInterceptor, TokenFileError, TokenStore
from service.catalog import ModelCatalog
from service.config import ConfigError, ServerConfig, parse_config
from service.engine_client import EngineClient
from service.http_frontend import HttpFrontend, http_ssl_context
from service.metrics import ServingMetrics
from service.servicer import UNRESOLVED_MODEL, TextGenerationServicer, add_to_server
from service.supervisor import Supervisor, frontend_count
from service.threads import NamedThread
from service.tls import TLSConfigError, server_credentials
from training.tf_runtime import import_tensorflow_quietly

if TYPE_CHECKING:
    from service.engine import Engine
    from service.model_repository import ModelRepository

log = logging.getLogger(__name__)

SERVICE_NAME = textgen_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
# SERVING from the moment the server answers until shutdown, whether or not a model
# is loaded: what a liveness probe should ask (an empty repository is not a crash).
LIVENESS_SERVICE = "textgen.liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the grace period, the time the handlers of streams the engine ended get to send their status.
_STATUS_SECONDS = 1.0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True)
class FrontendRole:
    """A ``Server`` in a frontend process: the engine process's address and this frontend's name on it."""

    endpoint: str
    name: bytes


def grpc_options(config: ServerConfig, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments of the server; ``reuse_port`` only for frontend processes that share the port."""
    # gRPC holds the calls the servicer has not picked up yet, and cancels one past a count or a
    # time (CANCELLED before any handler runs, so no metric counts it): by default 1000 calls with
    # random drops up to 3000, and 30 s, which cut most of a burst of 10,000 streams. Within
    # --max-pending-calls (one limit: no random drops) and --request-timeout every call reaches
    # the servicer, which refuses RESOURCE_EXHAUSTED and counts past --max-queue.
    held_seconds = math.ceil(config.request_timeout) if config.request_timeout > 0 else 2**31 - 1
    options = [
        ("grpc.so_reuseport", int(reuse_port)),  # otherwise two servers must never share a port by accident
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.server.max_pending_requests", config.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", config.max_pending_calls),
        ("grpc.server_max_unrequested_time_in_server", held_seconds),
    ]
    if config.max_connection_age > 0:
        # Clients reconnect now and then, so a k8s Service spreads them over new replicas.
        options.append(("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(max(config.grace_seconds, 1.0) * 1000)))
    return options


def read_security_files(
    config: ServerConfig,
) -> tuple[grpc.ServerCredentials | None, TokenStore | None, ssl.SSLContext | None]:
    """The TLS credentials, bearer tokens and HTTP TLS context the flags name; a bad file is an ``OSError``
    saying which flag and why (a clean start-up error, before anything binds)."""
    try:
        credentials = (
            server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert and config.tls_key
            else None
        )
        tokens = TokenStore(config.auth_token_file) if config.auth_token_file else None
        ssl_context = (
            http_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca)
            if config.tls_cert and config.tls_key and config.http_port >= 0
            else None
        )
    except (TLSConfigError, TokenFileError) as exc:
        raise OSError(str(exc)) from exc
    except ssl.SSLError as exc:
        raise OSError(f"--tls-cert/--tls-key cannot be used for the HTTP port: {exc}") from exc
    return credentials, tokens, ssl_context


class Server:
    """One serving process's worth of parts; start it in a running event loop.

    Without a ``role`` it holds the models and the engine itself (``--frontends 0``, and the
    tests' in-process servers); with one it is a frontend process: the engine process owns the
    models and a ``ModelCatalog`` and an ``EngineClient`` stand in for them.
    """

    def __init__(self, config: ServerConfig, role: FrontendRole | None = None) -> None:
        self.config = config
        self.role = role
        self.metrics = ServingMetrics()
        self.local: tuple[ModelRepository, Engine] | None = None
        self.repository: ModelRepository | ModelCatalog
        self.engine: Engine | EngineClient
        if role is None:
            from service.engine import Engine  # TensorFlow: only a process that runs the model imports it
            from service.model_repository import ModelRepository

            # Building the repository configures TensorFlow's devices: construct a Server off the event loop.
            repository = ModelRepository(
                config.models,
                default_model=config.default_model,
                metrics=self.metrics,
                poll_seconds=config.poll_seconds,
                keep_versions=config.keep_versions,
                on_change=self._models_changed,
                # The decode functions take any batch size (one trace); warming up the largest
                # batch too allocates its buffers before the first full step has to.
                warmup_batch_sizes=config.warmup_batch_sizes,
                xla=config.xla_shapes,
            )
            engine = Engine(config.engine, self.metrics)
            self.repository, self.engine, self.local = repository, engine, (repository, engine)
        else:
            self.repository = ModelCatalog(config.models, config.default_model, on_change=self._models_changed)
            self.engine = EngineClient(role.endpoint, role.name, self.repository, self.metrics, self._engine_lost)
        self.lost = asyncio.Event()  # set when the engine process went away (frontend processes only)
        prompt.prepare()  # the Stream-Safe check's table, built before any request waits for it
        self.servicer = TextGenerationServicer(config, self.repository, self.engine, self.metrics)
        self.health = health.aio.HealthServicer()
        self.http: HttpFrontend | None = None
        self.port = 0
        self.http_port = 0  # the OpenAI-compatible HTTP API's port; 0 while off
        self.metrics_port = 0
        self.ready = asyncio.Event()  # set while health says SERVING
        self._serving = False
        self._loader: threading.Thread | None = None
        self.health_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Binds the ports, starts the engine and begins loading models in a worker thread."""
        config = self.config
        self._loop = asyncio.get_running_loop()
        for service in HEALTH_SERVICES:
            await self.health.set(service, NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        credentials, tokens, ssl_context = read_security_files(config)  # before anything binds
        interceptors = (
            [TokenAuthInterceptor(tokens, on_denied=self._count_unauthenticated)] if tokens is not None else []
        )
        reuse = self.role is not None
        server = grpc.aio.server(options=grpc_options(config, reuse), interceptors=interceptors)
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        host = config.host.strip("[]")  # "::" and "[::]" both mean every IPv6 (and IPv4) address
        address = f"[{host}]" if ":" in host else host
        try:
            if credentials is not None:
                self.port = server.add_secure_port(f"{address}:{config.port}", credentials)
            else:
                self.port = server.add_insecure_port(f"{address}:{config.port}")
        except RuntimeError as exc:
            raise OSError(f"could not bind the gRPC port {address}:{config.port}: {exc}") from exc
        if self.port == 0:
            raise OSError(f"could not bind the gRPC port {address}:{config.port}")
        if self.role is None:  # frontend processes: the supervisor serves every process's metrics
            self._http, self._http_thread = start_http_server(
                config.metrics_port, addr=host, registry=self.metrics.registry
            )
            self.metrics_port = int(self._http.server_port)
        if config.health_port >= 0:
            # Plaintext grpc.health.v1 only, for kubelet probes that cannot speak (m)TLS.
            health_server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            self.health_port = health_server.add_insecure_port(f"{address}:{config.health_port}")
            if self.health_port == 0:
                raise OSError(f"could not bind the health port {address}:{config.health_port}")
            await health_server.start()
            self._health_grpc = health_server
        if config.http_port >= 0:
            self.http = HttpFrontend(
                config,
                self.repository,
                self.engine,
                self.metrics,
                is_ready=lambda: self._serving and not self._stopping,
                tokens=tokens,
            )
            self.http_port = await self.http.start(host, config.http_port, ssl_context, reuse_port=reuse)
        if isinstance(self.engine, EngineClient):
            await self.engine.start()
        else:
            self.engine.start()
        await server.start()
        self._grpc = server
        log.info(
            "textgen serving gRPC on %s:%d, HTTP on %s, %s",
            config.host,
            self.port,
            f"{'https' if ssl_context else 'http'}://{config.host}:{self.http_port}" if self.http else "no port",
            f"metrics on http://{config.host}:{self.metrics_port}/metrics"
            if self.role is None
            else "metrics by the supervisor",
        )
        if self.local is not None:
            self._tasks.append(asyncio.create_task(self._load_models(), name="textgen-load-models"))

    async def _load_models(self) -> None:
        """Loads the repository in a thread of its own, then lets it poll for new versions in its own thread.

        The first load runs in a daemon thread, not the loop's executor: a SIGTERM during a long load
        then drains and exits at once (``main`` leaves the load behind), where the executor would make
        the process wait for the load to end.
        """
        assert self.local is not None
        repository = self.local[0]
        loop = asyncio.get_running_loop()
        loaded = loop.create_future()

        def load() -> None:
            try:
                repository.load_all()
            except Exception:
                log.exception("loading models from %s failed", self.config.models)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed: the server has stopped
                    loop.call_soon_threadsafe(_resolve, loaded)

        self._loader = NamedThread(target=load, name="textgen-load", daemon=True)
        self._loader.start()
        await loaded
        await self._update_readiness()
        if not self._serving:
            log.error(
                "no model could be loaded from %s; health stays NOT_SERVING%s",
                self.config.models,
                " until a poll finds one" if self.config.poll_seconds > 0 else " (polling is off)",
            )
        if not self._stopping:
            repository.start_polling()

    def _engine_lost(self) -> None:
        """The engine process went away (the ``EngineClient`` ended every stream): health NOT_SERVING, exit."""
        self.lost.set()

    @property
    def loading(self) -> bool:
        """Whether the first load of the repository is still running."""
        return self._loader is not None and self._loader.is_alive()

    def _count_unauthenticated(self, method: str) -> None:
        self.metrics.requests_total.labels(model=UNRESOLVED_MODEL, code="UNAUTHENTICATED", protocol="grpc").inc()

    def _models_changed(self) -> None:
        """Called by the repository (from its thread) when the set of loaded versions changed."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._update_readiness(), loop)

    async def _update_readiness(self) -> None:
        """Health follows whether the default model (without one: any model) can serve, both ways."""
        if self._stopping:
            return
        serving = self.repository.can_serve()
        if serving == self._serving:
            return
        self._serving = serving
        for service in HEALTH_SERVICES:
            await self.health.set(service, SERVING if serving else NOT_SERVING)
        if serving:
            self.ready.set()
            log.info("ready: serving %s", ", ".join(f"{m.name}/{m.version}" for m in self.repository.loaded()))
        else:
            self.ready.clear()
            log.warning("not ready: %s", self.repository.why_not_serving())

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, new RPCs UNAVAILABLE, running streams get ``grace`` seconds."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down: %d running streams get %.1f s to finish", self.engine.active, grace)
        await self.health.enter_graceful_shutdown()
        self.servicer.begin_shutdown()
        if self.http is not None:
            self.http.begin_shutdown()
        self.engine.close()
        for task in self._tasks:
            task.cancel()
        if self.local is not None:
            await asyncio.to_thread(self.local[0].stop)
        # Keep the port open while running streams drain: a new RPC then gets the
        # servicer's UNAVAILABLE ("shutting down"); once the transport itself is
        # stopping, grpc answers new RPCs on open connections with CANCELLED instead.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (self.engine.active or self.engine.waiting) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.active or self.engine.waiting:
            # The grace is over: the engine ends what is left, so each handler sends (and counts)
            # UNAVAILABLE itself, rather than grpc cancelling the handlers (counted CANCELLED).
            log.warning("the grace period is over: ending %d streams with UNAVAILABLE", self.engine.active)
            await self._stop_engine()
            deadline = loop.time() + _STATUS_SECONDS
        if self._grpc is not None:
            await self._grpc.stop(max(0.0, deadline - loop.time()))
        await self._stop_engine()
        if isinstance(self.engine, EngineClient):
            await self.engine.aclose()
        if self.http is not None:
            await self.http.stop()  # its streams have ended with the engine's
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5.0)
        self._stopped.set()
        log.info("stopped")

    async def _stop_engine(self) -> None:
        """End what is left: the engine thread (in-process) or this frontend's streams (a frontend process)."""
        if isinstance(self.engine, EngineClient):
            self.engine.stop()
        else:
            await asyncio.to_thread(self.engine.stop, 5.0)

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def serve(
    config: ServerConfig, stop: asyncio.Event | None = None, started: Callable[[Server], None] | None = None
) -> int:
    """Runs a server until ``stop`` is set (or SIGTERM/SIGINT arrives), then shuts it down gracefully.

    ``started`` is called with the server once it is built.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    server = await asyncio.to_thread(Server, config)
    if started is not None:
        started(server)
    try:
        await server.start()
        # One line a supervisor (or a test) can read to find the bound ports.
        print(
            f"textgen: listening on port {server.port}, metrics on port {server.metrics_port}, "
            f"http on port {server.http_port}",
            flush=True,
        )
        await stop.wait()
        await server.shutdown()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if not server.stopping:
            await server.shutdown(grace=0)
    return 0


# How long a thread may hold the GIL before another that wants it gets it. Python's
# default, 5 ms, is longer than a batched step: after each TensorFlow call the engine
# thread waited up to that long for the event loop thread to let go of the GIL.
# Measured at 64 streams (benchmarks/README.md): 0.5 ms took the end-to-end rate
# from 0.34x to 0.55x of the engine-only rate.
GIL_SWITCH_INTERVAL = 0.0005


T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T], kind: str) -> T:
    """Run ``main`` on a new event loop of ``kind`` (``--event-loop``: uvloop or asyncio) until it returns.

    grpc.aio and aiohttp run on any asyncio loop; uvloop's costs less CPU per message and per call.
    """
    if kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def configure_process(config: ServerConfig, environ: Mapping[str, str], frontends: int = 0) -> int | None:
    """Process-wide tuning, before TensorFlow runs its first op; returns the intra-op threads set (None: kept).

    ``frontends``: the frontend processes beside this engine process, whose cores TensorFlow leaves
    them (one core when the event loop runs in this process).

    On a CPU the event loop (gRPC, the servicer) needs a core of its own: TensorFlow's
    intra-op threads on every core made each step wait for the loop's thread. With one
    core left to the loop (two cores: one op thread), the end-to-end rate at 64 streams
    went from 0.55x to 0.63x of the engine-only rate.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    if set_mmap_threshold(config.malloc_mmap_threshold, environ):
        log.info("glibc mmap threshold fixed at %d bytes", config.malloc_mmap_threshold)
    threads = config.intra_op_threads
    if threads == 0:
        threads = max(1, usable_cores() - max(1, frontends))
    from service.decoder import configure_cpu_threads  # TensorFlow: only in the process that runs the model

    return threads if configure_cpu_threads(threads) else None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``textgen serve``: parse flags over ``TEXTGEN_*`` variables and serve until SIGTERM/SIGINT."""
    try:
        config = parse_config(list(sys.argv[1:] if argv is None else argv), os.environ if environ is None else environ)
    except ConfigError as exc:
        print(f"textgen serve: error: {exc}", file=sys.stderr)
        return 2
    frontends = frontend_count(config, usable_cores())
    if frontends == 0:
        # TensorFlow runs in this process: import it behind the stderr filter (training/tf_runtime.py).
        import_tensorflow_quietly(config.log_level.lower())
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if frontends > 0:
        try:
            read_security_files(config)  # each frontend reads them again; fail here, once, before any starts
        except OSError as exc:
            print(f"textgen serve: error: {exc}", file=sys.stderr)
            return 1
        return Supervisor(config, frontends).run()
    threads = configure_process(config, os.environ if environ is None else environ)
    if threads is not None:
        log.info(
            "TensorFlow uses %d intra-op thread(s); GIL switch interval %.1f ms", threads, GIL_SWITCH_INTERVAL * 1e3
        )
    loading: list[Server] = []
    try:
        code = run_event_loop(serve(config, started=loading.append), config.event_loop)
    except OSError as exc:
        print(f"textgen serve: error: {exc}", file=sys.stderr)
        return 1
    if loading and loading[0].loading:
        # Stopped during the first load: TensorFlow cannot be interrupted, and a daemon thread
        # inside it while the interpreter finalises can crash the exit. Leave it now.
        log.warning("exiting while the first model load is still running")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
