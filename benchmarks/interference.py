"""Interference: inter-token latency of running streams while long prompts arrive, then without them.

The load generator (``python -m benchmarks.interference --target HOST:PORT ...``)
keeps ``--streams`` streams running (each one loops short-prompt requests of
``--stream-tokens`` tokens) and measures their inter-token latency over a
window of ``--window`` seconds, twice: first while a new request with a
``--arrival-prompt-chars`` prompt arrives every ``--interval`` seconds, then
with no arrivals. Only gaps that end inside the window count, so start-up and
tail do not. It writes one JSON document with both phases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.e2e_bench import (
    StreamRecord,
    channel_pool,
    generate_request,
    percentile,
    run_load,
    run_stream,
    summarize,
)
from benchmarks.prompts import bench_corpus


@dataclass(frozen=True)
class InterferenceConfig:
    """The interference scenario (defaults: the issue's 32 streams and 512-char prompts every 100 ms)."""

    streams: int = 32
    stream_tokens: int = 256
    stream_prompt_chars: int = 16
    arrival_prompt_chars: int = 512
    arrival_tokens: int = 8
    interval: float = 0.1
    window: float = 5.0
    warmup: float = 1.0
    timeout: float = 120.0

    def args(self) -> list[str]:
        return [
            "--streams",
            str(self.streams),
            "--stream-tokens",
            str(self.stream_tokens),
            "--stream-prompt-chars",
            str(self.stream_prompt_chars),
            "--arrival-prompt-chars",
            str(self.arrival_prompt_chars),
            "--arrival-tokens",
            str(self.arrival_tokens),
            "--interval",
            str(self.interval),
            "--window",
            str(self.window),
            "--warmup",
            str(self.warmup),
            "--timeout",
            str(self.timeout),
        ]


def itl_in_window(records: Sequence[StreamRecord], start: float, end: float) -> list[float]:
    """Inter-token samples (ms) of gaps that end inside ``[start, end]``."""
    samples: list[float] = []
    for r in records:
        for (t0, _), (t1, k) in zip(r.arrivals, r.arrivals[1:], strict=False):
            if start <= t1 <= end:
                samples.extend([1000.0 * (t1 - t0) / k] * k)
    return samples


async def phase(target: str, config: InterferenceConfig, model: str, with_arrivals: bool) -> dict[str, Any]:
    """One window of running streams, with or without long-prompt arrivals."""
    corpus = bench_corpus(200_000)
    channels = channel_pool(target, 2)
    from service.api import textgen_pb2_grpc

    stub = textgen_pb2_grpc.TextGenerationStub(channels[0])
    arrival_stub = textgen_pb2_grpc.TextGenerationStub(channels[1])
    records: list[StreamRecord] = []
    arrivals: list[asyncio.Task[StreamRecord]] = []
    begin = time.perf_counter()
    window_start = begin + config.warmup
    window_end = window_start + config.window
    hard_end = begin + config.timeout

    async def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < window_end and time.perf_counter() < hard_end:
            request = generate_request(1000 * i + n, config.stream_tokens, config.stream_prompt_chars, corpus, model)
            records.append(await run_stream(stub, request, hard_end - time.perf_counter()))
            n += 1

    try:
        workers = [asyncio.ensure_future(worker(i)) for i in range(config.streams)]
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        k = 0
        while with_arrivals and time.perf_counter() < window_end:
            request = generate_request(
                10_000_000 + k, config.arrival_tokens, config.arrival_prompt_chars, corpus, model
            )
            arrivals.append(asyncio.ensure_future(run_stream(arrival_stub, request, config.timeout)))
            k += 1
            await asyncio.sleep(config.interval)
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        _, pending = await asyncio.wait([*workers, *arrivals], timeout=max(1.0, hard_end - time.perf_counter()))
        for task in pending:
            task.cancel()
    finally:
        for c in channels:
            await c.close()
    itls = itl_in_window(records, window_start, window_end)
    arrival_records = [t.result() for t in arrivals if t.done() and not t.cancelled()]
    running = summarize(records)
    return {
        "with_arrivals": with_arrivals,
        "streams": config.streams,
        "window_s": config.window,
        "itl_ms_p50": percentile(itls, 50),
        "itl_ms_p99": percentile(itls, 99),
        "itl_samples": len(itls),
        "running_errors": running["errors"],
        "running_error_codes": running["error_codes"],
        "arrivals": len(arrivals),
        "arrival_errors": sum(1 for r in arrival_records if r.error is not None),
        "arrival_ttft_ms_p50": summarize(arrival_records)["ttft_ms_p50"] if arrival_records else None,
        "arrival_ttft_ms_p99": summarize(arrival_records)["ttft_ms_p99"] if arrival_records else None,
    }


async def both_phases(target: str, config: InterferenceConfig, model: str) -> dict[str, Any]:
    with_arrivals = await phase(target, config, model, True)
    without = await phase(target, config, model, False)
    return {"with_arrivals": with_arrivals, "without_arrivals": without}


def measure_interference(target: str, model: str, config: InterferenceConfig) -> dict[str, Any]:
    """Run both phases in a load-generator process against the server at ``target``."""
    args = ["--target", target, "--model", model, *config.args()]
    return run_load("benchmarks.interference", args, timeout=2 * config.timeout + 60.0)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interference", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--out-json", required=True)
    defaults = InterferenceConfig()
    for name, value in vars(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    config = InterferenceConfig(**{k: getattr(args, k) for k in vars(defaults)})
    for name in ("streams", "stream_tokens", "arrival_tokens"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not 0 < config.interval <= config.window:
        parser.error(f"--interval must be in (0, --window], got {config.interval}")
    result = asyncio.run(both_phases(args.target, config, args.model))
    with open(args.out_json, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
