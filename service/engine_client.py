"""A frontend process's handle on the engine process: requests out, token ids in, text to each ``Stream``.

``EngineClient`` has the ``submit`` of the in-process ``Engine`` (``service/request.py``'s
``Submitter``), so the gRPC servicer and the HTTP frontend run unchanged over it. It lives on the
frontend's event loop and owns one ZeroMQ DEALER socket (``service/ipc.py``), a plain (blocking-API)
socket driven by the loop's ``add_reader`` on its file descriptor: every send and receive is one
non-blocking call, without the futures and callbacks ``zmq.asyncio`` makes per message.

* ``submit`` queues the request; everything queued in one turn of the loop leaves as one message.
* Each ``out`` message holds a model call's tokens for this frontend's rows. Here they are turned
  into text (``Tokenizer.piece``), matched against stop sequences, timed (time to first token,
  inter-token latency: the request metrics this process exports) and pushed to the ``Stream``;
  a row that matched a stop is cancelled in the engine.
* ``models`` messages keep the ``ModelCatalog`` in step with what the engine serves.
* When the engine's socket disconnects (the engine process died), every stream ends UNAVAILABLE at
  once, the catalog empties (health NOT_SERVING) and ``on_lost`` is called.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from service import ipc
from service.catalog import ModelCatalog, RemoteModel
from service.errors import EngineClosedError
from service.metrics import ServingMetrics, observe_weighted
from service.sampling import SamplingParams, StoppingCriteria
from service.stream import FinishReason, Stream

log = logging.getLogger(__name__)

ENGINE_GONE = "the engine process exited; retry on another replica"


def _readable(socket: zmq.Socket[bytes]) -> bool:
    """Whether a message waits on ``socket`` (reading EVENTS also re-arms its descriptor's signal)."""
    return bool(cast(int, socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _waiting(socket: zmq.Socket[bytes] | None) -> Iterator[list[bytes]]:
    """Every message waiting on ``socket`` now, each read without blocking (none once it is closed)."""
    while socket is not None and not socket.closed and _readable(socket):
        try:
            yield socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


@dataclass(eq=False)
class _Observed:
    """One message's latencies of one model, written to its histograms together."""

    first: list[float] = field(default_factory=list)  # times to first token
    gaps: list[float] = field(default_factory=list)  # inter-token latencies ...
    weights: list[int] = field(default_factory=list)  # ... and how many tokens each is the latency of
    tokens: int = 0


@dataclass(eq=False)
class _Live:
    """A request this frontend has open in the engine."""

    rid: int
    stream: Stream
    model: RemoteModel
    criteria: StoppingCriteria
    last_id: int | None
    last_token_time: float | None = None


class EngineClient:
    """Submits this frontend's requests to the engine process and feeds their streams (on the event loop)."""

    def __init__(
        self,
        endpoint: str,
        name: bytes,
        catalog: ModelCatalog,
        metrics: ServingMetrics | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self.catalog = catalog
        self.metrics = metrics
        self.on_lost = on_lost
        self.lost = False  # the engine process went away
        self._context = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._connected = False  # the monitor saw the connection to the engine
        self._live: dict[int, _Live] = {}
        self._by_stream: dict[Stream, int] = {}
        self._next_rid = 1
        self._submits: list[ipc.Submit] = []
        self._cancels: list[int] = []
        self._acks = 0  # out messages handled since the last message to the engine
        self._flush_scheduled = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_output = 0.0  # time.monotonic() of the engine's previous output message

    # ------------------------------------------------------------ the Submitter side
    @property
    def active(self) -> int:
        """Streams of this frontend that have not ended."""
        return len(self._live)

    @property
    def waiting(self) -> int:
        return 0  # the engine counts its queue; a frontend's streams are all "active" here

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, self.name)
        socket.setsockopt(zmq.LINGER, 0)
        # No high-water mark: a burst of requests while the engine is busy queues here instead of
        # failing the sends (EAGAIN); what this frontend accepts already bounds the queue.
        socket.setsockopt(zmq.SNDHWM, 0)
        monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        socket.connect(self.endpoint)
        self._socket, self._monitor = socket, monitor
        socket.send_multipart(ipc.encode_hello())  # queued by ZeroMQ until the connection is up
        # ZeroMQ's descriptor signals edges ("the socket's events changed"), not levels: each
        # callback drains its socket until EVENTS says there is nothing more (``_drain``).
        loop.add_reader(socket.fileno(), self._drain)
        loop.add_reader(monitor.fileno(), self._watch)
        loop.call_soon(self._drain)
        loop.call_soon(self._watch)

    def submit(
        self,
        model: RemoteModel,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
    ) -> Stream:
        """Queue a request for the engine (never blocks); its stream fills as the engine's output arrives."""
        if self._closed or self.lost:
            raise EngineClosedError(
                ENGINE_GONE if self.lost else "the server is shutting down and takes no new requests"
            )
        rid = self._next_rid
        self._next_rid += 1
        stream = Stream(loop, len(prompt_ids), params.include_tokens, self._cancel)
        ids = np.asarray(prompt_ids if len(prompt_ids) else model.tokenizer.start_ids, np.int32)
        self._live[rid] = _Live(
            rid,
            stream,
            model,
            StoppingCriteria(params.max_tokens, params.stop),
            int(ids[-1]) if len(prompt_ids) else None,
        )
        self._by_stream[stream] = rid
        self._submits.append(
            ipc.Submit(
                rid=rid,
                model=model.name,
                version=model.version,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seed=params.seed,
                logprobs=params.include_tokens,
                deadline_in=None if deadline is None else max(0.0, deadline - time.monotonic()),
                prompt=ids,
            )
        )
        self._schedule_flush()
        return stream

    def close(self) -> None:
        """Refuse new requests; running streams go on."""
        self._closed = True

    def stop(self, timeout: float = 0.0) -> None:
        """End every stream still open (CANCELLED: the grace period is over) and cancel them in the engine."""
        self._closed = True
        for live in list(self._live.values()):
            self._end(live, FinishReason.CANCELLED, None, cancel=True)
        self._flush()

    async def aclose(self) -> None:
        """After ``stop``: stop watching the sockets and close them."""
        if self._loop is not None:
            for sock in (self._socket, self._monitor):
                if sock is not None and not sock.closed:
                    self._loop.remove_reader(sock.fileno())
        self._context.destroy(linger=0)  # closes the socket and its monitor

    # ------------------------------------------------------------ sending
    def _cancel(self, stream: Stream) -> None:
        rid = self._by_stream.get(stream)
        live = self._live.get(rid) if rid is not None else None
        if live is not None:
            self._end(live, FinishReason.CANCELLED, None, cancel=True)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what this turn of the loop queued as one message."""
        self._flush_scheduled = False
        if not self._submits and not self._cancels and not self._acks:
            return
        submits, self._submits = self._submits, []
        cancels, self._cancels = self._cancels, []
        acks, self._acks = self._acks, 0
        if self._socket is None or self.lost:
            return
        try:
            self._socket.send_multipart(ipc.encode_requests(submits, cancels, acks), flags=zmq.NOBLOCK)
            # A send can take in what arrived meanwhile without the descriptor signalling it again.
            if _readable(self._socket) and self._loop is not None:
                self._loop.call_soon(self._drain)
        except zmq.ZMQError as exc:  # the engine is not there (yet): its streams cannot run
            log.error("cannot reach the engine process: %s", exc)
            for submit in submits:
                live = self._live.get(submit.rid)
                if live is not None:
                    self._end(live, FinishReason.UNAVAILABLE, f"the engine process is not reachable ({exc})")

    # ------------------------------------------------------------ receiving
    def _drain(self) -> None:
        """Handle every message waiting on the socket (the loop calls this when its descriptor is readable)."""
        for frames in _waiting(self._socket):
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            header, arrays = ipc.decode(frames)
            if header["t"] == "out":
                self._output(*ipc.decode_out(header, arrays))
                # Acknowledged once the streams it woke have run (call_soon keeps the order):
                # the engine waits for that before it runs ahead of this frontend.
                self._acks += 1
                self._schedule_flush()
            elif header["t"] == "models":
                self.catalog.update(header["versions"])
            else:
                log.error("unknown message %r from the engine", header["t"])
        except Exception:  # a bad message must not end the reading: every stream depends on it
            log.exception("could not handle a message from the engine")

    def _output(self, rids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, ends: ipc.Ends) -> None:
        """One model call's tokens for this frontend's rows, then the rows the engine ended.

        The call's tokens come step by step (every row's first, then every row's second, ...); they
        are taken row by row, in order: the row's pieces, its stop matching and one ``push_many``.
        The latencies of the whole message are written once per histogram (``observe_weighted``).
        """
        now = time.monotonic()
        previous, self._last_output = self._last_output, now
        observed: dict[str, _Observed] = {}
        if len(rids):
            order = np.argsort(rids, kind="stable")  # each row's tokens together, in their order
            sorted_rids = rids[order]
            starts = np.flatnonzero(np.concatenate(([True], sorted_rids[1:] != sorted_rids[:-1])))
            bounds = [*starts.tolist(), len(sorted_rids)]
            id_list = ids[order].tolist()
            logprob_list = logprobs[order].tolist()
            for n, rid in enumerate(sorted_rids[starts].tolist()):
                live = self._live.get(rid)
                if live is None:
                    continue  # ended here already (a stop matched, the client cancelled)
                begin, end = bounds[n], bounds[n + 1]
                row_ids = id_list[begin:end]
                piece = live.model.tokenizer.piece
                last = live.last_id
                pieces = []
                for token_id in row_ids:
                    pieces.append(piece(last, token_id))
                    last = token_id
                emit, taken, finish = live.criteria.feed(pieces)
                if taken < len(row_ids):
                    del row_ids[taken:], pieces[taken:]
                live.last_id = row_ids[-1]
                stream = live.stream
                stream.push_many(row_ids, pieces, emit, logprob_list[begin : begin + taken], finish, now)
                seen = observed.get(live.model.name)
                if seen is None:
                    seen = observed[live.model.name] = _Observed()
                seen.tokens += taken
                count = end - begin  # the row's tokens of this call arrive together: each gets an equal share
                if live.last_token_time is None:
                    seen.first.append(now - stream.submitted_at)
                    if taken > 1:  # the others: shares of the call, which began about when the previous one ended
                        seen.gaps.append((now - max(previous, stream.submitted_at)) / count)
                        seen.weights.append(taken - 1)
                else:
                    seen.gaps.append((now - live.last_token_time) / count)
                    seen.weights.append(taken)
                live.last_token_time = now
                if finish is not None:
                    self._end(live, finish, None, cancel=finish is FinishReason.STOP, ended=True)
                stream.wake()
        if self.metrics is not None:
            for name, seen in observed.items():
                mm = self.metrics.model(name)
                ttft, itl, generated = mm.time_to_first_token, mm.inter_token_latency, mm.generated_tokens
                observe_weighted(ttft, seen.first, [1] * len(seen.first))
                observe_weighted(itl, seen.gaps, seen.weights)
                generated.inc(seen.tokens)
        for rid, reason, error in ends:
            live = self._live.get(rid)
            if live is not None:
                self._end(live, FinishReason(reason), error)

    def _end(
        self, live: _Live, reason: FinishReason, error: str | None, cancel: bool = False, ended: bool = False
    ) -> None:
        """Forget a request here. ``cancel``: the engine drops its row too; ``ended``: its stream has ended already."""
        self._live.pop(live.rid, None)
        self._by_stream.pop(live.stream, None)
        if not ended:
            emit = live.criteria.flush() if reason.flushes_held_text else ""
            live.stream.end(reason, emit, error)
            live.stream.wake()
        if cancel:
            self._cancels.append(live.rid)
            self._schedule_flush()

    def _watch(self) -> None:
        """The monitor's events: a disconnect after the connection came up means the engine process is gone."""
        for frames in _waiting(self._monitor):
            event = parse_monitor_message(frames)
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED and self._connected and not self.lost:
                self._engine_lost()

    def _engine_lost(self) -> None:
        log.error("the engine process is gone: ending %d streams with UNAVAILABLE", len(self._live))
        self.lost = True
        for live in list(self._live.values()):
            self._end(live, FinishReason.UNAVAILABLE, ENGINE_GONE)
        self.catalog.update([])
        if self.on_lost is not None:
            self.on_lost()
