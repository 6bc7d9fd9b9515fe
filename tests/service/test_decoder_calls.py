"""The decoder's flat calls give exactly what calling its concrete functions gives."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from service.decoder import DECODE, DECODE_STEPS, PREFILL, PREFILL_FROM, Decoder, pack_rows
from training.contract import list_versions


def test_flat_calls_equal_the_concrete_functions(tiny_model_repo) -> None:
    base = tiny_model_repo / "tiny"
    path = str(base / str(list_versions(str(base))[-1]))
    decoder = Decoder.load(path)
    functions = decoder.functions
    b, k = 5, 3
    state = tf.random.stateless_normal([b, decoder.state_size], seed=[1, 2])
    params = (
        tf.constant([1.0, 0.0, 0.7, 1.0, 2.0], tf.float32),
        tf.constant([0, 0, 3, 0, 0], tf.int32),
        tf.constant([1.0, 1.0, 1.0, 0.9, 1.0], tf.float32),
        tf.range(10, 10 + b, dtype=tf.int64),
        tf.constant([0, 4, 9, 1, 2], tf.int64),
    )
    tokens = tf.constant([3, 4, 5, 6, 7], tf.int32)
    slice_tokens, lengths = tf.constant(np.full([b, 4], 5, np.int32)), tf.constant([4, 1, 2, 3, 4], tf.int32)
    steps = (
        tf.constant(k),
        tf.constant(np.full([b, k], 6, np.int32)),
        tf.constant([0, 1, 3, 0, 2], tf.int32),
        tf.constant([4, -1, 0, 1, 2], tf.int32),  # rows moved, and one new row (a zero state)
    )
    temperature, top_k, top_p, seed, position = params
    k_steps, forced, left, source = steps
    per_row = (tokens, top_k, left, source, position, seed, temperature, top_p, forced)
    packed = (state, tf.constant(pack_rows(*(t.numpy() for t in per_row))), k_steps)
    calls = [
        (DECODE, decoder.decode, (tokens, state, *params)),
        (DECODE_STEPS, decoder.decode_steps_packed, packed),
        (PREFILL, decoder.prefill, (slice_tokens, lengths, *params)),
    ]
    if decoder.has_prefill_from:
        calls.append((PREFILL_FROM, decoder.prefill_from, (slice_tokens, lengths, state, *params)))
    for name, method, args in calls:
        flat, structured = method(*args), functions[name](*args)
        assert len(flat) == len(structured) == 3, name
        for got, expected in zip(flat, structured, strict=True):
            np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=name)
