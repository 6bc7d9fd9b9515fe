"""The contract module against a real export, and its version listing on real folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from training.contract import (
    CONTRACT_VERSION,
    MODEL_ASSET,
    MODEL_INFO_KEYS,
    REQUIRED_MODEL_INFO_KEYS,
    SAVED_MODEL_FILE,
    SIGNATURES,
    TOKENIZER_ASSET,
    ContractError,
    asset_path,
    check_model_info,
    is_visible_model_name,
    list_versions,
    next_version,
    read_json_asset,
)


@pytest.fixture(scope="module")
def version(tiny_model_repo: Path) -> Path:
    return tiny_model_repo / "tiny" / "1"


def test_an_export_holds_the_contracts_files(version: Path) -> None:
    assert (version / SAVED_MODEL_FILE).is_file()
    assert Path(asset_path(str(version), TOKENIZER_ASSET)) == version / "assets" / "tokenizer.json"
    assert Path(asset_path(str(version), TOKENIZER_ASSET)).is_file()
    assert Path(asset_path(str(version), MODEL_ASSET)).is_file()


def test_an_export_writes_the_contracts_model_json_keys(version: Path) -> None:
    info = read_json_asset(str(version), MODEL_ASSET)
    # What export writes is the contract's keys plus the metadata it was given (the fixture's).
    assert set(info) == set(MODEL_INFO_KEYS) | {"fixture"}
    assert set(REQUIRED_MODEL_INFO_KEYS) <= set(MODEL_INFO_KEYS)
    assert info["contract_version"] == CONTRACT_VERSION
    check_model_info(info)


def test_an_exports_signatures_are_the_contracts_by_name_dtype_and_shape(version: Path) -> None:
    loaded = tf.saved_model.load(str(version))
    assert sorted(loaded.signatures) == sorted(sig.name for sig in SIGNATURES) == ["prefill", "prefill_from", "step"]
    for sig in SIGNATURES:
        fn = loaded.signatures[sig.name]
        args, inputs = fn.structured_input_signature
        assert args == ()
        assert {k: (v.dtype.name, tuple(v.shape.as_list())) for k, v in inputs.items()} == {
            spec.name: (spec.dtype, spec.shape) for spec in sig.inputs
        }
        outputs = fn.structured_outputs
        assert {k: (v.dtype.name, v.shape.rank) for k, v in outputs.items()} == {
            spec.name: (spec.dtype, spec.rank) for spec in sig.outputs
        }
    step = next(sig for sig in SIGNATURES if sig.name == "step")
    assert [str(spec) for spec in step.inputs] == ["tokens int32[B]", "state float32[B,S]"]
    assert all(spec.shape[0] is None and spec.axes[0] == "B" for sig in SIGNATURES for spec in sig.inputs)


def test_list_versions_takes_positive_numbered_folders_only(tmp_path: Path) -> None:
    for name in ("1", "2", "10", "0", "007", ".tmp-0123abcd", ".5", "x1", "-4", "+6", "\u0663", "12.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file named by digits is not a version")
    assert list_versions(str(tmp_path)) == [1, 2, 10]
    assert next_version(str(tmp_path)) == 11


def test_list_versions_and_next_version_of_a_missing_or_empty_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert list_versions(str(missing)) == [] and next_version(str(missing)) == 1
    (tmp_path / "only-hidden" / ".tmp-x").mkdir(parents=True)
    assert list_versions(str(tmp_path / "only-hidden")) == [] and next_version(str(tmp_path / "only-hidden")) == 1
    (tmp_path / "file").write_text("x")
    assert list_versions(str(tmp_path / "file")) == []


def test_visible_model_names() -> None:
    assert is_visible_model_name("tiny") and is_visible_model_name("my.model")
    assert not any(is_visible_model_name(n) for n in (".hidden", "_private", "model.tmp", "model~"))


def test_reading_a_json_asset_names_the_asset_and_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"^assets/model.json is missing$"):
        read_json_asset(str(tmp_path), MODEL_ASSET)
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / MODEL_ASSET).write_text("{not json")
    with pytest.raises(ContractError, match=r"^assets/model.json is not readable JSON: "):
        read_json_asset(str(tmp_path), MODEL_ASSET)
    (tmp_path / "assets" / MODEL_ASSET).write_text(json.dumps([1, 2]))
    with pytest.raises(ContractError, match=r"^assets/model.json must hold a JSON object, not list$"):
        read_json_asset(str(tmp_path), MODEL_ASSET)


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"state_size": 4}, "lacks contract_version"),
        ({"contract_version": 1}, "lacks state_size"),
        ({"contract_version": 3, "state_size": 4}, "contract_version is 3; this textgen reads 1 or 2"),
        ({"contract_version": 2.0, "state_size": 4}, "contract_version is 2.0; this textgen reads 1 or 2"),
        ({"contract_version": True, "state_size": 4}, "contract_version is True"),
        ({"contract_version": 1, "state_size": "4"}, "state_size is '4', needs a positive integer"),
        ({"contract_version": 1, "state_size": 0}, "state_size is 0"),
    ],
)
def test_model_info_needs_the_required_keys(info: dict, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        check_model_info(info)


def test_the_contract_module_imports_no_tensorflow() -> None:
    code = "import sys, training.contract; sys.exit('tensorflow' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
