"""The gRPC face of the service: validates requests, maps errors to status codes, protobuf in and out.

The servicer never touches TensorFlow and never samples: it validates a request into
``SamplingParams`` (``validate_request``, a pure function), hands it to the ``Engine``,
and turns the engine's ``Chunk``s into ``GenerateResponse`` messages. Every failure
goes through one place (``service.request.status_of``, shared with HTTP), which picks the documented gRPC code,
logs unexpected exceptions once, and never lets a request end as UNKNOWN.

``Generate`` writes its messages itself (``context.write``), each bounded by
``--stream-write-timeout`` (``_StallWatch``): a client that stops reading fills HTTP/2
flow control, a write then waits, and after the timeout the request leaves the batch
and the stream ends RESOURCE_EXHAUSTED (``stream_write_timeout``). The final status is
bounded by the same timeout, so the handler finishes even if the client never reads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from service.api import textgen_pb2, textgen_pb2_grpc
from service.catalog import ModelView
from service.config import RequestLimits, ServerConfig
from service.metrics import ServingMetrics
from service.request import (
    UNRESOLVED_MODEL,
    Outcome,
    RequestError,
    Resolver,
    Submitter,
    check_sampling,
    invalid,
    open_stream,
    raise_for_unfinished,
    record,
    shutting_down,
    status_of,
    stream_write_timeout,
)
from service.sampling import SamplingParams
from service.stream import Chunk, FinishReason

__all__ = ["UNRESOLVED_MODEL", "RequestError", "RequestLimits", "invalid", "validate_request", "add_to_server"]

log = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128

# The reasons a stream ends normally, as the proto says them; every other reason ends it with a status.
FINISH_REASONS = {
    FinishReason.LENGTH: textgen_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: textgen_pb2.FINISH_REASON_STOP,
}


@dataclass(frozen=True)
class MalformedRequest:
    """What a request that does not parse becomes, so it ends as INVALID_ARGUMENT rather than UNKNOWN."""

    message: str


def _tolerant_parser(message_type: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            # grpc would answer UNKNOWN for a deserializer's exception; invalid UTF-8 in a
            # string field (possible from clients in other languages) is the usual cause.
            return MalformedRequest(f"the request is not a valid {name} ({exc}); string fields must be UTF-8")

    return parse


def add_to_server(servicer: TextGenerationServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer like the generated ``add_TextGenerationServicer_to_server``, with tolerant parsing."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_tolerant_parser(textgen_pb2.GenerateRequest),
            response_serializer=textgen_pb2.GenerateResponse.SerializeToString,
        ),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete,
            request_deserializer=_tolerant_parser(textgen_pb2.GenerateRequest),
            response_serializer=textgen_pb2.GenerateResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=_tolerant_parser(textgen_pb2.ListModelsRequest),
            response_serializer=textgen_pb2.ListModelsResponse.SerializeToString,
        ),
    }
    service = textgen_pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _request_id(request: textgen_pb2.GenerateRequest | MalformedRequest) -> str:
    if isinstance(request, MalformedRequest) or not request.request_id:
        return uuid.uuid4().hex
    request_id: str = request.request_id
    # It goes into log lines: control characters (a newline could forge a line) are escaped.
    return request_id if request_id.isprintable() else ascii(request_id)[1:-1]


@dataclass(eq=False)
class _Writer:
    """One streaming RPC's write state, as ``_StallWatch`` sees it."""

    task: asyncio.Task[Any]
    since: float | None = None  # time.monotonic() when the pending write began; None between writes
    expired: bool = False  # the watch cancelled the task because that write waited too long


class _StallWatch:
    """Cancels any write that has waited longer than ``timeout`` seconds: one timer for all streams.

    A writer marks when its write began; a timer, armed while any stream is watched, looks
    every ``timeout / 4`` seconds, so a stalled write ends between 1 and 1.25 times the
    timeout. An ``asyncio.timeout`` around each write would arm and disarm a timer per
    message (measured about 20 % fewer messages per second in a bare grpc.aio loop).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._writers: set[_Writer] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, writer: _Writer) -> None:
        self._writers.add(writer)
        loop = asyncio.get_running_loop()
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_later(self.timeout / 4, self._sweep)

    def unwatch(self, writer: _Writer) -> None:
        self._writers.discard(writer)

    def _sweep(self) -> None:
        self._timer = None
        if not self._writers or self._loop is None:
            return  # idle: the next watch() arms the timer again
        limit = time.monotonic() - self.timeout
        for writer in self._writers:
            if writer.since is not None and writer.since <= limit and not writer.expired:
                writer.expired = True
                writer.task.cancel()  # raises CancelledError in the pending write (see _write)
        self._timer = self._loop.call_later(self.timeout / 4, self._sweep)


def validate_request(request: textgen_pb2.GenerateRequest, limits: RequestLimits) -> SamplingParams:
    """Checks a request against the limits; returns its ``SamplingParams`` or raises INVALID_ARGUMENT.

    Messages name the field, the value and the limit, e.g.
    ``temperature must be a finite number >= 0, got nan``.
    """
    params = check_sampling(
        limits,
        prompt=request.prompt,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,  # uint32 on the wire
        seed=int(request.seed) if request.HasField("seed") else None,
        stops=request.stop,
        include_tokens=request.include_tokens,
    )
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        raise invalid(f"request_id must be at most {MAX_REQUEST_ID_LENGTH} characters, got {len(request.request_id)}")
    return params


def _status_of(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status a client sees for ``exc`` (``service.request.status_of``)."""
    return status_of(exc, request_id)


