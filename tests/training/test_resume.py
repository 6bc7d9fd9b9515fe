"""Checkpoints and resume: a run killed with SIGKILL resumes from its last finished epoch.

Also: early stopping exports the best epoch's weights, and a run without ``--resume`` clears the
checkpoint folder before it trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.cli import main as train_main
from training.config import TrainConfig
from training.corpus import embedded_text
from training.export import load_exported
from training.model import ModelConfig, build_model
from training.tokenizer import Tokenizer
from training.train import EpochEnd, Progress
from training.windows import split_ids, window_starts

EPOCHS = 20


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _argv(corpus: Path, epochs: int = EPOCHS, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training", "--corpus", str(corpus), "--out", "models/m", "--checkpoint-dir", "ck",
        "--log-dir", "logs", "--units", "16", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8",
        "--max-steps-per-epoch", "4", "--epochs", str(epochs), "--patience", "100", "--sample-tokens", "0", *extra,
    ]  # fmt: skip


def _progress(ck: Path) -> dict:
    return json.loads((ck / "progress.json").read_text())


@pytest.mark.timeout(900)  # real training runs; generous for a loaded 2-core machine
def test_sigkill_mid_run_then_resume_runs_only_the_remaining_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(embedded_text()[:15_000], encoding="utf-8")
    ck = tmp_path / "ck"
    first = subprocess.Popen(
        _argv(corpus), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if (ck / "progress.json").exists() and _progress(ck)["epochs_done"] >= 2:
                break
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    done = _progress(ck)["epochs_done"]
    assert 2 <= done < EPOCHS
    assert not (tmp_path / "models" / "m").exists() or os.listdir(tmp_path / "models" / "m") == []
    # A checkpoint write interrupted by the kill leaves a temporary file; resume must not mind it.
    (ck / ".tmp-0123abcd.weights.h5").write_bytes(b"half a file")

    second = subprocess.run(
        _argv(corpus, EPOCHS, "--resume"), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming after epoch {done} of {EPOCHS}" in second.stderr
    ran = [line for line in second.stderr.splitlines() if line.startswith("textgen train: epoch ")]
    assert [line.split()[3].rstrip(":") for line in ran] == [f"{e}/{EPOCHS}" for e in range(done + 1, EPOCHS + 1)]
    history = _progress(ck)["history"]
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))  # every epoch exactly once
    assert {r["pid"] for r in history[:done]} == {first.pid}
    assert first.pid not in {r["pid"] for r in history[done:]}
    info = json.loads((tmp_path / "models" / "m" / "1" / "assets" / "model.json").read_text())
    assert info["epochs_completed"] == EPOCHS and len(info["history"]) == EPOCHS

    # Resuming a finished, exported run does nothing; asking for more epochs trains only those.
    monkeypatch.chdir(tmp_path)
    assert train_main(_argv(corpus, EPOCHS, "--resume")[3:]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert os.listdir(tmp_path / "models" / "m") == ["1"]
    more = subprocess.run(
        _argv(corpus, EPOCHS + 1, "--resume"), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert [ln.split()[3].rstrip(":") for ln in more.stderr.splitlines() if ln.startswith("textgen train: epoch ")] == [
        f"{EPOCHS + 1}/{EPOCHS + 1}"
    ]
    assert sorted(os.listdir(tmp_path / "models" / "m")) == ["1", "2"]

    # A checkpoint made by another configuration is refused before anything is written.
    before = sorted(p.name for p in ck.iterdir())
    assert train_main(_argv(corpus, EPOCHS, "--resume", "--units", "32")[3:]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "units" in err
    assert sorted(p.name for p in ck.iterdir()) == before


def test_early_stopping_counts_epochs_without_improvement(tmp_path: Path) -> None:
    config = TrainConfig(checkpoint_dir=str(tmp_path), patience=2, epochs=10)
    model = build_model(ModelConfig(vocab_size=5, embedding_dim=2, units=4))
    model.compile(keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    progress = Progress(fingerprint={})
    callback = EpochEnd(config, progress, is_chief=True)
    callback.set_model(model)
    for epoch, val_loss in enumerate([3.0, 2.0, 2.5, 1.9, 2.2, 2.3]):
        assert not model.stop_training
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {"loss": 3.0, "val_loss": val_loss})
    assert model.stop_training and progress.stopped_early
    assert progress.best_epoch == 4 and progress.best_val_loss == pytest.approx(1.9)
    # Only the best and the last epochs' weights are kept.
    assert sorted(p.name for p in tmp_path.glob("epoch-*.weights.h5")) == [
        "epoch-0004.weights.h5",
        "epoch-0006.weights.h5",
    ]
    saved = json.loads((tmp_path / "progress.json").read_text())
    assert saved["epochs_done"] == 6 and saved["best_weights"] == "epoch-0004.weights.h5"


def _validation_loss(version: Path, corpus: str, seq_len: int, fraction: float) -> float:
    """The exported version's mean next-token loss over the run's validation windows, through its ``prefill``."""
    loaded, tokenizer, _ = load_exported(str(version))
    ids = np.asarray(tokenizer.encode(corpus), dtype=np.int32)
    validation = split_ids(ids, seq_len, fraction).validation
    losses = []
    for start in window_starts(len(validation), seq_len, seq_len):
        window = validation[start : start + seq_len + 1]
        x, y = window[:-1], window[1:]
        # Row i reads the first i + 1 tokens: its logits predict y[i], as Keras scores the window.
        out = loaded.signatures["prefill"](
            tokens=tf.constant(np.tile(x, (seq_len, 1))), lengths=tf.constant(np.arange(1, seq_len + 1, dtype=np.int32))
        )
        logits = out["logits"].numpy().astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        losses.extend(log_z - logits[np.arange(seq_len), y])
    return float(np.mean(losses))


def test_after_early_stopping_the_best_epochs_weights_are_exported(tmp_path: Path) -> None:
    """Training text "ab"..., validation "aab"...: validation loss falls, then rises as the model learns "ab"."""
    corpus_text = "ab" * 400 + "aab" * 40
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    seq_len, fraction = 16, 0.1305  # the validation tail is exactly the 120 "aab" characters
    out, ck = tmp_path / "models" / "m", tmp_path / "ck"
    argv = ["--corpus", str(corpus), "--out", str(out), "--checkpoint-dir", str(ck), "--log-dir", str(tmp_path / "l")]
    argv += ["--units", "16", "--embedding-dim", "8", "--seq-len", str(seq_len), "--stride", str(seq_len)]
    argv += ["--batch-size", "8", "--validation-fraction", str(fraction), "--learning-rate", "0.01"]
    assert train_main([*argv, "--epochs", "12", "--patience", "2", "--sample-tokens", "0"]) == 0

    info = json.loads((out / "1" / "assets" / "model.json").read_text())
    val = {r["epoch"]: r["val_loss"] for r in info["history"]}
    best = min(val, key=lambda e: val[e])
    last = max(val)
    # The run stopped early, some epochs after its best one, with a clearly worse validation loss.
    assert info["stopped_early"] and last == info["epochs_completed"] == best + 2 < 12
    assert val[last] > val[best] + 0.1
    # model.json reports the best epoch's figures ...
    assert info["exported_epoch"] == best and info["val_loss"] == pytest.approx(val[best])
    # ... and the exported weights are that epoch's: evaluated for real, they score its validation loss.
    exported = _validation_loss(out / "1", corpus_text, seq_len, fraction)
    assert exported == pytest.approx(val[best], abs=1e-3)
    assert abs(exported - val[last]) > 0.1
    # The best epoch's checkpoint gives the exported model's logits; the last epoch's does not.
    tokens = np.asarray(Tokenizer.load(str(ck / "tokenizer.json")).encode("aabaab" * 3), dtype=np.int32)[None, :]
    loaded, _, _ = load_exported(str(out / "1"))
    export_logits = loaded.signatures["prefill"](
        tokens=tf.constant(tokens), lengths=tf.constant([tokens.shape[1]], tf.int32)
    )["logits"].numpy()
    config = ModelConfig(vocab_size=info["architecture"]["vocab_size"], embedding_dim=8, units=16)
    for epoch, same in ((best, True), (last, False)):
        model = build_model(config)
        model.compile(keras.optimizers.Adam(0.01, clipnorm=5.0), keras.losses.SparseCategoricalCrossentropy())
        model.optimizer.build(model.trainable_variables)
        model.load_weights(str(ck / f"epoch-{epoch:04d}.weights.h5"))
        logits = model(tf.constant(tokens)).numpy()[:, -1, :]
        assert np.allclose(logits, export_logits, atol=1e-4) == same, (epoch, logits, export_logits)


@pytest.mark.timeout(900)  # real training runs; generous for a loaded 2-core machine
def test_a_run_without_resume_clears_the_checkpoint_folder_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A fresh run killed before its first checkpoint leaves nothing of the earlier run for ``--resume`` to pick up."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(embedded_text()[:15_000], encoding="utf-8")
    ck = tmp_path / "ck"
    monkeypatch.chdir(tmp_path)
    flags = ["--stride", "4", "--max-steps-per-epoch", "300"]  # epochs of a few seconds
    assert train_main(_argv(corpus, 3, *flags)[3:]) == 0
    stale = {p.name for p in ck.iterdir()}
    assert {"progress.json", "tokenizer.json", "epoch-0003.weights.h5"} <= stale
    (ck / ".tmp-0123abcd.weights.h5").write_bytes(b"half a file")  # left by a run killed mid-write

    # The same run again, without --resume: killed as soon as the earlier run's progress.json is gone.
    fresh = subprocess.Popen(
        _argv(corpus, 3, *flags), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 400
        while fresh.poll() is None and time.monotonic() < deadline and (ck / "progress.json").exists():
            time.sleep(0.01)
        cleared = not (ck / "progress.json").exists()
        fresh.send_signal(signal.SIGKILL)
    finally:
        fresh.kill()
        fresh.wait()
    assert cleared, "the run without --resume never removed the earlier run's progress.json"
    assert fresh.returncode == -signal.SIGKILL, "the fresh run ended before it could be killed"
    left = {p.name for p in ck.iterdir()}
    assert not left & (stale | {".tmp-0123abcd.weights.h5"}) - {"tokenizer.json"}, left
    assert not any(name.startswith("epoch-") for name in left), left

    # So --resume finds no checkpoint and starts afresh: two new epochs, a new version.
    capsys.readouterr()
    assert train_main(_argv(corpus, 2, *flags, "--resume")[3:]) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and "nothing to do" not in err, err[-2000:]
    info = json.loads((tmp_path / "models" / "m" / "2" / "assets" / "model.json").read_text())
    assert [r["epoch"] for r in info["history"]] == [1, 2] and info["epochs_completed"] == 2
    assert sorted(os.listdir(tmp_path / "models" / "m")) == ["1", "2"]
