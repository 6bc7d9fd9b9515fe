"""The engine: one thread that owns every model call and every active sequence's state.

Continuous batching. Each iteration of the engine thread

1. takes new submissions and cancellations (thread-safe hand-off under one lock),
2. drops finished, cancelled and expired rows and admits waiting requests, with
   one gather/concat of the state matrix per change (never per step),
3. runs ONE batched ``decode`` call (model ``step`` + in-graph sampler) per
   loaded (model, version), round-robin, so different weights never share a
   call and every model gets a step per iteration,
4. hands each row its token (text via ``Tokenizer.piece``, stop sequences via
   ``StoppingCriteria``), and wakes each event loop once for all its streams.

Prompts ride in the decode batch: for an LSTM a prompt token costs exactly one
step, so a row feeds its next prompt token instead of its last sample and its
sample is ignored until the prompt is consumed. Running streams never stall
behind a long prompt. When a (model, version) has no running row at all, the
waiting prompts are prefilled together with the ``prefill`` signature (no one
is stalled then). The asyncio side never runs TensorFlow: ``submit`` only
encodes the prompt and queues it, and ``Stream.next_chunk`` only reads what
the engine accumulated.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import tensorflow as tf

from service.metrics import ServingMetrics
from service.model_repository import LoadedModel
from service.sampling import SamplingParams, StoppingCriteria

log = logging.getLogger(__name__)

_Item = TypeVar("_Item")

_U64 = 1 << 64


class CapacityError(Exception):
    """Over max_concurrent + max_queue (RESOURCE_EXHAUSTED)."""


class EngineClosedError(Exception):
    """The engine is shutting down and takes no new requests (UNAVAILABLE)."""


@dataclass(frozen=True)
class EngineConfig:
    max_concurrent: int = 256  # active sequences (all models)
    max_queue: int = 1024  # accepted but waiting
    max_batch_size: int = 256  # rows in one step; 1 = no batching (baseline)
    # When a (model, version) has no running row, prefill the waiting prompts
    # with the ``prefill`` signature in one call instead of one token per step.
    prefill_when_idle: bool = True
    # Readers of one event loop are woken at most once per this many seconds
    # while the engine runs (always at once when it goes idle): on a fast
    # model the cross-thread wake-up, not the model, is the cost of a step.
    wake_interval: float = 0.002
    # A prompt longer than this many tokens that arrives while its (model,
    # version) has running rows is prefilled by a worker thread with the
    # ``prefill`` signature, beside the decode steps, and joins the batch with
    # its state; shorter prompts ride in the batch. 0 (the default): every
    # prompt rides, which keeps running streams flattest on a small CPU; the
    # worker gives long prompts a much earlier first token (docs/engine.md).
    prefill_threshold: int = 0
    # Decode steps per model call while nobody waits to join (rows reading their
    # prompt are fed it inside the loop): one ``tf.while_loop`` call makes K steps, so
    # the Python and dispatch cost of a call is paid once per K tokens. Tokens then
    # reach readers K at a time, and a cancel, deadline or arrival waits up to one
    # call. 1 (the default): one step per call. The same seed gives the same text
    # whatever K is.
    steps_per_call: int = 1
    # The time one multi-step call may take, in seconds (0 = no limit: always
    # ``steps_per_call`` steps). The engine times each batch's steps and makes
    # K = budget / step time calls, at most ``steps_per_call`` and at least 1, so
    # a small batch gets long calls and a batch of 1000 rows (37 ms a step on a
    # 2-core CPU) goes back to one step per call instead of 300 ms bursts.
    call_budget: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {self.steps_per_call}")
        if not 0.0 <= self.call_budget <= 10.0:
            raise ValueError(f"call_budget must be in [0, 10] seconds, got {self.call_budget}")
        if self.prefill_threshold < 0:
            raise ValueError(f"prefill_threshold must be >= 0, got {self.prefill_threshold}")
        if not 0.0 <= self.wake_interval <= 1.0:
            raise ValueError(f"wake_interval must be in [0, 1] seconds, got {self.wake_interval}")


@dataclass
class Chunk:
    """Everything new since the previous Chunk of this stream."""

    text: str
    token_ids: list[int]  # filled only when include_tokens
    token_texts: list[str]
    logprobs: list[float]
    # None while running; "length" | "stop" | "end" | "cancelled" | "deadline" | "error" | "resource_exhausted"
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # total so far
    time_to_first_token: float | None  # seconds, once known
    error: str | None = None  # message when finish_reason is "error" or "resource_exhausted"


class Stream:
    """The servicer's handle on one request; the engine thread writes, the event loop reads."""

    def __init__(
        self,
        engine: Engine,
        model: LoadedModel,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        prompt_ids: list[int],
        prompt_tokens: int,
        seed: int,
        deadline: float | None,
    ) -> None:
        self.model = model
        self.params = params
        self.loop = loop
        self.prompt_tokens = prompt_tokens
        self.seed = seed  # the seed actually used (drawn when the request had none)
        self.deadline = deadline
        self.submitted_at = time.monotonic()
        self._engine = engine
        self._prompt_ids = prompt_ids
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._text: list[str] = []
        self._ids: list[int] = []
        self._token_texts: list[str] = []
        self._logprobs: list[float] = []
        self._completion_tokens = 0
        self._ttft: float | None = None
        self._finish: str | None = None
        self._error: str | None = None
        self._final_taken = False
        self._cancel_requested = False

    # ------------------------------------------------------------ consumer side (event loop)
    async def next_chunk(self) -> Chunk:
        """Wait for news and return all of it, coalesced. After the final chunk, returns it again (empty)."""
        while True:
            with self._lock:
                if self._text or self._ids or (self._finish is not None and not self._final_taken):
                    return self._take()
                if self._final_taken:
                    return self._chunk("", [], [], [])
                self._event.clear()
            await self._event.wait()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Chunk:
        with self._lock:
            if self._final_taken:
                raise StopAsyncIteration
        return await self.next_chunk()

    def cancel(self) -> None:
        """Thread-safe; the row leaves the batch at the next step (no-op once finished)."""
        with self._lock:
            if self._finish is not None or self._cancel_requested:
                return
            self._cancel_requested = True
        self._engine._request_cancel(self)

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._finish is not None

    def _take(self) -> Chunk:
        chunk = self._chunk("".join(self._text), self._ids, self._token_texts, self._logprobs)
        self._text = []
        self._ids = []
        self._token_texts = []
        self._logprobs = []
        if self._finish is not None:
            self._final_taken = True
        return chunk

    def _chunk(self, text: str, ids: list[int], texts: list[str], logprobs: list[float]) -> Chunk:
        return Chunk(
            text=text,
            token_ids=ids,
            token_texts=texts,
            logprobs=logprobs,
            finish_reason=self._finish,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self._completion_tokens,
            time_to_first_token=self._ttft,
            error=self._error,
        )

    # ------------------------------------------------------------ producer side (engine thread)
    def _push(self, token_id: int, piece: str, emit: str, logprob: float, finish: str | None, now: float) -> None:
        with self._lock:
            if emit:
                self._text.append(emit)
            if self.params.include_tokens:
                self._ids.append(token_id)
                self._token_texts.append(piece)
                self._logprobs.append(logprob)
            self._completion_tokens += 1
            if self._ttft is None:
                self._ttft = now - self.submitted_at
            if finish is not None:
                self._finish = finish

    def _end(self, finish: str, emit: str = "", error: str | None = None) -> bool:
        """Finish without a new token; False if it had already finished."""
        with self._lock:
            if self._finish is not None:
                return False
            if emit:
                self._text.append(emit)
            self._finish = finish
            self._error = error
            return True

    def _wake(self) -> None:
        self._event.set()


