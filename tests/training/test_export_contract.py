"""The SavedModel contract, checked on reloaded exports of small trained models.

``step(t, prefill(p).state).logits == prefill(p + t).logits``; right padding is
inert; rows of different lengths in one batch equal each row alone; the
reloaded signatures give the in-memory Keras model's logits; an export that
fails midway leaves no numbered folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from training.contract import CONTRACT_VERSION, list_versions
from training.export import export_version, load_exported
from training.model import ModelConfig, build_model
from training.tokenizer import Tokenizer

ATOL = 1e-4
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
) * 6


@dataclass
class Exported:
    model: keras.Model
    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    loaded: Any


def _train_and_export(base: Path, level: str, cell: str, layers: int, dropout: float) -> Exported:
    keras.utils.set_random_seed(3)
    tokenizer = Tokenizer(level=level).fit_on_texts([TEXT])
    ids = np.array(tokenizer.encode(TEXT), dtype=np.int32)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, embedding_dim=12, units=24, layers=layers, cell=cell, dropout=dropout
    )
    model = build_model(config)
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seq = 16
    n = (len(ids) - 1) // seq
    x, y = ids[: n * seq].reshape(n, seq), ids[1 : n * seq + 1].reshape(n, seq)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    path = export_version(model, config, tokenizer, str(base), {"test": True})
    return Exported(model, config, tokenizer, path, tf.saved_model.load(path))


# (level, cell, layers, dropout): dropout layers hold seed variables that must not reach the export.
CASES = [("char", "lstm", 2, 0.0), ("word", "lstm", 2, 0.2), ("char", "gru", 1, 0.1), ("char", "rnn", 2, 0.0)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{lv}-{c}-{n}-{d}" for lv, c, n, d in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    level, cell, layers, dropout = request.param
    return _train_and_export(tmp_path_factory.mktemp(f"{level}-{cell}"), level, cell, layers, dropout)


def _prefill(e: Exported, rows: list[list[int]], pad_to: int | None = None) -> dict[str, np.ndarray]:
    width = pad_to or max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    out = e.loaded.signatures["prefill"](
        tokens=tf.constant(tokens), lengths=tf.constant([len(r) for r in rows], tf.int32)
    )
    return {k: v.numpy() for k, v in out.items()}


def _step(e: Exported, tokens: list[int], state: np.ndarray) -> dict[str, np.ndarray]:
    out = e.loaded.signatures["step"](tokens=tf.constant(tokens, tf.int32), state=tf.constant(state))
    return {k: v.numpy() for k, v in out.items()}


def _prompt(e: Exported, text: str) -> list[int]:
    ids = e.tokenizer.encode(text)
    assert len(ids) >= 3
    return ids


def test_signatures_have_the_contract_shapes(exported: Exported) -> None:
    prefill = exported.loaded.signatures["prefill"]
    step = exported.loaded.signatures["step"]
    assert prefill.structured_input_signature[1]["tokens"].shape.as_list() == [None, None]
    assert prefill.structured_input_signature[1]["lengths"].shape.as_list() == [None]
    assert step.structured_input_signature[1]["tokens"].shape.as_list() == [None]
    assert step.structured_input_signature[1]["state"].shape.as_list() == [None, None]
    out = _prefill(exported, [_prompt(exported, "it was the age of")])
    assert out["logits"].shape == (1, exported.tokenizer.vocab_size) and out["logits"].dtype == np.float32
    assert out["state"].shape == (1, exported.config.state_size) and out["state"].dtype == np.float32


def test_step_after_prefill_equals_prefill_of_the_longer_prompt(exported: Exported) -> None:
    p = _prompt(exported, "it was the best of times, it was")
    state = _prefill(exported, [p[:-3]])["state"]
    for i in range(3, 0, -1):  # three steps, each checked against a fresh prefill
        out = _step(exported, [p[-i]], state)
        state = out["state"]
        whole = _prefill(exported, [p[: len(p) - i + 1]])
        np.testing.assert_allclose(out["logits"], whole["logits"], atol=ATOL)
        np.testing.assert_allclose(out["state"], whole["state"], atol=ATOL)
    assert np.abs(out["logits"]).max() > 0.1  # the model says something: the check is not vacuous


def test_right_padding_changes_nothing(exported: Exported) -> None:
    p = _prompt(exported, "it was the epoch of")
    tight = _prefill(exported, [p])
    padded = _prefill(exported, [p], pad_to=len(p) + 9)
    np.testing.assert_allclose(padded["logits"], tight["logits"], atol=ATOL)
    np.testing.assert_allclose(padded["state"], tight["state"], atol=ATOL)


def test_rows_of_different_lengths_in_one_batch_equal_each_row_alone(exported: Exported) -> None:
    rows = [
        _prompt(exported, "it was the worst of times"),
        _prompt(exported, "the age of"),
        _prompt(exported, "it was the epoch of belief, it was the epoch"),
    ]
    together = _prefill(exported, rows)
    for i, row in enumerate(rows):
        alone = _prefill(exported, [row])
        np.testing.assert_allclose(together["logits"][i], alone["logits"][0], atol=ATOL)
        np.testing.assert_allclose(together["state"][i], alone["state"][0], atol=ATOL)
    # One batched step equals one step per row.
    nxt = [int(np.argmax(together["logits"][i])) for i in range(len(rows))]
    batched = _step(exported, nxt, together["state"])
    for i in range(len(rows)):
        single = _step(exported, [nxt[i]], together["state"][i : i + 1])
        np.testing.assert_allclose(batched["logits"][i], single["logits"][0], atol=ATOL)


def test_reloaded_logits_equal_the_in_memory_keras_model(exported: Exported) -> None:
    p = _prompt(exported, "it was the age of wisdom")
    keras_logits = exported.model(np.array([p], np.int32), training=False).numpy()  # (1, t, vocab)
    reloaded = _prefill(exported, [p])
    np.testing.assert_allclose(reloaded["logits"][0], keras_logits[0, -1], atol=ATOL)
    for t in (1, len(p) // 2):  # and at earlier positions, via shorter prompts
        np.testing.assert_allclose(_prefill(exported, [p[:t]])["logits"][0], keras_logits[0, t - 1], atol=ATOL)


def test_assets_hold_the_tokenizer_and_the_model_card(exported: Exported) -> None:
    _, tokenizer, info = load_exported(exported.path)
    assert tokenizer.vocab == exported.tokenizer.vocab and tokenizer.level == exported.tokenizer.level
    assert info["architecture"] == exported.config.to_dict()
    assert info["state_size"] == exported.config.state_size
    assert "created_at" in info and info["test"] is True


def test_a_failure_mid_export_leaves_no_version_behind(tmp_path: Path) -> None:
    tokenizer = Tokenizer().fit_on_texts(["abcdef"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=4, units=8)
    model = build_model(config)
    base = tmp_path / "m"
    seen: list[str] = []

    def fail(tmp: str) -> None:
        seen.append(tmp)
        assert os.path.isfile(os.path.join(tmp, "saved_model.pb"))  # everything was written...
        raise OSError("disk full (simulated)")  # ...and then the export fails before the rename

    with pytest.raises(OSError, match="simulated"):
        export_version(model, config, tokenizer, str(base), {}, before_rename=fail)
    assert seen and not os.path.exists(seen[0])
    assert list_versions(str(base)) == [] and os.listdir(base) == []
    # The next export takes version 1, and the one after that version 2.
    assert export_version(model, config, tokenizer, str(base), {}).endswith(os.sep + "1")
    assert export_version(model, config, tokenizer, str(base), {}).endswith(os.sep + "2")
    assert list_versions(str(base)) == [1, 2]
    os.makedirs(base / ".tmp-other")
    os.makedirs(base / "notes")
    assert list_versions(str(base)) == [1, 2]
    info = json.loads((base / "2" / "assets" / "model.json").read_text())
    assert info["contract_version"] == CONTRACT_VERSION


def test_export_refuses_a_tokenizer_that_does_not_match_the_model(tmp_path: Path) -> None:
    tokenizer = Tokenizer().fit_on_texts(["abcdef"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size + 1, embedding_dim=4, units=8)
    with pytest.raises(ValueError, match="logits"):
        export_version(build_model(config), config, tokenizer, str(tmp_path / "m"), {})
    assert not (tmp_path / "m").exists() or list_versions(str(tmp_path / "m")) == []


def test_prefill_from_reads_on_from_a_state_as_prefill_of_the_whole_prompt(exported: Exported) -> None:
    p = _prompt(exported, "it was the age of wisdom, it was the age of foolishness")
    q = _prompt(exported, "it was the epoch of belief")
    prefill_from = exported.loaded.signatures["prefill_from"]
    # Row 0 reads q after p; row 1 reads p after nothing (zero state), right-padded to the longer of the two.
    heads = _prefill(exported, [p, p[:1]])["state"]
    heads[1] = 0.0
    width = max(len(q), len(p))
    tokens = np.zeros((2, width), np.int32)
    tokens[0, : len(q)] = q
    tokens[1, : len(p)] = p
    out = prefill_from(tokens=tf.constant(tokens), lengths=tf.constant([len(q), len(p)], tf.int32), state=heads)
    whole = _prefill(exported, [p + q])
    alone = _prefill(exported, [p])
    np.testing.assert_allclose(out["logits"].numpy()[0], whole["logits"][0], atol=ATOL)
    np.testing.assert_allclose(out["state"].numpy()[0], whole["state"][0], atol=ATOL)
    np.testing.assert_allclose(out["logits"].numpy()[1], alone["logits"][0], atol=ATOL)
    np.testing.assert_allclose(out["state"].numpy()[1], alone["state"][0], atol=ATOL)


def test_a_contract_1_export_has_no_prefill_from(tmp_path: Path) -> None:
    tokenizer = Tokenizer(level="char").fit_on_texts([TEXT])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=4, units=8)
    model = build_model(config)
    path = export_version(model, config, tokenizer, str(tmp_path), {}, contract_version=1)
    loaded, _, info = load_exported(path)
    assert sorted(loaded.signatures) == ["prefill", "step"] and info["contract_version"] == 1
    with pytest.raises(ValueError, match=r"contract_version is 3, must be one of \(1, 2\)"):
        export_version(model, config, tokenizer, str(tmp_path), {}, contract_version=3)
    assert list_versions(str(tmp_path)) == [1]
