"""The in-graph batched sampler: one token per row from a batch of logits, inside the TensorFlow graph.

It is the only sampler in textgen. The server's decode functions (``service/decoder.py``) wrap it
with a version's ``step`` or ``prefill`` signature in one ``tf.function`` so logits never leave the
device; local generation (``textgen generate --model``) runs those same functions, and the export's
smoke sample calls it directly. It lives in ``training/`` because training never imports ``service``.

Every row has its own temperature, top-k, top-p and seed, and a row's choice depends only on its
own logits, parameters, seed and position: never on which other rows share the batch. That is what
makes a seeded request reproducible under continuous batching.

How: inverse-CDF sampling. One uniform ``u`` per row picks the first token whose cumulative
probability under ``softmax(logits / T)`` (after top-k and top-p) reaches ``u``. The uniform comes
from a counter-based integer hash of ``(seed, position)`` computed with TF integer ops, so each row
gets its own stream (``tf.random.stateless_*`` takes one seed per call and cannot do that).
"""

from __future__ import annotations

import tensorflow as tf

# Token id 0 is padding: it decodes to nothing and is never sampled.
PADDING_ID = 0
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one of them fits in a
# signed int64 (int64 ops run on every device; uint32 Mul may not).
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D
_GOLDEN = 0x1E3779B9


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int64 values in [0, 2**32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * _M1, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * _M2, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    return x


def row_uniform(seed: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """One uniform in (0, 1) per row, shape ``(b,)``: a pure function of (seed, position).

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
    key = _mix32(tf.bitwise.bitwise_xor(key, _mix32(tf.bitwise.bitwise_and(pos * 2 + 1, _MASK32))))
    return unit_float(key)


def unit_float(bits: tf.Tensor) -> tf.Tensor:
    """int64 values in [0, 2**32) -> float32 strictly inside (0, 1), from their top 23 bits.

    ``(n + 0.5) / 2**23`` is exact in float32 for ``n < 2**23``; with 24 bits the
    largest value would round up to 1.0.
    """
    top23 = tf.cast(tf.bitwise.right_shift(bits, 9), tf.float32)
    return (top23 + 0.5) / float(1 << 23)


def _truncation_mask(scaled: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor) -> tf.Tensor:
    """Which tokens top-k and then top-p keep, ``(b, v)`` bool in vocabulary order.

    One descending sort finds each row's cut-off logit: the k-th best for
    top-k, then the last one the nucleus needs for top-p. A token is kept when
    its logit reaches the cut-off, so tokens tied with the last kept one are
    kept too (the threshold rule vLLM and TGI use).
    """
    vocab = tf.shape(scaled)[1]
    sorted_logits = tf.math.top_k(scaled, k=vocab, sorted=True).values  # (b, v)
    rank = tf.range(vocab)[None, :]  # (1, v)
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)  # (b,)
    in_top_k = rank < k[:, None]
    probs = tf.nn.softmax(tf.where(in_top_k, sorted_logits, float("-inf")), axis=-1)
    before = tf.math.cumsum(probs, axis=-1, exclusive=True)  # mass of strictly better tokens
    nucleus = tf.logical_or(before < top_p[:, None], rank == 0)
    nucleus = tf.logical_or(nucleus, top_p[:, None] >= 1.0)  # 1 = off, whatever the rounding of cumsum
    kept = tf.reduce_sum(tf.cast(tf.logical_and(in_top_k, nucleus), tf.int32), axis=-1)  # (b,) >= 1
    cutoff = tf.gather(sorted_logits, kept - 1, batch_dims=1)  # (b,)
    return scaled >= cutoff[:, None]


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
    * ``seed``/``position`` int64 ``(b,)``: the row's draw for this step.

    How: inverse-CDF sampling in vocabulary order. The row's uniform ``u``
    picks the first token whose cumulative probability reaches ``u`` times the
    total, so a token with probability 0 (padding, or cut by top-k/top-p) is
    never picked. The sort that top-k/top-p need runs only when some row of the
    batch asks for them; rows that do not get exactly the same draw either way,
    because truncation only masks logits and the draw is always made in
    vocabulary order.

    The logprob is the model's own log-softmax of the chosen id (temperature 1,
    no truncation), so it measures how likely the model found the token,
    whatever sampling parameters picked it.
    """
    return sample_uniform(logits, temperature, top_k, top_p, row_uniform(seed, position))


def sample_uniform(
    logits: tf.Tensor,
    temperature: tf.Tensor,
    top_k: tf.Tensor,
    top_p: tf.Tensor,
    uniform: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """``sample`` with each row's uniform given (``row_uniform(seed, position)``, float32 ``(b,)``).

    A multi-step decode computes the uniforms of all its steps at once, outside its loop: the
    hash is a third of a step's ops, and a row's uniform depends only on its seed and position.
    """
    logits = tf.cast(logits, tf.float32)  # (b, v)
    vocab = tf.shape(logits)[1]
    # A NaN logit (a broken model) counts as impossible, in both branches below alike.
    logits = tf.where(tf.math.is_nan(logits), float("-inf"), logits)
    # Padding is never a real next token.
    pad_mask = tf.one_hot(PADDING_ID, vocab, on_value=float("-inf"), off_value=0.0)  # (v,)
    logits = logits + pad_mask[None, :]
    model_logprobs = tf.nn.log_softmax(logits, axis=-1)  # (b, v)

    greedy = temperature <= 0.0  # (b,)
    safe_t = tf.where(greedy, tf.ones_like(temperature), temperature)
    scaled = logits / safe_t[:, None]  # (b, v)
    truncating = tf.logical_or(tf.logical_and(top_k > 0, top_k < vocab), top_p < 1.0)
    truncating = tf.logical_and(truncating, tf.logical_not(greedy))
    scaled = tf.cond(
        tf.reduce_any(truncating),
        lambda: tf.where(_truncation_mask(scaled, top_k, top_p), scaled, float("-inf")),
        lambda: scaled,
    )

    cdf = tf.math.cumsum(tf.nn.softmax(scaled, axis=-1), axis=-1)  # (b, v)
    target = uniform * cdf[:, -1]  # (b,): scaled to the total, which rounding moves off 1
    sampled = tf.reduce_sum(tf.cast(cdf < target[:, None], tf.int32), axis=-1)
    sampled = tf.minimum(sampled, vocab - 1)
    argmax = tf.argmax(logits, axis=-1, output_type=tf.int32)
    # A temperature so small that logits / T overflows leaves no finite distribution: that is greedy.
    ids = tf.where(tf.logical_or(greedy, tf.logical_not(tf.math.is_finite(cdf[:, -1]))), argmax, sampled)
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