@dataclass(eq=False)
class _Row:
    """Engine-side record of one active sequence."""

    stream: Stream
    criteria: StoppingCriteria
    prompt_ids: list[int]
    cursor: int = 1  # index of the next prompt token to feed
    last_id: int | None = None  # for Tokenizer.piece
    last_token_time: float | None = None
    done: bool = False


@dataclass(eq=False)
class _Batch:
    """The running rows of one (model, version) and their state, row-aligned."""

    model: LoadedModel
    rows: list[_Row] = field(default_factory=list)
    state: Any = None  # tf.Tensor (b, S)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # next token to feed
    temperature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    top_k: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    top_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    seed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    position: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens generated so far
    deadline: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    prompt_left: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # prompt tokens after `tokens`
    # Tensors reused from step to step while the batch does not change (a
    # numpy -> tensor conversion costs about as much as a small model's step).
    params_t: tuple | None = None  # (temperature, top_k, top_p, seed)
    tokens_t: Any = None  # the previous step's sampled ids, when every row is generating
    want_logprobs: bool = False
    prefilling: int = 0  # rows of this batch at the prefill worker
    step_seconds: float = 0.0  # moving average of one decode step's time (0: none yet)
    step_rows: int = 0  # the batch size when step_seconds was last updated

    ARRAYS = ("tokens", "temperature", "top_k", "top_p", "seed", "position", "deadline", "prompt_left")

    def record_step_time(self, seconds: float) -> None:
        """Fold one step's time into the moving average (~the last 8 steps); a new batch size restarts it."""
        rows = len(self.rows)
        if self.step_rows > 0 and 0.8 <= rows / self.step_rows <= 1.25:
            self.step_seconds += (seconds - self.step_seconds) / 8.0
        else:
            self.step_seconds = seconds
        self.step_rows = rows

    def step_time_estimate(self) -> float:
        """The next step's time: the average, scaled up in proportion to rows that joined since.

        A step's cost grows less than linearly with its rows, so the scaled figure errs long and
        the call short of its budget. A batch that shrank keeps its larger figure until the next
        step is timed.
        """
        return self.step_seconds * max(1.0, len(self.rows) / max(self.step_rows, 1))