class TextGenerationServicer(textgen_pb2_grpc.TextGenerationServicer):
    """Generate (streaming), Complete (one message) and ListModels over the engine and repository."""

    def __init__(self, config: ServerConfig, repository: Resolver, engine: Submitter, metrics: ServingMetrics) -> None:
        self._limits = config.limits
        self._request_timeout = config.request_timeout
        # None: no bound (asyncio.timeout(None) never fires, and no stall watch runs).
        self._write_timeout = config.stream_write_timeout if config.stream_write_timeout > 0 else None
        self._stall_watch = _StallWatch(self._write_timeout) if self._write_timeout is not None else None
        self._repository = repository
        self._engine = engine
        self._metrics = metrics
        self._shutting_down = False

    def begin_shutdown(self) -> None:
        """From now on new generation RPCs get UNAVAILABLE; running ones go on."""
        self._shutting_down = True

    # ------------------------------------------------------------------ RPCs
    async def Generate(
        self, request: textgen_pb2.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Streams with ``context.write`` (not an async generator), so that every write has a time bound."""
        request_id = _request_id(request)
        outcome = Outcome(request_id, "grpc")
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None  # grpc.aio runs each RPC in a task of its own
        writer = _Writer(task)
        if self._stall_watch is not None:
            self._stall_watch.watch(writer)
        try:
            # aclosing: when a write fails, the generator's finally cancels the row before the status is sent.
            async with contextlib.aclosing(self._generate(request, request_id, context, outcome, started)) as responses:
                first = True
                async for response in responses:
                    await self._write(context, response, first, writer, outcome)
                    first = False
        except BaseException as exc:
            await self._fail(exc, request_id, context, outcome)
        finally:
            if self._stall_watch is not None:
                self._stall_watch.unwatch(writer)
            self._record(outcome, started)

    async def _write(
        self,
        context: grpc.aio.ServicerContext,
        response: textgen_pb2.GenerateResponse,
        first: bool,
        writer: _Writer,
        outcome: Outcome,
    ) -> None:
        """Hands one message to gRPC, waiting at most ``--stream-write-timeout`` for a client that is not reading.

        A write waits when the client's HTTP/2 flow-control window is full. grpc cannot take
        back a message it has started sending: after the timeout the message stays queued
        (the client gets it, then the status, if it reads again) and this raises
        ``stream_write_timeout``. The initial metadata goes first in a write of its own: were it
        part of a write that timed out, the status could not be queued behind it.
        """
        writer.since = time.monotonic()
        try:
            if first:
                await context.send_initial_metadata(())
            await context.write(response)
        except asyncio.CancelledError:
            # uncancel() == 0: the watch's cancel was the only one (not also the client's or the server's).
            if writer.expired and writer.task.uncancel() == 0:
                raise stream_write_timeout(
                    self._write_timeout or 0.0, outcome.completion_tokens, outcome.request_id
                ) from None
            raise
        except grpc.aio.InternalError as exc:
            # grpc fails a pending write (ExecuteBatchError, an InternalError) when the call ends
            # under it: the client cancelled or went away, or its deadline passed. A cancellation,
            # not a bug; anything else (a message that does not serialize) stays an error.
            raise asyncio.CancelledError(f"the call ended during a write ({type(exc).__name__})") from exc
        finally:
            writer.since = None

    async def Complete(
        self, request: textgen_pb2.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> textgen_pb2.GenerateResponse | None:
        request_id = _request_id(request)
        outcome = Outcome(request_id, "grpc")
        started = time.monotonic()
        try:
            parts: list[textgen_pb2.GenerateResponse] = []
            async for response in self._generate(request, request_id, context, outcome, started):
                parts.append(response)
            whole = textgen_pb2.GenerateResponse()
            for part in parts:
                whole.MergeFrom(part)  # scalars take the last value; tokens append
            whole.text = "".join(p.text for p in parts)
            return whole
        except BaseException as exc:
            await self._fail(exc, request_id, context, outcome)
            return None  # the status is queued (see _fail); grpc ends the RPC with it
        finally:
            self._record(outcome, started)

    async def ListModels(
        self, request: textgen_pb2.ListModelsRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> textgen_pb2.ListModelsResponse | None:
        try:
            if isinstance(request, MalformedRequest):
                raise invalid(request.message)
            return textgen_pb2.ListModelsResponse(
                models=[_model_info(m) for m in self._repository.loaded()],
                max_tokens_limit=self._limits.max_tokens_limit,
                max_prompt_bytes=self._limits.max_prompt_bytes,
            )
        except BaseException as exc:
            await self._fail(exc, "ListModels", context, Outcome("ListModels", "grpc"))
            return None  # the status is queued (see _fail); grpc ends the RPC with it

    # ------------------------------------------------------------------ the generation itself
    async def _generate(
        self,
        request: textgen_pb2.GenerateRequest | MalformedRequest,
        request_id: str,
        context: grpc.aio.ServicerContext,
        outcome: Outcome,
        started: float,
    ) -> AsyncGenerator[textgen_pb2.GenerateResponse, None]:
        if isinstance(request, MalformedRequest):
            raise invalid(request.message)
        if self._shutting_down:
            raise shutting_down()
        params = validate_request(request, self._limits)
        model, stream = await open_stream(
            self._repository,
            self._engine,
            params,
            model_name=request.model,
            model_version=int(request.model_version),
            prompt=request.prompt,
            deadline=self._deadline(context, started),
            outcome=outcome,
        )
        # However the RPC ends (even while a message is being written), the row leaves the batch.
        context.add_done_callback(lambda _: stream.cancel())
        try:
            while True:
                chunk = await stream.next_chunk()
                outcome.update(chunk)
                if chunk.finish_reason is None:
                    if chunk.text or chunk.token_ids:
                        yield self._response(chunk, request_id, model)
                    continue
                raise_for_unfinished(chunk, request_id)
                last = self._response(chunk, request_id, model)
                last.finish_reason = FINISH_REASONS[chunk.finish_reason]
                last.usage.prompt_tokens = chunk.prompt_tokens
                last.usage.completion_tokens = chunk.completion_tokens
                last.usage.time_to_first_token_seconds = chunk.time_to_first_token or 0.0
                last.usage.total_seconds = time.monotonic() - started
                yield last
                return
        finally:
            # Client gone, deadline passed, or any error: the row leaves the batch at the next step.
            stream.cancel()

    def _deadline(self, context: grpc.aio.ServicerContext, started: float) -> float | None:
        """The engine's deadline (time.monotonic based): the client's, or the server's default."""
        candidates = []
        remaining = context.time_remaining()
        if remaining is not None:
            candidates.append(time.monotonic() + remaining)
        if self._request_timeout > 0:
            candidates.append(started + self._request_timeout)
        return min(candidates) if candidates else None

    @staticmethod
    def _response(chunk: Chunk, request_id: str, model: ModelView) -> textgen_pb2.GenerateResponse:
        response = textgen_pb2.GenerateResponse(
            text=chunk.text, request_id=request_id, model=model.name, model_version=model.version
        )
        if chunk.token_ids:
            response.tokens.extend(
                textgen_pb2.Token(id=i, text=t, logprob=p)
                for i, t, p in zip(chunk.token_ids, chunk.token_texts, chunk.logprobs, strict=False)
            )
        return response

    # ------------------------------------------------------------------ errors and metrics
    async def _fail(
        self, exc: BaseException, request_id: str, context: grpc.aio.ServicerContext, outcome: Outcome
    ) -> None:
        """Ends the RPC with the status ``exc`` maps to; re-raises cancellation and aborts as they are.

        Returns (rather than raising grpc's AbortError) only when the status was not delivered:
        it still waits in gRPC behind messages the client has not read after
        ``--stream-write-timeout`` (grpc ends the RPC with it once the handler returns), or the
        call ended while it waited.
        """
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        code, message = _status_of(exc, request_id)
        outcome.code = code
        try:
            async with asyncio.timeout(self._write_timeout):
                await context.abort(code, message)
        except (TimeoutError, grpc.aio.InternalError) as failed:
            # The status waits behind messages the client has not read (TimeoutError), or the
            # call ended while it waited (grpc fails the send: the client cancelled or went away).
            if not isinstance(failed, TimeoutError):
                outcome.code = grpc.StatusCode.CANCELLED
            log.debug("request %s: the %s status was not delivered (%s)", request_id, code.name, type(failed).__name__)
        finally:
            # A client whose deadline passed before the status reached it saw DEADLINE_EXCEEDED.
            if _deadline_passed(context):
                outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED

    def _record(self, outcome: Outcome, started: float) -> None:
        record(self._metrics, outcome, started, log)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """True once the client's deadline has passed (it then sees DEADLINE_EXCEEDED, whatever the server sends)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _model_info(model: ModelView) -> textgen_pb2.ModelInfo:
    info = model.info or {}
    architecture = info.get("architecture")
    if not isinstance(architecture, dict):
        architecture = {}
    # Training facts as strings: text as it is, anything else (numbers, nested config) as JSON.
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in info.items()}
    return textgen_pb2.ModelInfo(
        name=model.name,
        version=model.version,
        level=model.tokenizer.level,
        vocab_size=model.vocab_size,
        layers=int(architecture.get("layers") or 0),
        units=int(architecture.get("units") or 0),
        created_at=str(info.get("created_at", "")),
        metadata=metadata,
    )
