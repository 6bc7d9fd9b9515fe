"""The weights' moving average of a budgeted run: its arithmetic, the swap for validations, and the flag."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.budgeted import StepRunner, WeightAverage
from training.config import UsageError, parse_args
from training.model import ModelConfig, build_model


def test_the_average_moves_by_one_over_the_horizon_and_starts_at_the_weights() -> None:
    weight = tf.Variable([2.0, -2.0])
    average = WeightAverage([weight])
    np.testing.assert_allclose(average.averages[0].numpy(), [2.0, -2.0])
    average.set_horizon(4)  # decay 0.75
    weight.assign([6.0, 2.0])
    average.update()
    np.testing.assert_allclose(average.averages[0].numpy(), [3.0, -1.0])
    average.set_horizon(1)  # decay 0: the average is the latest weights
    average.update()
    np.testing.assert_allclose(average.averages[0].numpy(), [6.0, 2.0])


def test_applied_swaps_the_average_in_and_the_trained_weights_back() -> None:
    weight = tf.Variable([1.0, 1.0])
    average = WeightAverage([weight])
    average.set_horizon(2)
    weight.assign([3.0, 5.0])
    average.update()  # (2, 3)
    with average.applied():
        np.testing.assert_allclose(weight.numpy(), [2.0, 3.0])
    np.testing.assert_allclose(weight.numpy(), [3.0, 5.0])
    with pytest.raises(RuntimeError), average.applied():
        raise RuntimeError("a failed validation still restores the weights")
    np.testing.assert_allclose(weight.numpy(), [3.0, 5.0])
    average.finish()
    np.testing.assert_allclose(weight.numpy(), [2.0, 3.0])


def test_the_training_step_updates_the_average_of_every_trainable_weight() -> None:
    config = ModelConfig(vocab_size=11, embedding_dim=4, units=16, layers=2)
    model = build_model(config)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    average = WeightAverage(model.trainable_variables)
    average.set_horizon(10)
    start = [v.numpy() for v in model.trainable_variables]
    runner = StepRunner(model, config, tf.distribute.get_strategy(), average)
    x = np.random.default_rng(0).integers(0, 11, (4, 9)).astype(np.int32)
    for _ in range(3):
        runner(x[:, :-1], x[:, 1:], runner.zero_state(4))
    for begin, trained, averaged in zip(start, model.trainable_variables, average.averages, strict=True):
        moved = np.abs(trained.numpy() - begin).max()
        assert moved > 0
        # Three steps of decay 0.9 move the average about a quarter as far as the weights.
        assert 0 < np.abs(averaged.numpy() - begin).max() < 0.5 * moved


def test_the_flag_is_checked_and_needs_a_budget() -> None:
    assert parse_args(["--time-budget", "60"]).weight_average == 0.0
    assert parse_args(["--time-budget", "60", "--weight-average", "0.05"]).weight_average == pytest.approx(0.05)
    with pytest.raises(UsageError, match="--weight-average needs --time-budget"):
        parse_args(["--weight-average", "0.05"])
    with pytest.raises(UsageError, match=r"--weight-average must be in \[0, 0.5\], got 0.7"):
        parse_args(["--time-budget", "60", "--weight-average", "0.7"])