def _error_summary(exc: BaseException) -> str:
    """A short message for the client: TensorFlow's own line, without the server's traceback and file paths."""
    text = exc.message if isinstance(exc, tf.errors.OpError) else str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("File ", "Detected at", "Graph execution", "<stack", "[[", "Hint:", "[Op:")):
            return line[:300]
    return type(exc).__name__


def _as_int64(seed: int) -> int:
    seed %= _U64
    return seed - _U64 if seed >= 1 << 63 else seed


class _ModelMetrics:
    """The engine's metric children for one model name (labels() looked up once)."""

    def __init__(self, metrics: ServingMetrics, name: str) -> None:
        self.step_duration = metrics.step_duration.labels(model=name)
        self.batch_size = metrics.batch_size.labels(model=name)
        self.queue_duration = metrics.queue_duration.labels(model=name)
        self.time_to_first_token = metrics.time_to_first_token.labels(model=name)
        self.inter_token_latency = metrics.inter_token_latency.labels(model=name)
        self.prompt_tokens = metrics.prompt_tokens.labels(model=name)
        self.generated_tokens = metrics.generated_tokens.labels(model=name)
        self.active_sequences = metrics.active_sequences.labels(model=name)
        self.waiting_requests = metrics.waiting_requests.labels(model=name)


