"""A burst: N Generate streams opened at once, how each one ended, and what the server counted.

``python -m benchmarks.burst --target HOST:PORT --metrics-port P`` opens ``--streams`` streams of
``--max-tokens`` tokens at once (``--streams-per-connection`` to a connection, each connection a
client of its own), waits until every one has ended and reports how many completed, how many
were refused RESOURCE_EXHAUSTED and which other codes ended the rest, with the seconds from the
burst's start to the last refusal and to the last completion. From the server's ``/metrics`` it
takes the change of ``textgen_requests_total`` (gRPC, by code) over the burst: ``unseen`` is
the streams the server never counted. A call that gRPC cancels before the server picks it up
(``--max-pending-calls``) ends CANCELLED at the client and is counted nowhere; a burst is
``accounted`` when no stream is unseen and the server's count of each code is the client's.

Without ``--target`` it exports an untrained model (``--units``, default 512) and measures two
servers, each started for its burst: ``admitted``, whose ``--max-queue`` holds the whole burst
(every stream should complete), and ``refusing``, whose ``--max-queue`` holds part of it (the
rest should be refused RESOURCE_EXHAUSTED). ``--quick`` shrinks the model and the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from benchmarks.e2e_bench import LOCALHOST, RssSampler, channel_pool, generate_request, percentile, run_load
from benchmarks.prompts import bench_corpus

PHASES = ("admitted", "refusing")
# How long the server's count may trail the clients' statuses (it is taken after the status is sent).
COUNT_SETTLE_SECONDS = 15.0


@dataclass(frozen=True)
class BurstConfig:
    """The issue's burst: 10,000 streams of 16 tokens at once, against servers of 1024 concurrent sequences."""

    streams: int = 10_000
    max_tokens: int = 16
    prompt_chars: int = 16
    streams_per_connection: int = 128
    timeout: float = 300.0  # each stream's deadline
    max_concurrent: int = 1024  # both servers' --max-concurrent (and --max-batch-size)
    refusing_max_queue: int = 1024  # the refusing server's --max-queue; the admitted one's holds the burst

    def load_args(self) -> list[str]:
        names = ("streams", "max_tokens", "prompt_chars", "streams_per_connection", "timeout")
        return [a for name in names for a in ("--" + name.replace("_", "-"), str(getattr(self, name)))]

    def server_limits(self, phase: str) -> tuple[int, int]:
        """``(--max-concurrent, --max-queue)`` of the server a phase runs against."""
        queue = max(self.streams, self.refusing_max_queue) if phase == "admitted" else self.refusing_max_queue
        return self.max_concurrent, queue


QUICK = BurstConfig(streams=200, max_tokens=4, timeout=60.0, max_concurrent=4, refusing_max_queue=4)


# --------------------------------------------------------------------------- the server's count
def requests_counted(metrics_port: int) -> Counter[str] | None:
    """``textgen_requests_total`` of gRPC requests by code, summed over models; None if /metrics is unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{metrics_port}/metrics", timeout=5.0) as response:
            text = response.read().decode("utf-8")
    except OSError:
        return None
    counted: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "textgen_requests_total" and sample.labels.get("protocol") == "grpc":
                counted[sample.labels["code"]] += int(sample.value)
    return counted


def _counted_since(metrics_port: int, before: Counter[str], expected: int) -> Counter[str] | None:
    """The count's change since ``before``, once it reaches ``expected`` or stops moving for a second."""
    end = time.monotonic() + COUNT_SETTLE_SECONDS
    last: Counter[str] | None = None
    still_since = time.monotonic()
    while True:
        now = requests_counted(metrics_port)
        if now is None:
            return None
        delta = +(now - before)
        if delta != last:
            last, still_since = delta, time.monotonic()
        if delta.total() >= expected or time.monotonic() - still_since >= 1.0 or time.monotonic() >= end:
            return delta
        time.sleep(0.1)


