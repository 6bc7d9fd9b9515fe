"""Validation loss in two protocols, the same for every run whatever its training windows.

* ``fresh``: windows of ``WINDOW`` (100) tokens every 100 tokens of the held-out
  tail, each read from a zero state; a longer training ``--seq-len`` gets no
  more context here, so it does not score better for free.
* ``carried``: the tail is cut into at most ``PIECES`` contiguous pieces (so
  the forward passes batch), and each piece is read from its start with the
  state carried across its windows: the context a server has when it
  generates.

Both are the mean cross-entropy in nats per predicted token; bits per token
are that over ln 2. With ``max_tokens``, both read an evenly spread sample of
the tail of about that many tokens (every k-th fresh window; ``PIECES``
shorter pieces at evenly spaced starts): a budgeted run validates on such a
sample as it goes and scores the exported weights on the whole tail once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from training.model import ModelConfig, forward

WINDOW = 100
PIECES = 64
BATCH = 128


@dataclass(frozen=True)
class Validation:
    fresh_loss: float
    carried_loss: float

    def logs(self) -> dict[str, float]:
        """The figures under the names the log, ``model.json`` and TensorBoard use."""
        ln2 = math.log(2.0)
        return {
            "val_loss": self.fresh_loss,
            "val_bits_per_token": self.fresh_loss / ln2,
            "val_perplexity": math.exp(min(self.fresh_loss, 50.0)),
            "val_carried_loss": self.carried_loss,
            "val_carried_bits_per_token": self.carried_loss / ln2,
            "val_carried_perplexity": math.exp(min(self.carried_loss, 50.0)),
        }


class Evaluator:
    """Scores a model on one held-out id stream in both protocols."""

    def __init__(self, model: keras.Model, config: ModelConfig, ids: np.ndarray, max_tokens: int | None = None) -> None:
        ids = np.asarray(ids, np.int32)
        if len(ids) < WINDOW + 1:
            raise ValueError(f"the validation tail has {len(ids)} tokens, fewer than one window of {WINDOW + 1}")
        self.model = model
        self.config = config
        starts = np.arange(0, len(ids) - WINDOW, WINDOW)
        every = max(1, -(-len(starts) * WINDOW // max_tokens)) if max_tokens else 1
        windows = ids[starts[::every, None] + np.arange(WINDOW + 1)]  # (n, WINDOW + 1)
        self.fresh = [windows[i : i + BATCH] for i in range(0, len(windows), BATCH)]
        self.tokens = windows[:, 1:].size
        self._all_tokens = len(starts) * WINDOW
        pieces = max(1, min(PIECES, (len(ids) - 1) // (WINDOW + 1)))
        spacing = (len(ids) - 1) // pieces
        length = spacing if not max_tokens else max(1, min(spacing, max_tokens // pieces))  # targets per piece
        rows = np.arange(pieces)[:, None] * spacing
        self.carried = [
            ids[rows + np.arange(start, min(start + WINDOW, length) + 1)] for start in range(0, length, WINDOW)
        ]
        self._chunk = tf.function(self._chunk_loss, reduce_retracing=True)

    @property
    def sampled(self) -> bool:
        return len(self.fresh) > 0 and self.tokens < self._all_tokens

    def _chunk_loss(self, w: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits, state = forward(self.model, self.config, w[:, :-1], state, training=False)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=w[:, 1:], logits=logits)
        return tf.reduce_sum(losses), state

    def _zeros(self, rows: int) -> tf.Tensor:
        return tf.zeros([rows, self.config.state_size], tf.float32)

    def __call__(self) -> Validation:
        total = count = 0.0
        for w in self.fresh:
            loss, _ = self._chunk(tf.constant(w), self._zeros(len(w)))
            total, count = total + float(loss), count + w[:, 1:].size
        fresh = total / count
        total = count = 0.0
        state = self._zeros(len(self.carried[0]))
        for w in self.carried:
            loss, state = self._chunk(tf.constant(w), state)
            total, count = total + float(loss), count + w[:, 1:].size
        return Validation(fresh_loss=fresh, carried_loss=total / count)
