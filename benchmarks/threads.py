"""A server's CPU per token thread by thread: which threads of which process do the work.

``python -m benchmarks.threads --units 16 --streams 1000 --tokens 64 --levels 5`` exports the
bench model, starts ``python -m service`` with the server's defaults, warms it up, reads every
thread's CPU time from ``/proc`` (``proc_cpu.tree_thread_ticks``), runs ``--levels`` levels of
``--streams`` streams, reads again, and prints each (process role, thread name) with its CPU
microseconds per completion token and its share of the tree's CPU over the same span. Threads
of one name in one role are summed (gRPC's ``event_engine`` threads, say).

The server names its own threads (``textgen-engine`` makes the engine's calls, ``service/threads.py``)
and ``main`` is a process's main thread (a frontend's event loop). Threads the server did not
name show as ``tf_*``, ``ZMQbg/*``, ``event_engine`` or under the process's name (``python``):
in the engine process the latter are TensorFlow's and XLA's, which run the model; in a frontend,
gRPC's poller. So the engine process's figure splits into the engine thread's Python and model
dispatch, and the model's own arithmetic, which a GPU would take off the CPU. A thread that
ended during the run is missing from the rows but not from the tree's total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks.e2e_bench import ServerProcess, ServerSpec, measure_level
from benchmarks.proc_cpu import find_engine, tree_cpu_seconds, tree_thread_ticks


def thread_rows(
    before: dict[tuple[str, int, int], tuple[str, int]],
    after: dict[tuple[str, int, int], tuple[str, int]],
    tokens: int,
    ticks_per_second: float,
) -> list[dict[str, Any]]:
    """CPU between two ``tree_thread_ticks`` readings per (role, thread name), most first.

    A thread absent from ``before`` started in between and counts from 0.
    """
    summed: dict[tuple[str, str], int] = {}
    for key, (name, ticks) in after.items():
        spent = ticks - before.get(key, (name, 0))[1]
        summed[(key[0], name)] = summed.get((key[0], name), 0) + spent
    rows = [
        {
            "role": role,
            "thread": name,
            "cpu_seconds": ticks / ticks_per_second,
            "cpu_us_per_token": 1e6 * ticks / ticks_per_second / tokens if tokens else None,
        }
        for (role, name), ticks in summed.items()
        if ticks > 0
    ]
    return sorted(rows, key=lambda row: (-row["cpu_seconds"], row["role"], row["thread"]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.engine_bench import ModelSpec, export_bench_model

    work = tempfile.mkdtemp(prefix="textgen-threads-")
    spec = ModelSpec(units=16, embedding_dim=16, corpus_chars=20_000) if args.quick else ModelSpec(units=args.units)
    bench = export_bench_model(os.path.join(work, "models"), spec)
    server_spec = ServerSpec(
        models_dir=bench.models_dir, model=bench.name, max_batch_size=1024, extra_args=tuple(args.server_arg)
    )
    with ServerProcess(server_spec, os.path.join(work, "server.log")) as server:
        measure_level(server, 4, 8, 16, 120.0)  # warm-up
        engine = find_engine(server.pid)
        cpu_before, threads_before = tree_cpu_seconds(server.pid), tree_thread_ticks(server.pid, engine)
        tokens = 0
        for _ in range(args.levels):
            tokens += int(measure_level(server, args.streams, args.tokens, 16, 300.0)["tokens"])
        cpu_after, threads_after = tree_cpu_seconds(server.pid), tree_thread_ticks(server.pid, engine)
    ticks = float(os.sysconf("SC_CLK_TCK"))
    tree = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    rows = thread_rows(threads_before, threads_after, tokens, ticks)
    for row in rows:
        row["share"] = row["cpu_seconds"] / tree if tree else None
    return {
        "units": spec.units,
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "levels": args.levels,
        "server_args": list(args.server_arg),
        "tokens": tokens,
        "tree_cpu_seconds": tree,
        "tree_cpu_us_per_token": 1e6 * tree / tokens if tree is not None and tokens else None,
        "threads": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--server-arg", action="append", default=[], help="a flag for the server")
    parser.add_argument("--quick", action="store_true", help="a 16-unit model and tiny levels: checks the harness")
    parser.add_argument("--out-json")
    args = parser.parse_args(argv)
    for name in ("units", "streams", "tokens", "levels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    result = run(args)
    print(f"{result['tokens']:,} tokens; the server's tree: {result['tree_cpu_us_per_token'] or 0:.2f} us CPU/token")
    for row in result["threads"]:
        share = f"{100 * row['share']:5.1f} %" if row["share"] is not None else "-"
        print(f"  {row['role']:10s} {row['thread']:16s} {row['cpu_us_per_token']:7.2f} us/token  {share}")
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