class Engine:
    """Continuous batching over every loaded model, in one daemon thread."""

    def __init__(self, config: EngineConfig, metrics: ServingMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._cond = threading.Condition()
        self._incoming: list[Stream] = []
        self._cancels: list[Stream] = []
        self._n_active = 0
        self._n_waiting = 0
        self._closed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._waker_thread: _WakerThread | None = None
        self._prefiller: _Prefiller | None = None
        self._prefilled: list[_Prefilled] = []  # results from the prefill worker (under _cond)
        # engine-thread only
        self._waiting: collections.deque[Stream] = collections.deque()
        self._batches: dict[LoadedModel, _Batch] = {}
        self._rows_by_stream: dict[Stream, tuple[_Batch, _Row]] = {}
        self._wake: dict[asyncio.AbstractEventLoop, list[Stream]] = {}
        self._wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = weakref.WeakKeyDictionary()
        self._held: dict[asyncio.AbstractEventLoop, _LoopWaker] = {}  # wake-ups not scheduled yet
        self._model_metrics: dict[str, _ModelMetrics] = {}
        self._gauge_names: set[str] = set()
        self._turn = 0
        # Counters for tests and benchmarks (engine thread writes, anyone reads).
        self.steps = 0  # batched decode/prefill steps made (a call of K steps counts K)
        self.calls = 0  # model calls made (decode, K-step decode, prefill)
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
        self._waker_thread = _WakerThread()
        if self.config.prefill_threshold > 0:
            self._prefiller = _Prefiller(self)
        self._thread = threading.Thread(target=self._run, name="textgen-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        model: LoadedModel,
        prompt: str,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
    ) -> Stream:
        """Queue a request; never blocks and runs no TensorFlow. Raises CapacityError / EngineClosedError."""
        limit = self.config.max_concurrent + self.config.max_queue
        with self._cond:
            if self._closed:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if self._n_active + self._n_waiting >= limit:
                raise CapacityError(
                    f"the server is at capacity: {self._n_active} active and {self._n_waiting} waiting requests "
                    f"(max_concurrent {self.config.max_concurrent} + max_queue {self.config.max_queue})"
                )
            self._n_waiting += 1  # reserve the slot before the (lock-free) encoding below
        try:
            prompt_ids = model.tokenizer.encode(prompt) if prompt else []
        except BaseException:
            with self._cond:
                self._n_waiting -= 1
            raise
        prompt_tokens = len(prompt_ids)
        if not prompt_ids:
            prompt_ids = list(model.tokenizer.start_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        stream = Stream(self, model, params, loop, prompt_ids, prompt_tokens, seed, deadline)
        model.acquire()
        with self._cond:
            self._incoming.append(stream)
            self._cond.notify()
        return stream

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
            if self._prefiller is not None:
                self._prefiller.stop(max(0.1, timeout - (time.monotonic() - began)))
            if self._waker_thread is not None:
                self._waker_thread.stop(max(0.1, timeout - (time.monotonic() - began)))

    def _post_prefilled(self, result: _Prefilled) -> None:
        with self._cond:
            self._prefilled.append(result)
            self._cond.notify()

    def _request_cancel(self, stream: Stream) -> None:
        with self._cond:
            self._cancels.append(stream)
            self._cond.notify()

    # ------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._incoming
                    and not self._cancels
                    and not self._waiting
                    and not self._batches
                    and not self._prefilled
                    and not self._stopping
                ):
                    self._set_gauges()
                    if self._held:
                        self._flush_wakeups(force=True)
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                cancels, self._cancels = self._cancels, []
                prefilled, self._prefilled = self._prefilled, []
                stopping = self._stopping
            self._waiting.extend(incoming)
            if stopping:
                self._shutdown()
                return
            began = time.perf_counter()
            try:
                self._iterate(cancels, prefilled)
            except Exception as exc:  # never let the thread die with streams waiting on it
                log.exception("engine iteration failed")
                self._fail_everything(f"internal engine error: {type(exc).__name__}: {exc}")
                self._flush_wakeups(force=True)
            self.busy_seconds += time.perf_counter() - began

    def _iterate(self, cancels: list[Stream], prefilled: list[_Prefilled]) -> None:
        now = time.monotonic()
        for stream in cancels:
            self._finish_stream(stream, "cancelled", now)
        for result in prefilled:
            self._join_from_worker(result, now)
        admitted = self._admit(now)
        batches = list(self._batches.values())
        if batches:
            self._turn = (self._turn + 1) % len(batches)
            batches = batches[self._turn :] + batches[: self._turn]
        for batch in batches:
            try:
                self._step(batch, admitted.get(batch, []))
            except Exception as exc:
                # Only the requests of this (model, version) step fail; the engine goes on with the rest.
                log.exception("decode failed for model %s", batch.model.key)
                message = f"model {batch.model.key} failed: {type(exc).__name__}: {_error_summary(exc)}"
                reason = "resource_exhausted" if isinstance(exc, tf.errors.ResourceExhaustedError) else "error"
                for row in batch.rows + admitted.get(batch, []):
                    self._finish_stream(row.stream, reason, time.monotonic(), error=message)
                self._batches.pop(batch.model, None)
        if not self._batches:
            self._flush_wakeups(force=True)  # nothing will run: wake the readers now
        self._set_gauges()

    def _admit(self, now: float) -> dict[_Batch, list[_Row]]:
        """Move waiting requests into their batches (in FIFO order) while there is room."""
        admitted: dict[_Batch, list[_Row]] = {}
        if not self._waiting:
            return admitted
        with self._cond:
            room = self.config.max_concurrent - self._n_active
        still: collections.deque[Stream] = collections.deque()
        to_worker: list[tuple[_Batch, _Row]] = []
        n_admitted = 0
        for stream in self._waiting:
            if stream.finished:
                continue  # cancelled while waiting
            if stream.deadline is not None and now >= stream.deadline:
                self._finish_stream(stream, "deadline", now)
                continue
            batch = self._batches.get(stream.model)
            size = len(batch.rows) + batch.prefilling + len(admitted.get(batch, [])) if batch is not None else 0
            if n_admitted >= room or size >= self.config.max_batch_size:
                still.append(stream)
                continue
            if batch is None:
                batch = _Batch(stream.model)
                self._batches[stream.model] = batch
            params = stream.params
            row = _Row(
                stream=stream,
                criteria=StoppingCriteria(params.max_tokens, params.stop),
                prompt_ids=stream._prompt_ids,
                last_id=stream._prompt_ids[-1] if stream.prompt_tokens else None,
            )
            self._rows_by_stream[stream] = (batch, row)
            n_admitted += 1
            threshold = self.config.prefill_threshold
            if self._prefiller is not None and batch.rows and len(row.prompt_ids) > threshold:
                batch.prefilling += 1
                to_worker.append((batch, row))
            else:
                admitted.setdefault(batch, []).append(row)
            if self.metrics is not None:
                mm = self._mm(stream.model.name)
                mm.queue_duration.observe(now - stream.submitted_at)
                if stream.prompt_tokens:
                    mm.prompt_tokens.inc(stream.prompt_tokens)
        self._waiting = still
        if to_worker and self._prefiller is not None:
            self._prefiller.post(to_worker)
        if n_admitted:
            with self._cond:
                self._n_waiting -= n_admitted
                self._n_active += n_admitted
        return admitted

    def _step(self, batch: _Batch, new_rows: list[_Row]) -> None:
        model = batch.model
        now = time.monotonic()
        if batch.rows:
            expired = np.nonzero(batch.deadline <= now)[0]
            for i in expired:
                self._finish_stream(batch.rows[int(i)].stream, "deadline", now)
        self._compact(batch)
        if new_rows:
            if not batch.rows and self.config.prefill_when_idle:
                self._prefill(batch, new_rows)
            else:
                self._append_riding(batch, new_rows)
            self._compact(batch)  # rows finished by their first token (max_tokens 1, a stop)
        if not batch.rows:
            self._batches.pop(model, None)
            return
        # Wake the readers of the previous step now: their Python work on the
        # event loop overlaps the model call (which releases the GIL) instead
        # of competing with the engine's own Python work.
        self._flush_wakeups()
        started = time.perf_counter()
        if batch.params_t is None:
            batch.params_t = tuple(tf.constant(a) for a in (batch.temperature, batch.top_k, batch.top_p, batch.seed))
            batch.want_logprobs = any(r.stream.params.include_tokens for r in batch.rows)
        tokens_t = batch.tokens_t if batch.tokens_t is not None else tf.constant(batch.tokens)
        k = self._steps_this_call(batch)
        if k > 1 and not self._waiting:
            self._step_many(batch, tokens_t, k, started)
            return
        ids_t, logprobs_t, batch.state = model.decode(
            tokens_t, batch.state, *batch.params_t, tf.constant(batch.position)
        )
        ids = ids_t.numpy()
        logprobs = logprobs_t.numpy() if batch.want_logprobs else np.zeros(len(ids), np.float32)
        elapsed = time.perf_counter() - started
        self.steps += 1
        self.calls += 1
        self.decode_seconds += elapsed
        batch.record_step_time(elapsed)
        size = len(batch.rows)
        if self.metrics is not None:
            mm = self._mm(model.name)
            mm.step_duration.observe(elapsed)
            mm.batch_size.observe(size)
        prompting = batch.prompt_left > 0
        if prompting.any():
            for i in np.nonzero(prompting)[0]:
                row = batch.rows[int(i)]
                batch.tokens[i] = row.prompt_ids[row.cursor]
                row.cursor += 1
            batch.prompt_left[prompting] -= 1
            generating = np.nonzero(~prompting)[0]
            batch.tokens_t = None
        else:
            generating = None
            batch.tokens_t = ids_t
        self._deliver(batch, ids, logprobs, generating)

    def _steps_this_call(self, batch: _Batch) -> int:
        """K for the next call: ``steps_per_call``, cut to what fits in ``call_budget``."""
        k = self.config.steps_per_call
        if k == 1 or self.config.call_budget <= 0.0:
            return k
        if batch.step_seconds <= 0.0:
            return 1  # time one step first
        return max(1, min(k, int(self.config.call_budget / batch.step_time_estimate())))

    def _step_many(self, batch: _Batch, tokens_t: Any, k: int, started: float) -> None:
        """``k`` decode steps in one call; rows reading their prompt are fed it in the graph.

        A row with ``prompt_left = n`` is fed its next ``min(n, k)`` prompt tokens and
        generates from step ``n`` on; each generating row gets its tokens in order.
        """
        model = batch.model
        assert batch.params_t is not None
        began = time.monotonic()
        left = np.minimum(batch.prompt_left, k).astype(np.int32)
        riding = np.nonzero(left)[0].tolist()
        forced = np.zeros((len(batch.rows), k), np.int32)
        for i in riding:
            row = batch.rows[i]
            forced[i, : left[i]] = row.prompt_ids[row.cursor : row.cursor + int(left[i])]
        ids_t, logprobs_t, batch.state = model.decode_steps(
            tokens_t,
            batch.state,
            *batch.params_t,
            tf.constant(batch.position),
            tf.constant(k, tf.int32),
            tf.constant(forced),
            tf.constant(left),
        )
        ids = ids_t.numpy()  # (k, b)
        logprobs = logprobs_t.numpy() if batch.want_logprobs else np.zeros(ids.shape, np.float32)
        elapsed = time.perf_counter() - started
        self.steps += k
        self.calls += 1
        self.decode_seconds += elapsed
        batch.record_step_time(elapsed / k)
        if self.metrics is not None:
            mm = self._mm(model.name)
            for _ in range(k):
                mm.step_duration.observe(elapsed / k)
                mm.batch_size.observe(len(batch.rows))
        # Inter-token latency: a row's tokens of this call arrive together, so each is given an
        # equal share of the time since its previous token (since the call began for a row with
        # none yet), as a client that divides a message's gap by its tokens sees it.
        previous = np.array([began if r.last_token_time is None else r.last_token_time for r in batch.rows])
        shares = (time.monotonic() - previous) / np.maximum(k - left, 1)
        done = np.array([row.done for row in batch.rows], bool)
        for j in range(k):
            # A row that finished at an earlier step of this call (max_tokens, a stop)
            # gets no more of its tokens; compaction drops it before the next call.
            live = np.nonzero(~done & (left <= j))[0]
            if len(live):
                self._deliver(batch, ids[j], logprobs[j], live, shares)
                done[live] = [batch.rows[i].done for i in live.tolist()]
        for i in riding:
            row = batch.rows[i]
            row.cursor += int(left[i])
            if left[i] == k:  # read its prompt for the whole call: the last token it was given is fed next
                batch.tokens[i] = forced[i, k - 1]
        batch.prompt_left -= left
        batch.tokens_t = None  # batch.tokens holds each row's next token

    def _deliver(
        self,
        batch: _Batch,
        ids: np.ndarray,
        logprobs: np.ndarray,
        which: np.ndarray | None,
        latencies: np.ndarray | None = None,
    ) -> None:
        """Hand rows ``which`` (None: all) their sampled token; the per-token Python work of the engine.

        ``latencies`` (per row, seconds) replaces the time since a row's previous token as its
        inter-token latency (K-step calls, whose tokens arrive together).
        """
        now = time.monotonic()
        rows = batch.rows
        tokenizer = batch.model.tokenizer
        mm = self._mm(batch.model.name) if self.metrics is not None else None
        indices = range(len(rows)) if which is None else which.tolist()
        ids_list = ids.tolist()
        logprobs_list = logprobs.tolist()
        wake = self._wake
        delivered = 0
        for i in indices:
            row = rows[i]
            token_id = ids_list[i]
            piece = tokenizer.piece(row.last_id, token_id)
            row.last_id = token_id
            emit, finish = row.criteria(piece)
            stream = row.stream
            stream._push(token_id, piece, emit, logprobs_list[i], finish, now)
            if mm is not None:
                if row.last_token_time is None:
                    mm.time_to_first_token.observe(now - stream.submitted_at)
                else:
                    mm.inter_token_latency.observe(now - row.last_token_time if latencies is None else latencies[i])
            row.last_token_time = now
            wake.setdefault(stream.loop, []).append(stream)
            delivered += 1
            if finish is not None:
                self._row_finished(batch, row)
        if which is None:
            batch.tokens = ids.astype(np.int32, copy=True)
            batch.position += 1
        elif len(which):
            batch.tokens[which] = ids[which]
            batch.position[which] += 1
        self.tokens += delivered
        if mm is not None and delivered:
            mm.generated_tokens.inc(delivered)

    def _prefill(self, batch: _Batch, new_rows: list[_Row]) -> None:
        """No row is running: prefill all new prompts in one call and sample their first tokens."""
        self._flush_wakeups()
        ids, logprobs, state, elapsed = _prefill_call(batch.model, new_rows)
        if self.metrics is not None:
            mm = self._mm(batch.model.name)
            mm.step_duration.observe(elapsed)
            mm.batch_size.observe(len(new_rows))
        self.steps += 1
        self.calls += 1
        self.decode_seconds += elapsed
        self._join_prefilled(batch, new_rows, ids, logprobs, state)

    def _join_prefilled(
        self, batch: _Batch, rows: list[_Row], ids: np.ndarray, logprobs: np.ndarray, state: Any
    ) -> None:
        """Rows whose prompt was prefilled join the batch with their state and receive their first token."""
        old_n = len(batch.rows)
        n = len(rows)
        for row in rows:
            row.cursor = len(row.prompt_ids)
        old_state = batch.state
        self._set_rows(batch, rows, np.zeros(n, np.int32), np.zeros(n, np.int64))
        batch.state = state if old_state is None or not old_n else tf.concat([old_state, state], 0)
        all_ids = np.zeros(old_n + n, np.int32)
        all_ids[old_n:] = ids
        all_logprobs = np.zeros(old_n + n, np.float32)
        all_logprobs[old_n:] = logprobs
        self._deliver(batch, all_ids, all_logprobs, np.arange(old_n, old_n + n))

    def _join_from_worker(self, result: _Prefilled, now: float) -> None:
        for waiting_in in result.batches:
            waiting_in.prefilling -= 1
        if result.error is not None:
            for row in result.rows:
                self._finish_stream(row.stream, "error", now, error=result.error)
            return
        keep = [i for i, row in enumerate(result.rows) if not row.done]  # cancelled meanwhile: dropped
        if not keep:
            return
        rows = [result.rows[i] for i in keep]
        state = result.state if len(keep) == len(result.rows) else tf.gather(result.state, keep)
        target = self._batches.get(result.model)
        if target is None:
            target = self._batches[result.model] = _Batch(result.model)
        self._compact(target)
        self._join_prefilled(target, rows, result.ids[keep], result.logprobs[keep], state)

    def _append_riding(self, batch: _Batch, new_rows: list[_Row]) -> None:
        """New rows join the running batch with a zero state, feeding their prompt one token per step."""
        n = len(new_rows)
        first = np.array([r.prompt_ids[0] for r in new_rows], np.int32)
        left = np.array([len(r.prompt_ids) - 1 for r in new_rows], np.int64)
        zeros = tf.zeros([n, batch.model.state_size], tf.float32)
        old_state = batch.state
        self._set_rows(batch, new_rows, first, left)
        batch.state = zeros if old_state is None or not int(old_state.shape[0]) else tf.concat([old_state, zeros], 0)

    def _set_rows(self, batch: _Batch, new_rows: list[_Row], first: np.ndarray, left: np.ndarray) -> None:
        params = [r.stream.params for r in new_rows]
        add = {
            "tokens": first,
            "temperature": np.array([p.temperature for p in params], np.float32),
            "top_k": np.array([p.top_k for p in params], np.int32),
            "top_p": np.array([p.top_p for p in params], np.float32),
            "seed": np.array([_as_int64(r.stream.seed) for r in new_rows], np.int64),
            "position": np.zeros(len(new_rows), np.int64),
            "deadline": np.array(
                [np.inf if r.stream.deadline is None else r.stream.deadline for r in new_rows], np.float64
            ),
            "prompt_left": left,
        }
        for name in _Batch.ARRAYS:
            setattr(batch, name, np.concatenate([getattr(batch, name), add[name]]))
        batch.rows.extend(new_rows)
        batch.params_t = batch.tokens_t = None

    def _compact(self, batch: _Batch) -> None:
        """Drop finished rows: one gather of the state, one fancy index per array."""
        if not any(r.done for r in batch.rows):
            return
        keep = [i for i, r in enumerate(batch.rows) if not r.done]
        batch.rows = [batch.rows[i] for i in keep]
        index = np.array(keep, np.int64)
        for name in _Batch.ARRAYS:
            setattr(batch, name, getattr(batch, name)[index])
        batch.state = tf.gather(batch.state, index) if keep else None
        batch.params_t = batch.tokens_t = None

    # ------------------------------------------------------------ finishing
    def _row_finished(self, batch: _Batch, row: _Row) -> None:
        row.done = True
        self._rows_by_stream.pop(row.stream, None)
        with self._cond:
            self._n_active -= 1
        row.stream.model.release()

    def _finish_stream(self, stream: Stream, reason: str, now: float, error: str | None = None) -> None:
        """End a stream that is waiting or running, without a new token."""
        entry = self._rows_by_stream.get(stream)
        emit = ""
        if entry is not None and reason not in ("cancelled", "error", "resource_exhausted"):
            emit = entry[1].criteria.flush()  # held-back text that can no longer become a stop
        if not stream._end(reason, emit, error):
            return
        self._wake.setdefault(stream.loop, []).append(stream)
        if entry is not None:
            self._row_finished(entry[0], entry[1])
        else:
            with self._cond:
                self._n_waiting -= 1
            stream.model.release()

    def _fail_everything(self, message: str) -> None:
        now = time.monotonic()
        for stream in list(self._rows_by_stream):
            self._finish_stream(stream, "error", now, error=message)
        self._batches.clear()
        for stream in self._waiting:
            self._finish_stream(stream, "error", now, error=message)
        self._waiting.clear()

    def _shutdown(self) -> None:
        now = time.monotonic()
        for stream in list(self._rows_by_stream):  # running, and at the prefill worker
            self._finish_stream(stream, "cancelled", now)
        self._batches.clear()
        with self._cond:
            incoming, self._incoming = self._incoming, []
        for stream in list(self._waiting) + incoming:
            self._finish_stream(stream, "cancelled", now)
        self._waiting.clear()
        self._flush_wakeups(force=True)
        self._set_gauges()

    # ------------------------------------------------------------ wake-ups and gauges
    def _flush_wakeups(self, force: bool = False) -> None:
        """Schedule the readers' wake-ups: per event loop at most one ``call_soon_threadsafe`` per step,
        none while one is still pending, and none within ``wake_interval`` of the previous one unless
        ``force`` (the engine is about to go idle)."""
        if self._wake:
            wake, self._wake = self._wake, {}
            for loop, streams in wake.items():
                waker = self._wakers.get(loop)
                if waker is None:
                    waker = self._wakers[loop] = _LoopWaker()
                waker.add(streams)
                self._held[loop] = waker
        if not self._held:
            return
        now = time.monotonic()
        interval = self.config.wake_interval
        due: list[tuple[asyncio.AbstractEventLoop, _LoopWaker]] = []
        for loop, waker in list(self._held.items()):
            if not force and now - waker.last < interval:
                continue
            del self._held[loop]
            if waker.arm(now):
                due.append((loop, waker))
        if due and self._waker_thread is not None:
            self._waker_thread.post(due)

    def _mm(self, name: str) -> _ModelMetrics:
        mm = self._model_metrics.get(name)
        if mm is None:
            assert self.metrics is not None
            mm = self._model_metrics[name] = _ModelMetrics(self.metrics, name)
        return mm

    def _set_gauges(self) -> None:
        if self.metrics is None:
            return
        active: collections.Counter[str] = collections.Counter()
        waiting: collections.Counter[str] = collections.Counter()
        for batch in self._batches.values():
            active[batch.model.name] += sum(1 for r in batch.rows if not r.done)
        for stream in self._waiting:
            if not stream.finished:
                waiting[stream.model.name] += 1
        names = set(active) | set(waiting) | self._gauge_names
        for name in names:
            mm = self._mm(name)
            mm.active_sequences.set(active[name])
            mm.waiting_requests.set(waiting[name])
        self._gauge_names = set(active) | set(waiting)


def _prefill_call(model: LoadedModel, rows: list[_Row]) -> tuple[np.ndarray, np.ndarray, Any, float]:
    """Run ``prefill`` + sampler on the rows' prompts (right-padded); position 0 for every row."""
    n = len(rows)
    lengths = np.array([len(r.prompt_ids) for r in rows], np.int32)
    tokens = np.zeros((n, int(lengths.max())), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : lengths[i]] = row.prompt_ids
    params = [r.stream.params for r in rows]
    started = time.perf_counter()
    ids_t, logprobs_t, state = model.prefill_sample(
        tf.constant(tokens),
        tf.constant(lengths),
        tf.constant(np.array([p.temperature for p in params], np.float32)),
        tf.constant(np.array([p.top_k for p in params], np.int32)),
        tf.constant(np.array([p.top_p for p in params], np.float32)),
        tf.constant(np.array([_as_int64(r.stream.seed) for r in rows], np.int64)),
        tf.zeros([n], tf.int64),
    )
    ids = ids_t.numpy()
    logprobs = logprobs_t.numpy()
    return ids, logprobs, state, time.perf_counter() - started


@dataclass(eq=False)
class _Prefilled:
    """What the prefill worker hands back to the engine thread."""

    model: LoadedModel
    batches: list[_Batch]
    rows: list[_Row]
    ids: np.ndarray
    logprobs: np.ndarray
    state: Any
    error: str | None = None


class _WorkerThread(Generic[_Item]):
    """A daemon thread that handles items posted to it, in batches, until stopped.

    ``stop`` ends it at once (items still queued are dropped) unless
    ``drain_on_stop``, when it first handles what was posted before the stop.
    """

    drain_on_stop = False

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._items: list[_Item] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, items: list[_Item]) -> None:
        with self._cond:
            self._items.extend(items)
            self._cond.notify()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if self._stopping and (not self.drain_on_stop or not self._items):
                    return
                items, self._items = self._items, []
            self._handle(items)

    def _handle(self, items: list[_Item]) -> None:
        raise NotImplementedError


