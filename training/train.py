"""The training run: corpus -> tokenizer -> windows -> fit (checkpoints, resume, early stopping) -> export.

``train(config, placement)`` does the whole job and returns a ``TrainResult``.
Everything a user can get wrong (corpus, windows, a checkpoint from another
run) is checked in ``prepare`` before anything is written. Without a budget
the run is epochs (``fit``, early stopping, a checkpoint per finished epoch);
with ``--time-budget`` it is ``budgeted.fit_budgeted``'s planned steps. Either
way ``checkpoints.py`` writes each checkpoint atomically, so a run killed at
any moment resumes from its last one. Under a multi-worker strategy every
worker trains; only the chief writes checkpoints, TensorBoard logs and the
exported version.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from training.budget import Deadline, process_age
from training.budgeted import fit_budgeted, size_for_budget
from training.checkpoints import (
    PROGRESS_FILE,
    TOKENIZER_FILE,
    Progress,
    clean_checkpoints,
    read_progress,
    save_checkpoint,
    write_json_atomic,
)
from training.config import TrainConfig, UsageError
from training.corpus import Corpus, load_corpus
from training.distribute import Placement
from training.evaluate import Evaluator
from training.export import export_version, smoke_generate
from training.model import ModelConfig, build_model
from training.optimizer import make_optimizer
from training.tokenizer import Tokenizer, TokenizerError
from training.windows import Split, count_batches, make_dataset, split_ids

log = logging.getLogger("textgen.train")

LN2 = math.log(2.0)


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("textgen")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


# ------------------------------------------------------------------- prepare
@dataclass(frozen=True)
class Prepared:
    """The checked inputs of a run: nothing has been written yet."""

    corpus: Corpus
    tokenizer: Tokenizer
    split: Split
    model_config: ModelConfig
    resume_from: Progress | None
    train_batches: int
    val_batches: int


def prepare(config: TrainConfig) -> Prepared:
    """Load and check everything; raise ``UsageError`` naming the problem. Writes nothing."""
    for flag, path in (
        ("--out", config.out),
        ("--checkpoint-dir", config.checkpoint_dir),
        ("--log-dir", config.log_dir),
    ):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"{flag} {path}: exists and is not a folder")
    corpus = load_corpus(config.corpus)
    resume_from = read_progress(config.checkpoint_dir) if config.resume else None
    fingerprint = {**config.fingerprint(), "corpus_sha256": corpus.sha256}
    if resume_from is not None and resume_from.fingerprint != fingerprint:
        changed = sorted(k for k in fingerprint if resume_from.fingerprint.get(k) != fingerprint[k])
        raise UsageError(
            f"--resume: the checkpoint in {config.checkpoint_dir} was made by a different run "
            f"(differs in: {', '.join(changed)}); use another --checkpoint-dir or drop --resume"
        )
    tok_path = os.path.join(config.checkpoint_dir, TOKENIZER_FILE)
    if resume_from is not None and os.path.exists(tok_path):
        tokenizer = Tokenizer.load(tok_path)
    else:
        try:
            tokenizer = Tokenizer(level=config.level, num_words=config.vocab_cap, lowercase=config.lowercase)
        except TokenizerError as exc:
            raise UsageError(str(exc)) from exc
        tokenizer.fit_on_texts([corpus.text])
    ids = np.asarray(tokenizer.encode(corpus.text), dtype=np.int32)
    if len(ids) == 0:
        raise UsageError(f"--corpus {', '.join(corpus.sources)}: the corpus has no tokens at --level {config.level}")
    split = split_ids(ids, config.seq_len, config.validation_fraction)
    model_config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        embedding_dim=config.embedding_dim,
        units=config.units,
        layers=config.layers,
        cell=config.cell,
        dropout=config.dropout,
        dropout_mask=config.dropout_mask,
        weight_drop=config.weight_drop,
    )
    train_batches = count_batches(
        len(split.train), config.seq_len, config.stride, config.batch_size, config.max_steps_per_epoch
    )
    val_batches = (
        count_batches(
            len(split.validation), config.seq_len, config.seq_len, config.batch_size, config.max_steps_per_epoch
        )
        if len(split.validation)
        else 0
    )
    return Prepared(corpus, tokenizer, split, model_config, resume_from, train_batches, val_batches)


# ----------------------------------------------------------------- callbacks
class EpochEnd(keras.callbacks.Callback):
    """Per epoch: bits per token and perplexity into the logs, early stopping, checkpoint, progress."""

    def __init__(
        self, config: TrainConfig, progress: Progress, is_chief: bool, evaluator: Evaluator | None = None
    ) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.config = config
        self.progress = progress
        self.is_chief = is_chief
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        loss = float(logs["loss"])
        logs["bits_per_token"] = loss / LN2
        monitored = loss
        if self.evaluator is not None:
            logs.update(self.evaluator().logs())
        if "val_loss" in logs:
            monitored = float(logs["val_loss"])
        p = self.progress
        record = {
            "epoch": epoch + 1,
            "seconds": round(time.monotonic() - self._started, 3),
            "pid": os.getpid(),
            **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float, np.floating))},
        }
        weights = f"epoch-{epoch + 1:04d}.weights.h5"
        improved = p.best_val_loss is None or monitored < p.best_val_loss
        if improved:
            p.best_val_loss, p.best_epoch, p.best_weights, p.wait = monitored, epoch + 1, weights, 0
        else:
            p.wait += 1
        p.epochs_done = epoch + 1
        p.history.append(record)
        p.last_weights = weights
        if p.wait >= self.config.patience:
            p.stopped_early = True
            self.model.stop_training = True
        self._checkpoint(weights)
        val = f", val_loss {monitored:.4f}, val bits/token {monitored / LN2:.4f}" if "val_loss" in logs else ""
        if "val_carried_bits_per_token" in logs:
            val += f" fresh, {logs['val_carried_bits_per_token']:.4f} carried, perplexity {logs['val_perplexity']:.2f}"
        log.info(
            "epoch %d/%d: loss %.4f%s (%.1f s)%s",
            epoch + 1,
            self.config.epochs,
            loss,
            val,
            record["seconds"],
            ", early stop" if p.stopped_early else "",
        )

    def _checkpoint(self, weights: str) -> None:
        save_checkpoint(self.model, self.config.checkpoint_dir, weights, self.progress, self.is_chief)


# --------------------------------------------------------------------- train
@dataclass(frozen=True)
class TrainResult:
    export_path: str  # "" on a worker that is not the chief
    metrics: dict[str, Any]
    sample: str


def train(config: TrainConfig, placement: Placement, prepared: Prepared | None = None) -> TrainResult:
    """Fit, checkpoint every epoch, export the next version (chief only) and sample from it."""
    prep = prepared or prepare(config)
    chief = placement.is_chief
    log.info(
        "corpus %s: %d chars, sha256 %s; %s vocabulary %d; %d training / %d validation tokens; %d batches per epoch",
        ", ".join(prep.corpus.sources),
        prep.corpus.chars,
        prep.corpus.sha256[:12],
        config.level,
        prep.tokenizer.vocab_size,
        len(prep.split.train),
        len(prep.split.validation),
        prep.train_batches,
    )
    fingerprint = {**config.fingerprint(), "corpus_sha256": prep.corpus.sha256}
    progress = prep.resume_from or Progress(fingerprint=fingerprint)
    if chief:
        os.makedirs(config.checkpoint_dir, exist_ok=True)
        if prep.resume_from is None:
            clean_checkpoints(config.checkpoint_dir)
            prep.tokenizer.save(os.path.join(config.checkpoint_dir, TOKENIZER_FILE))
    if config.time_budget is not None:
        finished = bool(progress.plan) and progress.steps_done >= progress.plan["total_steps"]
    else:
        finished = progress.stopped_early or progress.epochs_done >= config.epochs
    if progress.exported and finished:
        log.info("the checkpoint's run already finished and was exported as %s; nothing to do", progress.exported)
        return TrainResult(progress.exported, _final_metrics(progress), "")
    progress.exported = ""  # more epochs were asked for: train on and export a new version

    keras.utils.set_random_seed(config.seed)
    model_config = prep.model_config
    deadline = None
    if config.time_budget is not None:
        deadline = Deadline(config.time_budget, progress.budget_used_s + process_age())
        if config.auto_size:
            config = size_for_budget(
                config, prep.tokenizer.vocab_size, prep.split.train, placement.strategy, progress, deadline
            )
            model_config = dataclasses.replace(
                model_config,
                layers=config.layers,
                units=config.units,
                embedding_dim=config.embedding_dim,
                dropout=config.dropout,
            )
    with placement.strategy.scope():
        model = build_model(model_config)
        model.compile(
            optimizer=make_optimizer(config),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        if progress.last_weights:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(os.path.join(config.checkpoint_dir, progress.last_weights))
            if deadline is not None:
                log.info("resuming after step %d from %s", progress.steps_done, progress.last_weights)
            else:
                log.info(
                    "resuming after epoch %d of %d from %s", progress.epochs_done, config.epochs, progress.last_weights
                )

    if deadline is not None:
        fit_budgeted(
            model,
            config,
            model_config,
            placement.strategy,
            prep.split.train,
            prep.split.validation,
            progress,
            deadline,
            chief,
        )
    else:
        _fit_epochs(model, config, model_config, placement, prep, progress)

    if progress.best_weights and progress.best_weights != progress.last_weights:
        best = os.path.join(config.checkpoint_dir, progress.best_weights)
        log.info("restoring the best weights (%s) before export", progress.best_weights)
        with placement.strategy.scope():
            model.load_weights(best)

    metrics = _final_metrics(progress)
    metrics["cpu_seconds"] = round(time.process_time(), 1)
    if config.level == "char" and "bits_per_token" in metrics:
        metrics["bits_per_char"] = metrics["bits_per_token"]
    if not chief:
        log.info("worker %d done; the chief exports", placement.cluster.task_index)
        return TrainResult("", metrics, "")
    path = export_version(
        model,
        model_config,
        prep.tokenizer,
        config.out,
        {
            "name": config.name,
            "training": config.to_dict(),
            "corpus": prep.corpus.describe(),
            "tokens": {"train": int(len(prep.split.train)), "validation": int(len(prep.split.validation))},
            "history": progress.history,
            "distribution": placement.describe(),
            "package_version": package_version(),
            **metrics,
        },
    )
    progress.exported = path
    write_json_atomic(os.path.join(config.checkpoint_dir, PROGRESS_FILE), progress.to_dict())
    log.info("exported %s", path)
    sample = smoke_generate(path, tokens=config.sample_tokens) if config.sample_tokens else ""
    return TrainResult(path, metrics, sample)


def _fit_epochs(
    model: keras.Model,
    config: TrainConfig,
    model_config: ModelConfig,
    placement: Placement,
    prep: Prepared,
    progress: Progress,
) -> None:
    """Epochs as ``--epochs`` asks, early stopping after ``--patience`` epochs without a better validation."""
    chief = placement.is_chief
    train_ds = make_dataset(
        prep.split.train,
        config.seq_len,
        config.stride,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        max_batches=config.max_steps_per_epoch,
    )
    # Validation is the two protocols of evaluate.py, run by EpochEnd (not fit's validation_data).
    evaluator = Evaluator(model, model_config, prep.split.validation) if len(prep.split.validation) else None
    callbacks: list[keras.callbacks.Callback] = [EpochEnd(config, progress, chief, evaluator)]
    if chief and _tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(log_dir=config.log_dir, write_graph=False))
    remaining = config.epochs - progress.epochs_done
    if remaining > 0 and not progress.stopped_early:
        if placement.cluster.multi_worker:
            _fit_multi_worker(
                model,
                placement.strategy,
                train_ds,
                epochs=config.epochs,
                initial_epoch=progress.epochs_done,
                steps=prep.train_batches,
                callbacks=callbacks,
                verbose=chief and sys.stdout.isatty(),
            )
        else:
            model.fit(
                train_ds,
                epochs=config.epochs,
                initial_epoch=progress.epochs_done,
                callbacks=callbacks,
                shuffle=False,  # the dataset shuffles its windows itself
                # The live progress bar on a terminal; one line per epoch in logs and pipes.
                verbose=1 if chief and sys.stdout.isatty() else 2,
            )
    else:
        log.info("all %d epochs are done; exporting", progress.epochs_done)


def _fit_multi_worker(
    model: keras.Model,
    strategy: Any,
    train_ds: Any,
    *,
    epochs: int,
    initial_epoch: int,
    steps: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: bool,
) -> None:
    """The epoch loop of ``fit``, written out for MultiWorkerMirroredStrategy.

    Keras 3 (3.15) ``fit`` fails under that strategy: it reduces a distributed
    batch with ``strategy.reduce`` before the first step and the scalar loss
    with ``axis=0`` after it (keras-team/keras#20585). This loop runs the same
    model, loss and optimizer through ``strategy.run``; the optimizer sums the
    replicas' gradients, so each replica's mean loss is divided by their number.
    The callbacks (checkpoint, early stopping, TensorBoard) see the same logs.
    """
    import tensorflow as tf

    per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    replicas = float(strategy.num_replicas_in_sync)
    dist_train = strategy.experimental_distribute_dataset(train_ds)

    def train_replica(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            losses = per_token(y, model(x, training=True))  # (b, t)
            loss = tf.reduce_mean(losses) / replicas
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply(grads, model.trainable_variables)
        return tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)

    @tf.function
    def train_step(batch: Any) -> tuple[tf.Tensor, tf.Tensor]:
        total, count = strategy.run(train_replica, args=batch)
        return strategy.reduce("SUM", total, axis=None), strategy.reduce("SUM", count, axis=None)

    callback_list = keras.callbacks.CallbackList(callbacks, add_history=False, add_progbar=False, model=model)
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        print(f"Epoch {epoch + 1}/{epochs}", flush=True)
        bar = keras.utils.Progbar(steps, verbose=1 if verbose else 0)
        total = count = 0.0
        for i, batch in enumerate(dist_train):
            t, c = train_step(batch)
            total, count = total + float(t), count + float(c)
            bar.update(i + 1, [("loss", total / max(count, 1.0))])
        logs: dict[str, Any] = {"loss": total / max(count, 1.0)}
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()


def _tensorboard_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        log.warning("the tensorboard package is not installed: no TensorBoard logs")
        return False
    return True


def _final_metrics(progress: Progress) -> dict[str, Any]:
    """The exported weights' figures (the best validation's, when early stopping or a budget restored them)."""
    if progress.steps_done:  # a budgeted run: records per validation, keyed by step
        by_step = {r["step"]: r for r in progress.history}
        record = by_step.get(progress.best_step) or (progress.history[-1] if progress.history else {})
    else:
        by_epoch = {r["epoch"]: r for r in progress.history}
        record = by_epoch.get(progress.best_epoch) or (progress.history[-1] if progress.history else {})
    out: dict[str, Any] = {
        "epochs_completed": progress.epochs_done,
        "exported_epoch": record.get("epoch", 0),
        "stopped_early": progress.stopped_early,
        "train_loss": record.get("loss"),
    }
    if progress.steps_done:
        out.update(steps_completed=progress.steps_done, exported_step=record.get("step", 0))
        out.update(plan=progress.plan, budget_used_seconds=round(progress.budget_used_s, 1))
        if progress.sizing:
            out["sizing"] = progress.sizing
    if "val_loss" in record:
        out["val_loss"] = record["val_loss"]
        out["bits_per_token"] = record["val_loss"] / LN2
        out["val_perplexity"] = math.exp(min(record["val_loss"], 50.0))
        for key in ("val_carried_loss", "val_carried_bits_per_token", "val_carried_perplexity"):
            if key in record:
                out[key] = record[key]
    elif "loss" in record:
        out["bits_per_token"] = record["loss"] / LN2
    if progress.final_validation:  # the run validated on a sample; these are the whole tail's figures
        final = progress.final_validation
        out["val_sample_loss"] = out.get("val_loss")
        out.update({k: final[k] for k in final if k.startswith("val_")})
        out["bits_per_token"] = final["val_loss"] / LN2
    return out
