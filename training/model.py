"""The language model: Embedding -> N stacked recurrent layers -> Dense logits.

``build_model`` makes the Keras model that training fits (sequence in, logits
for every position out). The same layers serve generation: ``export.py`` wraps
them in the ``prefill``/``step`` signatures of the SavedModel contract, so
this module names its layers (``embedding``, ``rnn_0``..``rnn_{N-1}``,
``logits``) and exposes the state layout as ``ModelConfig.state_size``.

Dropout (``--dropout``) sits on every non-recurrent connection, as in Zaremba
et al.'s LSTM language models: a ``Dropout`` layer before each recurrent layer
(``dropout_0`` on the embedding) and one before the logits. ``dropout_mask``
says whether each position draws its own mask (``token``) or one mask covers
the whole window (``sequence``: Gal and Ghahramani's variational dropout, the
locked dropout of AWD-LSTM). The recurrent connections carry no activation
dropout: that keeps the loop free of masks, which is cheaper per step on a CPU
(``benchmarks/train_step.py``). ``weight_drop`` instead drops entries of each
LSTM's recurrent kernel, one mask per training step (DropConnect, as in
AWD-LSTM); ``forward`` then runs its own loop over the window (``lstm_loop``)
with the dropped kernel, on the same variables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
import tensorflow as tf

CELLS = ("lstm", "gru", "rnn")
DROPOUT_MASKS = ("token", "sequence")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (stored in ``assets/model.json``)."""

    vocab_size: int
    embedding_dim: int = 64
    units: int = 256
    layers: int = 1
    cell: str = "lstm"
    dropout: float = 0.0
    dropout_mask: str = "token"
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "embedding_dim", "units", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dropout_mask not in DROPOUT_MASKS:
            raise ValueError(f"dropout_mask must be one of {', '.join(DROPOUT_MASKS)}, got {self.dropout_mask!r}")
        if not 0.0 <= self.weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), got {self.weight_drop}")
        if self.weight_drop and self.cell != "lstm":
            raise ValueError(f"weight_drop needs the lstm cell, got {self.cell!r}")

    @property
    def states_per_layer(self) -> int:
        """LSTM carries (h, c); GRU and SimpleRNN carry h."""
        return 2 if self.cell == "lstm" else 1

    @property
    def state_size(self) -> int:
        """S in the contract: every layer's recurrent state packed into one vector."""
        return self.states_per_layer * self.layers * self.units

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rnn_layer(config: ModelConfig, index: int) -> keras.layers.Layer:
    kind = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}[config.cell]
    return kind(
        config.units,
        return_sequences=True,
        return_state=True,
        name=f"rnn_{index}",
    )


def _dropout_layer(config: ModelConfig, index: int, features: int) -> keras.layers.Layer:
    # A sequence mask is (batch, 1, features), broadcast over the window's positions.
    shape = (None, 1, features) if config.dropout_mask == "sequence" else None
    return keras.layers.Dropout(config.dropout, noise_shape=shape, name=f"dropout_{index}")


