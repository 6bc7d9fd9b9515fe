"""The server's configuration: one frozen ``ServerConfig`` built from flags and ``TEXTGEN_*`` variables.

Every flag ``--some-flag`` has the environment equivalent ``TEXTGEN_SOME_FLAG``; a flag given on the
command line wins over the environment, which wins over the default. ``parse_config(argv, environ)``
is pure (it reads only what it is given), so tests and two in-process servers build their own.
"""

from __future__ import annotations

import argparse
import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "TEXTGEN_"
_UINT32_MAX = 2**32 - 1
_INT32_MAX = 2**31 - 1
_MAX_SECONDS = _INT32_MAX // 1000


class ConfigError(ValueError):
    """A flag or environment variable has a value the server cannot use."""


@dataclass(frozen=True)
class EngineConfig:
    """The engine's part of ``ServerConfig`` (``ServerConfig.engine``); its defaults and checks are there."""

    max_concurrent: int  # active sequences, all models
    max_queue: int  # accepted but waiting
    max_batch_size: int  # rows in one model call; 1 = no batching (the baseline)
    steps_per_call: int  # decode steps per model call while nobody waits to join
    max_steps_per_call: int  # K's ceiling for a small batch (the XLA width)
    row_steps_per_call: int  # rows x steps a call aims for: a small batch takes more steps (0 = never)
    call_budget: float  # seconds one multi-step call may take (0 = no limit)
    # Readers of one event loop are woken at most once per this many seconds while the engine
    # runs (always at once when it goes idle): on a fast model the cross-thread wake-up, not the
    # model, is the cost of a step. Not a flag.
    wake_interval: float = 0.002


# The smallest padded batch: below it a call costs about the same whatever its rows.
MIN_PADDED_BATCH = 8
# ``--event-loop``: what ``service.server.run_event_loop`` runs the connection-owning processes on.
EVENT_LOOPS = ("uvloop", "asyncio")


def padded_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes an XLA decode is compiled for, up to ``max_batch_size`` (always the last one).

    8, 16, 32, 64, then alternately x1.5 and x4/3 (96, 128, 192, 256, 384, ...): a call pads its
    rows to the next size, at most a third more rows than it has above 64, and a server with the
    default 256 rows compiles 8 sizes.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    sizes: list[int] = []
    size = MIN_PADDED_BATCH
    while size < max_batch_size:
        sizes.append(size)
        size = size * 2 if size < 64 else (size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3)
    sizes.append(max_batch_size)
    return tuple(sizes)


@dataclass(frozen=True)
class XlaShapes:
    """The fixed shapes of the XLA-compiled ``decode_steps``: padded batch sizes and the most steps per call.

    XLA compiles one program per input shape, so a call's rows are padded up to the next of
    ``batch_sizes`` (each compiled during warm-up) and ``forced`` is always ``max_steps`` wide; the
    number of steps a call makes stays a run-time value.
    """

    batch_sizes: tuple[int, ...]
    max_steps: int

    def __post_init__(self) -> None:
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be ascending positive sizes, got {self.batch_sizes}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")

    @classmethod
    def for_server(cls, max_batch_size: int, steps_per_call: int) -> XlaShapes:
        return cls(padded_batch_sizes(max_batch_size), steps_per_call)

    def padded(self, rows: int) -> int:
        """The compiled batch size a call of ``rows`` rows runs at (``ValueError`` above the largest)."""
        at = bisect.bisect_left(self.batch_sizes, rows)
        if at == len(self.batch_sizes):
            raise ValueError(f"{rows} rows is more than the largest compiled batch size {self.batch_sizes[-1]}")
        return self.batch_sizes[at]


