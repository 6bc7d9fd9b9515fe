"""The HTTP face of the service: OpenAI-compatible completions (JSON and SSE), models, health, the playground.

A peer of the gRPC servicer over the same engine API: ``service.request`` checks the fields,
opens the stream, maps errors to status codes and records the request metrics (labelled
``protocol="http"``); ``service.openai_api`` holds the request and response bodies. aiohttp
runs on the server's event loop (``AppRunner``/``TCPSite``, no signal handling of its own),
with ``handler_cancellation``: a client that disconnects cancels its handler, whose ``finally``
frees the row at the next model call, counted ``code="CANCELLED"``. An event written while the
client has unread data waits at most ``--stream-write-timeout``; then the connection is closed,
the row leaves the batch and the request counts ``RESOURCE_EXHAUSTED``, as on gRPC.

Routes: ``GET /`` (the playground page), ``GET /health`` (200 while SERVING, else 503),
``GET /v1/models``, ``POST /v1/completions``; ``POST /v1/chat/completions`` is a 404 that says
so. ``/v1/`` routes need a bearer token when ``--auth-token-file`` is given.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.resources
import json
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web

from service.auth import TokenStore, bearer_token
from service.catalog import ModelView
from service.config import ServerConfig
from service.metrics import ServingMetrics
from service.openai_api import (
    Completion,
    CompletionRequest,
    error_body,
    http_error,
    models_body,
    parse_completion,
)
from service.prompt import echo
from service.request import (
    UNRESOLVED_MODEL,
    Outcome,
    RequestError,
    Resolver,
    Submitter,
    open_stream,
    raise_for_unfinished,
    record,
    shutting_down,
    status_of,
    stream_write_timeout,
)
from service.stream import Stream

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "1"  # sent with 429 and 503
PLAYGROUND = "playground.html"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _event(body: Any) -> bytes:
    return b"data: " + _dumps(body) + b"\n\n"


def error_response(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None
    body = _dumps(error_body(status, message, code, param))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class BodyError(RequestError):
    """A body that cannot be read as JSON: an HTTP status of its own (400, 413 or 415)."""

    def __init__(self, status: int, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(code, message)
        self.status = status


def _created(model: ModelView) -> int:
    try:
        stamp = datetime.datetime.fromisoformat(str((model.info or {}).get("created_at", "")))
    except ValueError:
        return 0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return int(stamp.timestamp())


def _origins(setting: str | None) -> tuple[str, ...]:
    return tuple(o.strip() for o in (setting or "").split(",") if o.strip())


class HttpFrontend:
    """The aiohttp application over one engine and repository; ``start`` binds it, ``stop`` ends it."""

    def __init__(
        self,
        config: ServerConfig,
        repository: Resolver,
        engine: Submitter,
        metrics: ServingMetrics,
        *,
        is_ready: Callable[[], bool],
        tokens: TokenStore | None = None,
    ) -> None:
        self._config = config
        self._limits = config.limits
        self._repository = repository
        self._engine = engine
        self._metrics = metrics
        self._is_ready = is_ready
        self._tokens = tokens
        self._origins = _origins(config.cors_allow_origin)
        self._write_timeout = config.stream_write_timeout if config.stream_write_timeout > 0 else None
        self._shutting_down = False
        self._runner: web.AppRunner | None = None
        self._page = importlib.resources.files("service").joinpath("static", PLAYGROUND).read_bytes()
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_receive_message_bytes, middlewares=[self._middleware])
        app.router.add_get("/", self._playground)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.on_response_prepare.append(self._cors_headers)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None, reuse_port: bool = False) -> int:
        """Binds ``host:port`` (0 picks a free port) on the running loop; returns the bound port.

        ``reuse_port``: share the port with the other frontend processes (``SO_REUSEPORT``).
        """
        runner = web.AppRunner(self.application(), handle_signals=False, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"could not bind the HTTP port {host}:{port}: {exc.strerror or exc}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    def begin_shutdown(self) -> None:
        """From now on new completions get 503; running ones go on."""
        self._shutting_down = True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ cross-cutting
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.method == "OPTIONS" and self._origins:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600",
                },
            )
        if request.path.startswith("/v1/") and self._tokens is not None:
            denied = self._check_token(request)
            if denied is not None:
                return denied
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, f"{request.method} {echo(request.path)}: {exc.reason}", exc.reason)

    def _check_token(self, request: web.Request) -> web.Response | None:
        assert self._tokens is not None
        header = request.headers.get("Authorization")
        token = bearer_token([("authorization", header)] if header is not None else [])
        if token is not None and self._tokens.check(token):
            return None
        if token is None:
            message = f"{request.path} needs a bearer token: send the header 'Authorization: Bearer <token>'"
        else:
            message = f"{request.path}: the bearer token is not valid"
        self._metrics.requests_total.labels(model=UNRESOLVED_MODEL, code="UNAUTHENTICATED", protocol="http").inc()
        response = error_response(401, message, "UNAUTHENTICATED")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not self._origins or origin is None:
            return
        if "*" in self._origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in self._origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    # ------------------------------------------------------------------ simple routes
    async def _playground(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def _health(self, request: web.Request) -> web.Response:
        serving = self._is_ready() and not self._shutting_down
        return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503)

    async def _models(self, request: web.Request) -> web.Response:
        newest: dict[str, int] = {}
        for model in self._repository.loaded():
            newest[model.name] = max(newest.get(model.name, 0), _created(model))
        return web.Response(body=_dumps(models_body(sorted(newest.items()))), content_type="application/json")

    async def _chat(self, request: web.Request) -> web.Response:
        return error_response(
            404, "this server serves plain completions only: POST /v1/completions with a prompt", "NOT_FOUND"
        )

    # ------------------------------------------------------------------ completions
    async def _body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise BodyError(415, f"the body must be application/json, got {echo(request.content_type)}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self._config.max_receive_message_bytes
            raise BodyError(
                413,
                f"the body must be at most {limit} bytes (the server's --max-receive-message-bytes)",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BodyError(400, f"the body is not valid JSON: {exc}") from None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        request_id = "cmpl-" + uuid.uuid4().hex
        outcome = Outcome(request_id, "http")
        stream: Stream | None = None
        try:
            try:
                asked = parse_completion(await self._body(request), self._limits)
                if self._shutting_down:
                    raise shutting_down()
                timeout = self._config.request_timeout
                model, stream = await open_stream(
                    self._repository,
                    self._engine,
                    asked.params,
                    model_name=asked.model_name,
                    model_version=asked.model_version,
                    prompt=asked.prompt,
                    deadline=started + timeout if timeout > 0 else None,
                    outcome=outcome,
                )
            except RequestError as exc:
                return self._failed(exc, outcome)
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception as exc:  # mapped by the one shared place (unexpected ones logged there)
                code, message = status_of(exc, request_id)
                return self._failed(RequestError(code, message), outcome)
            completion = Completion(request_id, model.name, asked.logprobs)
            if asked.stream:
                return await self._stream(request, stream, completion, asked, outcome)
            return await self._whole(stream, completion, outcome)
        except (asyncio.CancelledError, ConnectionError):
            outcome.code = grpc.StatusCode.CANCELLED  # the client went away
            raise
        finally:
            if stream is not None:
                stream.cancel()  # however the request ends, the row leaves the batch at the next step
            record(self._metrics, outcome, started, log)

    def _failed(self, exc: RequestError, outcome: Outcome) -> web.Response:
        outcome.code = exc.code
        if isinstance(exc, BodyError):
            return error_response(exc.status, exc.message, exc.code.name)
        status, body = http_error(exc)
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None
        return web.Response(status=status, body=_dumps(body), content_type="application/json", headers=headers)

    async def _whole(self, stream: Stream, completion: Completion, outcome: Outcome) -> web.Response:
        while True:
            chunk = await stream.next_chunk()
            outcome.update(chunk)
            completion.add(chunk)
            if chunk.finish_reason is None:
                continue
            try:
                raise_for_unfinished(chunk, outcome.request_id)
            except RequestError as exc:
                return self._failed(exc, outcome)
            body = completion.whole_body(chunk, chunk.finish_reason.value)
            return web.Response(body=_dumps(body), content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        stream: Stream,
        completion: Completion,
        asked: CompletionRequest,
        outcome: Outcome,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await response.prepare(request)
            while True:
                chunk = await stream.next_chunk()
                outcome.update(chunk)
                if chunk.finish_reason is None:
                    if chunk.text or chunk.token_ids:
                        body = completion.chunk_body(chunk, None, asked.include_usage)
                        await self._write(request, response, _event(body), outcome)
                    continue
                try:
                    raise_for_unfinished(chunk, outcome.request_id)
                except RequestError as exc:
                    # The status line has gone: the error is an event of its own, then the stream ends as usual.
                    outcome.code = exc.code
                    await self._write(request, response, _event(http_error(exc)[1]) + _DONE, outcome, last=True)
                    break
                events = _event(completion.chunk_body(chunk, chunk.finish_reason.value, asked.include_usage))
                if asked.include_usage:
                    events += _event(completion.usage_body(chunk))
                await self._write(request, response, events + _DONE, outcome, last=True)
                break
        except RequestError as exc:  # the client stopped reading: nothing more can reach it
            outcome.code = exc.code
            log.debug("request %s: %s", outcome.request_id, exc.message)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            # The client went away while an event was written (before aiohttp cancelled this
            # handler): returned, the response ends quietly in aiohttp; raised, it logs an error.
            outcome.code = grpc.StatusCode.CANCELLED
        return response

    async def _write(
        self, request: web.Request, response: web.StreamResponse, data: bytes, outcome: Outcome, last: bool = False
    ) -> None:
        """Writes events (the ``last`` ones end the body); while the client has unread data, waits at most
        ``--stream-write-timeout``.

        A write waits only when the transport's buffer is over its high-water mark, which takes
        unread data: the timer is armed only then, so a client that keeps up costs none.
        """
        transport = request.transport
        if self._write_timeout is None or transport is None or transport.get_write_buffer_size() == 0:
            await response.write(data)
            if last:
                await self._write_eof(response, outcome)
            return
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.write(data)
        except TimeoutError:
            raise stream_write_timeout(self._write_timeout, outcome.completion_tokens, outcome.request_id) from None
        if last:
            await self._write_eof(response, outcome)

    async def _write_eof(self, response: web.StreamResponse, outcome: Outcome) -> None:
        try:
            async with asyncio.timeout(self._write_timeout):  # one timer per stream
                await response.write_eof()
        except TimeoutError:
            seconds = self._write_timeout or 0.0
            raise stream_write_timeout(seconds, outcome.completion_tokens, outcome.request_id) from None


def http_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The HTTP port's TLS context from the gRPC port's certificate flags (client certificates with a CA)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