def build_model(config: ModelConfig) -> keras.Model:
    """Keras model mapping tokens ``(b, t)`` int32 to logits ``(b, t, vocab)`` float32."""
    tokens = keras.Input(shape=(None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(config.vocab_size, config.embedding_dim, name="embedding")(tokens)  # (b, t, e)
    for i in range(config.layers):
        if config.dropout:
            x = _dropout_layer(config, i, config.embedding_dim if i == 0 else config.units)(x)
        outputs = _rnn_layer(config, i)(x)
        x = outputs[0]  # (b, t, units); the states are for serving
    if config.dropout:
        x = _dropout_layer(config, config.layers, config.units)(x)
    # float32 logits even under a mixed_float16 policy: the softmax needs the range.
    logits = keras.layers.Dense(config.vocab_size, dtype="float32", name="logits")(x)  # (b, t, vocab)
    return keras.Model(tokens, logits, name=f"{config.cell}_lm")


def forward(
    model: keras.Model, config: ModelConfig, tokens: tf.Tensor, state: tf.Tensor, *, training: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """The model's layers from a packed ``state`` ``(b, S)``: logits ``(b, t, vocab)`` and the state after ``tokens``.

    Training with ``--stateful`` and the carried-state validation call this
    instead of ``model(tokens)``, which always starts from zeros.
    """
    x = model.get_layer("embedding")(tokens)
    finals: list[tf.Tensor] = []
    for i, (layer, initial) in enumerate(zip(rnn_layers(model, config), unpack_state(state, config), strict=True)):
        x = _dropout(model, config, i, x, training)
        if training and config.weight_drop:
            kernel = tf.nn.dropout(tf.cast(layer.cell.recurrent_kernel, x.dtype), rate=config.weight_drop)
            x, h, c = lstm_loop(layer, x, initial[0], initial[1], kernel)
            finals.extend((h, c))
            continue
        outputs = layer(x, initial_state=initial, training=training)
        x = outputs[0]
        finals.extend(outputs[1:])
    x = _dropout(model, config, config.layers, x, training)
    return model.get_layer("logits")(x), pack_state(finals)


def _dropout(model: keras.Model, config: ModelConfig, index: int, x: tf.Tensor, training: bool) -> tf.Tensor:
    if not (config.dropout and training):
        return x
    return model.get_layer(f"dropout_{index}")(x, training=True)


def lstm_loop(
    layer: keras.layers.Layer, x: tf.Tensor, h: tf.Tensor, c: tf.Tensor, recurrent_kernel: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Keras's LSTM (gates i, f, g, o; sigmoid and tanh) over ``x`` ``(b, t, e)`` with a given recurrent kernel.

    The input projection of every position is one matrix product before the
    loop; the loop adds ``h @ recurrent_kernel``. Returns the outputs
    ``(b, t, units)`` and the final ``h`` and ``c``.
    """
    cell = layer.cell
    units = cell.units
    shape = tf.shape(x)
    projected = tf.matmul(tf.reshape(x, [-1, x.shape[-1]]), tf.cast(cell.kernel, x.dtype)) + tf.cast(cell.bias, x.dtype)
    projected = tf.transpose(tf.reshape(projected, [shape[0], shape[1], 4 * units]), [1, 0, 2])  # (t, b, 4u)
    steps = tf.shape(projected)[0]
    inputs = tf.TensorArray(x.dtype, size=steps).unstack(projected)
    outputs = tf.TensorArray(x.dtype, size=steps)

    def body(t: tf.Tensor, h: tf.Tensor, c: tf.Tensor, outputs: tf.TensorArray) -> tuple[Any, ...]:
        i, f, g, o = tf.split(inputs.read(t) + tf.matmul(h, recurrent_kernel), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        return t + 1, h, c, outputs.write(t, h)

    _, h, c, outputs = tf.while_loop(lambda t, *_: t < steps, body, (tf.constant(0), h, c, outputs))
    return tf.transpose(outputs.stack(), [1, 0, 2]), h, c


def rnn_layers(model: keras.Model, config: ModelConfig) -> list[keras.layers.Layer]:
    return [model.get_layer(f"rnn_{i}") for i in range(config.layers)]


def pack_state(states: list[tf.Tensor]) -> tf.Tensor:
    """Layer states in order (h0, c0, h1, c1, ...) -> ``(b, S)`` float32."""
    return tf.concat([tf.cast(s, tf.float32) for s in states], axis=-1)


def unpack_state(state: tf.Tensor, config: ModelConfig) -> list[list[tf.Tensor]]:
    """``(b, S)`` -> per layer, its list of ``(b, units)`` states."""
    parts = tf.split(state, config.layers * config.states_per_layer, axis=-1)
    k = config.states_per_layer
    return [parts[i * k : (i + 1) * k] for i in range(config.layers)]
