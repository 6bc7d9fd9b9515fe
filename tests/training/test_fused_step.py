"""The folded first-layer step equals Keras's own cell, for every cell kind the models use."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import fused_step
from training.export import ServingModule
from training.fused_step import input_projection_table, step_from_projection
from training.model import ModelConfig, build_model

VOCAB, EMB, UNITS, BATCH = 13, 6, 8, 5


def _cell(kind: str, **kwargs: object) -> keras.layers.Layer:
    cls = {"lstm": keras.layers.LSTMCell, "gru": keras.layers.GRUCell, "rnn": keras.layers.SimpleRNNCell}[kind]
    cell = cls(UNITS, **kwargs)
    cell.build((None, EMB))
    rng = np.random.default_rng(7)
    # Random weights everywhere, biases included (Keras initialises them to 0 or 1).
    cell.set_weights([rng.normal(0, 0.5, size=w.shape).astype(np.float32) for w in cell.get_weights()])
    return cell


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("lstm", {}),
        ("gru", {}),
        ("gru", {"reset_after": False}),
        ("rnn", {}),
        ("lstm", {"use_bias": False}),
        ("gru", {"use_bias": False}),
    ],
    ids=["lstm", "gru", "gru-reset-before", "rnn", "lstm-no-bias", "gru-no-bias"],
)
def test_folded_step_equals_the_keras_cell(kind: str, kwargs: dict) -> None:
    cell = _cell(kind, **kwargs)
    rng = np.random.default_rng(3)
    embeddings = rng.normal(0, 1, size=(VOCAB, EMB)).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=BATCH)
    n_states = 2 if kind == "lstm" else 1
    states = [tf.constant(rng.normal(0, 1, size=(BATCH, UNITS)).astype(np.float32)) for _ in range(n_states)]

    table = input_projection_table(embeddings, cell, kind)
    assert table is not None and table.shape == (VOCAB, cell.kernel.shape[1])
    folded = step_from_projection(cell, kind, tf.gather(tf.constant(table), tokens), states)

    output, expected = cell(tf.constant(embeddings[tokens]), states if n_states > 1 else states[0], training=False)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    assert len(folded) == len(expected)
    for got, want in zip(folded, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(folded[0].numpy(), np.asarray(output), rtol=1e-5, atol=1e-5)


def test_a_table_over_the_budget_is_not_built_and_the_step_still_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig(vocab_size=VOCAB, embedding_dim=EMB, units=UNITS, layers=2)
    model = build_model(config)
    tokens = tf.constant([1, 4, 12], tf.int32)
    state = tf.random.normal([3, config.state_size], seed=1)
    folded = ServingModule(model, config)
    assert folded.folded
    monkeypatch.setattr(fused_step, "MAX_TABLE_BYTES", fused_step.table_bytes(VOCAB, 4 * UNITS) - 1)
    plain = ServingModule(model, config)
    assert not plain.folded
    a, b = folded.step(tokens, state), plain.step(tokens, state)
    for key in ("logits", "state"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-5)
