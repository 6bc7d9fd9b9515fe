"""Bearer-token authentication: a grpc.aio server interceptor for the textgen RPCs.

Tokens live in a file (``--auth-token-file``), one per line; blank lines and lines
starting with ``#`` are ignored. The file is re-read when its inode, size or
modification time changes, so tokens rotate without a restart (write the new file
beside the old one and rename it into place). Every call to a ``textgen.v1`` method
must carry ``authorization: Bearer <token>``; a missing or wrong token ends the call
with UNAUTHENTICATED before the servicer sees the request. Health checks and server
reflection are not intercepted: probes and grpcurl need no token.

Comparison is constant time in the token's value: the SHA-256 digests of the given
token and of every configured token are compared with ``hmac.compare_digest``, and
all of them are always compared. Tokens are never logged nor echoed in a status.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/textgen.v1."
SCHEME = "bearer"


class TokenFileError(ValueError):
    """The token file cannot be read or holds no token."""


def read_tokens(path: str) -> list[bytes]:
    """The SHA-256 digests of the tokens in ``path``; raises ``TokenFileError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"--auth-token-file {path!r} cannot be read: {exc}") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise TokenFileError(f"--auth-token-file {path!r} holds no token (one per line; '#' starts a comment)")
    return [hashlib.sha256(t.encode("utf-8")).digest() for t in tokens]


class TokenStore:
    """The tokens of one file, reloaded when the file changes; ``check(token)`` is thread-safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._digests = read_tokens(path)  # the first load must succeed: a server without tokens would lock out all
        self.reloads = 0

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> list[bytes]:
        stamp = self._stat()
        with self._lock:
            if stamp == self._stamp:
                return self._digests
            if stamp is None:
                # Mid-rotation or deleted: keep the last good tokens rather than lock every client out.
                log.error(
                    "--auth-token-file %s is missing; keeping the %d tokens loaded before",
                    self.path,
                    len(self._digests),
                )
                self._stamp = None
                return self._digests
            try:
                self._digests = read_tokens(self.path)
            except TokenFileError as exc:
                log.error("%s; keeping the %d tokens loaded before", exc, len(self._digests))
            else:
                self.reloads += 1
                log.info("reloaded %d tokens from --auth-token-file %s", len(self._digests), self.path)
            self._stamp = stamp
            return self._digests

    def check(self, token: str) -> bool:
        """True when ``token`` is one of the file's tokens; compares against all of them, in constant time."""
        given = hashlib.sha256(token.encode("utf-8", errors="surrogatepass")).digest()
        ok = False
        for digest in self._refresh():
            ok |= hmac.compare_digest(given, digest)
        return ok


def bearer_token(metadata: Any) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry in ``metadata``, if there is one."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == SCHEME and token.strip():
            return token.strip()
        return None
    return None


def _denied(message: str) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return deny


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets ``textgen.v1`` calls through only with a valid bearer token; every other service passes.

    ``on_denied(method)`` is called for each refused call (the server counts them in
    ``textgen_requests_total{code="UNAUTHENTICATED"}``).
    """

    def __init__(self, store: TokenStore, on_denied: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if not method.startswith(PROTECTED_PREFIX):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self.store.check(token):
            return await continuation(handler_call_details)
        if token is None:
            message = f"{method} needs a bearer token: send the metadata 'authorization: Bearer <token>'"
        else:
            message = f"{method}: the bearer token is not valid"
        if self.on_denied is not None:
            self.on_denied(method)
        handler = await continuation(handler_call_details)
        deny = _denied(message)
        # Answer with the same kind of handler, without parsing the request (raw bytes).
        if handler is not None and handler.response_streaming and not handler.request_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
