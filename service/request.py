"""What every frontend (gRPC, HTTP) does with a generation request, free of any wire protocol.

* ``check_sampling``: the field checks against the server's limits, giving ``SamplingParams``;
  messages name the field, the value and the limit.
* ``open_stream``: resolve the model, normalise stops, encode the prompt, submit to the engine.
* ``status_of``: the one place that maps an exception to the status a client sees. Status
  codes are gRPC's (``grpc.StatusCode``, used here as a vocabulary only); the HTTP frontend
  maps them to HTTP statuses.
* ``raise_for_unfinished``: a stream that ended other than by length or stop, as an error.
* ``Outcome`` and ``record``: the request metrics and the one request-log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from service.catalog import ModelView
from service.config import RequestLimits
from service.errors import CapacityError, EngineClosedError, ModelNotFoundError, NoModelLoadedError
from service.metrics import ServingMetrics
from service.prompt import UnsafeTextError, encode_prompt, normalize_stops
from service.sampling import SamplingParams
from service.stream import Chunk, FinishReason, Stream

log = logging.getLogger(__name__)

MAX_TOP_K = 2**31 - 1  # the engine holds top_k as int32
# The metric label used before a request has been resolved to a loaded model, so that
# names sent by clients never become label values (unbounded cardinality).
UNRESOLVED_MODEL = "unresolved"
# The reasons a stream ends normally; every other reason ends it with an error status.
NORMAL_ENDS = (FinishReason.LENGTH, FinishReason.STOP)


class Resolver(Protocol):
    """Which versions serve and which one a request means: a ``ModelRepository`` or a frontend's ``ModelCatalog``."""

    def resolve(self, name: str, version: int) -> Any: ...
    def loaded(self) -> Sequence[Any]: ...


class Submitter(Protocol):
    """Where a request goes: the in-process ``Engine`` or a frontend's ``EngineClient``."""

    def submit(
        self,
        model: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
    ) -> Stream: ...


class RequestError(Exception):
    """A request ends with this status code and message; ``param`` names the field at fault, if one is."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


def check_sampling(
    limits: RequestLimits,
    *,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stops: Sequence[str],
    include_tokens: bool = False,
) -> SamplingParams:
    """Checks one request's sampling fields against the limits (``max_tokens`` 0 = the server's default)."""
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}", "temperature")
    top_p = float(top_p)
    if not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
        raise invalid(f"top_p must be in [0, 1] (0 or 1 = off), got {top_p!r}", "top_p")
    if max_tokens > limits.max_tokens_limit:
        raise invalid(
            f"max_tokens must be <= {limits.max_tokens_limit} (the server's --max-tokens-limit), got {max_tokens}",
            "max_tokens",
        )
    prompt_bytes = len(prompt.encode("utf-8", errors="surrogatepass"))
    if prompt_bytes > limits.max_prompt_bytes:
        raise invalid(
            f"prompt must be at most {limits.max_prompt_bytes} bytes of UTF-8 (the server's --max-prompt-bytes), "
            f"got {prompt_bytes} bytes",
            "prompt",
        )
    stops = tuple(stops)
    if len(stops) > limits.max_stop_sequences:
        raise invalid(
            f"stop must hold at most {limits.max_stop_sequences} sequences (the server's --max-stop-sequences), "
            f"got {len(stops)}",
            "stop",
        )
    for i, stop in enumerate(stops):
        if not stop:
            raise invalid(f"stop[{i}] must not be empty", "stop")
        if len(stop) > limits.max_stop_length:
            raise invalid(
                f"stop[{i}] must be at most {limits.max_stop_length} characters (the server's --max-stop-length), "
                f"got {len(stop)}",
                "stop",
            )
    return SamplingParams(
        max_tokens=max_tokens or limits.default_max_tokens,
        temperature=temperature,
        top_k=min(int(top_k), MAX_TOP_K),  # any k >= the vocabulary keeps all
        top_p=1.0 if top_p == 0.0 else top_p,
        seed=seed,
        stop=stops,
        include_tokens=include_tokens,
    )


async def open_stream(
    repository: Resolver,
    engine: Submitter,
    params: SamplingParams,
    *,
    model_name: str,
    model_version: int,
    prompt: str,
    deadline: float | None,
    outcome: Outcome,
) -> tuple[ModelView, Stream]:
    """Resolves the model, normalises the stops, encodes the prompt and submits the request to the engine."""
    model = repository.resolve(model_name, model_version)
    outcome.model = model.name
    try:
        params = dataclasses.replace(params, stop=normalize_stops(model.tokenizer, params.stop))
        prompt_ids = await encode_prompt(model.tokenizer, prompt)
    except UnsafeTextError as exc:
        raise invalid(str(exc), "stop" if str(exc).startswith("stop") else "prompt") from None
    stream = engine.submit(model, prompt_ids, params, asyncio.get_running_loop(), deadline=deadline)
    return model, stream


def status_of(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The one place that maps an exception to the status a client sees; logs unexpected ones once."""
    if isinstance(exc, RequestError):
        return exc.code, exc.message
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, NoModelLoadedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "the server is shutting down"
    log.exception("request %s failed unexpectedly", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); request_id={request_id}"


