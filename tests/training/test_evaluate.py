"""The two validation protocols, checked against the Keras model computed directly."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.evaluate import PIECES, WINDOW, Evaluator
from training.model import ModelConfig, build_model

CONFIG = ModelConfig(vocab_size=30, embedding_dim=8, units=16, layers=2, dropout=0.2)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(7)
    return build_model(CONFIG)


def _mean_loss(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    logits = model(tf.constant(x), training=False)
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)))


def test_fresh_windows_are_100_tokens_from_a_zero_state(model: keras.Model) -> None:
    ids = np.random.default_rng(1).integers(0, 30, 1234).astype(np.int32)
    starts = np.arange(0, len(ids) - WINDOW, WINDOW)
    w = ids[starts[:, None] + np.arange(WINDOW + 1)]
    assert Evaluator(model, CONFIG, ids)().fresh_loss == pytest.approx(_mean_loss(model, w[:, :-1], w[:, 1:]), 1e-5)


def test_carried_state_equals_reading_each_piece_in_one_pass(model: keras.Model) -> None:
    ids = np.random.default_rng(2).integers(0, 30, 3 * 2 * (WINDOW + 1) + 1).astype(np.int32)
    ev = Evaluator(model, CONFIG, ids)
    pieces = min(PIECES, (len(ids) - 1) // (WINDOW + 1))
    length = (len(ids) - 1) // pieces
    rows = np.arange(pieces)[:, None] * length + np.arange(length + 1)
    whole = ids[rows]  # each piece as one long sequence: the state flows through it
    assert ev().carried_loss == pytest.approx(_mean_loss(model, whole[:, :-1], whole[:, 1:]), 1e-5)


def test_a_sample_reads_about_max_tokens_spread_over_the_tail(model: keras.Model) -> None:
    ids = np.random.default_rng(3).integers(0, 30, 50_001).astype(np.int32)
    full, sample = Evaluator(model, CONFIG, ids), Evaluator(model, CONFIG, ids, max_tokens=5_000)
    assert not full.sampled and sample.sampled
    assert 2_500 <= sample.tokens <= 5_000 < full.tokens
    # Built over positions (never run), the sample shows where it reads: spread over the whole tail.
    where = Evaluator(model, CONFIG, np.arange(50_001, dtype=np.int32), max_tokens=5_000)
    firsts = np.concatenate([w[:, 0] for w in where.fresh])
    assert firsts[0] == 0 and firsts[-1] > 45_000 and np.all(np.diff(firsts) % WINDOW == 0)
    pieces = where.carried[0][:, 0]
    assert len(pieces) == PIECES and pieces[0] == 0 and pieces[-1] > 45_000
    assert sum(w[:, 1:].size for w in where.carried) <= 5_000
    result = sample()
    assert np.isfinite(result.fresh_loss) and np.isfinite(result.carried_loss)
