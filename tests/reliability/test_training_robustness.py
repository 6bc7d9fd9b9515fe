"""Training on hostile input and under failing storage.

* invalid UTF-8 anywhere in a corpus is refused: one clear message (path, byte, offset), exit 2,
  nothing written;
* an enormous single line (5 MB, no newline) trains and exports;
* a full disk during export (a real tmpfs that fills up, or a failure just before the rename)
  leaves no numbered version folder and no temporary folder;
* a checkpoint write interrupted by a full disk leaves a checkpoint folder that ``--resume``
  continues from once there is room again.

The tmpfs tests need root (mount); they are skipped where mounting is not allowed.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import tensorflow as tf

from tests.helpers import child_env
from training.cli import main as train_main
from training.corpus import embedded_text

SMALL = ["--units", "16", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8", "--max-steps-per-epoch", "2"]
QUIET = ["--patience", "100", "--sample-tokens", "0"]


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 100 KB tmpfs (a disk that fills up for real); skipped where mount is not permitted."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_invalid_utf8_deep_in_a_corpus_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = embedded_text()[:20_000].encode("utf-8")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(good)
    (folder / "b.txt").write_bytes(good[:10_000] + b"\xff\xfe" + good[10_000:])  # a stray byte in the middle
    monkeypatch.chdir(tmp_path)
    argv = ["--corpus", str(folder), "--out", "models/m", "--checkpoint-dir", "ck", "--log-dir", "logs", *SMALL, *QUIET]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "b.txt" in err and "not UTF-8" in err and "0xff" in err and "offset 10000" in err
    assert err.count("\n") <= 2, err  # one message, no traceback
    assert _tree(tmp_path / "models") == [] and _tree(tmp_path / "ck") == [] and _tree(tmp_path / "logs") == []


@pytest.mark.timeout(600)
def test_a_5_mb_single_line_trains_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    piece = embedded_text()[:50_000].replace("\n", " ")
    line = (piece * (5_000_000 // len(piece) + 1))[:5_000_000]
    corpus = tmp_path / "line.txt"
    corpus.write_text(line, encoding="utf-8")  # no newline at all
    assert corpus.stat().st_size >= 5_000_000
    monkeypatch.chdir(tmp_path)
    argv = ["--corpus", str(corpus), "--out", "models/m", "--log-dir", "logs", "--epochs", "1", *SMALL, *QUIET]
    assert train_main(argv) == 0
    assert (tmp_path / "models" / "m" / "1" / "saved_model.pb").is_file()
    assert (tmp_path / "models" / "m" / "1" / "assets" / "tokenizer.json").is_file()


def _tiny_model() -> tuple:
    import keras

    from training.model import ModelConfig, build_model
    from training.tokenizer import Tokenizer

    tokenizer = Tokenizer(level="char").fit_on_texts([embedded_text()[:5_000]])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=8, units=16, layers=1)
    model = build_model(config)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, config, tokenizer


def test_export_failing_just_before_the_rename_leaves_no_version(tmp_path: Path) -> None:
    from training.contract import list_versions
    from training.export import export_version

    model, config, tokenizer = _tiny_model()
    base = tmp_path / "models" / "m"
    export_version(model, config, tokenizer, str(base), {})

    def disk_full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    with pytest.raises(OSError) as info:
        export_version(model, config, tokenizer, str(base), {}, before_rename=disk_full)
    assert info.value.errno == errno.ENOSPC
    assert list_versions(str(base)) == [1]
    assert sorted(os.listdir(base)) == ["1"]  # no temporary folder left behind


def test_export_onto_a_full_disk_leaves_no_version_and_no_temporary_folder(tmpfs: Path) -> None:
    from training.contract import list_versions
    from training.export import export_version

    model, config, tokenizer = _tiny_model()
    base = tmpfs / "m"
    # TensorFlow's SavedModel writer meets the full disk first and reports it as its own error.
    with pytest.raises(tf.errors.ResourceExhaustedError, match="No space left on device"):
        export_version(model, config, tokenizer, str(base), {})
    assert list_versions(str(base)) == []
    assert os.listdir(base) == []


@pytest.mark.timeout(600)
def test_a_checkpoint_write_cut_by_a_full_disk_resumes_once_there_is_room(tmp_path: Path, tmpfs: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(embedded_text()[:15_000], encoding="utf-8")
    ck = tmpfs / "ck"
    argv = [
        sys.executable, "-m", "training", "--corpus", str(corpus), "--out", str(tmp_path / "models" / "m"),
        "--checkpoint-dir", str(ck), "--log-dir", str(tmp_path / "logs"), *SMALL, *QUIET, "--epochs", "4",
    ]  # fmt: skip
    # 100 KB hold epoch 1's checkpoint (~70 KB) but not epoch 2's written beside it.
    first = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=400)
    # A clean error (HDF5 itself would crash the process with SIGSEGV on a write cut by ENOSPC).
    assert first.returncode == 1, first.stderr[-2000:]
    assert "no room for a checkpoint" in first.stderr and "--resume" in first.stderr, first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    assert not (tmp_path / "models" / "m").exists() or os.listdir(tmp_path / "models" / "m") == []
    kept = [n for n in os.listdir(ck) if n.startswith("epoch-")]
    assert kept == ["epoch-0001.weights.h5"], os.listdir(ck)
    # Room again: the run resumes after the last checkpoint that was written whole.
    subprocess.run(["mount", "-o", "remount,size=10m", str(tmpfs)], check=True)
    second = subprocess.run([*argv, "--resume"], env=child_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after epoch 1 of 4" in second.stderr
    assert (tmp_path / "models" / "m" / "1" / "saved_model.pb").is_file()
