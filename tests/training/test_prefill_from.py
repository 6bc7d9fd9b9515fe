"""Contract version 2's ``prefill_from``: ``textgen check`` shows and checks it, requires it from version 2 only."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tensorflow as tf

from tests.training.broken_versions import place
from training.check import check_version, input_specs, main
from training.contract import MODEL_ASSET, PREFILL, PREFILL_FROM, STEP, ContractError, required_signatures


@pytest.fixture(scope="module")
def good(tiny_model_repo: Path) -> Path:
    return tiny_model_repo / "tiny" / "1"


def resave(path: Path, extra: Callable[[tf.Module], dict] | None = None, contract_version: int | None = None) -> None:
    """Save the version's SavedModel again with ``prefill`` and ``step`` (plus ``extra``), keeping its assets."""
    loaded = tf.saved_model.load(str(path))
    signatures = {name: loaded.signatures[name] for name in (PREFILL.name, STEP.name)}
    if extra is not None:
        signatures.update(extra(loaded))
    staging = path.parent / "staging"
    tf.saved_model.save(loaded, str(staging), signatures=signatures)
    shutil.copytree(path / "assets", staging / "assets", dirs_exist_ok=True)
    shutil.rmtree(path)
    staging.rename(path)
    if contract_version is not None:
        info_path = path / "assets" / MODEL_ASSET
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["contract_version"] = contract_version
        info_path.write_text(json.dumps(info), encoding="utf-8")


def test_a_version_2_export_shows_prefill_from_and_passes(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(good)]) == 0
    out = capsys.readouterr().out
    assert "signatures prefill, prefill_from, step;" in out and out.rstrip().endswith("contract version 2")
    assert check_version(str(good)).prefill_from is not None
    assert [sig.name for sig in required_signatures(2)] == ["step", "prefill", "prefill_from"]
    assert [sig.name for sig in required_signatures(1)] == ["step", "prefill"]


def test_version_2_without_prefill_from_fails_naming_it_and_version_1_without_it_passes(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = place(good, tmp_path, "tiny", 1)
    resave(path)
    message = "signature 'prefill_from' is missing (found ['prefill', 'step']); contract version 2 requires it"
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: error: {message}\n"
    with pytest.raises(ContractError, match=re.escape(message)):
        check_version(str(path))
    info_path = path / "assets" / MODEL_ASSET
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info["contract_version"] = 1
    info_path.write_text(json.dumps(info), encoding="utf-8")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok: signatures prefill, step;" in out and out.rstrip().endswith("contract version 1")
    checked = check_version(str(path))
    assert checked.prefill_from is None and checked.signature_names == ["prefill", "step"]


def test_a_prefill_from_that_ignores_its_state_fails_the_check(good: Path, tmp_path: Path) -> None:
    path = place(good, tmp_path, "tiny", 1)

    def ignoring_state(loaded: tf.Module) -> dict:
        prefill = loaded.signatures[PREFILL.name]

        @tf.function(input_signature=input_specs(PREFILL_FROM))
        def prefill_from(tokens: tf.Tensor, lengths: tf.Tensor, state: tf.Tensor) -> dict:
            del state
            return prefill(tokens=tokens, lengths=lengths)

        loaded.ignoring = prefill_from  # type: ignore[attr-defined]
        return {PREFILL_FROM.name: prefill_from}

    resave(path, ignoring_state)
    with pytest.raises(ContractError, match=r"^prefill_from from prefill's state does not continue prefill"):
        check_version(str(path))


def test_a_prefill_from_with_the_wrong_inputs_fails_naming_them(good: Path, tmp_path: Path) -> None:
    path = place(good, tmp_path, "tiny", 1)

    def without_state(loaded: tf.Module) -> dict:
        return {PREFILL_FROM.name: loaded.signatures[PREFILL.name]}

    resave(path, without_state, contract_version=1)  # checked when present, whatever the version
    with pytest.raises(
        ContractError,
        match=re.escape("signature 'prefill_from' has inputs ['lengths', 'tokens'], the contract needs"),
    ):
        check_version(str(path))
