"""The SavedModel contract as data: what a version folder holds, named once, free of TensorFlow.

docs/contract.md explains the contract; this module is where its names live. ``training/export.py``
writes it, ``training/check.py`` checks a folder against it (``textgen check``, and the server's
loader runs the same check), and anything that lists versions uses ``list_versions`` here.

A model folder holds numbered version folders::

    <model>/<version>/saved_model.pb
    <model>/<version>/variables/
    <model>/<version>/assets/tokenizer.json
    <model>/<version>/assets/model.json

Stdlib only, so a job that only lists or names versions does not load TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

# The contract version ``training/export.py`` writes; a loader reads every version in CONTRACT_VERSIONS.
# Version 2 adds the ``prefill_from`` signature; version 1 exports (without it) stay valid.
CONTRACT_VERSION = 2
CONTRACT_VERSIONS = (1, 2)

SAVED_MODEL_FILE = "saved_model.pb"
ASSETS_DIR = "assets"
TOKENIZER_ASSET = "tokenizer.json"
MODEL_ASSET = "model.json"


class ContractError(ValueError):
    """A version folder does not meet the SavedModel contract; the message says how."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature: its name, dtype name and shape (``None`` = any size)."""

    name: str
    dtype: str  # a TensorFlow dtype name: "int32", "float32"
    axes: tuple[str, ...]  # what each axis is: "B" batch, "T" prompt length, "S" state size, "V" vocabulary

    @property
    def shape(self) -> tuple[None, ...]:
        """Every axis of a contract signature is ``None``: batch, prompt length, S and V vary by call or model."""
        return tuple(None for _ in self.axes)

    @property
    def rank(self) -> int:
        return len(self.axes)

    def __str__(self) -> str:
        return f"{self.name} {self.dtype}[{','.join(self.axes)}]"


@dataclass(frozen=True)
class Signature:
    """A signature the SavedModel must export; axis 0 of every input and output is the batch."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return sorted(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> list[str]:
        return sorted(spec.name for spec in self.outputs)


OUTPUTS = (TensorSpec("logits", "float32", ("B", "V")), TensorSpec("state", "float32", ("B", "S")))
PREFILL = Signature(
    "prefill",
    inputs=(TensorSpec("tokens", "int32", ("B", "T")), TensorSpec("lengths", "int32", ("B",))),
    outputs=OUTPUTS,
)
STEP = Signature(
    "step",
    inputs=(TensorSpec("tokens", "int32", ("B",)), TensorSpec("state", "float32", ("B", "S"))),
    outputs=OUTPUTS,
)
PREFILL_FROM = Signature(
    "prefill_from",
    inputs=(
        TensorSpec("tokens", "int32", ("B", "T")),
        TensorSpec("lengths", "int32", ("B",)),
        TensorSpec("state", "float32", ("B", "S")),
    ),
    outputs=OUTPUTS,
)
# Every signature the contract names, in the order a loader checks them.
SIGNATURES = (STEP, PREFILL, PREFILL_FROM)
# The contract version from which each signature is required; a version that has one earlier is checked too.
SIGNATURE_SINCE = {STEP.name: 1, PREFILL.name: 1, PREFILL_FROM.name: 2}

# The keys export writes to model.json (``textgen train`` adds its training facts beside them).
MODEL_INFO_KEYS = ("contract_version", "architecture", "state_size", "step_input_table", "level", "created_at")
# The keys a loader requires: which contract the version meets, and its state size S.
REQUIRED_MODEL_INFO_KEYS = ("contract_version", "state_size")


def required_signatures(contract_version: int) -> tuple[Signature, ...]:
    """The signatures an export of ``contract_version`` must have (``prefill_from`` from version 2)."""
    return tuple(sig for sig in SIGNATURES if SIGNATURE_SINCE[sig.name] <= contract_version)


def is_version_name(name: str) -> bool:
    """A version folder's name: a positive decimal integer in ASCII digits, no sign, no leading zero."""
    return name.isascii() and name.isdigit() and not name.startswith("0")


def list_versions(base_dir: str) -> list[int]:
    """The version numbers in a model folder, ascending; [] when it is missing or holds none.

    Only folders named by ``is_version_name`` count: files named by digits, ``0``, hidden and
    temporary folders (the exporter's ``.tmp-<hex>``) and anything else are ignored.
    """
    try:
        names = os.listdir(base_dir)
    except OSError:
        return []
    return sorted(int(n) for n in names if is_version_name(n) and os.path.isdir(os.path.join(base_dir, n)))


def next_version(base_dir: str) -> int:
    """The number a new version of ``base_dir`` takes: one past the newest, 1 for the first."""
    versions = list_versions(base_dir)
    return versions[-1] + 1 if versions else 1


def is_visible_model_name(name: str) -> bool:
    """Whether a folder in a model repository is a model: not hidden, private or an editor's temporary."""
    return not name.startswith((".", "_")) and not name.endswith((".tmp", "~"))


def asset_path(version_dir: str, asset: str) -> str:
    """Where an asset (``TOKENIZER_ASSET``, ``MODEL_ASSET``) of a version folder lives."""
    return os.path.join(version_dir, ASSETS_DIR, asset)


def read_json_asset(version_dir: str, asset: str) -> dict[str, Any]:
    """A version's JSON asset as a dict; ``ContractError`` naming the asset when it is missing or not a JSON object."""
    where = f"{ASSETS_DIR}/{asset}"
    try:
        with open(asset_path(version_dir, asset), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise ContractError(f"{where} is missing") from exc
    except (OSError, ValueError) as exc:
        raise ContractError(f"{where} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError(f"{where} must hold a JSON object, not {type(data).__name__}")
    return data


def check_model_info(info: dict[str, Any]) -> None:
    """``ContractError`` unless model.json has the required keys and names a contract version this textgen reads."""
    where = f"{ASSETS_DIR}/{MODEL_ASSET}"
    missing = [key for key in REQUIRED_MODEL_INFO_KEYS if key not in info]
    if missing:
        raise ContractError(f"{where} lacks {', '.join(missing)} (required: {', '.join(REQUIRED_MODEL_INFO_KEYS)})")
    version = info["contract_version"]
    if version not in CONTRACT_VERSIONS or not isinstance(version, int) or isinstance(version, bool):
        readable = " or ".join(str(v) for v in CONTRACT_VERSIONS)
        raise ContractError(f"{where} contract_version is {version!r}; this textgen reads {readable}")
    state_size = info["state_size"]
    if not isinstance(state_size, int) or isinstance(state_size, bool) or state_size < 1:
        raise ContractError(f"{where} state_size is {state_size!r}, needs a positive integer")
