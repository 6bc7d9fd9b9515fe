"""The first recurrent layer's single-token step with its input projection folded into a table.

A token's first-layer input projection is ``embedding[token] @ kernel + bias``:
it depends on the token alone, so for every token of the vocabulary it can be
computed once, at export, into a ``(vocab, gates * units)`` table. The serving
``step`` then gathers one row per token instead of running the embedding
lookup and an ``(B, embedding_dim) x (embedding_dim, gates * units)`` matmul:
for the benchmark's char model (embedding 256, 512 units) that is a third of
the step's arithmetic. Only the recurrent half (``h @ recurrent_kernel``) and
the gate nonlinearities are left, computed here exactly as Keras 3's
``LSTMCell``, ``GRUCell`` and ``SimpleRNNCell`` compute them (same gate order,
same activations, read from the cell), so the contract's equalities hold.

The table costs ``vocab * gates * units`` floats, so it is built only when it
fits in ``MAX_TABLE_BYTES`` (a char model's is about 1 MB; a large word-level
vocabulary keeps the plain embedding and cell). ``prefill`` is untouched: it
runs the fused Keras layer over the whole prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

# 64 MiB: a 16k-word vocabulary at 256 LSTM units, or any char model.
MAX_TABLE_BYTES = 64 * 1024 * 1024


def _input_bias(cell: Any, cell_kind: str, width: int) -> np.ndarray:
    if not getattr(cell, "use_bias", True) or cell.bias is None:
        return np.zeros([width], np.float32)
    bias = np.asarray(cell.bias, np.float32)
    if cell_kind == "gru" and cell.reset_after:
        return bias[0]  # (2, 3u): row 0 is the input bias, row 1 the recurrent one
    return bias


def table_bytes(vocab_size: int, width: int) -> int:
    return vocab_size * width * 4


def input_projection_table(embeddings: np.ndarray, cell: Any, cell_kind: str) -> np.ndarray | None:
    """``embeddings @ kernel + input_bias`` as float32 ``(vocab, gates * units)``, or None if too big."""
    kernel = np.asarray(cell.kernel, np.float32)
    width = kernel.shape[1]
    if table_bytes(embeddings.shape[0], width) > MAX_TABLE_BYTES:
        return None
    return np.asarray(embeddings, np.float32) @ kernel + _input_bias(cell, cell_kind, width)


def step_from_projection(cell: Any, cell_kind: str, x: tf.Tensor, states: list[tf.Tensor]) -> list[tf.Tensor]:
    """One step of ``cell`` given its input projection ``x`` (b, gates * units); returns the new states.

    The new states are ``[h, c]`` for an LSTM and ``[h]`` otherwise; ``h`` is
    also the layer's output.
    """
    dtype = x.dtype
    recurrent = tf.cast(cell.recurrent_kernel, dtype)
    h = tf.cast(states[0], dtype)
    if cell_kind == "lstm":
        c = tf.cast(states[1], dtype)
        z = x + tf.matmul(h, recurrent)  # the bias is in the table
        z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
        i = cell.recurrent_activation(z_i)
        f = cell.recurrent_activation(z_f)
        c = f * c + i * cell.activation(z_c)
        o = cell.recurrent_activation(z_o)
        return [o * cell.activation(c), c]
    if cell_kind == "gru":
        x_z, x_r, x_h = tf.split(x, 3, axis=1)
        units = cell.units
        if cell.reset_after:
            inner = tf.matmul(h, recurrent)
            if cell.use_bias:
                inner = inner + tf.cast(cell.bias[1], dtype)
            r_z, r_r, r_h = tf.split(inner, 3, axis=1)
            z = cell.recurrent_activation(x_z + r_z)
            r = cell.recurrent_activation(x_r + r_r)
            hh = cell.activation(x_h + r * r_h)
        else:
            inner = tf.matmul(h, recurrent[:, : 2 * units])
            r_z, r_r = tf.split(inner, 2, axis=1)
            z = cell.recurrent_activation(x_z + r_z)
            r = cell.recurrent_activation(x_r + r_r)
            hh = cell.activation(x_h + tf.matmul(r * h, recurrent[:, 2 * units :]))
        return [z * h + (1 - z) * hh]
    if cell_kind == "rnn":
        out = x + tf.matmul(h, recurrent)
        if cell.activation is not None:
            out = cell.activation(out)
        return [out]
    raise ValueError(f"no folded step for cell {cell_kind!r}")
