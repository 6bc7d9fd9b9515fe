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

from training.budget import DECAY_SHARE
from training.model import CELLS, DROPOUT_MASKS
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


# A budgeted run (--time-budget) without --preset: small's windows and batch (the sizing rule
# replaces its network), and the learning rate, schedule, optimiser and regularisation that
# docs/training.md#what-each-change-buys measured best.
BUDGET_DEFAULTS: dict[str, Any] = {
    **PRESETS["small"],
    "epochs": 1,  # unused: a budgeted run counts steps
    "learning_rate": 0.008,
    "schedule": "wsd",
    "weight_decay": 0.0,
    "clipping": "per-variable",
    "stateful": False,
    "dropout_mask": "sequence",
    "weight_drop": 0.0,
    "weight_average": 0.0,
}
# What every budgeted run takes from BUDGET_DEFAULTS, --preset or not.
BUDGET_OPTIMISER = (
    "schedule",
    "weight_decay",
    "clipping",
    "stateful",
    "dropout_mask",
    "weight_drop",
    "weight_average",
)
SIZE_FLAGS = ("layers", "units", "embedding_dim", "dropout")
SCHEDULES = ("cosine", "wsd", "constant")
CLIPPING = ("global", "per-variable", "none")
# Without --clip-norm: global-norm clipping at 1.0, per-variable at 5.0 (the presets' Adam(clipnorm=5.0)).
DEFAULT_CLIP_NORM = {"global": 1.0, "per-variable": 5.0, "none": 0.0}


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
    time_budget: float | None = None  # seconds from process start to the export being done
    auto_size: bool = False  # the sizing rule picks layers, units, embedding_dim and dropout
    schedule: str = "constant"  # the learning rate of a budgeted run; epoch runs keep it constant
    decay_share: float = DECAY_SHARE  # wsd: the last share of the steps the learning rate decays over
    weight_decay: float = 0.0  # AdamW's decoupled decay; 0 is Adam
    clipping: str = "per-variable"
    clip_norm: float = 5.0
    stateful: bool = False  # truncated BPTT: the state carries across consecutive windows
    dropout_mask: str = "token"  # a new dropout mask at each position, or one per window (model.py)
    weight_drop: float = 0.0  # DropConnect on the LSTM's recurrent kernel (model.py)
    weight_average: float = 0.0  # budgeted runs: the horizon of the weights' moving average, a share of the steps

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
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (0.0 < self.decay_share <= 1.0):
            raise UsageError(f"--decay-share must be in (0, 1], got {self.decay_share}")
        if self.clipping not in CLIPPING:
            raise UsageError(f"--clipping must be one of {', '.join(CLIPPING)}, got {self.clipping!r}")
        if not (0.0 <= self.weight_decay < 1.0):
            raise UsageError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if self.clipping != "none" and not self.clip_norm > 0:
            raise UsageError(f"--clip-norm must be a positive number, got {self.clip_norm}")
        if self.time_budget is not None and self.validation_fraction <= 0:
            raise UsageError("--time-budget validates as it goes: --validation-fraction must be above 0, got 0")
        if self.dropout_mask not in DROPOUT_MASKS:
            raise UsageError(f"--dropout-mask must be one of {', '.join(DROPOUT_MASKS)}, got {self.dropout_mask!r}")
        if not (0.0 <= self.weight_drop < 1.0):
            raise UsageError(f"--weight-drop must be in [0, 1), got {self.weight_drop}")
        if self.weight_drop and self.time_budget is None:
            raise UsageError("--weight-drop needs --time-budget (the budgeted loop runs the dropped kernel)")
        if self.weight_drop and self.cell != "lstm":
            raise UsageError(f"--weight-drop needs --cell lstm, got {self.cell!r}")
        if not (0.0 <= self.weight_average <= 0.5):
            raise UsageError(f"--weight-average must be in [0, 0.5], got {self.weight_average}")
        if self.weight_average and self.time_budget is None:
            raise UsageError("--weight-average needs --time-budget (the budgeted loop keeps the average)")
        if self.stateful and self.time_budget is None:
            raise UsageError("--stateful needs --time-budget (a budgeted run counts steps over the streams)")

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
            "validation_fraction max_vocab lowercase seed max_steps_per_epoch time_budget auto_size schedule "
            "decay_share weight_decay clipping clip_norm stateful dropout_mask weight_drop weight_average"
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
        help="default settings: quick (about a minute on 2 CPU cores) or small (under 30 minutes); flags override "
        "it (default: quick, or the sizing rule with --time-budget)",
    )
    add(
        "--time-budget",
        metavar="DURATION",
        help="train the best model that fits in DURATION (90s, 30m, 2h) from process start to the exported "
        "version: plans the steps, the learning-rate schedule and, without --preset or size flags, the network",
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
    add(
        "--dropout-mask",
        choices=DROPOUT_MASKS,
        help="a new dropout mask at every position (token) or one per window (sequence) "
        "(default: sequence when budgeted, else token)",
    )
    add(
        "--weight-drop",
        type=_number,
        help="budgeted runs: drop this fraction of each LSTM's recurrent weights, a new mask every step (default: 0)",
    )
    add(
        "--weight-average",
        type=_number,
        help="budgeted runs: validate, checkpoint and export a moving average of the weights over about this "
        f"share of the steps; 0 turns it off (default: {BUDGET_DEFAULTS['weight_average']:g})",
    )
    add("--learning-rate", type=_number, help="the peak learning rate with a schedule")
    add(
        "--schedule",
        choices=SCHEDULES,
        help="budgeted runs: warm-up then the peak until a linear decay over the last --decay-share of the steps "
        "(wsd), warm-up then a cosine decay, or constant (default: wsd)",
    )
    add(
        "--decay-share",
        type=_number,
        help="budgeted runs with wsd: the last share of the steps the learning rate decays over "
        f"(default: {DECAY_SHARE:g})",
    )
    add("--weight-decay", type=_number, help="AdamW weight decay; 0 is Adam (default: 0)")
    add(
        "--clipping",
        choices=CLIPPING,
        help="gradient clipping by the global norm or by each variable's norm (default: per-variable)",
    )
    add("--clip-norm", type=_number, help="the clipping threshold (default: 1.0 global, 5.0 per-variable)")
    add(
        "--stateful",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="budgeted runs: carry the LSTM state across consecutive windows of each stream, truncated BPTT "
        "(default: off)",
    )
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
    budget = None
    if args.time_budget is not None:
        from training.budget import BudgetError, parse_duration

        try:
            budget = parse_duration(args.time_budget)
        except BudgetError as exc:
            raise UsageError(str(exc)) from exc
    values: dict[str, Any] = {}
    if budget is not None:  # every budgeted run: the optimiser defaults; without --preset, the rest too
        values.update({k: BUDGET_DEFAULTS[k] for k in BUDGET_OPTIMISER})
    if args.preset is not None or budget is None:
        values.update({**PRESETS[args.preset or "quick"], "preset": args.preset or "quick"})
    else:
        values.update({**BUDGET_DEFAULTS, "preset": "budget"})
    given_flags = {f.name for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if budget is not None:
        # patience's default is given by argparse; only an explicit --patience is refused
        epoch_flags = sorted(given_flags & {"epochs", "max_steps_per_epoch"}) + (
            ["patience"] if any(a == "--patience" or a.startswith("--patience=") for a in argv) else []
        )
        if epoch_flags:
            flag = "--" + epoch_flags[0].replace("_", "-")
            raise UsageError(f"{flag} does not apply with --time-budget: a budgeted run plans its own steps")
    for name in given_flags - {"time_budget"}:
        values[name] = getattr(args, name)
    values["time_budget"] = budget
    values["auto_size"] = budget is not None and args.preset is None and not (given_flags & set(SIZE_FLAGS))
    values.setdefault("clipping", "per-variable")
    values.setdefault("clip_norm", DEFAULT_CLIP_NORM[values["clipping"]])
    values["corpus"] = tuple(args.corpus or ())
    name = os.path.basename(os.path.normpath(args.out)) or "model"
    values["checkpoint_dir"] = args.checkpoint_dir or os.path.join("runs", name, "checkpoints")
    values["log_dir"] = args.log_dir or os.path.join("runs", name, "logs")
    return TrainConfig(**values)
