"""Ways to break a good version folder, each with the words the contract check's message must contain.

Shared by the tests of ``textgen check`` and of the server's loader, which run the same check.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf


def place(src: Path, repo: Path, name: str, version: int | str) -> Path:
    """Copy a version folder into place the way the exporter does: hidden temporary folder, then rename."""
    base = repo / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{uuid.uuid4().hex}"
    shutil.copytree(src, tmp)
    final = base / str(version)
    os.rename(tmp, final)
    return final


def _truncate_pb(path: Path) -> None:
    pb = path / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:200])


def _drop_variables(path: Path) -> None:
    shutil.rmtree(path / "variables")


def _grow_vocab(path: Path) -> None:
    tok = path / "assets" / "tokenizer.json"
    data = json.loads(tok.read_text(encoding="utf-8"))
    data["vocab"].append("an extra token")
    tok.write_text(json.dumps(data), encoding="utf-8")


def _empty(path: Path) -> None:
    shutil.rmtree(path)
    path.mkdir()


def _unreadable_tokenizer(path: Path) -> None:
    tok = path / "assets" / "tokenizer.json"
    tok.unlink()
    tok.mkdir()  # a folder where a file should be: unreadable even for root


def _drop_model_info(path: Path) -> None:
    (path / "assets" / "model.json").unlink()


def _old_contract(path: Path) -> None:
    info_path = path / "assets" / "model.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    del info["contract_version"]
    info_path.write_text(json.dumps(info), encoding="utf-8")


def _resave(path: Path, signatures: Callable[[tf.Module], dict]) -> None:
    """Save the version's own SavedModel again with other signatures, keeping its assets."""
    assets = path.parent / f".assets-{uuid.uuid4().hex}"
    shutil.copytree(path / "assets", assets)
    loaded = tf.saved_model.load(str(path))
    staging = path.parent / f".resave-{uuid.uuid4().hex}"
    tf.saved_model.save(loaded, str(staging), signatures=signatures(loaded))
    shutil.rmtree(path)
    os.rename(staging, path)
    shutil.rmtree(path / "assets", ignore_errors=True)
    shutil.copytree(assets, path / "assets")
    shutil.rmtree(assets)


def _drop_prefill(path: Path) -> None:
    _resave(path, lambda loaded: {"step": loaded.signatures["step"]})


def _wrong_signatures(path: Path) -> None:
    def signatures(_: tf.Module) -> dict:
        module = tf.Module()
        fn = tf.function(lambda x: {"logits": tf.zeros([1, 3]) + tf.cast(x[0], tf.float32)})
        module.fn = fn  # type: ignore[attr-defined]
        concrete = fn.get_concrete_function(tf.TensorSpec([None], tf.int32, name="x"))
        return {"step": concrete, "prefill": concrete}

    _resave(path, signatures)


# kind -> (how to break a version folder in place, what the check's message says)
BREAKERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated saved_model.pb": (_truncate_pb, ""),
    "missing variables": (_drop_variables, ""),
    "wrong signatures": (
        _wrong_signatures,
        "signature 'step' has inputs ['x'], the contract needs ['state', 'tokens']",
    ),
    "missing signature": (_drop_prefill, "signature 'prefill' is missing (found ['step'])"),
    "vocabulary mismatch": (_grow_vocab, "logits but its tokenizer has"),
    "empty folder": (_empty, "saved_model.pb is missing"),
    "unreadable file": (_unreadable_tokenizer, "assets/tokenizer.json is not readable"),
    "missing model.json": (_drop_model_info, "assets/model.json is missing"),
    "no contract version": (_old_contract, "assets/model.json lacks contract_version"),
}


def broken_copy(good: Path, repo: Path, kind: str) -> Path:
    """A copy of the version folder ``good`` at ``<repo>/broken/1``, broken the way ``kind`` names."""
    path = place(good, repo, "broken", 1)
    BREAKERS[kind][0](path)
    return path
