"""Dropout masks and weight drop: what ``forward`` does in training, checked against Keras's own layers."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from training.config import UsageError, parse_args
from training.model import ModelConfig, build_model, forward, lstm_loop, rnn_layers, unpack_state

VOCAB, EMB, UNITS = 23, 8, 16


def _tokens(batch: int = 3, length: int = 12) -> tf.Tensor:
    return tf.constant(np.random.default_rng(0).integers(0, VOCAB, (batch, length)).astype(np.int32))


def test_lstm_loop_with_the_layers_own_kernel_is_the_keras_lstm() -> None:
    config = ModelConfig(VOCAB, EMB, UNITS, layers=1)
    model = build_model(config)
    layer = rnn_layers(model, config)[0]
    x = model.get_layer("embedding")(_tokens())
    h0 = tf.random.normal([3, UNITS], seed=1)
    c0 = tf.random.normal([3, UNITS], seed=2)
    want, want_h, want_c = layer(x, initial_state=[h0, c0])
    got, got_h, got_c = lstm_loop(layer, x, h0, c0, tf.convert_to_tensor(layer.cell.recurrent_kernel))
    for a, b in ((got, want), (got_h, want_h), (got_c, want_c)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_weight_drop_changes_training_outputs_only_and_its_gradient_reaches_the_kernels() -> None:
    config = ModelConfig(VOCAB, EMB, UNITS, layers=2, weight_drop=0.5)
    plain = ModelConfig(VOCAB, EMB, UNITS, layers=2)
    model = build_model(config)
    tokens, state = _tokens(), tf.zeros([3, config.state_size])
    reference, _ = forward(model, plain, tokens, state, training=False)
    evaluated, _ = forward(model, config, tokens, state, training=False)
    np.testing.assert_array_equal(evaluated.numpy(), reference.numpy())
    with tf.GradientTape() as tape:
        trained, final = forward(model, config, tokens, state, training=True)
        loss = tf.reduce_mean(trained)
    assert not np.allclose(trained.numpy(), reference.numpy())
    assert final.shape == (3, config.state_size) and len(unpack_state(final, config)) == 2
    kernels = [layer.cell.recurrent_kernel for layer in rnn_layers(model, config)]
    grads = tape.gradient(loss, [*kernels, model.get_layer("embedding").embeddings])
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    # DropConnect: about half of each recurrent kernel's gradient entries are exactly zero.
    zeros = float(tf.reduce_mean(tf.cast(tf.equal(grads[0], 0.0), tf.float32)))
    assert 0.35 < zeros < 0.65


def test_a_sequence_mask_drops_the_same_features_at_every_position() -> None:
    for mask, same in (("sequence", True), ("token", False)):
        config = ModelConfig(VOCAB, EMB, UNITS, layers=1, dropout=0.5, dropout_mask=mask)
        layer = build_model(config).get_layer("dropout_0")
        dropped = layer(tf.ones([2, 30, EMB]), training=True).numpy() == 0.0  # (b, t, e)
        assert dropped.any()
        assert (dropped == dropped[:, :1, :]).all() == same


def test_regularisation_flags_are_checked_and_weight_drop_needs_a_budget() -> None:
    config = parse_args(["--time-budget", "60", "--weight-drop", "0.3", "--dropout-mask", "sequence"])
    assert (config.weight_drop, config.dropout_mask) == (0.3, "sequence")
    with pytest.raises(UsageError, match="--weight-drop needs --time-budget"):
        parse_args(["--weight-drop", "0.3"])
    with pytest.raises(UsageError, match="--weight-drop must be in"):
        parse_args(["--time-budget", "60", "--weight-drop", "1.5"])
    with pytest.raises(UsageError, match="--dropout-mask"):
        parse_args(["--dropout-mask", "row"])
    with pytest.raises(ValueError, match="weight_drop needs the lstm cell"):
        ModelConfig(VOCAB, cell="gru", weight_drop=0.2)