@dataclass(frozen=True)
class RequestLimits:
    """The server's limits on one request (``ServerConfig.limits``)."""

    max_tokens_limit: int
    default_max_tokens: int
    max_prompt_bytes: int
    max_stop_sequences: int
    max_stop_length: int


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``textgen serve`` can be told; see docs/serving.md for each field."""

    models: str = "models"
    default_model: str | None = None
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 8000
    http_port: int = 8090
    cors_allow_origin: str | None = None
    max_concurrent: int = 256
    max_queue: int = 1024
    max_pending_calls: int = 16384
    max_batch_size: int = 256
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_prompt_bytes: int = 65536
    max_stop_sequences: int = 16
    max_stop_length: int = 256
    grace_seconds: float = 25.0
    poll_seconds: float = 30.0
    keep_versions: int = 1
    max_connection_age: float = 0.0
    request_timeout: float = 600.0
    stream_write_timeout: float = 30.0
    max_receive_message_bytes: int = 1048576
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    health_port: int = -1
    intra_op_threads: int = 0
    frontends: int = -1
    malloc_mmap_threshold: int = 1048576
    steps_per_call: int = 8
    max_steps_per_call: int = 32
    row_steps_per_call: int = 256
    call_budget_ms: float = 25.0
    xla: str = "on"
    event_loop: str = "uvloop"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(
            max_concurrent=self.max_concurrent,
            max_queue=self.max_queue,
            max_batch_size=self.max_batch_size,
            steps_per_call=self.steps_per_call,
            max_steps_per_call=self.max_steps_per_call,
            row_steps_per_call=self.row_steps_per_call,
            call_budget=self.call_budget_ms / 1000.0,
        )

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_tokens_limit=self.max_tokens_limit,
            default_max_tokens=self.default_max_tokens,
            max_prompt_bytes=self.max_prompt_bytes,
            max_stop_sequences=self.max_stop_sequences,
            max_stop_length=self.max_stop_length,
        )

    @property
    def xla_shapes(self) -> XlaShapes | None:
        """The shapes the K-step decode is XLA-compiled for, or None with ``--xla off``."""
        return XlaShapes.for_server(self.max_batch_size, self.max_steps_per_call) if self.xla == "on" else None

    @property
    def warmup_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes every decode function is run at before a version takes traffic."""
        return tuple(sorted({1, 8, self.max_batch_size}))


