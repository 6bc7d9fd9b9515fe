"""The benchmark's floor: a bare grpc.aio ``textgen.v1.TextGeneration/Generate`` that streams precomputed messages.

``python -m benchmarks.floor_server --port 0 --tokens-per-message K`` answers each ``Generate``
with the messages the real server sends for ``max_tokens`` tokens at K tokens per message:
``round(max_tokens / K)`` messages (at least 1, at most one per token) that split the tokens
evenly, each with K characters of text (one token per character, as the char model), a
``request_id``, the model's name and version; the last one also carries finish reason LENGTH
and the usage. There is no model, no validation, no admission and no detokenizing; messages are
built once per (max_tokens, model, prompt length) and reused. What such a server costs in CPU
per token is gRPC's and asyncio's work per call and per message, the floor of any Python gRPC
server's CPU per token with the same messages. It prints ``textgen floor: listening on port N``
once serving and stops on SIGTERM or SIGINT.

``FloorProcess`` starts it as a child process for the harness (``e2e_bench.measure_level``
measures it as it measures ``python -m service``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.e2e_bench import LOCALHOST, stop_process, tree_rss_kb
from benchmarks.proc_cpu import tree_pids

READY = re.compile(r"listening on port (\d+)")
TEXT = "the quick brown fox jumps over the lazy dog; "  # the characters messages are cut from
MAX_CACHED = 4096  # distinct (max_tokens, model, prompt length) message lists kept


def message_sizes(max_tokens: int, tokens_per_message: float) -> list[int]:
    """Tokens in each message: ``round(max_tokens / tokens_per_message)`` messages (1..max_tokens), split evenly."""
    count = min(max_tokens, max(1, round(max_tokens / tokens_per_message)))
    base, extra = divmod(max_tokens, count)
    return [base + 1 if i < extra else base for i in range(count)]


def build_messages(max_tokens: int, tokens_per_message: float, model: str, prompt_tokens: int) -> list[Any]:
    """The ``GenerateResponse`` messages of one call, shaped as the real server's."""
    from service.api import textgen_pb2

    request_id = uuid.uuid4().hex  # what the server makes up for a request without one
    messages = []
    for size in message_sizes(max_tokens, tokens_per_message):
        text = (TEXT * (size // len(TEXT) + 1))[:size]
        messages.append(textgen_pb2.GenerateResponse(text=text, request_id=request_id, model=model, model_version=1))
    last = messages[-1]
    last.finish_reason = textgen_pb2.FINISH_REASON_LENGTH
    last.usage.prompt_tokens = prompt_tokens
    last.usage.completion_tokens = max_tokens
    last.usage.time_to_first_token_seconds = 0.001
    last.usage.total_seconds = 0.01
    return messages


@dataclass(frozen=True)
class FloorConfig:
    """The floor server's command line."""

    host: str = LOCALHOST
    port: int = 0
    tokens_per_message: float = 1.0
    grace_seconds: float = 5.0


def make_servicer(tokens_per_message: float) -> Any:
    """A ``TextGenerationServicer`` whose ``Generate`` writes the precomputed messages."""
    import grpc

    from service.api import textgen_pb2_grpc

    class FloorServicer(textgen_pb2_grpc.TextGenerationServicer):  # type: ignore[misc]
        def __init__(self) -> None:
            self._cache: dict[tuple[int, str, int], list[Any]] = {}

        async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802 - gRPC's name
            if request.max_tokens < 1:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1")
            key = (request.max_tokens, request.model, len(request.prompt))
            messages = self._cache.get(key)
            if messages is None:
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
                messages = build_messages(request.max_tokens, tokens_per_message, request.model, len(request.prompt))
                self._cache[key] = messages
            # As the real server: the initial metadata in a write of its own, then one write per message.
            await context.send_initial_metadata(())
            for message in messages:
                await context.write(message)

    return FloorServicer()


async def serve(config: FloorConfig) -> int:
    """Serve until SIGTERM or SIGINT; the ready line goes to stdout."""
    import grpc

    from service.api import textgen_pb2_grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    textgen_pb2_grpc.add_TextGenerationServicer_to_server(make_servicer(config.tokens_per_message), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"textgen floor: listening on port {port}", flush=True)
    await stop.wait()
    await server.stop(config.grace_seconds)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=LOCALHOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed when ready)")
    parser.add_argument(
        "--tokens-per-message", type=float, default=1.0, help="mean tokens per message, as the real server sent them"
    )
    args = parser.parse_args(argv)
    if args.tokens_per_message <= 0:
        parser.error(f"--tokens-per-message must be above 0, got {args.tokens_per_message:g}")
    return asyncio.run(serve(FloorConfig(host=args.host, port=args.port, tokens_per_message=args.tokens_per_message)))


# --------------------------------------------------------------------------- the harness side
@dataclass(frozen=True)
class FloorSpec:
    """How to start one floor server."""

    tokens_per_message: float = 1.0
    model: str = "bench"  # the name its messages carry (requests name it, as they name the real model)
    startup_timeout: float = 60.0


class FloorProcess:
    """``python -m benchmarks.floor_server`` on 127.0.0.1, a ``LoadTarget``; a context manager that stops it."""

    http_target: str | None = None
    metrics_port: int | None = None

    def __init__(self, spec: FloorSpec, log_path: str) -> None:
        self.spec = spec
        self.log_path = log_path
        self.target = ""
        self._proc: subprocess.Popen[str] | None = None
        self._log: Any = None

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the floor server was never started"
        return self._proc.pid

    def rss_kb(self) -> int | None:
        return tree_rss_kb(tree_pids(self.pid))

    def command(self) -> list[str]:
        k = repr(float(self.spec.tokens_per_message))  # exact: the message count rounds max_tokens / k
        return [sys.executable, "-m", "benchmarks.floor_server", "--port", "0", "--tokens-per-message", k]

    def __enter__(self) -> FloorProcess:
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._log, text=True)
        try:
            self.target = f"{LOCALHOST}:{self._wait_ready()}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.spec.startup_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.2)
            if ready:
                line = self._proc.stdout.readline()
                if not line:
                    break  # the process closed stdout: it has exited
                if match := READY.search(line):
                    return int(match.group(1))
            elif self._proc.poll() is not None:
                break
        self._proc.poll()
        raise RuntimeError(f"floor server not ready (exit code {self._proc.returncode}): {self._log_tail()}")

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    sys.exit(main())
