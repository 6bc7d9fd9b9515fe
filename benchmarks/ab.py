"""Interleaved A/B of servers built from different source trees: one end-to-end level, and interference.

``python -m benchmarks.ab --tree before=DIR --tree after=. --rounds 5 --out-json F`` exports the
bench model once, starts one server per tree (``python -m service`` with that tree first on
``PYTHONPATH``, so a ``git worktree`` of another commit serves its own code), and runs, round after
round in a fresh random order, ``--streams`` streams of ``--tokens`` tokens against each, then
(unless ``--no-interference``) the interference scenario. It prints and writes the medians per
tree. Interleaving puts every tree through the same slow and fast moments of a shared machine,
which separate runs of ``textgen bench`` do not: the figure to read is the medians' ratio.
``--server-arg`` adds a flag to every server (e.g. ``--server-arg=--frontends=0``), ``--tree-arg``
to one tree's (``--tree-arg=wide=--max-steps-per-call=64``): one tree given twice under two names,
each with its own flags, compares settings of one tree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks.e2e_bench import ServerProcess, ServerSpec, measure_level
from benchmarks.interference import InterferenceConfig, measure_interference

QUICK_INTERFERENCE = InterferenceConfig(streams=4, stream_tokens=64, arrival_prompt_chars=64, window=0.5, warmup=0.2)


class TreeServer(ServerProcess):
    """``python -m service`` run from ``tree``, its code first on the path."""

    def __init__(self, spec: ServerSpec, log_path: str, tree: str) -> None:
        super().__init__(spec, log_path)
        self.tree = os.path.abspath(tree)

    def command(self) -> list[str]:
        argv = super().command()
        with open(os.path.join(self.tree, "service", "config.py"), encoding="utf-8") as f:
            has_http = "http_port" in f.read()
        if not has_http:  # a tree from before the HTTP API
            at = argv.index("--http-port")
            del argv[at : at + 2]
        return argv

    def launch(self) -> None:
        if self._proc is not None:
            return
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=self.tree)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed by ServerProcess.__exit__
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.tree
        )


def _tree(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"--tree takes NAME=DIR with an existing DIR, got {text!r}")
    return name, path


def _tree_arg(text: str) -> tuple[str, str]:
    name, sep, flag = text.partition("=")
    if not sep or not name or not flag.startswith("-"):
        raise argparse.ArgumentTypeError(f"--tree-arg takes NAME=FLAG with FLAG starting with '-', got {text!r}")
    return name, flag


def interference_terms(result: dict[str, Any]) -> tuple[float, float] | None:
    """(running streams' ITL p99 while long prompts arrive, their p50 without), in ms, when both were measured."""
    p99 = result.get("with_arrivals", {}).get("itl_ms_p99")
    p50 = result.get("without_arrivals", {}).get("itl_ms_p50")
    return (p99, p50) if p99 and p50 else None


def interference_ratio(result: dict[str, Any]) -> float | None:
    """p99 with arrivals / p50 without (``interference_terms``): the bench's interference target."""
    terms = interference_terms(result)
    return terms[0] / terms[1] if terms else None


def summary(runs: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float | None]]:
    """Medians per tree of every figure that was measured."""
    return {
        name: {key: statistics.median(values) if values else None for key, values in figures.items()}
        for name, figures in runs.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.engine_bench import ModelSpec, export_bench_model

    work = tempfile.mkdtemp(prefix="textgen-ab-")
    spec = ModelSpec(units=16, embedding_dim=16, corpus_chars=20_000) if args.quick else ModelSpec(units=args.units)
    bench = export_bench_model(os.path.join(work, "models"), spec)
    servers = {}
    for name, path in args.tree:
        flags = [*args.server_arg, *(flag for tree, flag in args.tree_arg if tree == name)]
        spec_of_tree = ServerSpec(
            models_dir=bench.models_dir, model=bench.name, max_batch_size=1024, extra_args=tuple(flags)
        )
        servers[name] = TreeServer(spec_of_tree, os.path.join(work, f"{name}.log"), path)
    interference = QUICK_INTERFERENCE if args.quick else InterferenceConfig()
    runs: dict[str, dict[str, list[float]]] = {
        name: {"tokens_per_s": [], "cpu_us_per_token": [], "interference_ratio": []} for name in servers
    }
    started: list[TreeServer] = []
    try:
        for server in servers.values():
            server.__enter__()
            started.append(server)
            measure_level(server, 4, 8, 16, 120.0)  # warm-up
        for round_ in range(args.rounds):
            order = list(servers)
            random.shuffle(order)
            for name in order:
                level = measure_level(servers[name], args.streams, args.tokens, 16, 300.0)
                runs[name]["tokens_per_s"].append(level["tokens_per_s"])
                line = f"round {round_ + 1} {name}: {level['tokens_per_s']:,.0f} tokens/s"
                if level.get("cpu_us_per_token") is not None:
                    runs[name]["cpu_us_per_token"].append(level["cpu_us_per_token"])
                    line += f", {level['cpu_us_per_token']:.1f} us CPU/token"
                # Each process role's share (engine, frontends, other), so a change is seen where it acts.
                roles = sorted((level.get("cpu_us_per_token_by_role") or {}).items())
                for role, value in roles:
                    runs[name].setdefault(f"{role}_us_per_token", []).append(value)
                if roles:
                    line += " (" + ", ".join(f"{role} {value:.1f}" for role, value in roles) + ")"
                if not args.no_interference:
                    terms = interference_terms(measure_interference(servers[name].target, bench.name, interference))
                    if terms is not None:
                        # The ratio's two terms too: a ratio that grows because p50 fell is not a loss.
                        p99, p50 = terms
                        ratio = p99 / p50
                        runs[name]["interference_ratio"].append(ratio)
                        runs[name].setdefault("itl_ms_p99_with_arrivals", []).append(p99)
                        runs[name].setdefault("itl_ms_p50_without", []).append(p50)
                        line += f", interference {ratio:.2f}x (p99 {p99:.2f} / p50 {p50:.2f} ms)"
                    else:
                        line += ", interference -"
                print(line, flush=True)
    finally:
        for running in started:
            running.__exit__()
    return {
        "trees": dict(args.tree),
        "units": spec.units,
        "streams": args.streams,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "server_args": list(args.server_arg),
        "flags": {name: list(server.spec.extra_args) for name, server in servers.items()},
        "runs": runs,
        "medians": summary(runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=_tree, action="append", required=True, help="NAME=DIR, twice or more")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--server-arg", action="append", default=[], help="a flag for every server")
    parser.add_argument(
        "--tree-arg", type=_tree_arg, action="append", default=[], help="NAME=FLAG: a flag for that tree's server"
    )
    parser.add_argument("--no-interference", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a 16-unit model and tiny scenarios: checks the harness")
    parser.add_argument("--out-json")
    args = parser.parse_args(argv)
    if len({name for name, _ in args.tree}) != len(args.tree) or len(args.tree) < 2:
        parser.error("--tree needs two or more distinct names")
    unknown = sorted({name for name, _ in args.tree_arg} - {name for name, _ in args.tree})
    if unknown:
        parser.error(f"--tree-arg names no --tree: {', '.join(unknown)}")
    result = run(args)
    for name, medians in result["medians"].items():
        shown = ", ".join(f"{k} {v:,.2f}" for k, v in medians.items() if v is not None)
        print(f"{name}: medians over {args.rounds} rounds: {shown}")
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
