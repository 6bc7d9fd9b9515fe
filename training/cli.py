"""``textgen train`` (and ``python -m training``): flags -> TrainConfig -> train -> exit code.

Bad input (a flag, the corpus, a checkpoint from another run) gives one line on
stderr naming the problem and exit code 2, before anything is written.
"""

from __future__ import annotations

import logging
import os
import sys

from training.tf_runtime import quiet_start, set_log_levels


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from training.config import UsageError, build_parser, parse_args

    try:
        config = parse_args(args)
    except UsageError as exc:
        print(f"textgen train: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    log_level = build_parser().parse_args(args).log_level  # not in TrainConfig, which goes into the export
    set_log_levels(log_level)

    from training.budget import BudgetError
    from training.corpus import CorpusError
    from training.distribute import ClusterError, choose_strategy
    from training.train import prepare, train
    from training.windows import WindowError

    _configure_logging(log_level)
    try:
        prepared = prepare(config)
        placement = choose_strategy(os.environ, mixed_precision=config.mixed_precision)
        replicas = placement.strategy.num_replicas_in_sync
        if config.time_budget is not None and replicas != 1:
            raise UsageError(
                f"--time-budget trains on one replica, but the strategy has {replicas} "
                f"({placement.describe()['strategy']}); train across workers with --epochs"
            )
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
    except BudgetError as exc:  # the budget ran out before one validation interval could be planned
        print(f"textgen train: error: {exc}", file=sys.stderr)
        return 2
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
    if config.time_budget is not None and result.export_path:
        from training.budget import process_age

        used = process_age()
        print(
            f"done in {used:.0f} s from process start: {100 * used / config.time_budget:.1f}% of the "
            f"{config.time_budget:.0f} s budget" + (" (this process only: it resumed)" if config.resume else ""),
            flush=True,
        )
    return 0


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("textgen.train")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("textgen train: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


if __name__ == "__main__":
    quiet_start(sys.argv[1:])
    sys.exit(main())