# --------------------------------------------------------------------------- the load generator
async def _one(stub: Any, request: Any, timeout: float, start: float) -> tuple[str, float, float | None]:
    """One stream: its code ("OK" when it finished), seconds from the burst's start to its end and to its first text."""
    import grpc

    first: float | None = None
    code = "NO_FINISH"  # the stream ended without a finish_reason and without an error
    try:
        async for message in stub.Generate(request, timeout=timeout):
            if first is None and message.text:
                first = time.perf_counter() - start
            if message.finish_reason:
                code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return code, time.perf_counter() - start, first


async def open_burst(target: str, model: str, config: BurstConfig) -> dict[str, Any]:
    """Opens ``config.streams`` streams at once and waits for all of them; what the clients saw."""
    from service.api import textgen_pb2_grpc

    corpus = bench_corpus(200_000)
    requests = [
        generate_request(i, config.max_tokens, config.prompt_chars, corpus, model) for i in range(config.streams)
    ]
    channels = channel_pool(target, max(1, math.ceil(config.streams / config.streams_per_connection)))
    try:
        stubs = [textgen_pb2_grpc.TextGenerationStub(c) for c in channels]
        start = time.perf_counter()
        ends = await asyncio.gather(
            *(_one(stubs[i % len(stubs)], r, config.timeout, start) for i, r in enumerate(requests))
        )
        seconds = time.perf_counter() - start
    finally:
        for c in channels:
            await c.close()
    codes = Counter(code for code, _, _ in ends)
    refusals = [end for code, end, _ in ends if code == "RESOURCE_EXHAUSTED"]
    completions = [end for code, end, _ in ends if code == "OK"]
    firsts = [1000.0 * first for code, _, first in ends if code == "OK" and first is not None]
    return {
        "streams": config.streams,
        "max_tokens": config.max_tokens,
        "completed": codes["OK"],
        "refused": codes["RESOURCE_EXHAUSTED"],
        "other_errors": config.streams - codes["OK"] - codes["RESOURCE_EXHAUSTED"],
        "codes": dict(codes),
        "seconds": seconds,
        "last_refusal_s": max(refusals) if refusals else None,
        "refusal_s_p50": percentile(refusals, 50),
        "last_completion_s": max(completions) if completions else None,
        # When the streams of each code ended, seconds from the burst's start: first, median, last.
        "end_s_by_code": {
            code: [min(t), percentile(t, 50), max(t)]
            for code in codes
            if (t := [end for c, end, _ in ends if c == code])
        },
        "ttft_ms_p50": percentile(firsts, 50),
        "ttft_ms_p99": percentile(firsts, 99),
    }


async def burst_with_count(target: str, model: str, metrics_port: int | None, config: BurstConfig) -> dict[str, Any]:
    """``open_burst`` plus, given the server's /metrics port, its count: ``counted``, ``unseen``, ``accounted``."""
    before = requests_counted(metrics_port) if metrics_port else None
    result = await open_burst(target, model, config)
    counted = None
    if metrics_port and before is not None:
        counted = await asyncio.to_thread(_counted_since, metrics_port, before, config.streams)
    result["counted"] = None if counted is None else dict(counted)
    result["unseen"] = None if counted is None else config.streams - counted.total()
    result["accounted"] = None if counted is None else result["unseen"] == 0 and counted == Counter(result["codes"])
    return result


# --------------------------------------------------------------------------- the harness
def measure_burst(target: str, pid: int | None, model: str, metrics_port: int, config: BurstConfig) -> dict[str, Any]:
    """One burst from a load-generator process of its own, with the peak RSS of the server's process tree."""
    args = ["--target", target, "--model", model, "--metrics-port", str(metrics_port), *config.load_args()]
    if pid is None:
        return run_load("benchmarks.burst", args, timeout=config.timeout + 120.0)
    with RssSampler(pid) as sampler:
        result = run_load("benchmarks.burst", args, timeout=config.timeout + 120.0)
    result["server_rss_kb_peak"] = sampler.peak_kb
    return result


