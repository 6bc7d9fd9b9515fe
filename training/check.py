"""``textgen check DIR [DIR ...]``: check version folders against the SavedModel contract.

``check_version(path)`` is the check the server runs on every version before it takes traffic
(``service/model_repository.py`` calls it), so a job that writes a version can run the same check
before publishing it. It loads the SavedModel, checks the assets and signatures against
``training/contract.py``, and makes one real ``prefill`` and ``step`` call to find the vocabulary
size V and the state size S; when the version has ``prefill_from`` (required from contract
version 2), two real calls check that it continues ``prefill``.

``DIR`` is a version folder (``models/tiny/3``) or a model folder, whose every version is
checked. One line per version; exit 0 when all pass, 2 when any fails (or a folder is missing).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.types.experimental import ConcreteFunction

from training.contract import (
    ASSETS_DIR,
    MODEL_ASSET,
    PREFILL_FROM,
    SAVED_MODEL_FILE,
    SIGNATURE_SINCE,
    SIGNATURES,
    TOKENIZER_ASSET,
    ContractError,
    Signature,
    TensorSpec,
    check_model_info,
    is_version_name,
    list_versions,
    read_json_asset,
    required_signatures,
)
from training.tf_runtime import add_log_level_flag
from training.tokenizer import Tokenizer

_REASON_CHARS = 500
# How far prefill_from's logits may be from prefill's for the same tokens (relative to the largest logit).
_CONTINUE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CheckedVersion:
    """A version folder that passed the contract check, loaded."""

    path: str
    saved: Any  # the loaded SavedModel: it owns the variables the signatures read
    prefill: ConcreteFunction  # prefill(tokens=int32[B,T], lengths=int32[B]) -> {logits, state}
    step: ConcreteFunction  # step(tokens=int32[B], state=float32[B,S]) -> {logits, state}
    tokenizer: Tokenizer
    info: dict[str, Any]  # assets/model.json
    vocab_size: int  # V
    state_size: int  # S
    # prefill_from(tokens=int32[B,T], lengths=int32[B], state=float32[B,S]) -> {logits, state}; None before contract 2
    prefill_from: ConcreteFunction | None = None

    @property
    def signature_names(self) -> list[str]:
        """Every signature the SavedModel exports (``prefill`` and ``step`` at least)."""
        return sorted(self.saved.signatures)


def input_specs(sig: Signature) -> list[tf.TensorSpec]:
    """The contract's inputs of ``sig`` as ``tf.TensorSpec``s, in argument order (export's input signatures)."""
    return [tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name) for spec in sig.inputs]


def failure_reason(exc: BaseException) -> str:
    """What is wrong, in one line: the first line of the error (TensorFlow's run long), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:_REASON_CHARS] if text else type(exc).__name__


def _check_spec(where: str, got: Any, want: TensorSpec) -> None:
    if got.dtype.name != want.dtype or got.shape.rank != want.rank:
        raise ContractError(
            f"{where} is {got.dtype.name}{got.shape}, the contract needs {want.dtype} of rank {want.rank}"
        )


def _check_signature(fn: Any, sig: Signature) -> None:
    """Names, dtypes, ranks and a ``None`` batch of every input; the outputs' names, dtypes and ranks."""
    args, kwargs = fn.structured_input_signature
    if args:
        raise ContractError(
            f"signature {sig.name!r} takes positional inputs; the contract names them {sig.input_names}"
        )
    specs = dict(kwargs)
    if set(specs) != set(sig.input_names):
        raise ContractError(f"signature {sig.name!r} has inputs {sorted(specs)}, the contract needs {sig.input_names}")
    for want in sig.inputs:
        got = specs[want.name]
        _check_spec(f"signature {sig.name!r} input {want.name!r}", got, want)
        if got.shape[0] is not None:
            raise ContractError(
                f"signature {sig.name!r} input {want.name!r} has a fixed batch size {got.shape[0]}, needs None"
            )
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or not set(sig.output_names) <= set(outputs):
        found = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ContractError(f"signature {sig.name!r} returns {found}, the contract needs {sig.output_names}")
    for want in sig.outputs:
        _check_spec(f"signature {sig.name!r} output {want.name!r}", outputs[want.name], want)


def check_version(path: str) -> CheckedVersion:
    """Load one version folder and check it against the contract; what the server runs before serving it.

    Raises ``ContractError`` (or whatever TensorFlow raises for an unreadable SavedModel) with a
    message saying what is wrong; ``failure_reason`` turns either into one line.
    """
    if not os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
        raise ContractError(f"{SAVED_MODEL_FILE} is missing")
    tokenizer_json = read_json_asset(path, TOKENIZER_ASSET)
    try:
        tokenizer = Tokenizer.from_dict(tokenizer_json)
    except ValueError as exc:
        raise ContractError(f"{ASSETS_DIR}/{TOKENIZER_ASSET} is not a valid tokenizer: {exc}") from exc
    info = read_json_asset(path, MODEL_ASSET)
    check_model_info(info)
    saved = tf.saved_model.load(path)
    signatures = getattr(saved, "signatures", {})
    required = required_signatures(info["contract_version"])
    for sig in SIGNATURES:
        if sig.name in signatures:
            _check_signature(signatures[sig.name], sig)
        elif sig in required:
            since = SIGNATURE_SINCE[sig.name]
            needs = f"; contract version {info['contract_version']} requires it" if since > 1 else ""
            raise ContractError(f"signature {sig.name!r} is missing (found {sorted(signatures)}){needs}")
    prefill, step = signatures["prefill"], signatures["step"]

    # A real call finds V and S and proves the variables are there.
    out = prefill(tokens=tf.constant([tokenizer.start_ids[:1]], tf.int32), lengths=tf.constant([1], tf.int32))
    vocab_size = int(out["logits"].shape[-1])
    state_size = int(out["state"].shape[-1])
    if vocab_size != tokenizer.vocab_size:
        raise ContractError(f"the model has {vocab_size} logits but its tokenizer has {tokenizer.vocab_size} tokens")
    if state_size < 1:
        raise ContractError(f"prefill returned a state of size {state_size}")
    if info["state_size"] != state_size:
        raise ContractError(
            f"{ASSETS_DIR}/{MODEL_ASSET} says state_size {info['state_size']}, prefill returns {state_size}"
        )
    if not np.isfinite(out["logits"].numpy()).all():
        raise ContractError("prefill returned non-finite logits for the start text")
    stepped = step(tokens=tf.constant([tokenizer.start_ids[0]], tf.int32), state=tf.zeros([1, state_size]))
    if tuple(stepped["state"].shape) != (1, state_size) or tuple(stepped["logits"].shape) != (1, vocab_size):
        raise ContractError(
            f"step returned logits {tuple(stepped['logits'].shape)} and state {tuple(stepped['state'].shape)}, "
            f"expected (1, {vocab_size}) and (1, {state_size})"
        )
    if not np.isfinite(stepped["logits"].numpy()).all():
        raise ContractError("step returned non-finite logits from the start state")
    prefill_from = signatures.get(PREFILL_FROM.name)
    if prefill_from is not None:
        _check_prefill_from(prefill, prefill_from, tokenizer.start_ids[0], state_size)
    return CheckedVersion(path, saved, prefill, step, tokenizer, info, vocab_size, state_size, prefill_from)


def _check_prefill_from(prefill: ConcreteFunction, prefill_from: ConcreteFunction, token: int, state_size: int) -> None:
    """``prefill_from`` from a zero state is ``prefill``, and from ``prefill(p).state`` it reads on after ``p``."""
    one, ones = tf.constant([[token]], tf.int32), tf.constant([1], tf.int32)
    first = prefill(tokens=one, lengths=ones)
    both = prefill(tokens=tf.constant([[token, token]], tf.int32), lengths=tf.constant([2], tf.int32))
    cases = (
        ("a zero state", prefill_from(tokens=one, lengths=ones, state=tf.zeros([1, state_size])), first),
        ("prefill's state", prefill_from(tokens=one, lengths=ones, state=first["state"]), both),
    )
    for start, got, want in cases:
        if tuple(got["state"].shape) != (1, state_size) or got["logits"].shape != want["logits"].shape:
            raise ContractError(
                f"prefill_from returned logits {tuple(got['logits'].shape)} and state {tuple(got['state'].shape)}, "
                f"expected {tuple(want['logits'].shape)} and (1, {state_size})"
            )
        got_logits, want_logits = got["logits"].numpy(), want["logits"].numpy()
        gap = float(np.max(np.abs(got_logits - want_logits))) if np.isfinite(got_logits).all() else float("inf")
        if not gap <= _CONTINUE_TOLERANCE * max(1.0, float(np.max(np.abs(want_logits)))):
            raise ContractError(
                f"prefill_from from {start} does not continue prefill: its logits differ by {gap:.3g} "
                f"(tolerance {_CONTINUE_TOLERANCE} of the largest logit)"
            )


def describe(checked: CheckedVersion) -> str:
    """What ``textgen check`` prints for a version that passes."""
    return (
        f"ok: signatures {', '.join(checked.signature_names)}; V={checked.vocab_size} S={checked.state_size}; "
        f"level {checked.tokenizer.level}; contract version {checked.info['contract_version']}"
    )


def versions_to_check(folder: str) -> list[str]:
    """The version folders ``textgen check FOLDER`` checks: FOLDER itself, or every version in a model folder.

    ``ContractError`` when FOLDER is missing, or is neither a version folder nor holds any.
    """
    if not os.path.isdir(folder):
        raise ContractError("no such folder")
    if os.path.exists(os.path.join(folder, SAVED_MODEL_FILE)) or os.path.isdir(os.path.join(folder, ASSETS_DIR)):
        return [folder]
    versions = list_versions(folder)
    if versions:
        return [os.path.join(folder, str(v)) for v in versions]
    if is_version_name(os.path.basename(os.path.normpath(folder))):
        return [folder]  # an empty or broken version folder: the check says what is missing
    raise ContractError(f"neither a version folder ({SAVED_MODEL_FILE}) nor a model folder holding numbered versions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="textgen check",
        description="Check version folders against the SavedModel contract (what the server checks before serving).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a version folder, or a model folder (every version)")
    add_log_level_flag(parser)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    failed = False
    for folder in args.dirs:
        try:
            paths = versions_to_check(folder)
        except ContractError as exc:
            print(f"{folder}: error: {exc}", file=sys.stderr)
            failed = True
            continue
        for path in paths:
            try:
                checked = check_version(path)
            except Exception as exc:  # anything that stops the server serving it
                print(f"{path}: error: {failure_reason(exc)}", file=sys.stderr)
                failed = True
                continue
            print(f"{path}: {describe(checked)}", flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
