"""Sliding windows over the token id stream, as tf.data pipelines for fit.

A window is ``seq_len + 1`` consecutive ids starting every ``stride`` ids; the
model reads ``w[:-1]`` and learns to predict ``w[1:]`` (each position its next
token). Validation is the *tail* of the corpus: the id stream is cut once, the
training windows all lie before the cut and the validation windows after it,
so no validation target was ever seen as training text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf


class WindowError(ValueError):
    """Windows that cannot be made from this stream; the message names the flag to change."""


@dataclass(frozen=True)
class Split:
    """The id stream cut into a training head and a validation tail."""

    train: np.ndarray  # (n_train,) int32
    validation: np.ndarray  # (n_val,) int32, empty when validation_fraction is 0
    cut: int  # index of the first validation id in the whole stream


def window_starts(n_ids: int, seq_len: int, stride: int) -> np.ndarray:
    """Start offsets of every full window of ``seq_len + 1`` ids in a stream of ``n_ids``."""
    if seq_len < 1 or stride < 1:
        raise WindowError(f"seq_len and stride must be at least 1, got seq_len={seq_len}, stride={stride}")
    last = n_ids - (seq_len + 1)
    if last < 0:
        return np.zeros((0,), np.int64)
    return np.arange(0, last + 1, stride, dtype=np.int64)


def split_ids(ids: np.ndarray, seq_len: int, validation_fraction: float) -> Split:
    """Cut ``ids`` into a training head and a validation tail of ``validation_fraction``.

    Both parts must hold at least one window; the error says which flag to change.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise WindowError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    ids = np.asarray(ids, dtype=np.int32)
    window = seq_len + 1
    n_val = int(round(len(ids) * validation_fraction))
    if validation_fraction > 0 and n_val < window:
        raise WindowError(
            f"the validation tail ({validation_fraction:g} of {len(ids)} tokens = {n_val}) is shorter than one "
            f"window of --seq-len {seq_len} + 1 tokens; lower --seq-len, raise --validation-fraction or use a "
            "longer corpus"
        )
    cut = len(ids) - n_val
    if cut < window:
        raise WindowError(
            f"the corpus is shorter than one window: {cut} training tokens, but a window needs --seq-len {seq_len} "
            f"+ 1 = {window}; use a longer corpus or a smaller --seq-len"
        )
    return Split(train=ids[:cut], validation=ids[cut:], cut=cut)


def make_dataset(
    ids: np.ndarray,
    seq_len: int,
    stride: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    max_batches: int | None = None,
) -> tf.data.Dataset:
    """``(x, y)`` batches of windows: ``x = w[:-1]``, ``y = w[1:]``, both ``(b, seq_len)`` int32."""
    starts = window_starts(len(ids), seq_len, stride)
    if len(starts) == 0:
        raise WindowError(f"no window of {seq_len + 1} tokens fits in {len(ids)} tokens; lower --seq-len")
    stream = tf.constant(np.asarray(ids, dtype=np.int32))  # (n,)
    ds = tf.data.Dataset.from_tensor_slices(starts)
    if shuffle:
        ds = ds.shuffle(len(starts), seed=seed, reshuffle_each_iteration=True)

    def cut(start: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        window = stream[start : start + seq_len + 1]  # (seq_len + 1,)
        return window[:-1], window[1:]

    ds = ds.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if max_batches is not None:
        ds = ds.take(max_batches)
    # The source is an in-memory tensor, not files: a multi-worker strategy shards it by element.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def count_batches(n_ids: int, seq_len: int, stride: int, batch_size: int, max_batches: int | None = None) -> int:
    n = -(-len(window_starts(n_ids, seq_len, stride)) // batch_size)
    return n if max_batches is None else min(n, max_batches)
