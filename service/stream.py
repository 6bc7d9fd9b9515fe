"""What a reader of one request gets: ``Chunk``s from a ``Stream``, and the wake-ups that deliver them.

The engine thread writes into a ``Stream`` (``push``, ``end``); the request's event loop reads it
(``next_chunk``, ``async for``), and gets everything that accumulated since its last read as one
``Chunk``, so a slow reader gets bigger chunks and never stalls the engine. A ``Stream`` knows
nothing of the engine: cancelling it calls the ``on_cancel`` callback it was built with.

Wake-ups cross threads: the engine collects the streams it wrote to per event loop and hands them
to a ``WakerThread``, which makes the ``call_soon_threadsafe`` call; a ``LoopWaker`` keeps one
wake-up pending per loop, so a loop slower than the engine gets one wake-up for many steps.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.threads import NamedThread


class FinishReason(str, enum.Enum):
    """Why a stream ended. ``LENGTH`` and ``STOP`` are normal ends; the others end the request with a status.

    A ``str`` enum: each member equals its value (``FinishReason.STOP == "stop"``), which is what
    logs and tests read.
    """

    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # a stop sequence matched (it is not emitted)
    CANCELLED = "cancelled"  # the client cancelled, or the server cut the stream while shutting down
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # the model call failed
    RESOURCE_EXHAUSTED = "resource_exhausted"  # the model call ran out of memory
    # Only between processes: the engine process refused the request (at capacity) or cannot run
    # it (shutting down, the version retired, the engine process gone).
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"

    @property
    def flushes_held_text(self) -> bool:
        """Whether text held back for a possible stop sequence is still sent when the stream ends this way."""
        return self in (FinishReason.LENGTH, FinishReason.STOP, FinishReason.DEADLINE)


@dataclass
class Chunk:
    """Everything new since the previous Chunk of this stream."""

    text: str
    token_ids: list[int]  # filled only when the request asked for tokens
    token_texts: list[str]
    logprobs: list[float]
    finish_reason: FinishReason | None  # None while running
    prompt_tokens: int
    completion_tokens: int  # total so far
    time_to_first_token: float | None  # seconds, once known
    error: str | None = None  # the message when finish_reason is ERROR or RESOURCE_EXHAUSTED


class EngineStream(Protocol):
    """Where the engine writes a request's output: a ``Stream`` in-process, a ``RemoteStream`` in the engine process."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...  # None: woken by its process's outbox
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def submitted_at(self) -> float: ...
    @property
    def finished(self) -> bool: ...
    def push(
        self, token_id: int, piece: str, emit: str, logprob: float, finish: FinishReason | None, now: float
    ) -> None: ...
    def end(self, finish: FinishReason, emit: str = "", error: str | None = None) -> bool: ...
    def wake(self) -> None: ...


class Outbox(Protocol):
    """The engine process's socket, used by the engine thread alone: ``flush`` sends each frontend what its
    rows got since the last, ``pump`` takes the frontends' requests in."""

    def push(self, streams: list[EngineStream], rows: np.ndarray, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """One call's tokens at once: token ``t`` (``ids[t]``, ``logprobs[t]``) is for ``streams[rows[t]]``."""
        ...

    def flush(self) -> None: ...

    def wait_for_room(self) -> bool:
        """Before a call: wait (bounded) until no frontend is too far behind; False if it gave up."""
        ...

    def pump(self, timeout: float) -> None:
        """Handle the messages that arrived, waiting up to ``timeout`` seconds for the first."""
        ...


class Stream:
    """One request's output; the engine thread writes (``push``, ``end``), the event loop reads."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        prompt_tokens: int,
        include_tokens: bool,
        on_cancel: Callable[[Stream], None],
    ) -> None:
        self.loop = loop
        self.prompt_tokens = prompt_tokens
        self.submitted_at = time.monotonic()
        self._include_tokens = include_tokens
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._text: list[str] = []
        self._ids: list[int] = []
        self._token_texts: list[str] = []
        self._logprobs: list[float] = []
        self._completion_tokens = 0
        self._ttft: float | None = None
        self._finish: FinishReason | None = None
        self._error: str | None = None
        self._final_taken = False
        self._cancel_requested = False

    # ------------------------------------------------------------ reader side (event loop)
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
        """Thread-safe; the row leaves the batch at the engine's next step (no-op once finished)."""
        with self._lock:
            if self._finish is not None or self._cancel_requested:
                return
            self._cancel_requested = True
        self._on_cancel(self)

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

    # ------------------------------------------------------------ writer side (engine thread)
    def push(
        self, token_id: int, piece: str, emit: str, logprob: float, finish: FinishReason | None, now: float
    ) -> None:
        """One generated token: ``piece`` is its text, ``emit`` what may be sent now (stop sequences held back)."""
        with self._lock:
            if emit:
                self._text.append(emit)
            if self._include_tokens:
                self._ids.append(token_id)
                self._token_texts.append(piece)
                self._logprobs.append(logprob)
            self._completion_tokens += 1
            if self._ttft is None:
                self._ttft = now - self.submitted_at
            if finish is not None:
                self._finish = finish

    def push_many(
        self,
        token_ids: list[int],
        pieces: list[str],
        emit: str,
        logprobs: list[float],
        finish: FinishReason | None,
        now: float,
    ) -> None:
        """``push`` for several tokens: ``emit`` is what they may send, joined; ``finish`` comes after the last."""
        with self._lock:
            if emit:
                self._text.append(emit)
            if self._include_tokens:
                self._ids.extend(token_ids)
                self._token_texts.extend(pieces)
                self._logprobs.extend(logprobs)
            self._completion_tokens += len(token_ids)
            if self._ttft is None:
                self._ttft = now - self.submitted_at
            if finish is not None:
                self._finish = finish

    def end(self, finish: FinishReason, emit: str = "", error: str | None = None) -> bool:
        """Finish without a new token; False if it had already finished."""
        with self._lock:
            if self._finish is not None:
                return False
            if emit:
                self._text.append(emit)
            self._finish = finish
            self._error = error
            return True

    def wake(self) -> None:
        """Wake the reader (on its event loop)."""
        self._event.set()


class LoopWaker:
    """Wakes one event loop's streams; a loop that is slower than the engine gets one wake-up for many steps."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[EngineStream] = []
        self._scheduled = False
        self.last = -float("inf")  # monotonic time of the last scheduled wake-up (engine thread)

    def add(self, streams: list[EngineStream]) -> None:
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
            stream.wake()


class WakerThread:
    """Makes the ``call_soon_threadsafe`` calls for the engine thread.

    Writing to an event loop's self-pipe releases the GIL, and getting it back can cost the engine
    thread hundreds of microseconds on a busy CPU while the woken loop runs its readers. Handing the
    calls to this thread costs the engine a lock release (which keeps the GIL), once per step.
    ``stop`` first makes the calls already posted: the last wake-ups carry final chunks.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[asyncio.AbstractEventLoop, LoopWaker]] = []
        self._stopping = False
        self._thread = NamedThread(target=self._run, name="textgen-wake", daemon=True)
        self._thread.start()

    def post(self, items: list[tuple[asyncio.AbstractEventLoop, LoopWaker]]) -> None:
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
                if not self._items:
                    return  # stopping, and nothing left to deliver
                items, self._items = self._items, []
            for loop, waker in items:
                try:
                    loop.call_soon_threadsafe(waker.run)
                except RuntimeError:  # the loop is closed: nobody is listening any more
                    pass
