"""``TrainConfig``: every setting of a training run, and the ``textgen train`` flags that build it.

Presets give the defaults (``quick`` trains in about a minute on two CPU cores,
``small`` is a better model for about half an hour); any flag given explicitly
wins over its preset. ``parse_args`` raises ``UsageError`` with one message
naming the flag, the value and the limit, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, NoReturn

from training.model import CELLS
from training.tf_runtime import add_log_level_flag
from training.tokenizer import LEVELS

DEFAULT_OUT = os.path.join("models", "textgen")
DEFAULT_WORD_MAX_VOCAB = 10_000

PRESETS: dict[str, dict[str, Any]] = {
    # About a minute on a 2-core CPU on the embedded corpus (measured in docs/training.md).
    "quick": {
        "epochs": 2,
        "seq_len": 100,
        "stride": 100,
        "layers": 1,
        "units": 192,
        "embedding_dim": 48,
        "batch_size": 32,
        "dropout": 0.0,
        "learning_rate": 0.01,
    },
    # Under 30 minutes on a 2-core CPU on the embedded corpus (measured in docs/training.md).
    "small": {
        "epochs": 10,
        "seq_len": 100,
        "stride": 50,
        "layers": 2,
        "units": 320,
        "embedding_dim": 64,
        "batch_size": 64,
        "dropout": 0.1,
        "learning_rate": 0.004,
    },
}


class UsageError(ValueError):
    """A flag value that cannot be used; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run, built in ``main()`` and passed down."""

    corpus: tuple[str, ...] = ()
    level: str = "char"
    out: str = DEFAULT_OUT
    preset: str = "quick"
    epochs: int = 2
    seq_len: int = 100
    stride: int = 100
    layers: int = 1
    units: int = 192
    embedding_dim: int = 48
    cell: str = "lstm"
    batch_size: int = 32
    dropout: float = 0.0
    learning_rate: float = 0.01
    validation_fraction: float = 0.05
    max_vocab: int | None = None
    lowercase: bool = False
    seed: int = 1234
    checkpoint_dir: str = ""
    log_dir: str = ""
    resume: bool = False
    patience: int = 3
    max_steps_per_epoch: int | None = None
    mixed_precision: bool = False
    sample_tokens: int = 40

    def __post_init__(self) -> None:
        for name in ("epochs", "seq_len", "stride", "layers", "units", "embedding_dim", "batch_size", "patience"):
            value = getattr(self, name)
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.level not in LEVELS:
            raise UsageError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.cell not in CELLS:
            raise UsageError(f"--cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not (0.0 <= self.validation_fraction < 1.0):
            raise UsageError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_vocab is not None and self.max_vocab < 3:
            raise UsageError(f"--max-vocab must be at least 3 (padding, OOV and one token), got {self.max_vocab}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise UsageError(f"--max-steps-per-epoch must be at least 1, got {self.max_steps_per_epoch}")
        if self.sample_tokens < 0:
            raise UsageError(f"--sample-tokens must be at least 0, got {self.sample_tokens}")
        if not self.out:
            raise UsageError("--out must name a folder, got ''")

    @property
    def name(self) -> str:
        """The model's name: the last part of ``out`` (``models/textgen`` -> ``textgen``)."""
        return os.path.basename(os.path.normpath(self.out)) or "model"

    @property
    def vocab_cap(self) -> int | None:
        if self.max_vocab is not None:
            return self.max_vocab
        return DEFAULT_WORD_MAX_VOCAB if self.level == "word" else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["corpus"] = list(self.corpus)
        return data

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (the data and the network, not the epoch count)."""
        keys = (
            "corpus level seq_len stride layers units embedding_dim cell batch_size dropout "
            "validation_fraction max_vocab lowercase seed max_steps_per_epoch"
        ).split()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keys}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="textgen train",
        description="Fit a character- or word-level LSTM language model on a corpus and export the next "
        "version of it as a SavedModel (the textgen contract).",
    )
    add = p.add_argument
    add(
        "--corpus",
        action="append",
        default=None,
        metavar="PATH",
        help="a UTF-8 text file or a folder of .txt files; repeatable (default: the embedded corpus)",
    )
    add(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="default settings: quick (about a minute on 2 CPU cores) or small (under 30 minutes); flags override it",
    )
    add("--level", choices=LEVELS, default="char", help="tokens are characters or words (default: char)")
    add(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"the model's base folder; each run exports the next version number in it (default: {DEFAULT_OUT})",
    )
    add("--epochs", type=_positive_int)
    add("--seq-len", type=_positive_int, help="tokens per training window")
    add("--stride", type=_positive_int, help="tokens between the starts of two windows (default: preset)")
    add("--layers", type=_positive_int, help="stacked recurrent layers")
    add("--units", type=_positive_int, help="units per recurrent layer")
    add("--embedding-dim", type=_positive_int)
    add("--cell", choices=CELLS, default="lstm", help="recurrent cell (default: lstm)")
    add("--batch-size", type=_positive_int, help="global batch size (split across replicas)")
    add("--dropout", type=_number)
    add("--learning-rate", type=_number)
    add(
        "--validation-fraction",
        type=_number,
        default=0.05,
        help="the tail of the corpus held out for validation (default: 0.05)",
    )
    add(
        "--max-vocab",
        type=_positive_int,
        help="vocabulary cap including padding and OOV; rarer tokens become OOV "
        f"(default: none for char, {DEFAULT_WORD_MAX_VOCAB} for word)",
    )
    add("--lowercase", action="store_true", help="lowercase the corpus before tokenizing")
    add("--seed", type=int, default=1234)
    add(
        "--checkpoint-dir",
        metavar="DIR",
        default="",
        help="where each epoch's checkpoint goes (default: runs/<name>/checkpoints)",
    )
    add("--log-dir", metavar="DIR", default="", help="TensorBoard logs (default: runs/<name>/logs)")
    add(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir, skipping the epochs it finished",
    )
    add(
        "--patience",
        type=_positive_int,
        default=3,
        help="early stopping: epochs without a better validation loss before stopping (default: 3)",
    )
    add("--max-steps-per-epoch", type=_positive_int, help="cap the batches per epoch (quick experiments, tests)")
    add("--mixed-precision", action="store_true", help="mixed_float16 on a GPU (ignored, with a warning, on a CPU)")
    add(
        "--sample-tokens",
        type=_non_negative_int,
        default=40,
        help="tokens to generate from the reloaded export at the end (default: 40)",
    )
    add_log_level_flag(p)
    return p


def parse_args(argv: list[str]) -> TrainConfig:
    """Flags -> ``TrainConfig`` (preset values fill whatever was not given)."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = dict(PRESETS[args.preset])
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values["corpus"] = tuple(args.corpus or ())
    name = os.path.basename(os.path.normpath(args.out)) or "model"
    values["checkpoint_dir"] = args.checkpoint_dir or os.path.join("runs", name, "checkpoints")
    values["log_dir"] = args.log_dir or os.path.join("runs", name, "logs")
    return TrainConfig(**values)
