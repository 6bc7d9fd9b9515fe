"""What a request asks of the sampler, and stop-sequence matching; plain Python, free of TensorFlow.

``SamplingParams`` is one request's validated parameters; the in-graph sampler that uses them is
``training/sampler.py``. ``StopSequenceMatcher`` and ``StoppingCriteria`` are unit-tested without
a model (the TGI pattern).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.stream import FinishReason


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; the servicer has validated every field."""

    max_tokens: int  # >= 1; the servicer resolved 0 to the server default
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off (the servicer maps 0 to 1)
    seed: int | None = None  # None: the engine draws one, so unseeded requests differ
    stop: tuple[str, ...] = ()
    include_tokens: bool = False


# --------------------------------------------------------------------------- stopping
class StopSequenceMatcher:
    """Finds stop sequences in streamed text, across chunk boundaries.

    ``feed(text)`` returns ``(emit, stopped)``: the text that is now safe to
    send, and whether a stop sequence matched. Text is held back while it could
    still be the start of a stop sequence (the longest suffix of what is
    pending that is a prefix of some stop), and neither the stop sequence nor
    anything after it is ever emitted. ``flush()`` releases what is held back
    when generation ends for another reason.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        pending = self._pending + text
        first = -1
        for stop in self.stops:
            at = pending.find(stop)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first >= 0:
            self._pending = ""
            self.stopped = True
            return pending[:first], True
        hold = 0
        for n in range(min(len(pending), self._longest - 1), 0, -1):
            if pending[-n:] in self._prefixes:
                hold = n
                break
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        held, self._pending = self._pending, ""
        return "" if self.stopped else held


class StoppingCriteria:
    """``max_tokens`` and stop sequences for one request: ``criteria(piece) -> (emit, finish_reason)``.

    Call it once per generated token with that token's text. ``finish_reason``
    is None while generation goes on, ``FinishReason.STOP`` when a stop sequence matched
    (the stop text is not in ``emit``), ``FinishReason.LENGTH`` when this was token
    ``max_tokens`` (any held-back text is released into ``emit``).
    """

    def __init__(self, max_tokens: int, stops: Sequence[str] = ()) -> None:
        self.max_tokens = max_tokens
        self.matcher = StopSequenceMatcher(stops)
        self.tokens = 0

    def __call__(self, piece: str) -> tuple[str, FinishReason | None]:
        self.tokens += 1
        emit, stopped = self.matcher.feed(piece)
        if stopped:
            return emit, FinishReason.STOP
        if self.tokens >= self.max_tokens:
            return emit + self.matcher.flush(), FinishReason.LENGTH
        return emit, None

    def feed(self, pieces: Sequence[str]) -> tuple[str, int, FinishReason | None]:
        """``__call__`` for several tokens in order: ``(emit, taken, finish_reason)``.

        ``emit`` is what the calls would have emitted, joined; ``taken`` how many of ``pieces`` were
        consumed: all of them, or up to the one that finished the request (the rest are dropped).
        Without stop sequences nothing is held back, so the pieces are simply joined.
        """
        if not self.matcher.stops:
            room = self.max_tokens - self.tokens
            if len(pieces) >= room:
                pieces = pieces[: max(room, 1)]
            self.tokens += len(pieces)
            return "".join(pieces), len(pieces), FinishReason.LENGTH if self.tokens >= self.max_tokens else None
        emitted = []
        for taken, piece in enumerate(pieces, 1):
            emit, finish = self(piece)
            emitted.append(emit)
            if finish is not None:
                return "".join(emitted), taken, finish
        return "".join(emitted), len(pieces), None

    def flush(self) -> str:
        return self.matcher.flush()
