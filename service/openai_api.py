"""The OpenAI-compatible request and response bodies of the HTTP frontend: pure functions, no I/O.

``parse_completion(body, limits)`` checks a ``POST /v1/completions`` JSON body into a
``CompletionRequest`` (or raises ``RequestError`` naming the field, the value and the limit);
the ``*_body`` functions build the JSON objects the frontend sends.

Defaults follow OpenAI where a field is absent (temperature 1, top_p 1, max_tokens 16),
unlike the proto, whose unset temperature is 0 (greedy).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import grpc

from service.config import RequestLimits
from service.prompt import echo
from service.request import RequestError, check_sampling, invalid
from service.sampling import SamplingParams
from service.stream import Chunk

OPENAI_DEFAULT_MAX_TOKENS = 16
# Known OpenAI fields this server does not support, with the values that leave the output unchanged.
UNSUPPORTED = {
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
}
_SEED_RANGE = (-(2**63), 2**64 - 1)

# The HTTP status of each status code a request can end with.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked ``/v1/completions`` body."""

    params: SamplingParams
    prompt: str
    model_name: str  # "" = the default model
    model_version: int  # 0 = the newest loaded
    stream: bool
    include_usage: bool
    logprobs: bool


def _shown(value: Any) -> str:
    """A client's value as a message quotes it, cut short (``prompt.echo``)."""
    return echo(value) if isinstance(value, str) else echo(json.dumps(value))


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{name} must be a number, got {_shown(value)}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {_shown(value)}", name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {_shown(value)}", name)
    return value


def parse_model(model: Any) -> tuple[str, int]:
    """``name`` or ``name:version`` (a version pinned); absent or ``""`` is the default model."""
    if model is None:
        return "", 0
    if not isinstance(model, str):
        raise invalid(f"model must be a string (a model name, or name:version), got {_shown(model)}", "model")
    name, sep, version = model.rpartition(":")
    if sep and version.isdigit() and name:
        return name, int(version)
    return model, 0


def parse_completion(body: Any, limits: RequestLimits) -> CompletionRequest:
    """Checks a ``/v1/completions`` body; raises ``RequestError`` (INVALID_ARGUMENT) naming the field."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise invalid(f"{name} is not supported by this server, got {_shown(value)}", name)
    n = _integer(body, "n", 1)
    if n != 1:
        raise invalid(f"n must be 1 (one completion per request), got {n}", "n")
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt is required (a string)", "prompt")
    if not isinstance(prompt, str):
        raise invalid(f"prompt must be a string (one prompt per request), got {_shown(prompt)}", "prompt")
    max_tokens = _integer(body, "max_tokens", min(OPENAI_DEFAULT_MAX_TOKENS, limits.max_tokens_limit))
    assert max_tokens is not None
    if max_tokens < 1:
        raise invalid(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    top_k = _integer(body, "top_k", 0)
    assert top_k is not None
    if top_k < -1:
        raise invalid(f"top_k must be >= -1 (0 and -1 = off), got {top_k}", "top_k")
    seed = _integer(body, "seed", None)
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise invalid(f"seed must be in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}], got {seed}", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise invalid(f"stop must be a string or a list of strings, got {_shown(stop)}", "stop")
    logprobs = _integer(body, "logprobs", None)
    if logprobs is not None and logprobs != 0:
        raise invalid(
            f"logprobs must be 0 (the sampled tokens' logprobs; this server gives no top-N alternatives), "
            f"got {logprobs}",
            "logprobs",
        )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"stream_options must be an object, got {_shown(options)}", "stream_options")
    params = check_sampling(
        limits,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=max(top_k, 0),
        seed=seed,
        stops=stops,
        include_tokens=logprobs is not None,
    )
    model_name, model_version = parse_model(body.get("model"))
    return CompletionRequest(
        params=params,
        prompt=prompt,
        model_name=model_name,
        model_version=model_version,
        stream=_boolean(body, "stream"),
        include_usage=_boolean(options or {}, "include_usage"),
        logprobs=logprobs is not None,
    )


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code.lower(),
        }
    }


def http_error(exc: RequestError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of a request's error."""
    status = HTTP_STATUS.get(exc.code, 500)
    return status, error_body(status, exc.message, exc.code.name, exc.param)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)


class Completion:
    """The text, tokens and logprobs of one completion as chunks arrive, and the bodies built from them."""

    def __init__(self, request_id: str, model: str, logprobs: bool) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.logprobs = logprobs
        self.text: list[str] = []
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.tokens.extend(chunk.token_texts)
        self.token_logprobs.extend(chunk.logprobs)

    def _logprobs(self, tokens: list[str], logprobs: list[float]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def chunk_body(self, chunk: Chunk, finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
        """One streamed event: the chunk's new text (and its tokens' logprobs)."""
        choice = {
            "index": 0,
            "text": chunk.text,
            "finish_reason": finish_reason,
            "logprobs": self._logprobs(chunk.token_texts, chunk.logprobs),
        }
        body = self._head() | {"choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    def usage_body(self, chunk: Chunk) -> dict[str, Any]:
        return self._head() | {"choices": [], "usage": usage(chunk)}

    def whole_body(self, last: Chunk, finish_reason: str) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": "".join(self.text),
            "finish_reason": finish_reason,
            "logprobs": self._logprobs(self.tokens, self.token_logprobs),
        }
        return self._head() | {"choices": [choice], "usage": usage(last)}


def usage(chunk: Chunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def models_body(models: list[tuple[str, int]]) -> dict[str, Any]:
    """``GET /v1/models``: one entry per model name, ``created`` the newest version's time (Unix seconds)."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "textgen"} for name, created in models
        ],
    }
