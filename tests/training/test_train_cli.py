"""``textgen train`` end to end: the default run, bad input, metadata, local generation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.local import main as generate_main
from tests.helpers import child_env
from training.cli import main as train_main
from training.corpus import embedded_text, load_corpus

TEXTGEN = str(Path(sys.executable).with_name("textgen"))
TINY = ["--units", "16", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8", "--sample-tokens", "5"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.timeout(900)  # real training runs; generous for a loaded 2-core machine
def test_no_arguments_trains_on_the_embedded_corpus_and_exports_version_1_then_2(tmp_path: Path) -> None:
    for expected in (1, 2):
        run = subprocess.run(
            [TEXTGEN, "train"], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"exported {os.path.join('models', 'textgen', str(expected))}" in run.stdout
        assert "sample from the reloaded export" in run.stdout
        assert "strategy DefaultStrategy" in run.stderr
    base = tmp_path / "models" / "textgen"
    assert sorted(os.listdir(base)) == ["1", "2"]
    info = json.loads((base / "2" / "assets" / "model.json").read_text())
    assert info["corpus"]["sources"] == ["pydoc_data.topics"]
    assert info["corpus"]["sha256"] == load_corpus().sha256
    assert info["corpus"]["chars"] == len(embedded_text())
    assert info["training"]["preset"] == "quick" and info["training"]["level"] == "char"
    assert len(info["history"]) == info["training"]["epochs"] == info["epochs_completed"]
    for key in ("train_loss", "val_loss", "bits_per_token", "bits_per_char", "val_perplexity"):
        assert math.isfinite(info[key]), key
    assert info["bits_per_token"] == pytest.approx(info["val_loss"] / math.log(2))
    assert info["bits_per_token"] < 4.0  # better than uniform over ~100 characters (6.7 bits)
    assert info["package_version"] and info["architecture"]["cell"] == "lstm"
    assert (tmp_path / "runs" / "textgen" / "logs").is_dir()  # TensorBoard
    # Local, stateful generation from the newest version (base folder) and from a version folder.
    gen = subprocess.run(
        [TEXTGEN, "generate", "--model", str(base), "The ", "--max-tokens", "30", "--temperature", "0"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("The ") and len(gen.stdout.strip()) > len("The ")


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(embedded_text()[:12_000], encoding="utf-8")
    return path


BAD_INPUTS = {
    "missing file": (["--corpus", "nope.txt"], "no such file"),
    "empty corpus": (["--corpus", "empty.txt"], "empty"),
    "non-UTF-8": (["--corpus", "latin1.txt"], "not UTF-8"),
    "folder without text": (["--corpus", "emptydir"], "no .txt"),
    "shorter than one window": (["--corpus", "short.txt", "--seq-len", "100"], "shorter than one window"),
    "seq-len 0": (["--seq-len", "0"], "--seq-len"),
    "unknown level": (["--level", "byte"], "--level"),
    "validation fraction": (["--validation-fraction", "1.5"], "--validation-fraction"),
    "negative dropout": (["--dropout", "-0.1"], "--dropout"),
    "unknown flag": (["--nope"], "--nope"),
    "out is a file": (["--out", "empty.txt"], "not a folder"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_message_exit_2_and_writes_nothing(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = BAD_INPUTS[name]
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "short.txt").write_text("far too short", encoding="utf-8")
    (tmp_path / "emptydir").mkdir()
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert train_main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("textgen train: error: ") and expected in lines[0]
    assert "Traceback" not in err and out == ""
    assert _tree(tmp_path) == before  # nothing written: no models/, runs/, checkpoints


def test_non_utf8_message_names_the_byte_and_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    assert train_main(["--corpus", str(bad), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "0xff" in err and "offset 6" in err and str(bad) in err


def test_word_level_run_on_a_folder_exports_a_working_model(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    corpus_file.rename(folder / "a.txt")
    (folder / "b.txt").write_text(embedded_text()[20_000:30_000], encoding="utf-8")
    (folder / "ignored.md").write_text("not a text file", encoding="utf-8")
    out = tmp_path / "models" / "words"
    argv = [
        "--corpus", str(folder), "--level", "word", "--max-vocab", "300", "--lowercase", "--epochs", "1",
        "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "logs"),
        "--mixed-precision", *TINY,
    ]  # fmt: skip
    assert train_main(argv) == 0
    # No GPU here: mixed precision is refused with a warning and the model trains in float32.
    assert "--mixed-precision needs a GPU" in capsys.readouterr().err
    info = json.loads((out / "1" / "assets" / "model.json").read_text())
    assert info["corpus"]["sources"] == [str(folder / "a.txt"), str(folder / "b.txt")]
    assert info["architecture"]["vocab_size"] == 300 and info["level"] == "word"
    assert "bits_per_char" not in info and math.isfinite(info["bits_per_token"])
    tok = json.loads((out / "1" / "assets" / "tokenizer.json").read_text())
    assert tok["level"] == "word" and tok["lowercase"] is True and len(tok["vocab"]) == 300
    capsys.readouterr()
    assert generate_main(["--model", str(out / "1"), "the", "--max-tokens", "8", "--seed", "5"]) == 0
    first = capsys.readouterr().out
    assert generate_main(["--model", str(out), "the", "--max-tokens", "8", "--seed", "5"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.startswith("the")


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--model", "nowhere", "hi"], "no such folder"),
        (["--model", ".", "hi"], "numbered versions"),
        (["--model", ".", "--max-tokens", "-1"], "--max-tokens"),
        (["--model", ".", "--temperature", "-1"], "--temperature"),
        (["--model", ".", "--top-k", "-2"], "--top-k"),
    ],
)
def test_generate_bad_input_exit_2(
    argv: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("textgen generate: error: ") and expected in err
