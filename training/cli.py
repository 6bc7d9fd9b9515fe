"""``textgen train`` (and ``python -m training``): flags -> TrainConfig -> train -> exit code.

Bad input (a flag, the corpus, a checkpoint from another run) gives one line on
stderr naming the problem and exit code 2, before anything is written.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.config import UsageError, parse_args

    try:
        config = parse_args(args)
    except UsageError as exc:
        print(f"textgen train: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    from training.corpus import CorpusError
    from training.distribute import ClusterError, choose_strategy
    from training.train import prepare, train
    from training.windows import WindowError

    _configure_logging()
    try:
        prepared = prepare(config)
        placement = choose_strategy(os.environ, mixed_precision=config.mixed_precision)
    except (UsageError, CorpusError, WindowError, ClusterError) as exc:
        print(f"textgen train: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = train(config, placement, prepared)
    except KeyboardInterrupt:
        print(
            f"textgen train: interrupted; continue from the last finished epoch with the same flags and --resume "
            f"(checkpoints in {config.checkpoint_dir})",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # a full or failing disk: the checkpoints written so far stay usable
        print(f"textgen train: error: {exc}", file=sys.stderr)
        return 1
    if result.export_path:
        summary = ", ".join(
            f"{k} {result.metrics[k]:.4f}"
            for k in ("train_loss", "val_loss", "bits_per_token")
            if isinstance(result.metrics.get(k), float)
        )
        print(f"exported {result.export_path} ({summary})", flush=True)
    if result.sample:
        print(f"sample from the reloaded export: {result.sample!r}", flush=True)
    return 0


def _configure_logging() -> None:
    logger = logging.getLogger("textgen.train")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("textgen train: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