def _problems(c: ServerConfig) -> list[str]:
    out: list[str] = []

    def need(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            out.append(f"{_flag(name)} must be {rule}, got {value!r}")

    need(bool(c.models), "models", c.models, "a model repository folder")
    need(c.default_model is None or bool(c.default_model), "default_model", c.default_model, "a model name")
    need(bool(c.host), "host", c.host, "a host name or address")
    for name in ("port", "metrics_port"):
        value = getattr(c, name)
        need(0 <= value <= 65535, name, value, "in [0, 65535] (0 picks a free port)")
    for name in (
        "max_concurrent",
        "max_pending_calls",
        "max_batch_size",
        "max_tokens_limit",
        "default_max_tokens",
        "max_prompt_bytes",
        "max_stop_length",
        "keep_versions",
    ):
        value = getattr(c, name)
        need(value >= 1, name, value, ">= 1")
    need(c.max_queue >= 0, "max_queue", c.max_queue, ">= 0")
    # Upper bounds are what the value's consumer can hold: the API's uint32 fields, gRPC's and
    # TensorFlow's int32 arguments, gRPC's int32 millisecond channel arguments.
    for name in ("max_tokens_limit", "default_max_tokens"):
        value = getattr(c, name)
        need(value <= _UINT32_MAX, name, value, f"<= {_UINT32_MAX} (the API's uint32 max_tokens)")
    for name in (
        "max_concurrent",
        "max_queue",
        "max_pending_calls",
        "max_batch_size",
        "max_receive_message_bytes",
        "steps_per_call",
        "max_steps_per_call",
        "row_steps_per_call",
    ):
        value = getattr(c, name)
        need(value <= _INT32_MAX, name, value, f"<= {_INT32_MAX} (gRPC and TensorFlow take it as an int32)")
    need(c.intra_op_threads <= 4096, "intra_op_threads", c.intra_op_threads, "<= 4096")
    need(c.max_stop_sequences <= 4096, "max_stop_sequences", c.max_stop_sequences, "<= 4096")
    need(c.max_stop_length <= 65536, "max_stop_length", c.max_stop_length, "<= 65536")
    need(c.keep_versions <= 1024, "keep_versions", c.keep_versions, "<= 1024")
    need(
        c.max_receive_message_bytes >= c.max_prompt_bytes + 4096,
        "max_receive_message_bytes",
        c.max_receive_message_bytes,
        f">= --max-prompt-bytes + 4096 ({c.max_prompt_bytes + 4096})",
    )
    need(-1 <= c.http_port <= 65535, "http_port", c.http_port, "in [-1, 65535] (-1 = off, 0 picks a free port)")
    for origin in (c.cors_allow_origin or "").split(","):
        origin = origin.strip()
        need(
            origin == "*" or origin.startswith(("http://", "https://")) or c.cors_allow_origin is None,
            "cors_allow_origin",
            c.cors_allow_origin,
            "'*' or comma-separated origins such as https://app.example.com",
        )
    need(-1 <= c.health_port <= 65535, "health_port", c.health_port, "in [-1, 65535] (-1 = off, 0 picks a free port)")
    need((c.tls_cert is None) == (c.tls_key is None), "tls_key", c.tls_key, "given together with --tls-cert")
    need(c.tls_client_ca is None or c.tls_cert is not None, "tls_client_ca", c.tls_client_ca, "used with --tls-cert")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
        value = getattr(c, name)
        need(value is None or bool(value), name, value, "a file path")
    need(c.max_stop_sequences >= 0, "max_stop_sequences", c.max_stop_sequences, ">= 0")
    need(c.steps_per_call >= 1, "steps_per_call", c.steps_per_call, ">= 1")
    need(
        c.max_steps_per_call >= c.steps_per_call,
        "max_steps_per_call",
        c.max_steps_per_call,
        f">= --steps-per-call ({c.steps_per_call})",
    )
    need(c.row_steps_per_call >= 0, "row_steps_per_call", c.row_steps_per_call, ">= 0 (0 = K stays --steps-per-call)")
    need(0.0 <= c.call_budget_ms <= 10_000.0, "call_budget_ms", c.call_budget_ms, "in [0, 10000] ms (0 = no limit)")
    need(c.intra_op_threads >= 0, "intra_op_threads", c.intra_op_threads, ">= 0 (0 = automatic)")
    need(-1 <= c.frontends <= 256, "frontends", c.frontends, "in [-1, 256] (-1 = automatic, 0 = one process)")
    need(
        c.malloc_mmap_threshold == 0 or 4096 <= c.malloc_mmap_threshold <= 32 * 1024 * 1024,
        "malloc_mmap_threshold",
        c.malloc_mmap_threshold,
        "0 (off) or in [4096, 33554432] bytes",
    )
    need(
        c.default_max_tokens <= c.max_tokens_limit,
        "default_max_tokens",
        c.default_max_tokens,
        f"<= --max-tokens-limit ({c.max_tokens_limit})",
    )
    for name in ("grace_seconds", "poll_seconds", "max_connection_age", "request_timeout", "stream_write_timeout"):
        value = getattr(c, name)
        need(
            math.isfinite(value) and 0 <= value <= _MAX_SECONDS,
            name,
            value,
            f"a number of seconds in [0, {_MAX_SECONDS}] (0 = off; gRPC takes it in int32 milliseconds)",
        )
    need(c.xla in ("on", "off"), "xla", c.xla, "on or off")
    need(c.event_loop in EVENT_LOOPS, "event_loop", c.event_loop, " or ".join(EVENT_LOOPS))
    need(c.log_level.upper() in _LOG_LEVELS, "log_level", c.log_level, f"one of {', '.join(_LOG_LEVELS)}")
    return out


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_HELP = {
    "models": "model repository: each subfolder is a model name holding numbered versions",
    "default_model": "model served when a request names none (default: the only model)",
    "host": "address to listen on",
    "port": "gRPC port (0 picks a free one; the bound port is logged)",
    "metrics_port": "Prometheus /metrics HTTP port (0 picks a free one)",
    "http_port": "OpenAI-compatible HTTP API and playground port (-1 = off, 0 picks a free one)",
    "cors_allow_origin": "origins whose browser pages may call the HTTP API: '*' or a comma-separated list "
    "(default: none)",
    "max_concurrent": "active sequences at most (all models)",
    "max_queue": "requests accepted but waiting at most; beyond that RESOURCE_EXHAUSTED",
    "max_pending_calls": "gRPC calls arrived but not yet picked up by the server, at most (per process); gRPC "
    "cancels a call beyond them, or held longer than --request-timeout, unseen: CANCELLED, in no metric",
    "max_batch_size": "sequences advanced in one engine step (1 = no batching)",
    "max_tokens_limit": "largest max_tokens a request may ask for",
    "default_max_tokens": "max_tokens used when a request leaves it 0",
    "max_prompt_bytes": "largest prompt, in UTF-8 bytes",
    "max_stop_sequences": "most stop sequences in one request",
    "max_stop_length": "longest stop sequence, in characters",
    "grace_seconds": "on SIGTERM/SIGINT, how long running streams may take to finish",
    "poll_seconds": "how often the model repository is checked for new versions (0 = never)",
    "keep_versions": "loaded versions kept per model (the newest N)",
    "max_connection_age": "seconds before a client connection is asked to reconnect, for load balancing (0 = off)",
    "request_timeout": "longest a request may run, in seconds: its deadline if it has none, a cap on a later "
    "one (0 = none)",
    "stream_write_timeout": "seconds a streamed message may wait for a client that does not read it; the stream then "
    "ends RESOURCE_EXHAUSTED and its sequence leaves the batch (0 = wait forever)",
    "max_receive_message_bytes": "largest request message gRPC accepts, in bytes (larger: RESOURCE_EXHAUSTED)",
    "tls_cert": "PEM certificate chain of the server; with --tls-key, the gRPC port speaks TLS only",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; clients must then present a certificate it signed (mTLS)",
    "auth_token_file": "file of bearer tokens, one per line, reloaded when it changes; textgen RPCs then need one",
    "health_port": "plaintext port serving only grpc.health.v1, for probes when TLS is on (-1 = off, 0 = free port)",
    "steps_per_call": "decode steps per model call while no request waits to join (tokens then arrive K at a time)",
    "max_steps_per_call": "most decode steps in one call of a small batch (see --row-steps-per-call; equal to "
    "--steps-per-call: never more than that)",
    "row_steps_per_call": "rows x steps one call aims for: a batch of fewer than this / --steps-per-call rows takes "
    "more steps, up to --max-steps-per-call, so a call's fixed cost is shared by as many tokens (0 = off)",
    "call_budget_ms": "longest a multi-step call may take: K is cut to this over the batch's measured step time, "
    "so large batches stream token by token (0 = no limit)",
    "intra_op_threads": "TensorFlow threads per op on the CPU (0 = the usable CPUs minus the frontends' cores, "
    "at least one)",
    "frontends": "frontend processes owning the gRPC and HTTP connections beside one engine process (-1 = one per "
    "usable CPU but one, at least 1; 0 = everything in one process)",
    "malloc_mmap_threshold": "bytes above which glibc maps each allocation on its own and unmaps it when freed, "
    "so memory of a large batch goes back to the OS (0 = glibc's own, rising threshold)",
    "xla": "on: compile the K-step decode with XLA at padded batch sizes, each during warm-up (a small model's "
    "call then costs several times less CPU); off: TensorFlow runs it op by op at any batch size",
    "event_loop": "the event loop of the processes that own connections: uvloop (libuv's loop, less CPU per "
    "message) or asyncio (the standard library's)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _converter(name: str) -> Callable[[str], Any]:
    default = ServerConfig.__dataclass_fields__[name].default
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def build_parser(prog: str = "textgen serve") -> argparse.ArgumentParser:
    """The argparse parser; every option defaults to None so that 'not given' is visible."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve exported textgen models over gRPC with continuous batching. "
        f"Every flag also reads {ENV_PREFIX}<FLAG> from the environment (flags win).",
    )
    for f in fields(ServerConfig):
        default = f.default
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=_converter(f.name),
            default=None,
            metavar=f.name.upper(),
            help=f"{_HELP[f.name]} (env {_env(f.name)}; default {default!r})",
        )
    return parser


def parse_config(argv: list[str], environ: Mapping[str, str]) -> ServerConfig:
    """Builds the config from ``argv`` (flags) over ``environ`` (``TEXTGEN_*``) over the defaults.

    Raises ``SystemExit`` for unknown flags (argparse) and ``ConfigError`` for bad values.
    """
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(ServerConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
            continue
        raw = environ.get(_env(f.name))
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = _converter(f.name)(raw)
        except ValueError:
            kind = _converter(f.name).__name__
            raise ConfigError(
                f"{_env(f.name)} must be {'a number' if kind == 'float' else 'an integer'}, got {raw!r}"
            ) from None
    values["log_level"] = str(values.get("log_level", ServerConfig.log_level)).upper()
    return ServerConfig(**values)
