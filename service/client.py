"""Clients of the textgen gRPC API (sync and asyncio) and ``textgen generate --target HOST:PORT``.

    with TextGenClient("localhost:50051") as client:
        for response in client.generate("The ", max_tokens=100, temperature=0.8, seed=1):
            print(response.text, end="", flush=True)

This module imports only grpc and the generated stubs (never TensorFlow), so the
command line starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TextIO

import grpc

from service.api import textgen_pb2, textgen_pb2_grpc
from service.tls import TLSConfigError, channel_credentials

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen generate",
        description="Stream a generation from a textgen server to the terminal.",
    )
    parser.add_argument("prompt", nargs="?", default="", help="seed text (default: empty)")
    parser.add_argument("--target", required=True, help="the server, HOST:PORT")
    parser.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0 = the server's default)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default 1.0")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass in (0, 1] (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="same seed + prompt + params => same text")
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable); not printed")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--model-version", type=int, default=0, help="model version (0 = newest)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline for the whole request, in seconds")
    parser.add_argument("--quiet", action="store_true", help="print no summary line on stderr")
    parser.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA roots")
    parser.add_argument(
        "--tls-ca", default=None, help="PEM CA bundle that signed the server's certificate (implies --tls)"
    )
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate for mTLS (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--token-file", default=None, help="file holding the bearer token (default: the TEXTGEN_TOKEN variable)"
    )
    return parser


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
    """``textgen generate --target HOST:PORT "prompt"``: text to stdout as it arrives, a summary to stderr."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("max_tokens", "top_k", "model_version"):
        if getattr(args, name) < 0:
            print(f"textgen generate: error: --{name.replace('_', '-')} must be >= 0", file=err)
            return 2
    if args.seed is not None and not 0 <= args.seed < 2**64:
        print(f"textgen generate: error: --seed must be in [0, 2**64), got {args.seed}", file=err)
        return 2
    try:
        token = _read_token(args.token_file)
        use_tls = args.tls or bool(args.tls_ca or args.tls_cert or args.tls_key)
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if use_tls else None
    except TLSConfigError as exc:
        print(f"textgen generate: error: {exc}", file=err)
        return 2
    last: textgen_pb2.GenerateResponse | None = None
    try:
        with TextGenClient(args.target, timeout=args.timeout, credentials=credentials, token=token) as client:
            for response in client.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
                model=args.model,
                model_version=args.model_version,
            ):
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
        print(
            f"[{last.model}/{last.model_version} finish={FINISH_REASON_NAMES.get(last.finish_reason, '?')} "
            f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
            f"ttft={usage.time_to_first_token_seconds:.3f}s total={usage.total_seconds:.3f}s]",
            file=err,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
