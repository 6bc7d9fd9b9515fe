"""The training loop of a budgeted run (``--time-budget``): optimizer steps planned to end with the budget.

``fit_budgeted`` times a few real steps and one validation, asks
``budget.plan`` how many steps fit before the export, and trains them with the
learning rate of ``budget.lr_at``. Every ``validate_every`` steps it validates
in both protocols (``evaluate.py``), logs one progress line, writes TensorBoard
scalars, keeps the best weights and checkpoints (``progress.json`` holds the
steps done and the seconds of the budget used, so ``--resume`` continues with
what is left). With ``--weight-average`` the validations, checkpoints and
export use a moving average of the weights (``WeightAverage``). After each
validation it plans again from the measured step time, so a machine that
slows down or speeds up still ends on time. A budgeted run trains on one
replica: workers that time themselves plan different steps, and each step is
a collective (the CLI refuses a strategy with several replicas).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training import sizing
from training.batches import StreamBatches, WindowBatches, start_state
from training.budget import (
    VALIDATION_SHARE,
    Deadline,
    Plan,
    export_reserve,
    lr_at,
    plan,
    plan_from_now,
    probe_seconds,
    replan,
)
from training.checkpoints import PROGRESS_FILE, Progress, save_checkpoint, write_json_atomic
from training.config import TrainConfig
from training.evaluate import Evaluator
from training.model import ModelConfig, build_model, forward
from training.optimizer import make_optimizer

log = logging.getLogger("textgen.train")

LN2 = math.log(2.0)
# Steps run before the timed ones (the first traces the step function).
UNTIMED_STEPS = 2
# The timed probe: at least this many steps, until budget.probe_seconds have passed.
PROBE_STEPS = 3
# Validations as the run goes read a sample of about this many held-out tokens (evaluate.py).
VALIDATION_SAMPLE_TOKENS = 200_000
# Before the plan exists the learning rate warms up as if over this many steps (the longest warm-up).
PROBE_WARMUP = 500


def make_batches(config: TrainConfig, ids: np.ndarray) -> WindowBatches | StreamBatches:
    if config.stateful:
        return StreamBatches(ids, config.seq_len, config.batch_size, config.seed)
    return WindowBatches(ids, config.seq_len, config.stride, config.batch_size, config.seed)


class WeightAverage:
    """An exponential moving average of the trainable weights, over about the last ``set_horizon`` steps.

    ``update`` runs inside the training step; ``applied`` swaps the average into
    the model for a validation and its checkpoint, and back; ``finish`` leaves
    it there for the export. The average starts from the weights it is built
    with (a resumed run: the averaged weights of its last checkpoint).
    """

    def __init__(self, variables: list[tf.Variable]) -> None:
        self.variables = variables
        self.averages = [tf.Variable(v, trainable=False, name="average") for v in variables]
        self.decay = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="average_decay")

    def set_horizon(self, steps: int) -> None:
        self.decay.assign(1.0 - 1.0 / max(1, steps))

    def update(self) -> None:
        for average, variable in zip(self.averages, self.variables, strict=True):
            decay = tf.cast(self.decay, average.dtype)
            average.assign(decay * average + (1.0 - decay) * tf.cast(variable, average.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        raw = [v.numpy() for v in self.variables]
        self.finish()
        try:
            yield
        finally:
            for variable, value in zip(self.variables, raw, strict=True):
                variable.assign(value)

    def finish(self) -> None:
        for variable, average in zip(self.variables, self.averages, strict=True):
            variable.assign(average)


class StepRunner:
    """One optimizer step under ``strategy`` (one replica), from NumPy batches and a carried state."""

    def __init__(
        self, model: keras.Model, model_config: ModelConfig, strategy: Any, average: WeightAverage | None = None
    ) -> None:
        self.model = model
        self.config = model_config
        per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
        optimizer = model.optimizer

        def replica_step(x: tf.Tensor, y: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                logits, new_state = forward(model, model_config, x, state, training=True)
                loss = tf.reduce_mean(per_token(y, logits))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            if average is not None:
                average.update()
            return loss, tf.stop_gradient(new_state)

        @tf.function
        def step(x: Any, y: Any, state: Any) -> tuple[tf.Tensor, Any]:
            loss, new_state = strategy.run(replica_step, args=(x, y, state))
            return strategy.reduce("MEAN", loss, axis=None), new_state

        self._step = step

    def zero_state(self, rows: int) -> Any:
        return tf.zeros([rows, self.config.state_size], tf.float32)

    def __call__(self, x: np.ndarray, y: np.ndarray, state: Any) -> tuple[float, Any]:
        loss, state = self._step(tf.constant(x), tf.constant(y), state)
        return float(loss), state


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def fit_budgeted(
    model: keras.Model,
    config: TrainConfig,
    model_config: ModelConfig,
    strategy: Any,
    train_ids: np.ndarray,
    validation_ids: np.ndarray,
    progress: Progress,
    deadline: Deadline,
    is_chief: bool,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Train until the plan's last step (or the deadline's reserve), validating and checkpointing as planned."""
    assert config.time_budget is not None
    batches = make_batches(config, train_ids)
    if len(validation_ids) == 0:
        raise ValueError("a budgeted run validates: --validation-fraction must be above 0")
    evaluator = Evaluator(model, model_config, validation_ids, max_tokens=VALIDATION_SAMPLE_TOKENS)
    whole = Evaluator(model, model_config, validation_ids) if evaluator.sampled else None
    average = None
    if config.weight_average:
        with strategy.scope():
            average = WeightAverage(model.trainable_variables)
    runner = StepRunner(model, model_config, strategy, average)
    writer = tf.summary.create_file_writer(config.log_dir) if is_chief else None
    peak = config.learning_rate
    run_plan: Plan | None = None
    zero = runner.zero_state(config.batch_size)
    state = zero  # the last step's final state
    step = progress.steps_done
    seen = 0.0  # training loss summed since the last validation
    seen_steps = 0

    def lr(step: int) -> float:
        # A resumed run follows the plan it checkpointed until it has timed this machine again.
        known = run_plan.describe() if run_plan is not None else progress.plan
        # Before the first plan: the warm-up of the probe steps, and no end in sight.
        total, warmup = (int(known["total_steps"]), int(known["warmup_steps"])) if known else (10**9, PROBE_WARMUP)
        return lr_at(
            step,
            peak=peak,
            total_steps=total,
            warmup_steps=warmup,
            shape=config.schedule,
            decay_share=config.decay_share,
        )

    def train_one() -> None:
        nonlocal step, state, seen, seen_steps
        model.optimizer.learning_rate.assign(lr(step))
        loss, state = runner(*batches(step), start_state(batches, step, state, zero))
        seen, seen_steps, step = seen + loss, seen_steps + 1, step + 1

    def adopt_plan(new_plan: Plan) -> Plan:
        if average is not None:
            average.set_horizon(round(config.weight_average * new_plan.total_steps))
        return new_plan

    def validate(last: bool = False) -> None:
        if average is None:
            record_validation(evaluator().logs(), {})
            return
        if not last:
            with average.applied():
                record_validation(evaluator().logs(), {})
            return
        # The last validation scores the trained weights too and keeps (and exports) the better.
        trained = evaluator().logs()
        with average.applied():
            averaged = evaluator().logs()
        keep_average = averaged["val_loss"] <= trained["val_loss"]
        log.info(
            "step %d: the weight average scores %.4f bits/token fresh, the trained weights %.4f; keeping %s",
            step,
            averaged["val_bits_per_token"],
            trained["val_bits_per_token"],
            "the average" if keep_average else "the trained weights",
        )
        if keep_average:
            average.finish()
        both = {
            "average_val_bits_per_token": averaged["val_bits_per_token"],
            "trained_val_bits_per_token": trained["val_bits_per_token"],
        }
        record_validation(averaged if keep_average else trained, both)

    def record_validation(figures: dict[str, float], extra: dict[str, float]) -> None:
        nonlocal seen, seen_steps
        record: dict[str, Any] = {
            "step": step,
            "epoch": round(step / batches.steps_per_epoch, 3),
            "seconds": round(deadline.used(), 1),
            "lr": lr(max(0, step - 1)),
            "loss": seen / max(1, seen_steps),
            "bits_per_token": seen / max(1, seen_steps) / LN2,
            **figures,
            **extra,
        }
        seen, seen_steps = 0.0, 0
        improved = progress.best_val_loss is None or record["val_loss"] < progress.best_val_loss
        weights = f"step-{step:08d}.weights.h5"
        if improved:
            progress.best_val_loss, progress.best_step, progress.best_weights = record["val_loss"], step, weights
        progress.steps_done = step
        progress.budget_used_s = deadline.used()
        progress.history.append(record)
        progress.last_weights = weights
        if run_plan is not None:
            progress.plan = run_plan.describe()
        save_checkpoint(model, config.checkpoint_dir, weights, progress, is_chief)
        if writer is not None:
            with writer.as_default(step=step):
                for name in ("loss", "lr", "val_loss", "val_bits_per_token", "val_carried_bits_per_token"):
                    tf.summary.scalar(name, record[name])
                tf.summary.scalar("val_perplexity", record["val_perplexity"])
            writer.flush()
        total = run_plan.total_steps if run_plan is not None else 0
        log.info(
            "step %d/%s (epoch %.2f): loss %.4f, val %.4f bits/token fresh, %.4f carried, perplexity %.2f, lr %.2e; "
            "%s elapsed, %s left of %s%s",
            step,
            total or "?",
            record["epoch"],
            record["loss"],
            record["val_bits_per_token"],
            record["val_carried_bits_per_token"],
            record["val_perplexity"],
            record["lr"],
            _clock(deadline.used()),
            _clock(deadline.remaining()),
            _clock(deadline.budget_s),
            ", best" if improved else "",
        )

    # Probe: untimed steps (tracing), timed steps, one validation; then plan.
    for _ in range(UNTIMED_STEPS):
        train_one()
    started, timed = clock(), 0
    while timed < PROBE_STEPS or clock() - started < probe_seconds(deadline.budget_s):
        train_one()
        timed += 1
    step_s = (clock() - started) / timed
    started = clock()
    validate()
    validation_s = clock() - started
    # The exported weights are scored on the whole tail once, after the last step.
    final_s = validation_s * whole.tokens / evaluator.tokens if whole is not None else 0.0
    run_plan = adopt_plan(
        plan(
            remaining_s=deadline.remaining(),
            budget_s=deadline.budget_s,
            steps_done=step,
            step_s=step_s,
            validation_s=validation_s,
            reserve_s=export_reserve(deadline.budget_s) + final_s,
        )
    )
    progress.plan = run_plan.describe()
    log.info(
        "plan: %d steps (%.3f s each), a validation every %d steps (%.1f s each), warm-up %d steps, "
        "%.0f s held back for the export",
        run_plan.total_steps,
        step_s,
        run_plan.validate_every,
        validation_s,
        run_plan.warmup_steps,
        run_plan.reserve_s,
    )
    # Step and validation times are averaged over the whole run so far: one slow interval on a
    # shared machine does not swing the plan (and the schedule with it).
    train_time, train_steps, interval_start, first = 0.0, 0, clock(), step
    validation_time, validations = validation_s, 1
    while step < run_plan.total_steps:
        train_one()
        # A run that falls far behind its plan stops at once, to export on time.
        late = deadline.remaining() < run_plan.reserve_s / 2
        at_end = step >= run_plan.total_steps or late
        if late:
            log.warning("behind the plan: stopping at step %d of %d to export on time", step, run_plan.total_steps)
            run_plan = replan(run_plan, total_steps=step)
        if step % run_plan.validate_every == 0 or at_end:
            started = clock()
            train_time, train_steps = train_time + started - interval_start, step - first
            validate(last=at_end)
            validation_time, validations = validation_time + clock() - started, validations + 1
            if not at_end:
                total = plan_from_now(run_plan, deadline, step, train_time / train_steps, validation_time / validations)
                run_plan = adopt_plan(replan(run_plan, total_steps=total))
            interval_start = clock()
    progress.plan = run_plan.describe()
    if whole is not None:
        if progress.best_weights != progress.last_weights:
            model.load_weights(os.path.join(config.checkpoint_dir, progress.best_weights))
        figures = whole().logs()
        progress.final_validation = {"step": progress.best_step, "tokens": whole.tokens, **figures}
        progress.budget_used_s = deadline.used()
        if is_chief:
            write_json_atomic(os.path.join(config.checkpoint_dir, PROGRESS_FILE), progress.to_dict())
        log.info(
            "step %d on the whole validation tail (%d tokens): %.4f bits/token fresh, %.4f carried, perplexity %.2f",
            progress.best_step,
            whole.tokens,
            figures["val_bits_per_token"],
            figures["val_carried_bits_per_token"],
            figures["val_perplexity"],
        )


