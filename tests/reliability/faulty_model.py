"""A test-only model that serves under the SavedModel contract and fails on purpose.

Its ``prefill`` and ``step`` are a tiny real recurrent cell, with two traps in the graph:
a ``FAULT`` character in the tokens trips a ``tf.debugging.Assert`` (InvalidArgumentError
from TensorFlow itself), and an ``OOM`` character makes the step allocate a tensor of
2**36 floats (256 GiB), which TensorFlow's allocator refuses with a real
``ResourceExhaustedError``. The markers' logits are pushed far down, so the model never
samples them itself: only a prompt can bring them in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from training.tokenizer import Tokenizer

FAULT = "!"
OOM = "#"
STATE = 8
_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n" + FAULT + OOM


class _Faulty(tf.Module):
    def __init__(self, vocab: int, fault_id: int, oom_id: int) -> None:
        super().__init__(name="faulty")
        rng = np.random.default_rng(0)
        self.embed = tf.Variable(rng.normal(size=(vocab, STATE)).astype(np.float32))
        self.recur = tf.Variable(rng.normal(size=(STATE, STATE)).astype(np.float32) * 0.3)
        self.out = tf.Variable(rng.normal(size=(STATE, vocab)).astype(np.float32))
        mask = np.zeros(vocab, np.float32)
        mask[[0, fault_id, oom_id]] = -1e9  # finite: the loader checks the logits are finite
        self.mask = tf.constant(mask)
        self.fault_id = fault_id
        self.oom_id = oom_id

    def _traps(self, tokens: tf.Tensor) -> tf.Tensor:
        """Checks the real tokens; returns 0.0 (after allocating 256 GiB if an OOM marker is there)."""
        ok = tf.debugging.Assert(
            tf.reduce_all(tokens != self.fault_id), ["fault injected: the FAULT marker token reached the model"]
        )
        with tf.control_dependencies([ok]):
            n = tf.cast(tf.reduce_any(tokens == self.oom_id), tf.int64) * (1 << 36)
            return tf.reduce_sum(tf.fill(tf.reshape(n, [1]), 1.0)) * 0.0

    def _cell(self, tokens: tf.Tensor, state: tf.Tensor) -> tf.Tensor:
        return tf.tanh(tf.gather(self.embed, tokens) + state @ self.recur)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int32, "tokens"), tf.TensorSpec([None, None], tf.float32, "state")]
    )
    def step(self, tokens: tf.Tensor, state: tf.Tensor) -> dict[str, tf.Tensor]:
        zero = self._traps(tokens)
        new_state = self._cell(tokens, state) + zero
        return {"logits": new_state @ self.out + self.mask, "state": new_state}

    @tf.function(
        input_signature=[tf.TensorSpec([None, None], tf.int32, "tokens"), tf.TensorSpec([None], tf.int32, "lengths")]
    )
    def prefill(self, tokens: tf.Tensor, lengths: tf.Tensor) -> dict[str, tf.Tensor]:
        real = tf.sequence_mask(lengths, tf.shape(tokens)[1])
        zero = self._traps(tf.boolean_mask(tokens, real))
        state = tf.zeros([tf.shape(tokens)[0], STATE]) + zero
        for_t = tf.transpose(tokens)  # (t, b)
        keep = tf.transpose(real)

        def body(s: tf.Tensor, x: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
            tok, k = x
            return tf.where(k[:, None], self._cell(tok, s), s)

        state = tf.foldl(body, (for_t, keep), initializer=state)
        return {"logits": state @ self.out + self.mask, "state": state}


def export_faulty(base: Path) -> Path:
    """Writes ``<base>/1`` and returns it."""
    tokenizer = Tokenizer(level="char").fit_on_texts([_ALPHABET])
    fault_id, oom_id = tokenizer.encode(FAULT)[0], tokenizer.encode(OOM)[0]
    module = _Faulty(tokenizer.vocab_size, fault_id, oom_id)
    path = base / "1"
    tf.saved_model.save(module, str(path), signatures={"prefill": module.prefill, "step": module.step})
    assets = path / "assets"
    os.makedirs(assets, exist_ok=True)
    tokenizer.save(str(assets / "tokenizer.json"))
    # Contract version 1: it has no prefill_from, so the server reads a long prompt's first slice and the rest rides.
    info = {"fixture": "faulty", "contract_version": 1, "state_size": STATE}
    (assets / "model.json").write_text(json.dumps(info), encoding="utf-8")
    return path