def stream_write_timeout(seconds: float, completion_tokens: int, request_id: str) -> RequestError:
    """The status of a stream whose client did not take a message for ``seconds`` (``--stream-write-timeout``)."""
    return RequestError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the client did not read its stream for {seconds:g} s (the server's --stream-write-timeout); "
        f"the stream was ended after {completion_tokens} tokens; request_id={request_id}",
    )


def shutting_down() -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")


def raise_for_unfinished(chunk: Chunk, request_id: str) -> None:
    """Raises the status of a final chunk that did not end by length or a stop sequence."""
    reason = chunk.finish_reason
    if reason is None or reason in NORMAL_ENDS:
        return
    if reason is FinishReason.DEADLINE:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it finished")
    if reason is FinishReason.CANCELLED:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the request was cancelled by the server (shutting down)")
    if reason is FinishReason.REJECTED:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{chunk.error}; request_id={request_id}")
    if reason is FinishReason.UNAVAILABLE:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{chunk.error}; request_id={request_id}")
    if reason is FinishReason.RESOURCE_EXHAUSTED:
        log.error("request %s ran out of memory in the engine: %s", request_id, chunk.error)
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server ran out of memory for this step: {chunk.error}; retry later or ask for less; "
            f"request_id={request_id}",
        )
    log.error("request %s failed in the engine: %s", request_id, chunk.error)
    raise RequestError(grpc.StatusCode.INTERNAL, f"generation failed: {chunk.error}; request_id={request_id}")


@dataclass
class Outcome:
    """What the metrics and the request log need to know about a finished request."""

    request_id: str
    protocol: str  # "grpc" or "http": the requests metrics' label
    model: str = UNRESOLVED_MODEL
    code: grpc.StatusCode = grpc.StatusCode.OK
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""

    def update(self, chunk: Chunk) -> None:
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason.value


def record(metrics: ServingMetrics, outcome: Outcome, started: float, logger: logging.Logger) -> None:
    """Counts a finished request (``textgen_requests_total``, its duration) and writes its line to ``logger``."""
    elapsed = time.monotonic() - started
    total, duration = metrics.request_children(outcome.model, outcome.code.name, outcome.protocol)
    total.inc()
    duration.observe(elapsed)
    logger.info(
        "request %s model=%s code=%s finish=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f protocol=%s",
        outcome.request_id,
        outcome.model,
        outcome.code.name,
        outcome.finish_reason or "-",
        outcome.prompt_tokens,
        outcome.completion_tokens,
        elapsed,
        outcome.protocol,
    )
