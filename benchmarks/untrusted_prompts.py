"""Untrusted prompts: running streams' largest gap between messages, alone and while costly prompts arrive.

The prompt is ``"e" + "\\u0301\\u0316" * 16383``: 65,533 bytes of UTF-8, under the default
``--max-prompt-bytes``, whose NFC normalisation is quadratic in its run of combining marks. The
server refuses it (INVALID_ARGUMENT: not Stream-Safe text); a server that normalised it on the
event loop stalled every stream for about half a second per prompt.

``python -m benchmarks.untrusted_prompts --target HOST:PORT`` keeps ``--streams`` streams
running (each loops seeded requests of ``--stream-tokens`` tokens), lets them run for
``--settle`` seconds, then measures each stream's largest gap between consecutive messages over
a window of at least ``--window`` seconds, twice: (a) with nothing else arriving, then (b) while
``--clients`` clients, each on its own connection, send that prompt once each, all at the
window's start (the window lasts until every one has its answer, plus 0.5 s). It prints and
writes (``--out-json``) the median and max of the streams' largest gaps in (a) and (b), their
ratios (b)/(a), and the status codes the clients got. Without ``--target`` it exports an
untrained model (``--units``, default 512) and starts ``python -m service`` on free ports.
``--quick`` shrinks the model and the windows to check the script end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from benchmarks.e2e_bench import StreamRecord, channel_pool, generate_request, run_load, run_stream
from benchmarks.prompts import bench_corpus

PROMPT = "e" + "\u0301\u0316" * 16383


@dataclass(frozen=True)
class UntrustedConfig:
    """The scenario: the issue's 4 running streams and 8 clients sending the prompt."""

    streams: int = 4
    stream_tokens: int = 4096
    clients: int = 8
    settle: float = 1.0
    window: float = 5.0
    timeout: float = 120.0

    def args(self) -> list[str]:
        return [a for f in fields(self) for a in ("--" + f.name.replace("_", "-"), str(getattr(self, f.name)))]


QUICK = UntrustedConfig(stream_tokens=4096, settle=0.3, window=1.0, timeout=60.0)


def largest_gap_ms(records: Sequence[StreamRecord], start: float, end: float) -> float | None:
    """The largest gap (ms) between consecutive messages of one stream's calls, over gaps ending in ``[start, end]``."""
    pairs = [p for r in records for p in zip(r.arrivals, r.arrivals[1:], strict=False)]
    gaps = [t1 - t0 for (t0, _), (t1, _) in pairs if start <= t1 <= end]
    return 1000.0 * max(gaps) if gaps else None


async def phase(target: str, model: str, config: UntrustedConfig, attack: bool) -> dict[str, Any]:
    """One window of running streams; with ``attack``, the clients send the prompt at its start."""
    from service.api import textgen_pb2, textgen_pb2_grpc

    corpus = bench_corpus(200_000)
    channels = channel_pool(target, 1 + config.clients)
    stub = textgen_pb2_grpc.TextGenerationStub(channels[0])
    records: list[list[StreamRecord]] = [[] for _ in range(config.streams)]
    over = asyncio.Event()

    async def stream(i: int) -> None:
        n = 0
        while not over.is_set():
            request = generate_request(1000 * i + n, config.stream_tokens, 16, corpus, model)
            records[i].append(await run_stream(stub, request, config.timeout))
            n += 1

    async def send(k: int) -> str:
        request = textgen_pb2.GenerateRequest(prompt=PROMPT, max_tokens=1, seed=k + 1, model=model)
        record = await run_stream(textgen_pb2_grpc.TextGenerationStub(channels[1 + k]), request, config.timeout)
        return record.error or "OK"

    try:
        workers = [asyncio.ensure_future(stream(i)) for i in range(config.streams)]
        await asyncio.sleep(config.settle)
        start = time.perf_counter()
        codes = await asyncio.gather(*(send(k) for k in range(config.clients))) if attack else []
        answered = time.perf_counter() - start
        await asyncio.sleep(max(0.0, config.window - answered, 0.5 if attack else 0.0))
        end = time.perf_counter()
        over.set()
        for w in workers:
            w.cancel()  # run_stream ends the call and records it as CLIENT_TIMEOUT
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        for c in channels:
            await c.close()
    gaps = [largest_gap_ms(r, start, end) for r in records]
    measured = [g for g in gaps if g is not None]
    errors = Counter(r.error for rs in records for r in rs if r.error not in (None, "CLIENT_TIMEOUT"))
    out: dict[str, Any] = {
        "window_s": end - start,
        "largest_gap_ms": gaps,
        "median_ms": statistics.median(measured) if measured else None,
        "max_ms": max(measured) if measured else None,
        "stream_errors": dict(errors),
    }
    if attack:
        out.update(codes=dict(Counter(codes)), answered_s=answered)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


