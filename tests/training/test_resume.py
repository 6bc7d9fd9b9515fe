"""Checkpoints and resume: a run killed with SIGKILL resumes from its last finished epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from training.cli import main as train_main
from training.config import TrainConfig
from training.corpus import embedded_text
from training.model import ModelConfig, build_model
from training.train import EpochEnd, Progress

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
