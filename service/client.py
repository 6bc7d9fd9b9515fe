"""Clients of the textgen gRPC API (sync and asyncio), and the ``textgen generate`` command line.

    with TextGenClient("localhost:50051") as client:
        for response in client.generate("The ", max_tokens=100, temperature=0.8, seed=1):
            print(response.text, end="", flush=True)

``build_parser`` holds the one set of ``textgen generate`` flags and defaults; ``main`` runs them
against a server (``--target HOST:PORT``) and ``service/local.py`` without one (``--model DIR``).
This module imports only grpc, the generated stubs and the server's plain-Python config (never
TensorFlow), so ``textgen generate --target`` starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TextIO

import grpc

from service.api import textgen_pb2, textgen_pb2_grpc
from service.config import ServerConfig
from service.tls import TLSConfigError, channel_credentials
from training.tf_runtime import add_log_level_flag, set_log_levels

FINISH_REASON_NAMES = {
    textgen_pb2.FINISH_REASON_UNSPECIFIED: "unspecified",
    textgen_pb2.FINISH_REASON_LENGTH: "length",
    textgen_pb2.FINISH_REASON_STOP: "stop",
    textgen_pb2.FINISH_REASON_END: "end",
}


def build_request(
    prompt: str,
    *,
    max_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    model: str = "",
    model_version: int = 0,
    include_tokens: bool = False,
    request_id: str = "",
) -> textgen_pb2.GenerateRequest:
    """A ``GenerateRequest``; 0 for max_tokens means the server's default, 0 for top_k/top_p means off."""
    request = textgen_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=list(stop),
        model=model,
        model_version=model_version,
        include_tokens=include_tokens,
        request_id=request_id,
    )
    if seed is not None:
        request.seed = seed
    return request


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The bearer token as call metadata (sent on every call, over TLS or plaintext)."""
    return (("authorization", f"Bearer {token}"),) if token else None


class TextGenClient:
    """A blocking client over one channel; use as a context manager or call ``close()``.

    ``credentials`` (from ``service.tls.channel_credentials``) makes it a TLS/mTLS channel;
    ``token`` is sent as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        if channel is None:
            channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._channel = channel
        self._stub = textgen_pb2_grpc.TextGenerationStub(self._channel)
        self._metadata = _auth_metadata(token)
        self.timeout = timeout

    def generate(
        self, prompt: str, *, timeout: float | None = None, **params: Any
    ) -> Iterator[textgen_pb2.GenerateResponse]:
        """Streams responses as the server produces them; the last carries finish_reason and usage."""
        call = self._stub.Generate(
            build_request(prompt, **params), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream is done; frees the server's row if the caller stops early

    def complete(self, prompt: str, *, timeout: float | None = None, **params: Any) -> textgen_pb2.GenerateResponse:
        """The whole generation in one response."""
        response: textgen_pb2.GenerateResponse = self._stub.Complete(
            build_request(prompt, **params), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    def list_models(self, *, timeout: float | None = None) -> textgen_pb2.ListModelsResponse:
        response: textgen_pb2.ListModelsResponse = self._stub.ListModels(
            textgen_pb2.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TextGenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTextGenClient:
    """The asyncio client over one ``grpc.aio`` channel; ``async with`` or ``await close()``."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        if channel is None:
            channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        self._channel = channel
        self._stub = textgen_pb2_grpc.TextGenerationStub(self._channel)
        self._metadata = _auth_metadata(token)
        self.timeout = timeout

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **params: Any
    ) -> AsyncIterator[textgen_pb2.GenerateResponse]:
        call = self._stub.Generate(
            build_request(prompt, **params), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def complete(
        self, prompt: str, *, timeout: float | None = None, **params: Any
    ) -> textgen_pb2.GenerateResponse:
        response: textgen_pb2.GenerateResponse = await self._stub.Complete(
            build_request(prompt, **params), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    async def list_models(self, *, timeout: float | None = None) -> textgen_pb2.ListModelsResponse:
        response: textgen_pb2.ListModelsResponse = await self._stub.ListModels(
            textgen_pb2.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTextGenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --------------------------------------------------------------------------- textgen generate
# The command's one set of flags, for a server (--target) and for local generation (--model DIR,
# service/local.py): the same sampling flags and defaults, the same request, the same printing.

_UINT32_MAX = 2**32 - 1
# Flags that only mean something for a server: their dest and their spelling.
SERVER_ONLY_FLAGS = {
    "model_version": "--model-version",
    "timeout": "--timeout",
    "tls": "--tls",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "token_file": "--token-file",
}


class FlagError(ValueError):
    """A ``textgen generate`` flag with a value it cannot take; the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``textgen generate``, for a server (``--target``) and local generation (``--model DIR``) alike."""
    parser = argparse.ArgumentParser(
        prog="textgen generate",
        description="Stream text from an exported version, through a server (--target HOST:PORT) or in this "
        "process without one (--model DIR). The same version, prompt, seed and flags give the same text both "
        "ways. Prints the prompt, the generated text and a newline; a summary line goes to stderr.",
    )
    parser.add_argument("prompt", nargs="?", default="", help="text to continue (default: empty)")
    where = parser.add_argument_group("where the model runs")
    where.add_argument("--target", default=None, metavar="HOST:PORT", help="a running server")
    where.add_argument(
        "--model",
        default="",
        metavar="NAME|DIR",
        help="with --target: a model name (default: the server's default model); without --target: DIR, a "
        "version folder or a model folder (its newest version), run in this process",
    )
    sampling = parser.add_argument_group("sampling (checked as the server checks a request)")
    sampling.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="tokens to generate (default 0: the server's --default-max-tokens, "
        f"{ServerConfig.default_max_tokens} unless it sets another)",
    )
    sampling.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in [0, 1] (default 1; 0 or 1 = off)")
    sampling.add_argument("--seed", type=int, default=None, help="same seed, prompt and flags: same text")
    sampling.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable); not printed")
    parser.add_argument("--quiet", action="store_true", help="print no summary line on stderr")
    add_log_level_flag(parser)
    server = parser.add_argument_group("server only (--target)")
    server.add_argument("--model-version", type=int, default=0, help="model version (0 = newest)")
    server.add_argument("--timeout", type=float, default=None, help="deadline for the whole request, in seconds")
    server.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA roots")
    server.add_argument(
        "--tls-ca", default=None, help="PEM CA bundle that signed the server's certificate (implies --tls)"
    )
    server.add_argument("--tls-cert", default=None, help="PEM client certificate for mTLS (with --tls-key)")
    server.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    server.add_argument(
        "--token-file", default=None, help="file holding the bearer token (default: the TEXTGEN_TOKEN variable)"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed flags, or the exit code when argparse has answered itself (``--help``: 0, a bad flag: 2)."""
    try:
        return build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


def request_params(args: argparse.Namespace) -> dict[str, Any]:
    """``build_request``'s keyword arguments from the flags; ``FlagError`` for a value the request cannot hold.

    The sampling values are checked by whoever runs the request, as ``validate_request`` does
    (the server for ``--target``, ``service/local.py`` for ``--model DIR``).
    """
    for dest, flag in (("max_tokens", "--max-tokens"), ("top_k", "--top-k"), ("model_version", "--model-version")):
        value = getattr(args, dest)
        if not 0 <= value <= _UINT32_MAX:
            raise FlagError(f"{flag} must be in [0, {_UINT32_MAX}], got {value}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise FlagError(f"--seed must be in [0, 2**64), got {args.seed}")
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": list(args.stop),
        "model": args.model if args.target is not None else "",
        "model_version": args.model_version,
    }


def summary_line(
    model: str, version: int, finish: str, prompt_tokens: int, completion_tokens: int, ttft: float, total: float
) -> str:
    """The line ``textgen generate`` writes to stderr after the text (unless ``--quiet``)."""
    return (
        f"[{model}/{version} finish={finish} prompt_tokens={prompt_tokens} completion_tokens={completion_tokens} "
        f"ttft={ttft:.3f}s total={total:.3f}s]"
    )


def _read_token(path: str | None) -> str | None:
    """The bearer token: the first line of ``path``, else the TEXTGEN_TOKEN environment variable."""
    if path is None:
        return os.environ.get("TEXTGEN_TOKEN") or None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TLSConfigError(f"--token-file {path!r} cannot be read: {exc}") from exc
    if not token:
        raise TLSConfigError(f"--token-file {path!r} is empty")
    return token


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``textgen generate --target HOST:PORT "prompt"``: the prompt, then the text as it arrives, to stdout."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    set_log_levels(args.log_level)
    if args.target is None:
        print(
            "textgen generate: error: --target HOST:PORT is required (or --model DIR to generate without a server)",
            file=err,
        )
        return 2
    try:
        params = request_params(args)
        token = _read_token(args.token_file)
        use_tls = args.tls or bool(args.tls_ca or args.tls_cert or args.tls_key)
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if use_tls else None
    except (FlagError, TLSConfigError) as exc:
        print(f"textgen generate: error: {exc}", file=err)
        return 2
    last: textgen_pb2.GenerateResponse | None = None
    out.write(args.prompt)
    out.flush()
    try:
        with TextGenClient(args.target, timeout=args.timeout, credentials=credentials, token=token) as client:
            for response in client.generate(args.prompt, **params):
                out.write(response.text)
                out.flush()
                last = response
    except grpc.RpcError as exc:
        out.write("\n")
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"textgen generate: error: {code}: {details}", file=err)
        return 1
    except KeyboardInterrupt:
        out.write("\n")
        print("textgen generate: interrupted", file=err)
        return 130
    out.write("\n")
    out.flush()
    if last is not None and not args.quiet:
        usage = last.usage
        finish = FINISH_REASON_NAMES.get(last.finish_reason, "?")
        print(
            summary_line(
                last.model,
                last.model_version,
                finish,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.time_to_first_token_seconds,
                usage.total_seconds,
            ),
            file=err,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
