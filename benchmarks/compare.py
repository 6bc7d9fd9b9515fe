"""``python -m benchmarks.compare --baseline A.json B.json C.json --candidate D.json``: runs side by side.

A change that should not move performance is checked by running ``textgen bench`` several times
on the commit before it and once after, back to back on one machine, and asking whether each
headline figure (the README's performance table: tokens/s of the seeds' loop, OneStep, the engine
alone and end to end) falls within the baselines' min-max. This prints that table and exits 1 if
any figure falls outside it (or is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

Figure = Callable[[dict[str, Any]], float | None]


def _engine_batch(batch: int) -> Figure:
    def get(results: dict[str, Any]) -> float | None:
        rows = results.get("engine", {}).get("batched", {}).get("rows", [])
        return next((r["tokens_per_s"] for r in rows if r["batch"] == batch), None)

    return get


def _variant(steps: int, batch: int) -> Figure:
    def get(results: dict[str, Any]) -> float | None:
        rows = results.get("engine", {}).get("variants", {}).get("rows", [])
        return next(
            (r["tokens_per_s"] for r in rows if r["sampler"] and r["steps_per_call"] == steps and r["batch"] == batch),
            None,
        )

    return get


def _e2e(server: str, streams: int) -> Figure:
    def get(results: dict[str, Any]) -> float | None:
        levels = results.get("e2e", {}).get(server, {}).get("levels", [])
        return next((lv["tokens_per_s"] for lv in levels if lv["streams"] == streams), None)

    return get


def _engine_key(key: str) -> Figure:
    def get(results: dict[str, Any]) -> float | None:
        value = results.get("engine", {}).get(key, {}).get("tokens_per_s")
        return None if value is None else float(value)

    return get


HEADLINE: list[tuple[str, Figure]] = [
    ("seeds' loop, tokens/s", _engine_key("seed_loop")),
    ("OneStep per request, tokens/s", _engine_key("onestep")),
    ("engine, 1 step per call, B=64", _engine_batch(64)),
    ("engine, 1 step per call, B=512", _engine_batch(512)),
    ("engine, 8 steps per call, B=64", _variant(8, 64)),
    ("engine, 8 steps per call, B=512", _variant(8, 512)),
    ("e2e --max-batch-size 1, 64 streams", _e2e("max_batch_size_1", 64)),
    ("e2e batched, 64 streams", _e2e("batched", 64)),
    ("e2e batched, 256 streams", _e2e("batched", 256)),
    ("e2e batched, 1000 streams", _e2e("batched", 1000)),
]


def compare(baselines: Sequence[dict[str, Any]], candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per headline figure: the baselines' values, min, max, the candidate and whether it is within."""
    rows = []
    for name, get in HEADLINE:
        values = [v for v in (get(b) for b in baselines) if v is not None]
        value = get(candidate)
        low, high = (min(values), max(values)) if values else (None, None)
        within = value is not None and low is not None and high is not None and low <= value <= high
        rows.append(
            {"figure": name, "baselines": values, "min": low, "max": high, "candidate": value, "within": within}
        )
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| figure | baselines | min-max | candidate | within |", "|---|---:|---:|---:|:---:|"]
    for r in rows:
        baselines = " / ".join(_fmt(v) for v in r["baselines"])
        lines.append(
            f"| {r['figure']} | {baselines} | {_fmt(r['min'])}-{_fmt(r['max'])} | {_fmt(r['candidate'])} | "
            f"{'yes' if r['within'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", nargs="+", required=True, metavar="RESULTS_JSON")
    parser.add_argument("--candidate", required=True, metavar="RESULTS_JSON")
    args = parser.parse_args(argv)
    baselines = []
    for path in args.baseline:
        with open(path, encoding="utf-8") as f:
            baselines.append(json.load(f))
    with open(args.candidate, encoding="utf-8") as f:
        candidate = json.load(f)
    rows = compare(baselines, candidate)
    print(markdown(rows))
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