class _Prefiller(_WorkerThread[tuple[_Batch, _Row]]):
    """Prefills long prompts with the ``prefill`` signature while the engine thread keeps stepping.

    It only computes: the engine thread still owns every active row. A
    result (state, first token) goes back through the engine's condition, and
    the engine joins the rows to their batch at its next iteration.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        super().__init__("textgen-engine-prefill")

    def _handle(self, jobs: list[tuple[_Batch, _Row]]) -> None:
        groups: dict[LoadedModel, list[tuple[_Batch, _Row]]] = {}
        for batch, row in jobs:
            groups.setdefault(batch.model, []).append((batch, row))
        for model, group in groups.items():
            batches = [b for b, _ in group]
            rows = [r for _, r in group]
            try:
                ids, logprobs, state, _ = _prefill_call(model, rows)
                result = _Prefilled(model, batches, rows, ids, logprobs, state)
            except Exception as exc:
                log.exception("prefill failed for model %s", model.key)
                message = f"model {model.key} prefill failed: {type(exc).__name__}: {_error_summary(exc)}"
                result = _Prefilled(model, batches, rows, np.zeros(0), np.zeros(0), None, message)
            self._engine._post_prefilled(result)


class _WakerThread(_WorkerThread[tuple[asyncio.AbstractEventLoop, "_LoopWaker"]]):
    """Makes the ``call_soon_threadsafe`` calls for the engine thread.

    Writing to an event loop's self-pipe releases the GIL, and getting it back
    can cost the engine thread hundreds of microseconds on a busy CPU while the
    woken loop runs its readers. Handing the calls to this thread costs the
    engine a lock release (which keeps the GIL), once per step.
    """

    drain_on_stop = True  # the last wake-ups carry final chunks

    def __init__(self) -> None:
        super().__init__("textgen-engine-wake")

    def _handle(self, items: list[tuple[asyncio.AbstractEventLoop, _LoopWaker]]) -> None:
        for loop, waker in items:
            try:
                loop.call_soon_threadsafe(waker.run)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


class _LoopWaker:
    """Wakes one event loop's streams; a loop that is slower than the engine gets one wake-up for many steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Stream] = []
        self._scheduled = False
        self.last = -float("inf")  # monotonic time of the last scheduled wake-up (engine thread)

    def add(self, streams: list[Stream]) -> None:
        with self._lock:
            self._pending.extend(streams)

    def arm(self, now: float) -> bool:
        """True when the caller must schedule ``run``; False when a scheduled run will take the pending streams."""
        with self._lock:
            if self._scheduled:
                return False
            self._scheduled = True
        self.last = now
        return True

    def run(self) -> None:  # on the event loop
        with self._lock:
            streams, self._pending = self._pending, []
            self._scheduled = False
        for stream in streams:
            stream._wake()
