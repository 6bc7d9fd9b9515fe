"""Checkpoints of a training run: ``progress.json`` and the weights files it names, written atomically.

Each checkpoint is ``<name>.weights.h5`` (model and optimizer state) and then
``progress.json`` naming it, both written to a temporary name and renamed, so a
run killed at any moment resumes from its last checkpoint. Only the last and
the best weights are kept. Under a multi-worker strategy every worker saves
(reading distributed variables may take part in collectives), but only the
chief keeps its files.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from training.config import UsageError

PROGRESS_FILE = "progress.json"
TOKENIZER_FILE = "tokenizer.json"
PROGRESS_FORMAT = "textgen.progress/1"
WEIGHTS_GLOB = "*.weights.h5"


@dataclass
class Progress:
    """What ``progress.json`` holds: the finished epochs and where their weights are."""

    fingerprint: dict[str, Any]
    epochs_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_weights: str = ""
    best_weights: str = ""
    best_val_loss: float | None = None
    best_epoch: int = 0
    wait: int = 0
    stopped_early: bool = False
    exported: str = ""
    # A budgeted run (--time-budget) counts optimizer steps and the seconds of its budget used so far.
    steps_done: int = 0
    budget_used_s: float = 0.0
    best_step: int = 0
    plan: dict[str, Any] = field(default_factory=dict)
    sizing: dict[str, Any] = field(default_factory=dict)
    final_validation: dict[str, Any] = field(default_factory=dict)  # the best weights on the whole tail

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROGRESS_FORMAT, **self.__dict__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        if data.get("format") != PROGRESS_FORMAT:
            raise ValueError(f"progress format must be {PROGRESS_FORMAT!r}, got {data.get('format')!r}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_progress(checkpoint_dir: str) -> Progress | None:
    path = os.path.join(checkpoint_dir, PROGRESS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return Progress.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--resume: cannot read {path}: {exc}") from exc


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}.json")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(model: keras.Model, checkpoint_dir: str, weights: str, progress: Progress, is_chief: bool) -> None:
    """Write ``weights`` and then ``progress.json`` (which must already name it), keeping the last and best."""
    target_dir = checkpoint_dir if is_chief else tempfile.mkdtemp(prefix="textgen-ckpt-")
    tmp = os.path.join(target_dir, f".tmp-{uuid.uuid4().hex}.weights.h5")
    _check_room(model, target_dir)
    model.save_weights(tmp)
    if not is_chief:
        shutil.rmtree(target_dir, ignore_errors=True)
        return
    os.replace(tmp, os.path.join(target_dir, weights))
    write_json_atomic(os.path.join(target_dir, PROGRESS_FILE), progress.to_dict())
    keep = {progress.last_weights, progress.best_weights}
    for path in glob.glob(os.path.join(target_dir, WEIGHTS_GLOB)):
        if os.path.basename(path) not in keep:
            os.remove(path)


def clean_checkpoints(checkpoint_dir: str) -> None:
    for pattern in (WEIGHTS_GLOB, ".tmp-*", PROGRESS_FILE, TOKENIZER_FILE):
        for path in glob.glob(os.path.join(checkpoint_dir, pattern)):
            os.remove(path)


def _check_room(model: keras.Model, target_dir: str) -> None:
    """Refuse a checkpoint that will not fit: HDF5 crashes the process (SIGSEGV) on a full disk mid-write."""
    previous = [os.path.getsize(p) for p in glob.glob(os.path.join(target_dir, WEIGHTS_GLOB))]
    weights = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    needed = max(previous + [2 * weights + 64 * 1024])
    free = shutil.disk_usage(target_dir).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"no room for a checkpoint in {target_dir}: {free} bytes free, about {needed} needed; "
            "free some space and continue with --resume",
        )