async def both_phases(target: str, model: str, config: UntrustedConfig) -> dict[str, Any]:
    quiet = await phase(target, model, config, attack=False)
    attacked = await phase(target, model, config, attack=True)
    return {
        "config": asdict(config),
        "attack": f"{config.clients} clients send the prompt once each, together, at the window's start",
        "prompt_bytes": len(PROMPT.encode("utf-8")),
        "quiet": quiet,
        "attacked": attacked,
        "ratio_median": _ratio(attacked["median_ms"], quiet["median_ms"]),
        "ratio_max": _ratio(attacked["max_ms"], quiet["max_ms"]),
        "codes": attacked["codes"],
    }


def measure_untrusted(target: str, model: str, config: UntrustedConfig) -> dict[str, Any]:
    """Both phases in a load-generator process against the server at ``target``."""
    args = ["--target", target, "--model", model, *config.args()]
    return run_load("benchmarks.untrusted_prompts", args, timeout=2 * config.timeout + 60.0)


def _self_served(units: int, quick: bool, config: UntrustedConfig) -> dict[str, Any]:
    """Export an untrained model, start a server on it, measure, stop it."""
    from benchmarks.e2e_bench import ServerProcess, ServerSpec
    from training.tf_runtime import quiet_start

    quiet_start([])
    from benchmarks.engine_bench import ModelSpec, export_bench_model

    spec = ModelSpec(units=units, embedding_dim=16, corpus_chars=20_000) if quick else ModelSpec(units=units)
    with tempfile.TemporaryDirectory(prefix="textgen-untrusted-") as tmp:
        bench = export_bench_model(os.path.join(tmp, "models"), spec)
        server = ServerProcess(ServerSpec(bench.models_dir, bench.name, max_batch_size=64), os.path.join(tmp, "log"))
        with server:
            return measure_untrusted(server.target, bench.name, config)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.untrusted_prompts", description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--model", default="", help="model name ('' = the server's default)")
    parser.add_argument("--units", type=int, help="units of the model it exports without --target (512; --quick 16)")
    parser.add_argument("--quick", action="store_true", help="a 16-unit model and short windows")
    parser.add_argument("--out-json", help="write the result here too")
    for f in fields(UntrustedConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(QUICK, f.name)))
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(UntrustedConfig) if getattr(args, f.name) is not None}
    config = replace(QUICK if args.quick else UntrustedConfig(), **given)
    units = args.units or (16 if args.quick else 512)
    for flag, value in (("--streams", config.streams), ("--clients", config.clients), ("--units", units)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if config.stream_tokens < 1:
        parser.error(f"--stream-tokens must be at least 1, got {config.stream_tokens}")
    if args.target:
        result = asyncio.run(both_phases(args.target, args.model, config))
    else:
        result = _self_served(units, args.quick, config)
    q, a = result["quiet"], result["attacked"]
    print(
        f"largest gap between messages of {config.streams} streams, median / max ms: alone "
        f"{_ms(q['median_ms'])} / {_ms(q['max_ms'])}; with {config.clients} prompts of {result['prompt_bytes']:,} "
        f"bytes {_ms(a['median_ms'])} / {_ms(a['max_ms'])}; codes {result['codes']}",
        flush=True,
    )
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as out:
            json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
