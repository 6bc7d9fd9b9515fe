"""What each training change buys: ``textgen train --time-budget`` runs that differ from one baseline in one thing.

The baseline is ``--preset small`` as the presets train (constant learning
rate 0.004, Adam, per-variable clipping at 5.0, a new dropout mask per token,
fresh windows, no weight average) inside the same budget. Each variant
changes one thing; ``defaults`` is a budgeted run with no flags (every change
its rule or default picks), ``small`` the same with ``--preset small``'s
network. Every run is a real
``textgen train`` process; the table gives its validation bits per token in
both protocols (evaluate.py), the difference from the baseline and its wall
time from process start against the budget.

``--parallel 2`` runs two at a time, each pinned to its own core, so that a
2-core machine measures six runs in the time of three; step speed then is
one core's, the same for every row.

    python -m benchmarks.train_ablation --budget 10m --out ablation-out
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = [
    "--preset", "small", "--schedule", "constant", "--weight-decay", "0", "--clipping", "per-variable",
    "--dropout-mask", "token", "--weight-drop", "0", "--weight-average", "0", "--no-stateful",
]  # fmt: skip


def _with(flag: str, value: str) -> list[str]:
    out = list(BASELINE)
    out[out.index(flag) + 1] = value
    return out


VARIANTS: dict[str, list[str]] = {
    "baseline": BASELINE,
    "schedule": _with("--schedule", "cosine"),
    "schedule-wsd": [*_with("--schedule", "wsd"), "--decay-share", "0.2"],  # the share the 10-minute table ran
    "decay-share": _with("--schedule", "wsd"),  # the default share
    "schedule-cosine-2x": [*_with("--schedule", "cosine"), "--learning-rate", "0.008"],
    "learning-rate": [*BASELINE, "--learning-rate", "0.008"],
    # no --preset: the sizing rule picks the network (the preset's learning rate kept)
    "sizing": [*BASELINE[2:], "--learning-rate", "0.004"],
    "weight-decay": _with("--weight-decay", "0.1"),
    "clipping": _with("--clipping", "global"),
    "stateful": [*BASELINE[:-1], "--stateful"],
    "dropout-mask": _with("--dropout-mask", "sequence"),
    "weight-drop": _with("--weight-drop", "0.3"),
    "weight-average": _with("--weight-average", "0.05"),
    "defaults": [],
    "small": ["--preset", "small"],  # the defaults with the preset's network instead of the sizing rule's
}


@dataclass
class Run:
    name: str
    argv: list[str]
    folder: Path
    core: int | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    wall_s: float = 0.0
    returncode: int | None = None


def _start(run: Run) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    log = open(run.folder / "train.log", "wb")  # noqa: SIM115 - closed by the child's exit
    core = run.core

    def pin() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})

    run.started = time.monotonic()
    run.proc = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)


def _summary(run: Run, budget_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"name": run.name, "flags": " ".join(VARIANTS.get(run.name, [])), "exit": run.returncode}
    row["wall_s"] = round(run.wall_s, 1)
    row["budget_pct"] = round(100 * run.wall_s / budget_s, 1)
    info_files = sorted((run.folder / "model").glob("*/assets/model.json"))
    if run.returncode != 0 or not info_files:
        return row
    info = json.loads(info_files[-1].read_text())
    arch = info["architecture"]
    row.update(
        network=f"{arch['layers']} x {arch['units']}, dropout {arch['dropout']:g}",
        steps=info.get("steps_completed"),
        epochs=info.get("exported_epoch"),
        bits_fresh=round(info["val_loss"] / 0.6931471805599453, 4),
        bits_carried=round(info["val_carried_bits_per_token"], 4),
        perplexity=round(info["val_perplexity"], 2),
    )
    return row


def run_all(
    names: Sequence[str], budget: str, budget_s: float, out: Path, train_args: Sequence[str], parallel: int
) -> list[dict[str, Any]]:
    cores = sorted(os.sched_getaffinity(0))
    textgen = str(Path(sys.executable).with_name("textgen"))
    pending = [
        Run(
            name,
            [
                textgen,
                "train",
                "--time-budget",
                budget,
                *VARIANTS[name],
                *train_args,
                "--out",
                str(out / name / "model"),
                "--checkpoint-dir",
                str(out / name / "ck"),
                "--log-dir",
                str(out / name / "logs"),
            ],  # fmt: skip
            out / name,
            None,
        )
        for name in names
    ]
    active: list[Run] = []
    done: list[Run] = []
    while pending or active:
        while pending and len(active) < parallel:
            run = pending.pop(0)
            busy = {r.core for r in active}
            run.core = next(c for c in cores if c not in busy) if parallel > 1 else None
            _start(run)
            print(f"{run.name}: started (core {run.core if run.core is not None else 'all'})", flush=True)
            active.append(run)
        time.sleep(0.5)
        for run in list(active):
            assert run.proc is not None
            if run.proc.poll() is not None:
                run.wall_s = time.monotonic() - run.started
                run.returncode = run.proc.returncode
                active.remove(run)
                done.append(run)
                print(f"{run.name}: exit {run.returncode} after {run.wall_s:.0f} s", flush=True)
    order = {name: i for i, name in enumerate(names)}
    return [_summary(r, budget_s) for r in sorted(done, key=lambda r: order[r.name])]


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["name"] == "baseline" and "bits_fresh" in r), None)
    lines = [
        "| run | network | steps | val bits/token fresh | carried | vs baseline (fresh) | wall s | of budget |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "bits_fresh" not in r:
            lines.append(f"| {r['name']} | failed (exit {r['exit']}) | | | | | {r['wall_s']} | |")
            continue
        delta = f"{r['bits_fresh'] - base['bits_fresh']:+.4f}" if base else ""
        lines.append(
            f"| {r['name']} | {r['network']} | {r['steps']} | {r['bits_fresh']:.4f} | {r['bits_carried']:.4f} | "
            f"{delta} | {r['wall_s']:.0f} | {r['budget_pct']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_ablation", description=__doc__)
    parser.add_argument("--budget", default="10m", help="each run's --time-budget (default: 10m)")
    parser.add_argument("--out", required=True, help="folder for the runs, ablation.json and ablation.md")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each pinned to one core")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more textgen train flags for all")
    args = parser.parse_args(argv)
    from training.budget import parse_duration

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not 1 <= args.parallel <= len(os.sched_getaffinity(0)):
        parser.error(f"--parallel must be from 1 to the {len(os.sched_getaffinity(0))} usable cores")
    extra = [a for a in args.train_args if a != "--"]
    out = Path(args.out)
    rows = run_all(names, args.budget, parse_duration(args.budget), out, extra, args.parallel)
    (out / "ablation.json").write_text(json.dumps({"budget": args.budget, "train_args": extra, "rows": rows}, indent=1))
    text = table(rows)
    (out / "ablation.md").write_text(text)
    print(text)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
