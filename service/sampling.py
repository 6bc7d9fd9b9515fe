"""Sampling: the request's parameters, the in-graph batched sampler, and stop-sequence matching.

``sample`` turns a batch of logits into one token per row inside the TensorFlow
graph (the repository wraps it with the model's ``step`` in one ``tf.function``
so logits never leave the device). Every row has its own temperature, top-k,
top-p and seed, and a row's choice depends only on its own logits, parameters,
seed and position: never on which other rows share the batch. That is what
makes a seeded request reproducible under continuous batching.

How: Gumbel-max. ``argmax(logits / T + g)`` with ``g = -log(-log(u))`` and
``u`` uniform draws one token from ``softmax(logits / T)``. The uniforms come
from a counter-based integer hash of ``(seed, position, vocabulary id)``
computed with TF integer ops, so each row gets its own stream of noise
(``tf.random.stateless_*`` takes one seed per call and cannot do that).

``StopSequenceMatcher`` and ``StoppingCriteria`` are plain Python, free of
TensorFlow, and unit-tested without a model (the TGI pattern).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tensorflow as tf

# Token id 0 is padding: it decodes to nothing and is never sampled.
PADDING_ID = 0
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one of them fits in a
# signed int64 (int64 ops run on every device; uint32 Mul may not).
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D
_GOLDEN = 0x1E3779B9


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


# --------------------------------------------------------------------------- in-graph sampler
def _mix32(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int64 values in [0, 2**32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * _M1, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * _M2, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    return x


def uniform_noise(seed: tf.Tensor, position: tf.Tensor, vocab_size: tf.Tensor | int) -> tf.Tensor:
    """Uniforms in (0, 1), shape ``(b, vocab)``: a pure function of (seed, position, id) per cell.

    ``seed`` and ``position`` are int64 ``(b,)``; the 64-bit seed is folded in
    as two 32-bit halves.
    """
    seed = tf.cast(seed, tf.int64)
    position = tf.cast(position, tf.int64)
    lo = tf.bitwise.bitwise_and(seed, _MASK32)
    hi = tf.bitwise.bitwise_and(tf.bitwise.right_shift(seed, 32), _MASK32)
    pos = tf.bitwise.bitwise_and(position, _MASK32)
    key = _mix32(tf.bitwise.bitwise_xor(lo, _GOLDEN))
    key = _mix32(tf.bitwise.bitwise_xor(key, _mix32(hi + 0x632BE5AB)))
    key = _mix32(tf.bitwise.bitwise_xor(key, _mix32(tf.bitwise.bitwise_and(pos * 2 + 1, _MASK32))))  # (b,)
    ids = tf.range(tf.cast(vocab_size, tf.int64), dtype=tf.int64)  # (v,)
    cell = _mix32(tf.bitwise.bitwise_xor(key[:, None], _mix32(ids + 0x5BD1E995)[None, :]))  # (b, v)
    cell = _mix32(cell + key[:, None])
    # 24 bits -> a float32 strictly inside (0, 1).
    top24 = tf.cast(tf.bitwise.right_shift(cell, 8), tf.float32)
    return (top24 + 0.5) / float(1 << 24)


def sample(
    logits: tf.Tensor,
    temperature: tf.Tensor,
    top_k: tf.Tensor,
    top_p: tf.Tensor,
    seed: tf.Tensor,
    position: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One token per row: ``(ids int32 (b,), logprobs float32 (b,))``.

    * ``temperature`` float32 ``(b,)``: 0 (or less) is greedy argmax;
    * ``top_k`` int32 ``(b,)``: keep the k most likely tokens, 0 = off;
    * ``top_p`` float32 ``(b,)``: keep the smallest set of most likely tokens
      whose probability (after temperature and top-k) reaches p, 1 = off;
    * ``seed``/``position`` int64 ``(b,)``: the noise for this row and step.

    The logprob is the model's own log-softmax of the chosen id (temperature 1,
    no truncation), so it measures how likely the model found the token,
    whatever sampling parameters picked it.
    """
    logits = tf.cast(logits, tf.float32)  # (b, v)
    vocab = tf.shape(logits)[1]
    # Padding is never a real next token.
    pad_mask = tf.one_hot(PADDING_ID, vocab, on_value=float("-inf"), off_value=0.0)  # (v,)
    logits = logits + pad_mask[None, :]
    model_logprobs = tf.nn.log_softmax(logits, axis=-1)  # (b, v)

    greedy = temperature <= 0.0  # (b,)
    safe_t = tf.where(greedy, tf.ones_like(temperature), temperature)
    scaled = logits / safe_t[:, None]  # (b, v)

    # Sort once; all truncation happens in sorted order.
    sorted_logits, sorted_ids = tf.math.top_k(scaled, k=vocab, sorted=True)  # (b, v) each
    rank = tf.range(vocab)[None, :]  # (1, v)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)  # (b,)
    keep = rank < k[:, None]  # (b, v)
    neg_inf = tf.fill(tf.shape(sorted_logits), float("-inf"))
    topk_logits = tf.where(keep, sorted_logits, neg_inf)
    probs = tf.nn.softmax(topk_logits, axis=-1)
    before = tf.math.cumsum(probs, axis=-1, exclusive=True)  # mass of strictly better tokens
    nucleus = tf.logical_or(before < top_p[:, None], rank == 0)
    nucleus = tf.logical_or(nucleus, top_p[:, None] >= 1.0)  # 1 = off, whatever the rounding of cumsum
    keep = tf.logical_and(keep, nucleus)
    kept_logits = tf.where(keep, sorted_logits, neg_inf)

    noise = uniform_noise(seed, position, vocab)  # (b, v), indexed by vocabulary id
    gumbel = -tf.math.log(-tf.math.log(noise))
    sorted_gumbel = tf.gather(gumbel, sorted_ids, batch_dims=1)  # (b, v)
    choice = tf.argmax(kept_logits + sorted_gumbel, axis=-1, output_type=tf.int32)  # (b,)
    sampled = tf.gather(sorted_ids, choice, batch_dims=1)  # (b,)
    argmax = tf.argmax(logits, axis=-1, output_type=tf.int32)
    ids = tf.where(greedy, argmax, sampled)
    logprobs = tf.gather(model_logprobs, ids, batch_dims=1)
    return ids, logprobs


SAMPLER_SIGNATURE = [
    tf.TensorSpec([None, None], tf.float32, name="logits"),
    tf.TensorSpec([None], tf.float32, name="temperature"),
    tf.TensorSpec([None], tf.int32, name="top_k"),
    tf.TensorSpec([None], tf.float32, name="top_p"),
    tf.TensorSpec([None], tf.int64, name="seed"),
    tf.TensorSpec([None], tf.int64, name="position"),
]


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
    is None while generation goes on, ``"stop"`` when a stop sequence matched
    (the stop text is not in ``emit``), ``"length"`` when this was token
    ``max_tokens`` (any held-back text is released into ``emit``).
    """

    def __init__(self, max_tokens: int, stops: Sequence[str] = ()) -> None:
        self.max_tokens = max_tokens
        self.matcher = StopSequenceMatcher(stops)
        self.tokens = 0

    def __call__(self, piece: str) -> tuple[str, str | None]:
        self.tokens += 1
        emit, stopped = self.matcher.feed(piece)
        if stopped:
            return emit, "stop"
        if self.tokens >= self.max_tokens:
            return emit + self.matcher.flush(), "length"
        return emit, None

    def flush(self) -> str:
        return self.matcher.flush()