def size_for_budget(
    config: TrainConfig,
    vocab: int,
    train_ids: np.ndarray,
    strategy: Any,
    progress: Progress,
    deadline: Deadline,
    clock: Callable[[], float] = time.monotonic,
) -> TrainConfig:
    """``config`` with the layers, units, embedding and dropout of ``sizing.choose`` (kept in ``progress``)."""
    if not progress.sizing:
        batches = make_batches(config, train_ids)
        times = []
        for layers, units in sizing.PROBES:
            probe = ModelConfig(vocab, sizing.EMBEDDING_DIM, units, layers, config.cell, 0.1)
            with strategy.scope():
                model = build_model(probe)
                model.compile(optimizer=make_optimizer(config))
            runner = StepRunner(model, probe, strategy)
            state = runner.zero_state(config.batch_size)
            for step in range(UNTIMED_STEPS):
                runner(*batches(step), state)
            started, timed = clock(), 0
            while timed < PROBE_STEPS or clock() - started < probe_seconds(deadline.budget_s) / 2:
                runner(*batches(UNTIMED_STEPS + timed), state)
                timed += 1
            times.append((clock() - started) / timed)
        probe_s = (times[0], times[1])
        train_s = (deadline.remaining() - export_reserve(deadline.budget_s)) * (1.0 - VALIDATION_SHARE)
        choice = sizing.choose(
            vocab=vocab,
            corpus_tokens=len(train_ids),
            train_s=train_s,
            probe_step_s=probe_s,
            tokens_per_step=config.batch_size * config.seq_len,
        )
        progress.sizing = {
            "layers": choice.layers,
            "units": choice.units,
            "embedding_dim": choice.embedding_dim,
            "dropout": choice.dropout,
            "probes": [f"{layers} x {units}" for layers, units in sizing.PROBES],
            "probe_step_seconds": [round(t, 5) for t in probe_s],
            "estimated_step_seconds": round(choice.est_step_s, 5),
            "reason": choice.reason(),
        }
        keras.utils.set_random_seed(config.seed)  # the chosen network starts as if no probe had run
    log.info("sizing rule: %s", progress.sizing["reason"])
    s = progress.sizing
    return dataclasses.replace(
        config, layers=s["layers"], units=s["units"], embedding_dim=s["embedding_dim"], dropout=s["dropout"]
    )
