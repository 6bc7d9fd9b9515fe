"""The engine: one thread that owns every model call and every active sequence's state.

Continuous batching. Each iteration of the engine thread

1. takes new submissions and cancellations (a hand-off under one lock),
2. drops finished, cancelled and expired rows and admits waiting requests (``service/batch.py``
   joins and compacts the batch arrays, one state gather per change, never per step),
3. runs ONE batched decode call (model ``step`` + in-graph sampler, ``service/decoder.py``) per
   loaded (model, version), round-robin, so different weights never share a call and every model
   gets a call per iteration; a call makes K steps, K from the batch's ``CallBudget``,
4. hands each row its tokens (text via ``Tokenizer.piece``, stop sequences via
   ``StoppingCriteria``) and wakes each event loop once for all its streams (``service/stream.py``).

Prompts ride in the decode batch: for an LSTM a prompt token costs exactly one step, so a row feeds
its next prompt token instead of its last sample, and its samples are ignored until the prompt is
consumed; running streams never stall behind a long prompt. While no row of a (model, version)
generates, its prompts are read together in slices of at most ``PREFILL_SLICE`` tokens per row, one
slice per call (``prefill``, then ``prefill_from``), so a cancel or deadline frees a row within one
bounded call; a version without ``prefill_from`` (contract version 1) reads the first slice and the
rest rides. The asyncio side never runs TensorFlow: ``submit`` takes an encoded prompt and only
queues, and ``Stream.next_chunk`` only reads what the engine accumulated.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from service.batch import Batch, CallBudget, Request, Row
from service.config import EngineConfig
from service.errors import CapacityError, EngineClosedError
from service.metrics import ServingMetrics, observe_weighted
from service.model_repository import LoadedModel
from service.sampling import SamplingParams
from service.stream import EngineStream, FinishReason, LoopWaker, Outbox, Stream, WakerThread
from service.threads import NamedThread

log = logging.getLogger(__name__)

# How long the engine process's engine thread waits on its socket at a time while it has nothing to run.
IDLE_PUMP_SECONDS = 0.1
# The most prompt tokens per row one prefill call reads while no row generates: a call's length, and
# so how late a cancel or deadline can free a row, is bounded by this many steps of the fused layers.
PREFILL_SLICE = 256


def error_summary(exc: BaseException) -> str:
    """A short message for the client: TensorFlow's own line, without the server's traceback and file paths."""
    text = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("File ", "Detected at", "Graph execution", "<stack", "[[", "Hint:", "[Op:")):
            return line[:300]
    return type(exc).__name__


class Engine:
    """Continuous batching over every loaded model, in one daemon thread."""

    def __init__(
        self, config: EngineConfig, metrics: ServingMetrics | None = None, outbox: Outbox | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        # In the engine process, streams belong to frontend processes: rows get token ids only (the
        # frontends detokenize, match stops and time tokens), and ``outbox.flush`` sends each call's.
        self.outbox = outbox
        self._cond = threading.Condition()
        self._incoming: list[Request] = []
        self._cancels: list[EngineStream] = []
        self._n_active = 0
        self._n_waiting = 0
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._waker_thread: WakerThread | None = None
        # engine-thread only
        self._requests: dict[EngineStream, Request] = {}  # every request taken in and not yet finished
        self._waiting: collections.deque[Request] = collections.deque()
        self._batches: dict[LoadedModel, Batch] = {}
        self._rows: dict[EngineStream, tuple[Batch, Row]] = {}
        self._wake: dict[asyncio.AbstractEventLoop, list[EngineStream]] = {}
        self._wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker] = weakref.WeakKeyDictionary()
        self._held: dict[asyncio.AbstractEventLoop, LoopWaker] = {}  # wake-ups not scheduled yet
        self._gauge_names: set[str] = set()
        self._turn = 0
        # Counters for tests and benchmarks (engine thread writes, anyone reads).
        self.steps = 0  # batched decode/prefill steps made (a call of K steps counts K)
        self.calls = 0  # model calls made (decode, K-step decode, prefill slices)
        self.slices = 0  # prefill and prefill_from calls made (prompt slices read)
        self.widest_slice = 0  # the most prompt tokens one slice call read for a row (at most PREFILL_SLICE)
        self.tokens = 0  # tokens delivered to streams
        self.decode_seconds = 0.0  # inside the decode/prefill calls, host copy of the ids included
        self.busy_seconds = 0.0  # whole iterations: decode calls plus the engine's own Python work

    # ------------------------------------------------------------ public API
    @property
    def active(self) -> int:
        with self._cond:
            return self._n_active

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._n_waiting

    def start(self) -> None:
        if self._thread is not None:
            return
        self._waker_thread = WakerThread()
        self._thread = NamedThread(target=self._run, name="textgen-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        model: LoadedModel,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
    ) -> Stream:
        """Queue a request whose prompt is already encoded; never blocks and runs no TensorFlow.

        An empty prompt starts from the tokenizer's start ids. Raises CapacityError / EngineClosedError.
        """
        stream = Stream(loop, len(prompt_ids), params.include_tokens, self._request_cancel)
        self.submit_stream(model, prompt_ids, params, stream, deadline)
        return stream

    def submit_stream(
        self,
        model: LoadedModel,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stream: EngineStream,
        deadline: float | None = None,
    ) -> None:
        """``submit`` with the stream the engine writes to given (the engine process's ``RemoteStream``)."""
        limit = self.config.max_concurrent + self.config.max_queue
        with self._cond:
            if self._closed:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if self._n_active + self._n_waiting >= limit:
                raise CapacityError(
                    f"the server is at capacity: {self._n_active} active and {self._n_waiting} waiting requests "
                    f"(max_concurrent {self.config.max_concurrent} + max_queue {self.config.max_queue})"
                )
            self._n_waiting += 1
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        ids = list(prompt_ids) if len(prompt_ids) else list(model.tokenizer.start_ids)
        model.acquire()
        with self._cond:
            self._incoming.append(Request(stream, model, params, ids, seed, deadline, stream.submitted_at))
            self._cond.notify()

    def cancel(self, streams: Sequence[EngineStream]) -> None:
        """End these streams at the engine's next iteration (thread-safe; finished ones are skipped)."""
        with self._cond:
            self._cancels.extend(streams)
            self._cond.notify()

    def close(self) -> None:
        """Refuse new submits; running streams go on."""
        with self._cond:
            self._closed = True

    def stop(self, timeout: float) -> None:
        """Cancel whatever is left and join the engine thread."""
        with self._cond:
            self._closed = True
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            began = time.monotonic()
            self._thread.join(timeout)
            if self._waker_thread is not None:
                self._waker_thread.stop(max(0.1, timeout - (time.monotonic() - began)))

    def _request_cancel(self, stream: EngineStream) -> None:
        with self._cond:
            self._cancels.append(stream)
            self._cond.notify()

    # ------------------------------------------------------------ the engine thread
    def _has_work(self) -> bool:
        """Whether the loop has anything to do (under ``_cond``)."""
        return bool(self._incoming or self._cancels or self._waiting or self._batches or self._stopping)

    def _run(self) -> None:
        outbox = self.outbox
        while True:
            if outbox is not None:
                # The engine process: this thread also owns the socket to the frontends. Take what
                # arrived (their requests come through ``submit_stream`` from here), waiting for it
                # while there is nothing to run.
                with self._cond:
                    busy = self._has_work()
                if not busy:
                    self._set_gauges()
                    outbox.flush()
                outbox.pump(0.0 if busy else IDLE_PUMP_SECONDS)
            with self._cond:
                if outbox is not None and not self._has_work():
                    continue
                while not self._has_work():
                    self._set_gauges()
                    if self._held:
                        self._flush_wakeups(force=True)
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
                stopping = self._stopping
            for request in incoming:
                self._requests[request.stream] = request
            self._waiting.extend(incoming)
            if stopping:
                self._shutdown()
                return
            began = time.perf_counter()
            try:
                self._iterate(cancels)
            except Exception as exc:  # never let the thread die with streams waiting on it
                log.exception("engine iteration failed")
                self._fail_everything(f"internal engine error: {type(exc).__name__}: {exc}")
                self._flush_wakeups(force=True)
            self.busy_seconds += time.perf_counter() - began

    def _iterate(self, cancels: list[EngineStream]) -> None:
        now = time.monotonic()
        for stream in cancels:
            request = self._requests.get(stream)
            if request is not None:
                self._finish(request, FinishReason.CANCELLED, now)
        admitted = self._admit(now)
        batches = list(self._batches.values())
        if batches:
            self._turn = (self._turn + 1) % len(batches)
            batches = batches[self._turn :] + batches[: self._turn]
        for batch in batches:
            new_rows = admitted.get(batch, [])
            try:
                self._step(batch, new_rows)
            except Exception as exc:
                # Only the requests of this (model, version) fail; the engine goes on with the rest.
                log.exception("decode failed for model %s", batch.model.key)
                message = f"model {batch.model.key} failed: {type(exc).__name__}: {error_summary(exc)}"
                oom = isinstance(exc, tf.errors.ResourceExhaustedError)
                reason = FinishReason.RESOURCE_EXHAUSTED if oom else FinishReason.ERROR
                for row in batch.rows + new_rows:
                    self._finish(row.request, reason, time.monotonic(), error=message)
                self._batches.pop(batch.model, None)
        if not self._batches:
            self._flush_wakeups(force=True)  # nothing will run: wake the readers now
        self._set_gauges()

    def _admit(self, now: float) -> dict[Batch, list[Row]]:
        """Move waiting requests into their batches (in FIFO order) while there is room."""
        admitted: dict[Batch, list[Row]] = {}
        if not self._waiting:
            return admitted
        with self._cond:
            room = self.config.max_concurrent - self._n_active
        still: collections.deque[Request] = collections.deque()
        n_admitted = 0
        for request in self._waiting:
            if request.stream.finished:
                continue  # cancelled while waiting
            if request.deadline is not None and now >= request.deadline:
                self._finish(request, FinishReason.DEADLINE, now)
                continue
            batch = self._batches.get(request.model)
            size = len(batch) + len(admitted.get(batch, [])) if batch is not None else 0
            if n_admitted >= room or size >= self.config.max_batch_size:
                still.append(request)
                continue
            if batch is None:
                batch = self._batches[request.model] = Batch(request.model, self._budget(request.model))
            row = Row.admit(request)
            self._rows[request.stream] = (batch, row)
            admitted.setdefault(batch, []).append(row)
            n_admitted += 1
            if self.metrics is not None:
                mm = self.metrics.model(request.model.name)
                mm.queue_duration.observe(now - request.submitted_at)
                if request.stream.prompt_tokens:
                    mm.prompt_tokens.inc(request.stream.prompt_tokens)
        self._waiting = still
        if n_admitted:
            with self._cond:
                self._n_waiting -= n_admitted
                self._n_active += n_admitted
        return admitted

    def _budget(self, model: LoadedModel) -> CallBudget:
        """A new batch's call budget: K never exceeds the steps its version's XLA decode was compiled for."""
        c = self.config
        xla = model.decoder.xla
        most = c.max_steps_per_call if xla is None else min(c.max_steps_per_call, xla.max_steps)
        return CallBudget(min(c.steps_per_call, most), c.call_budget, most, c.row_steps_per_call)

    def _step(self, batch: Batch, new_rows: list[Row]) -> None:
        now = time.monotonic()
        for row in batch.expired(now):
            self._finish(row.request, FinishReason.DEADLINE, now)
        batch.compact()
        if new_rows:
            batch.join_riding(new_rows)
        if not batch.rows:
            self._batches.pop(batch.model, None)
            return
        # Wake the readers of the previous call now: their Python work on the event loop overlaps
        # the model call (which releases the GIL) instead of competing with the engine's own.
        self._flush_wakeups()
        if self.outbox is not None:
            self.outbox.wait_for_room()  # no frontend more than a call or two behind
        started = time.perf_counter()
        k = 1 if self._waiting else batch.budget.steps(len(batch))  # requests waiting: join after one step
        if batch.reading() and (batch.model.decoder.has_prefill_from or batch.unread_from_start()):
            self._call_slice(batch, started)
        elif k > 1 or batch.model.decoder.xla is not None:
            self._call_steps(batch, k, started)
        else:
            self._call_step(batch, started)

    def _call_step(self, batch: Batch, started: float) -> None:
        """One decode step for every row; rows reading their prompt are fed their next prompt token."""
        params = batch.sampling_tensors()
        ids_t, logprobs_t, state = batch.model.decoder.decode(
            batch.tokens_tensor(), batch.live_state(), *params, tf.constant(batch.position)
        )
        batch.set_state(state)
        ids = ids_t.numpy()
        logprobs = logprobs_t.numpy() if batch.want_logprobs else np.zeros(len(ids), np.float32)
        self._record_call(batch, 1, len(batch), time.perf_counter() - started)
        generating = batch.feed_prompts()
        self._deliver(batch, ids, logprobs, generating)
        if generating is None:
            batch.tokens_t = ids_t  # every row feeds back its sample (otherwise feed_prompts cleared it)

    def _call_steps(self, batch: Batch, k: int, started: float) -> None:
        """``k`` decode steps in one call; rows reading their prompt are fed it in the graph.

        A row with ``n`` prompt tokens left is fed the next ``min(n, k)`` of them and generates
        from step ``n`` on; each generating row gets its tokens in order.
        """
        began = time.monotonic()
        n = len(batch)
        inputs, forced, left = batch.steps_inputs(k)
        ids_t, logprobs_t, state = batch.model.decoder.decode_steps_packed(*inputs)
        batch.set_state(state)
        ids = ids_t.numpy()[:k, :n]  # (k, rows): an XLA call's padding rows and steps are dropped
        logprobs = logprobs_t.numpy()[:k, :n] if batch.want_logprobs else np.zeros(ids.shape, np.float32)
        self._record_call(batch, k, len(batch), time.perf_counter() - started)
        if self.outbox is not None:
            take = self._deliver_remote(batch, ids, logprobs, left.astype(np.int64), np.maximum(k - left, 0))
            batch.record_steps(ids, left, take)
            batch.advance_prompts(forced, left, k)
            return
        # Inter-token latency: a row's tokens of this call arrive together, so each is given an
        # equal share of the time since its previous token (since the call began for a row with
        # none yet), as a client that divides a message's gap by its tokens sees it.
        previous = np.array([began if r.last_token_time is None else r.last_token_time for r in batch.rows])
        shares = (time.monotonic() - previous) / np.maximum(k - left, 1)
        done = np.array([row.done for row in batch.rows], bool)
        for j in range(k):
            # A row that finished at an earlier step of this call (max_tokens, a stop) gets no
            # more of its tokens; compaction drops it before the next call.
            live = np.nonzero(~done & (left <= j))[0]
            if len(live):
                self._deliver(batch, ids[j], logprobs[j], live, shares)
                done[live] = [batch.rows[i].done for i in live.tolist()]
        batch.advance_prompts(forced, left, k)

    def _call_slice(self, batch: Batch, started: float) -> None:
        """No row generates: read the next ``PREFILL_SLICE`` prompt tokens of every row in one call.

        The first slice goes through ``prefill`` (every state is zero), the next through
        ``prefill_from``. Rows whose prompt ends in the slice get its sample as their first token;
        the others ignore it and read on at the next call, after cancels and deadlines are seen.
        """
        decoder = batch.model.decoder
        tokens, lengths = batch.prompt_slice(PREFILL_SLICE)
        params = batch.sampling_tensors()
        position = tf.constant(batch.position)
        if batch.unread_from_start():
            ids_t, logprobs_t, state = decoder.prefill(tf.constant(tokens), tf.constant(lengths), *params, position)
        else:
            ids_t, logprobs_t, state = decoder.prefill_from(
                tf.constant(tokens), tf.constant(lengths), batch.live_state(), *params, position
            )
        batch.set_state(state)
        ids = ids_t.numpy()
        logprobs = logprobs_t.numpy() if batch.want_logprobs else np.zeros(len(ids), np.float32)
        self._record_call(batch, 1, len(batch), time.perf_counter() - started, timed=False)
        self.slices += 1
        self.widest_slice = max(self.widest_slice, tokens.shape[1])
        self._deliver(batch, ids, logprobs, batch.advance_slice(lengths))

    def _record_call(self, batch: Batch, k: int, rows: int, elapsed: float, timed: bool = True) -> None:
        """The one place that accounts for a model call: counters, the call budget's timing, metrics."""
        self.steps += k
        self.calls += 1
        self.decode_seconds += elapsed
        if timed:
            batch.budget.record(rows, elapsed / k)
        if self.metrics is not None:
            mm = self.metrics.model(batch.model.name)
            observe_weighted(mm.step_duration, [elapsed / k], [k])  # k steps of equal length, of ``rows`` rows
            observe_weighted(mm.batch_size, [rows], [k])

    def _deliver(
        self,
        batch: Batch,
        ids: np.ndarray,
        logprobs: np.ndarray,
        which: np.ndarray | None,
        latencies: np.ndarray | None = None,
    ) -> None:
        """Hand rows ``which`` (None: all) their sampled token; the per-token Python work of the engine.

        ``latencies`` (per row, seconds) replaces the time since a row's previous token as its
        inter-token latency (K-step calls, whose tokens arrive together).
        """
        rows = batch.rows
        if self.outbox is not None:
            count = np.zeros(len(rows), np.int64)
            count[slice(None) if which is None else which] = 1
            self._deliver_remote(batch, ids[None, :], logprobs[None, :], np.zeros(len(rows), np.int64), count)
            batch.record_sampled(ids, which)
            return
        now = time.monotonic()
        tokenizer = batch.model.tokenizer
        mm = self.metrics.model(batch.model.name) if self.metrics is not None else None
        indices = range(len(rows)) if which is None else which.tolist()
        ids_list = ids.tolist()
        logprobs_list = logprobs.tolist()
        wake = self._wake
        delivered = 0
        for i in indices:
            row = rows[i]
            token_id = ids_list[i]
            stream = row.request.stream
            piece = tokenizer.piece(row.last_id, token_id)
            row.last_id = token_id
            emit, finish = row.criteria(piece)
            stream.push(token_id, piece, emit, logprobs_list[i], finish, now)
            if mm is not None:
                if row.last_token_time is None:
                    mm.time_to_first_token.observe(now - row.request.submitted_at)
                else:
                    mm.inter_token_latency.observe(now - row.last_token_time if latencies is None else latencies[i])
            if stream.loop is not None:
                wake.setdefault(stream.loop, []).append(stream)
            row.last_token_time = now
            delivered += 1
            if finish is not None:
                self._row_finished(row)
        batch.record_sampled(ids, which)
        self.tokens += delivered
        if mm is not None and delivered:
            mm.generated_tokens.inc(delivered)

    def _deliver_remote(
        self, batch: Batch, ids: np.ndarray, logprobs: np.ndarray, first: np.ndarray, count: np.ndarray
    ) -> np.ndarray:
        """In the engine process: the call's tokens to the outbox in one hand-off; returns what each row took.

        ``ids`` and ``logprobs`` are ``(steps, rows)``; row ``i`` generated steps ``first[i]`` to
        ``first[i] + count[i] - 1``. The frontends detokenize, match stops and time tokens, so here
        a row only counts its tokens up to ``max_tokens`` (``Batch.within_max_tokens``); the tokens
        go in step order, each row's in its order.
        """
        assert self.outbox is not None
        rows = batch.rows
        take, ending = batch.within_max_tokens(np.where([row.done for row in rows], 0, count))
        steps, which = np.nonzero(
            (np.arange(ids.shape[0])[:, None] >= first) & (np.arange(ids.shape[0])[:, None] < first + take)
        )
        if len(which):
            self.outbox.push([row.request.stream for row in rows], which, ids[steps, which], logprobs[steps, which])
            self.tokens += len(which)
        for i in ending.tolist():
            rows[i].request.stream.end(FinishReason.LENGTH)
            self._row_finished(rows[i])
        return take

    # ------------------------------------------------------------ finishing
    def _row_finished(self, row: Row) -> None:
        row.done = True
        stream = row.request.stream
        self._rows.pop(stream, None)
        self._requests.pop(stream, None)
        with self._cond:
            self._n_active -= 1
        row.request.model.release()

    def _finish(self, request: Request, reason: FinishReason, now: float, error: str | None = None) -> None:
        """End a request that is waiting or running, without a new token."""
        stream = request.stream
        entry = self._rows.get(stream)
        emit = entry[1].criteria.flush() if entry is not None and reason.flushes_held_text else ""
        if not stream.end(reason, emit, error):
            return
        if stream.loop is not None:
            self._wake.setdefault(stream.loop, []).append(stream)
        if entry is not None:
            self._row_finished(entry[1])
        else:
            self._requests.pop(stream, None)
            with self._cond:
                self._n_waiting -= 1
            request.model.release()

    def _end_all(self, reason: FinishReason, error: str | None = None) -> None:
        now = time.monotonic()
        for request in list(self._requests.values()):  # running first, then waiting, in admission order
            self._finish(request, reason, now, error=error)
        self._batches.clear()
        self._waiting.clear()

    def _fail_everything(self, message: str) -> None:
        self._end_all(FinishReason.ERROR, message)

    def _shutdown(self) -> None:
        with self._cond:
            incoming, self._incoming = self._incoming, []
        for request in incoming:
            self._requests[request.stream] = request
        self._end_all(FinishReason.CANCELLED)
        self._flush_wakeups(force=True)
        self._set_gauges()

    # ------------------------------------------------------------ wake-ups and gauges
    def _flush_wakeups(self, force: bool = False) -> None:
        """Schedule the readers' wake-ups: per event loop at most one ``call_soon_threadsafe`` per step,
        none while one is still pending, and none within ``wake_interval`` of the previous one unless
        ``force`` (the engine is about to go idle). In the engine process: send each frontend its output."""
        if self.outbox is not None:
            self.outbox.flush()
        if self._wake:
            wake, self._wake = self._wake, {}
            for loop, streams in wake.items():
                waker = self._wakers.get(loop)
                if waker is None:
                    waker = self._wakers[loop] = LoopWaker()
                waker.add(streams)
                self._held[loop] = waker
        if not self._held:
            return
        now = time.monotonic()
        interval = self.config.wake_interval
        due: list[tuple[asyncio.AbstractEventLoop, LoopWaker]] = []
        for loop, waker in list(self._held.items()):
            if not force and now - waker.last < interval:
                continue
            del self._held[loop]
            if waker.arm(now):
                due.append((loop, waker))
        if due and self._waker_thread is not None:
            self._waker_thread.post(due)

    def _set_gauges(self) -> None:
        if self.metrics is None:
            return
        active: collections.Counter[str] = collections.Counter()
        waiting: collections.Counter[str] = collections.Counter()
        for batch in self._batches.values():
            active[batch.model.name] += sum(1 for r in batch.rows if not r.done)
        for request in self._waiting:
            if not request.stream.finished:
                waiting[request.model.name] += 1
        names = set(active) | set(waiting) | self._gauge_names
        for name in names:
            mm = self.metrics.model(name)
            mm.active_sequences.set(active[name])
            mm.waiting_requests.set(waiting[name])
        self._gauge_names = set(active) | set(waiting)
