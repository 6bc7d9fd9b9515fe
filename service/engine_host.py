"""The engine process of ``textgen serve --frontends N``: the models, the engine, and the socket to the frontends.

It owns everything that touches TensorFlow: the ``ModelRepository`` (loading, polling, retiring
versions) and one ``Engine`` (batches, sampler, call budget). The engine thread is the socket's
only user (ZeroMQ sockets are not thread-safe): between model calls it takes the frontends' batched
requests, cancels and acknowledgements (``EngineHost.pump``), and it sends their output itself.
The main thread only starts it and waits for the supervisor's ``stop``.

The engine thread writes each row's tokens into a ``RemoteStream``, which appends them to its
frontend's ``FrontendBuffer``; ``RemoteOutbox.flush``, once per model call, turns every buffer
into one ``out`` message (``service/ipc.py``). A frontend that stops answering (the supervisor's
``gone``, or a send that finds no such peer) has its rows cancelled at the engine's next iteration.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import zmq

from service import ipc
from service.config import ServerConfig
from service.engine import Engine
from service.errors import CapacityError, EngineClosedError, ModelNotFoundError, NoModelLoadedError
from service.metrics import ServingMetrics
from service.model_repository import ModelRepository
from service.sampling import SamplingParams
from service.stream import EngineStream, FinishReason
from service.threads import NamedThread

log = logging.getLogger(__name__)

# Flow control: a frontend acknowledges each ``out`` message once its streams have taken it. The
# engine starts no call while a frontend has WINDOW messages unacknowledged (waiting at most
# MAX_WAIT seconds): tokens made faster than the frontends deliver them would only queue, and
# waiting lets new requests join the next call instead of the engine spinning on a small batch.
WINDOW = 2
MAX_WAIT = 0.05


@dataclass(eq=False)
class FrontendBuffer:
    """What one frontend's rows got since the last flush (engine thread), and its live requests."""

    name: bytes
    # Typed arrays: an append costs what a list's does, and the message takes their bytes as they are.
    rids: array = field(default_factory=lambda: array("q"))
    ids: array = field(default_factory=lambda: array("i"))
    logprobs: array = field(default_factory=lambda: array("f"))
    ends: ipc.Ends = field(default_factory=list)
    streams: dict[int, RemoteStream] = field(default_factory=dict)
    gone: bool = False
    unacked: int = 0  # out messages sent and not yet acknowledged

    def extend(self, rids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """Tokens in bulk (``RemoteOutbox.push``): what ``RemoteStream.push`` appends one by one."""
        self.rids.frombytes(rids.astype(np.int64, copy=False).tobytes())
        self.ids.frombytes(ids.astype(np.int32, copy=False).tobytes())
        self.logprobs.frombytes(logprobs.astype(np.float32, copy=False).tobytes())


class RemoteStream:
    """One frontend request as the engine sees it: its tokens go to the frontend's buffer (engine thread only)."""

    loop = None  # woken by the outbox, not an event loop
    __slots__ = ("buffer", "rid", "prompt_tokens", "submitted_at", "_finish")

    def __init__(self, buffer: FrontendBuffer, rid: int, prompt_tokens: int) -> None:
        self.buffer = buffer
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.monotonic()
        self._finish: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self._finish is not None

    def push(
        self, token_id: int, piece: str, emit: str, logprob: float, finish: FinishReason | None, now: float
    ) -> None:
        buffer = self.buffer
        buffer.rids.append(self.rid)
        buffer.ids.append(token_id)
        buffer.logprobs.append(logprob)
        if finish is not None:
            self._finish = finish
            buffer.ends.append((self.rid, finish.value, None))

    def end(self, finish: FinishReason, emit: str = "", error: str | None = None) -> bool:
        if self._finish is not None:
            return False
        self._finish = finish
        self.buffer.ends.append((self.rid, finish.value, error))
        return True

    def wake(self) -> None:
        pass


class RemoteOutbox:
    """Each frontend's buffer, and its tokens sent once per call; all of it on the engine thread.

    ``send`` and ``pump`` are the host's: a message to one frontend, and handling what arrived.
    """

    def __init__(self, send: Callable[[bytes, list[bytes]], None], pump: Callable[[float], None]) -> None:
        self._send = send
        self.pump = pump
        self._buffers: dict[bytes, FrontendBuffer] = {}

    def buffer(self, name: bytes) -> FrontendBuffer:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = FrontendBuffer(name)
        return buffer

    def drop(self, name: bytes) -> FrontendBuffer | None:
        buffer = self._buffers.pop(name, None)
        if buffer is not None:
            buffer.gone = True
        return buffer

    def acked(self, name: bytes, count: int) -> None:
        """The frontend ``name`` handled ``count`` more ``out`` messages."""
        buffer = self._buffers.get(name)
        if buffer is not None and count > 0:
            buffer.unacked = max(0, buffer.unacked - count)

    def wait_for_room(self, timeout: float = MAX_WAIT) -> bool:
        """Before a call: take messages in until no frontend has ``WINDOW`` messages unacknowledged.

        Returns False when ``timeout`` passed first (a frontend that is behind, or stuck: the call
        goes ahead; a frontend that died is dropped and waited for no more).
        """
        deadline = time.monotonic() + timeout
        while any(b.unacked >= WINDOW for b in self._buffers.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(left)
        return True

    def push(self, streams: list[EngineStream], rows: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """One call's tokens: token ``t`` is for ``streams[rows[t]]``, a ``RemoteStream``."""
        owners: dict[FrontendBuffer, int] = {}
        remote = cast(list[RemoteStream], streams)
        owner = np.fromiter((owners.setdefault(s.buffer, len(owners)) for s in remote), np.int64, len(remote))
        rids = np.fromiter((s.rid for s in remote), np.int64, len(remote))[rows]
        if len(owners) == 1:
            next(iter(owners)).extend(rids, ids, logprobs)
            return
        token_owner = owner[rows]
        for buffer, n in owners.items():
            mine = token_owner == n
            buffer.extend(rids[mine], ids[mine], logprobs[mine])

    def flush(self) -> None:
        for buffer in list(self._buffers.values()):
            if not buffer.rids and not buffer.ends:
                continue
            rids, ids, logprobs, ends = buffer.rids, buffer.ids, buffer.logprobs, buffer.ends
            buffer.rids, buffer.ids, buffer.logprobs, buffer.ends = array("q"), array("i"), array("f"), []
            for rid, _, _ in ends:
                buffer.streams.pop(rid, None)
            if buffer.gone:
                continue
            frames = ipc.encode_out(
                np.frombuffer(rids, np.int64),
                np.frombuffer(ids, np.int32),
                np.frombuffer(logprobs, np.float32),
                ends,
            )
            buffer.unacked += 1
            self._send(buffer.name, frames)


class EngineHost:
    """The engine process: the ROUTER socket (requests in, output out, model announcements), the engine."""

    def __init__(self, config: ServerConfig, run_dir: str) -> None:
        self.config = config
        self.metrics = ServingMetrics()
        self._context = zmq.Context()
        self.outbox = RemoteOutbox(self._send, self.pump)
        self._announce = threading.Event()  # the set of serving versions changed
        self.repository = ModelRepository(
            config.models,
            default_model=config.default_model,
            metrics=self.metrics,
            poll_seconds=config.poll_seconds,
            keep_versions=config.keep_versions,
            on_change=self._announce.set,
            warmup_batch_sizes=config.warmup_batch_sizes,
            xla=config.xla_shapes,
        )
        self.engine = Engine(config.engine, self.metrics, self.outbox)
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(ipc.engine_endpoint(run_dir))
        self._frontends: set[bytes] = set()  # that said hello and are not gone
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def loading(self) -> bool:
        """Whether the first load of the repository is still running."""
        return self._loader is not None and self._loader.is_alive()

    def run(self) -> None:
        """Serve until ``stop``: load the models in a thread; the engine thread does the rest."""
        self.engine.start()
        self._loader = NamedThread(target=self._load, name="textgen-load", daemon=True)
        self._loader.start()
        try:
            self._stop.wait()
        finally:
            self.engine.stop(5.0)
            self.repository.stop()
            self._router.close(0)

    def pump(self, timeout: float) -> None:
        """Engine thread: handle what the frontends and the supervisor sent, waiting up to ``timeout`` for it."""
        if self._announce.is_set():
            self._announce.clear()
            for name in list(self._frontends):
                self._send(name, self._models())
        if not self._router.poll(int(timeout * 1000) if timeout > 0 else 0, zmq.POLLIN):
            return
        for _ in range(256):  # a bounded number at a time: the engine has calls to make
            try:
                message = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(message[0], message[1:])

    def _load(self) -> None:
        try:
            self.repository.load_all()
        except Exception:
            log.exception("loading models from %s failed", self.config.models)
        self._announce.set()
        if not self.repository.can_serve():
            log.error("no model could be loaded: %s", self.repository.why_not_serving())
        if not self._stop.is_set():
            self.repository.start_polling()

    def _models(self) -> list[bytes]:
        versions = [
            {"name": m.name, "version": m.version, "path": m.path, "vocab_size": m.vocab_size}
            for m in self.repository.loaded()
        ]
        ready = self.repository.can_serve()
        return ipc.encode_models(ready, "" if ready else self.repository.why_not_serving(), versions)

    def _send(self, name: bytes, frames: list[bytes]) -> None:
        try:
            self._router.send_multipart([name, *frames])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._frontend_gone(name)

    def _handle(self, name: bytes, frames: list[bytes]) -> None:
        try:
            header, arrays = ipc.decode(frames)
            kind = header["t"]
            if kind == "req":
                self._requests(name, *ipc.decode_requests(header, arrays))
            elif kind == "hello":
                self._frontends.add(name)
                self._send(name, self._models())
            elif kind == "gone":
                self._frontend_gone(str(header["frontend"]).encode())
            elif kind == "stop" and name == ipc.SUPERVISOR_ID:
                self.stop()
            else:
                log.error("unknown message %r from %r", kind, name)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("a malformed message from %r: %s", name, exc)

    def _requests(self, name: bytes, submits: list[ipc.Submit], cancels: list[int], acks: int) -> None:
        self.outbox.acked(name, acks)
        buffer = self.outbox.buffer(name)
        refused: ipc.Ends = []
        now = time.monotonic()
        for submit in submits:
            try:
                model = self.repository.resolve(submit.model, submit.version)
            except (ModelNotFoundError, NoModelLoadedError) as exc:
                refused.append((submit.rid, FinishReason.UNAVAILABLE.value, f"{exc}; retry"))
                continue
            stream = RemoteStream(buffer, submit.rid, len(submit.prompt))
            params = SamplingParams(
                max_tokens=submit.max_tokens,
                temperature=submit.temperature,
                top_k=submit.top_k,
                top_p=submit.top_p,
                seed=submit.seed,
                include_tokens=submit.logprobs,
            )
            deadline = None if submit.deadline_in is None else now + submit.deadline_in
            buffer.streams[submit.rid] = stream
            try:
                self.engine.submit_stream(model, submit.prompt.tolist(), params, stream, deadline)
            except CapacityError as exc:
                refused.append((submit.rid, FinishReason.REJECTED.value, str(exc)))
            except EngineClosedError as exc:
                refused.append((submit.rid, FinishReason.UNAVAILABLE.value, str(exc)))
            else:
                continue
            buffer.streams.pop(submit.rid, None)
        if cancels:
            self.engine.cancel([s for s in (buffer.streams.get(rid) for rid in cancels) if s is not None])
        if refused:
            empty = np.zeros(0, np.int64)
            self._send(name, ipc.encode_out(empty, empty, empty, refused))

    def _frontend_gone(self, name: bytes) -> None:
        self._frontends.discard(name)
        buffer = self.outbox.drop(name)
        if buffer is None:
            return
        streams = list(buffer.streams.values())
        buffer.streams.clear()
        if streams:
            log.warning("frontend %s is gone: ending its %d streams", name.decode(), len(streams))
        self.engine.cancel(streams)


def run(config: ServerConfig, run_dir: str, up: Any = None) -> int:
    """The engine process: serve until the supervisor's ``stop`` (sent once the frontends have drained).

    SIGTERM and SIGINT are ignored: a signal to the whole process group (a terminal's ^C, ``timeout``)
    must not stop the engine while the frontends drain their streams.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host = EngineHost(config, run_dir)
    if up is not None:
        up.set()  # bound: from now on the supervisor stops it with a message
    host.run()
    if host.loading:
        log.warning("exiting while the first model load is still running")
    return 0