def run_bursts(
    models_dir: str, model: str, config: BurstConfig, log_dir: str, extra_args: Sequence[str] = ()
) -> dict[str, Any]:
    """Both phases, each against a server of its own started with ``extra_args`` besides the limits."""
    from benchmarks.e2e_bench import ServerProcess, ServerSpec

    out: dict[str, Any] = {"config": asdict(config)}
    for phase in PHASES:
        concurrent, queue = config.server_limits(phase)
        spec = ServerSpec(models_dir, model, concurrent, concurrent, queue, extra_args=tuple(extra_args))
        try:
            with ServerProcess(spec, os.path.join(log_dir, f"server-burst-{phase}.log")) as server:
                result = measure_burst(server.target, server.pid, model, server.metrics_port, config)
        except Exception as e:  # the report says what failed; the other phase stands
            result = {"error": f"{type(e).__name__}: {e}"}
        result["server_args"] = f"--max-concurrent {concurrent} --max-queue {queue} {' '.join(extra_args)}".strip()
        out[phase] = result
        print(f"  burst, {phase}: {summary_line(result)}", flush=True)
    return out


def summary_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"not measured: {result['error']}"
    return (
        f"{result['streams']:,} streams: {result['completed']:,} completed, {result['refused']:,} refused "
        f"RESOURCE_EXHAUSTED, {result['other_errors']:,} other ({result['codes']}); the server counted "
        f"{result['counted']}, unseen {result['unseen']}"
    )


def markdown_lines(burst: dict[str, Any]) -> list[str]:
    """The report's section: one row per phase."""
    if not burst:
        return []
    config = burst.get("config", {})
    lines = [
        f"### Burst ({config.get('streams', 0):,} streams of {config.get('max_tokens', 0)} tokens opened at once)",
        "",
        "| server | completed | refused (RESOURCE_EXHAUSTED) | other codes | counted by the server | unseen | "
        "last refusal (s) | last completion (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase in PHASES:
        r = burst.get(phase)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {phase}: `{r.get('server_args', '')}` | not measured: {r['error']} |||||||")
            continue
        other = {k: v for k, v in r["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
        lines.append(
            f"| {phase}: `{r['server_args']}` | {r['completed']:,} | {r['refused']:,} | {other or '-'} | "
            f"{r['counted']} | {r['unseen']} | {_s(r['last_refusal_s'])} | {_s(r['last_completion_s'])} |"
        )
    return [*lines, ""]


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _self_served(units: int, quick: bool, config: BurstConfig) -> dict[str, Any]:
    """Export an untrained model and measure both phases on it."""
    from training.tf_runtime import quiet_start

    quiet_start([])
    from benchmarks.engine_bench import ModelSpec, export_bench_model

    spec = ModelSpec(units=units, embedding_dim=16, corpus_chars=20_000) if quick else ModelSpec(units=units)
    with tempfile.TemporaryDirectory(prefix="textgen-burst-") as tmp:
        bench = export_bench_model(os.path.join(tmp, "models"), spec)
        return run_bursts(bench.models_dir, bench.name, config, tmp)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst", description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one per phase)")
    parser.add_argument("--metrics-port", type=int, help="the running server's /metrics port, for its count")
    parser.add_argument("--model", default="", help="model name ('' = the server's default)")
    parser.add_argument("--units", type=int, help="units of the model it exports without --target (512; --quick 16)")
    parser.add_argument("--quick", action="store_true", help="a 16-unit model and a burst of 200")
    parser.add_argument("--out-json", help="write the result here too")
    for f in fields(BurstConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(QUICK, f.name)))
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(BurstConfig) if getattr(args, f.name) is not None}
    config = replace(QUICK if args.quick else BurstConfig(), **given)
    units = args.units or (16 if args.quick else 512)
    for flag, value in (
        ("--streams", config.streams),
        ("--max-tokens", config.max_tokens),
        ("--streams-per-connection", config.streams_per_connection),
        ("--max-concurrent", config.max_concurrent),
        ("--units", units),
    ):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.target:
        result = asyncio.run(burst_with_count(args.target, args.model, args.metrics_port, config))
        print(summary_line(result), flush=True)
    else:
        result = _self_served(units, args.quick, config)
    if args.out_json:
        with open(args.out_json, "w", encoding="utf-8") as out:
            json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
