"""``textgen bench --out DIR``: run every benchmark on one model in one go and write the report.

Order of a run (one model, one machine, baselines from the same run):

1. build an untrained char LSTM (default 1 layer x 512 units) and export it to
   ``DIR/models/bench/1``;
2. engine only: the decode step at several batch sizes, the seeds' loop and
   OneStep per request;
3. end to end over gRPC against ``python -m service`` at several concurrency
   levels (each level's figures are medians over ``--repeats``), then the
   interference and untrusted-prompt scenarios on the same server;
4. the floor: the same levels against ``benchmarks.floor_server`` (no model),
   sending as many tokens per message as the server sent at that level;
5. the same concurrency levels against ``--max-batch-size 1`` (once each);
6. ``DIR/results.json``, ``DIR/table.md``, ``DIR/throughput.png``,
   ``DIR/latency.png``; the table is printed too.

``--quick`` shrinks everything (a 16-unit model, two small levels, a few
tokens) to check the harness end to end in well under a minute.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmarks.burst import PHASES as BURST_PHASES
from benchmarks.burst import QUICK as QUICK_BURST
from benchmarks.burst import BurstConfig, run_bursts
from benchmarks.e2e_bench import (
    Profiler,
    ServerProcess,
    ServerSpec,
    measure_level,
    strip_local_paths,
    summarize_profile,
)
from benchmarks.floor_server import FloorProcess, FloorSpec
from benchmarks.interference import InterferenceConfig, measure_interference
from benchmarks.untrusted_prompts import QUICK as QUICK_UNTRUSTED
from benchmarks.untrusted_prompts import UntrustedConfig, measure_untrusted
from service.config import ServerConfig
from training.tf_runtime import add_log_level_flag, quiet_start

SERVER_DEFAULTS = ServerConfig()  # the server's own defaults, which the bench's servers run with


@dataclass(frozen=True)
class E2EConfig:
    """The end-to-end levels and how many tokens each stream asks for.

    A stream asks for ``total_tokens // streams`` tokens, clamped to
    ``[min_tokens, max_tokens]``, so every level does a similar amount of work.
    """

    streams: tuple[int, ...] = (1, 16, 64, 256, 1000)
    total_tokens: int = 32768
    min_tokens: int = 64
    max_tokens: int = 2048
    repeats: int = 3
    prompt_chars: int = 16
    level_timeout: float = 120.0
    server_max_batch_size: int = 1024
    server_max_concurrent: int = 1024
    # Both servers' K flags and --call-budget-ms (the server's defaults).
    server_steps_per_call: int = SERVER_DEFAULTS.steps_per_call
    server_max_steps_per_call: int = SERVER_DEFAULTS.max_steps_per_call
    server_row_steps_per_call: int = SERVER_DEFAULTS.row_steps_per_call
    server_call_budget_ms: float = SERVER_DEFAULTS.call_budget_ms
    # --max-batch-size 1: far slower, so less work per level and one repeat.
    baseline_streams: tuple[int, ...] = (1, 16, 64, 256, 1000)
    baseline_total_tokens: int = 4096
    baseline_min_tokens: int = 8
    warmup_streams: int = 16
    warmup_tokens: int = 8

    def tokens_for(self, streams: int, baseline: bool = False) -> int:
        total, low = (
            (self.baseline_total_tokens, self.baseline_min_tokens) if baseline else (self.total_tokens, self.min_tokens)
        )
        return max(low, min(self.max_tokens, total // streams))

    def server_flags(self) -> tuple[str, ...]:
        """K and the call budget, as every server of the run gets them (the ceiling never below K)."""
        return (
            "--steps-per-call",
            str(self.server_steps_per_call),
            "--max-steps-per-call",
            str(max(self.server_max_steps_per_call, self.server_steps_per_call)),
            "--row-steps-per-call",
            str(self.server_row_steps_per_call),
            "--call-budget-ms",
            f"{self.server_call_budget_ms:g}",
        )


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run does; built in ``main`` from the flags."""

    out: str
    model: Any  # engine_bench.ModelSpec (imported lazily: it pulls in TensorFlow)
    engine: Any  # engine_bench.EngineBenchConfig
    e2e: E2EConfig = field(default_factory=E2EConfig)
    interference: InterferenceConfig = field(default_factory=InterferenceConfig)
    untrusted: UntrustedConfig = field(default_factory=UntrustedConfig)
    burst: BurstConfig = field(default_factory=BurstConfig)
    run_e2e: bool = True
    run_interference: bool = True
    run_untrusted: bool = True
    run_burst: bool = True
    run_floor: bool = True
    profile: bool = False  # py-spy the batched server during one extra run at reference_streams
    overlap_startup: bool = False  # --quick: start both servers at once (saves a start-up; not for real figures)
    reference_streams: int = 64
    capacity_streams: int = 1000


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM and software versions of this machine."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
            ram_gib = round(kb / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    import tensorflow as tf

    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "platform": platform.platform(),
    }


def _median_level(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each figure over repeats; errors summed; RSS per stream the worst repeat."""
    out = dict(runs[-1])
    keys = ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "seconds", "tokens_per_message")
    for key in (
        *keys,
        "server_cpu_seconds",
        "cpu_us_per_token",
        "cpu_ms_per_request",
        "client_cpu_percent",
        "server_mean_batch",
        "server_step_ms_mean",
        "server_step_share",
    ):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(r["errors"] for r in runs)
    codes: dict[str, int] = {}
    for r in runs:
        for code, n in r["error_codes"].items():
            codes[code] = codes.get(code, 0) + n
    out["error_codes"] = codes
    out["server_rss_kb_per_stream"] = max(r["server_rss_kb_per_stream"] for r in runs)
    out["server_rss_kb_peak"] = max(r["server_rss_kb_peak"] for r in runs)
    out["server_processes"] = max((r.get("server_processes") or 0 for r in runs), default=0) or None
    by_role = [r["cpu_us_per_token_by_role"] for r in runs if r.get("cpu_us_per_token_by_role")]
    out["cpu_us_per_token_by_role"] = (
        {k: statistics.median(x[k] for x in by_role) for k in by_role[0]} if by_role else None
    )
    out["repeats"] = len(runs)
    out["tokens_per_s_all"] = [r["tokens_per_s"] for r in runs]
    return out


def make_server(config: BenchConfig, models_dir: str, max_batch_size: int) -> ServerProcess:
    e2e = config.e2e
    spec = ServerSpec(
        models_dir=models_dir,
        model="bench",
        max_batch_size=max_batch_size,
        max_concurrent=e2e.server_max_concurrent,
        max_queue=max(e2e.server_max_concurrent, max(e2e.streams), max(e2e.baseline_streams)),
        # Both servers get the same K and budget; with --max-batch-size 1 and requests
        # waiting to join, the engine makes one step per call anyway.
        extra_args=e2e.server_flags(),
    )
    tag = "mbs1" if max_batch_size == 1 else "batched"
    return ServerProcess(spec, os.path.join(config.out, "logs", f"server-{tag}.log"))


def run_server_levels(
    config: BenchConfig, server: ServerProcess, baseline: bool, results: dict[str, Any]
) -> dict[str, Any]:
    """Wait for one server, measure its concurrency levels (and the interference scenario if batched), stop it."""
    e2e = config.e2e
    spec = server.spec
    tag = "mbs1" if baseline else "batched"
    flags = " ".join(
        [f"--max-batch-size {spec.max_batch_size} --max-concurrent {spec.max_concurrent} --max-queue {spec.max_queue}"]
        + list(spec.extra_args)
    )
    part: dict[str, Any] = {"server_args": flags, "levels": []}
    streams = e2e.baseline_streams if baseline else e2e.streams
    repeats = 1 if baseline else e2e.repeats
    try:
        with server:
            part["server_rss_kb_idle"] = server.rss_kb()
            measure_level(server, e2e.warmup_streams, e2e.warmup_tokens, e2e.prompt_chars, e2e.level_timeout)
            part["server_rss_kb_after_warmup"] = server.rss_kb()
            for n in streams:
                tokens = e2e.tokens_for(n, baseline)
                runs = [measure_level(server, n, tokens, e2e.prompt_chars, e2e.level_timeout) for _ in range(repeats)]
                level = _median_level(runs)
                # The stricter figure: growth since warm-up (16 streams), so memory kept from earlier levels counts.
                baseline_kb = part["server_rss_kb_after_warmup"] or 0
                level["server_rss_kb_per_stream_since_warmup"] = max(0, level["server_rss_kb_peak"] - baseline_kb) / n
                part["levels"].append(level)
                print(
                    f"  e2e {tag}: {n} streams x {tokens} tokens: {level['tokens_per_s']:,.0f} tokens/s, "
                    f"server CPU {_us(level['cpu_us_per_token'])} us/token, errors {level['errors']}",
                    flush=True,
                )
            if not baseline and config.reference_streams in streams:
                # The same load over the HTTP API (SSE), on the same server, right after the gRPC levels.
                n = config.reference_streams
                runs = [
                    measure_level(server, n, e2e.tokens_for(n), e2e.prompt_chars, e2e.level_timeout, protocol="http")
                    for _ in range(repeats)
                ]
                part["http"] = _median_level(runs)
                print(
                    f"  e2e {tag} over HTTP SSE: {n} streams: {part['http']['tokens_per_s']:,.0f} tokens/s, "
                    f"errors {part['http']['errors']}",
                    flush=True,
                )
            if not baseline and config.profile:
                results["profile"] = profile_server(config, server)
            if not baseline and config.run_interference:
                try:
                    results["interference"] = measure_interference(server.target, "bench", config.interference)
                except Exception as e:  # the report says what failed; the rest of the run stands
                    results["interference"] = {"error": f"{type(e).__name__}: {e}"}
            if not baseline and config.run_untrusted:
                try:
                    results["untrusted_prompts"] = measure_untrusted(server.target, "bench", config.untrusted)
                except Exception as e:  # as above
                    results["untrusted_prompts"] = {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:
        part["error"] = f"{type(e).__name__}: {e}"
        print(f"  e2e {tag} failed: {part['error']}", file=sys.stderr, flush=True)
    return part


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def run_floor_levels(config: BenchConfig, batched: dict[str, Any]) -> dict[str, Any]:
    """The batched server's levels against the floor server, one floor process per level.

    Each level's floor sends the tokens per message the batched server sent at that level (the
    median over repeats), so both serve the same messages.
    """
    e2e = config.e2e
    part: dict[str, Any] = {"levels": []}
    try:
        for served in batched.get("levels", []):
            n, tokens = served["streams"], served["max_tokens"]
            per_message = served.get("tokens_per_message") or 1.0
            log = os.path.join(config.out, "logs", f"floor-{n}-streams.log")
            with FloorProcess(FloorSpec(tokens_per_message=per_message, model="bench"), log) as floor:
                measure_level(floor, e2e.warmup_streams, e2e.warmup_tokens, e2e.prompt_chars, e2e.level_timeout)
                after_warmup = floor.rss_kb() or 0
                runs = [
                    measure_level(floor, n, tokens, e2e.prompt_chars, e2e.level_timeout) for _ in range(e2e.repeats)
                ]
            level = _median_level(runs)
            level["server_rss_kb_per_stream_since_warmup"] = max(0, level["server_rss_kb_peak"] - after_warmup) / n
            level["tokens_per_message_sent"] = per_message
            part["levels"].append(level)
            print(
                f"  floor: {n} streams x {tokens} tokens at {per_message:.2f} tokens/message: "
                f"{level['tokens_per_s']:,.0f} tokens/s, server CPU {_us(level['cpu_us_per_token'])} us/token, "
                f"errors {level['errors']}",
                flush=True,
            )
    except Exception as e:
        part["error"] = f"{type(e).__name__}: {e}"
        print(f"  floor failed: {part['error']}", file=sys.stderr, flush=True)
    return part


def profile_server(config: BenchConfig, server: ServerProcess) -> dict[str, Any]:
    """One more run at ``reference_streams`` under py-spy (not part of the figures: profiling slows the server)."""
    n = config.reference_streams
    raw = os.path.join(config.out, "profile", f"server-{n}-streams.txt")
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    try:
        with Profiler(server.pid, raw):
            level = measure_level(
                server, n, config.e2e.tokens_for(n), config.e2e.prompt_chars, config.e2e.level_timeout
            )
        strip_local_paths(raw, {sys.executable: "python", os.path.abspath(config.out): "OUT"})
        summary = summarize_profile(raw)
    except Exception as e:  # the report says what failed; the rest of the run stands
        return {"error": f"{type(e).__name__}: {e}"}
    print(f"  profiled {n} streams: {summary['samples']} samples in {raw}", flush=True)
    return {"streams": n, "tokens_per_s": level["tokens_per_s"], "raw": os.path.relpath(raw, config.out), **summary}


def run(config: BenchConfig) -> dict[str, Any]:
    """The whole benchmark; returns the results document (the report is written by the caller)."""
    from benchmarks import engine_bench

    started = time.perf_counter()
    models_dir = os.path.join(config.out, "models")
    os.makedirs(os.path.join(config.out, "logs"), exist_ok=True)
    results: dict[str, Any] = {
        "config": {
            "model": asdict(config.model),
            "engine": asdict(config.engine),
            "e2e": asdict(config.e2e),
            "interference": asdict(config.interference),
            "untrusted_prompts": asdict(config.untrusted),
            "burst": asdict(config.burst),
            "reference_streams": config.reference_streams,
            "capacity_streams": config.capacity_streams,
        },
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"exporting the benchmark model ({config.model.units} units) ...", flush=True)
    bench = engine_bench.export_bench_model(models_dir, config.model)
    engine: dict[str, Any] = {"vocab_size": bench.tokenizer.vocab_size}
    results["engine"] = engine
    print("engine only: batched decode step ...", flush=True)
    engine["batched"] = engine_bench.measure_batched(bench, config.engine)
    for row in engine["batched"]["rows"]:
        print(f"  batch {row['batch']}: {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    engine["variants"] = engine_bench.measure_variants(bench, config.engine)
    for row in engine["variants"]["rows"]:
        print(f"  {row['variant']}, batch {row['batch']}: {row['tokens_per_s']:,.0f} tokens/s", flush=True)
    engine["onestep"] = engine_bench.measure_onestep(bench, config.engine)
    print(f"  OneStep per request: {engine['onestep']['ms_per_token']:.3f} ms/token", flush=True)
    engine["seed_loop"] = engine_bench.measure_seed_loop(bench, config.engine)
    print(f"  seeds' loop: {engine['seed_loop']['ms_per_token']:.1f} ms/token", flush=True)
    if config.run_e2e:
        results["e2e"] = {}
        servers = [
            ("batched", make_server(config, models_dir, config.e2e.server_max_batch_size), False),
            ("max_batch_size_1", make_server(config, models_dir, 1), True),
        ]
        try:
            if config.overlap_startup:  # both start now; the second idles while the first is measured
                for _, server, _ in servers:
                    server.launch()
            for key, server, baseline in servers:
                print(f"end to end: --max-batch-size {server.spec.max_batch_size} ...", flush=True)
                results["e2e"][key] = run_server_levels(config, server, baseline, results)
                if not baseline and config.run_floor:
                    print("end to end: the floor (a bare grpc.aio server, no model) ...", flush=True)
                    results["e2e"]["floor"] = run_floor_levels(config, results["e2e"][key])
        finally:
            for _, server, _ in servers:
                server.__exit__()
    if config.run_e2e and config.run_burst:
        print(f"burst: {config.burst.streams:,} streams opened at once ...", flush=True)
        flags = config.e2e.server_flags()  # the e2e servers' K and budget
        results["burst"] = run_bursts(models_dir, "bench", config.burst, os.path.join(config.out, "logs"), flags)
    results["seconds"] = time.perf_counter() - started
    return results


QUICK_E2E = E2EConfig(
    streams=(1, 4),
    total_tokens=64,
    min_tokens=8,
    max_tokens=16,
    repeats=1,
    level_timeout=60.0,
    server_max_batch_size=64,
    server_max_concurrent=64,
    baseline_streams=(1, 4),
    baseline_total_tokens=32,
    baseline_min_tokens=4,
    warmup_streams=2,
    warmup_tokens=4,
)
QUICK_INTERFERENCE = InterferenceConfig(
    streams=4, stream_tokens=32, arrival_prompt_chars=64, arrival_tokens=4, window=0.6, warmup=0.3, timeout=30.0
)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_config(argv: Sequence[str]) -> BenchConfig:
    from benchmarks.engine_bench import EngineBenchConfig, ModelSpec

    parser = argparse.ArgumentParser(prog="textgen bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for results.json, table.md, plots, model, logs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    parser.add_argument("--units", type=int, help="LSTM units (default 512; --quick 16)")
    parser.add_argument("--layers", type=int, help="LSTM layers (default 1)")
    parser.add_argument("--batches", type=_ints, help="engine-only batch sizes, e.g. 1,8,32,64,128,512")
    parser.add_argument("--streams", type=_ints, help="end-to-end concurrency levels, e.g. 1,16,64,256,1000")
    parser.add_argument("--baseline-streams", type=_ints, help="levels for --max-batch-size 1")
    parser.add_argument("--repeats", type=int, help="repeats per figure (medians are reported)")
    parser.add_argument("--no-e2e", action="store_true", help="engine-only figures (no server)")
    parser.add_argument("--no-interference", action="store_true")
    parser.add_argument("--no-untrusted", action="store_true", help="skip the untrusted-prompt scenario")
    parser.add_argument("--no-burst", action="store_true", help="skip the burst of streams opened at once")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare gRPC server's levels")
    parser.add_argument("--profile", action="store_true", help="py-spy the batched server in one extra run")
    d = SERVER_DEFAULTS
    parser.add_argument(
        "--steps-per-call", type=int, help=f"the servers' --steps-per-call (default {d.steps_per_call}, as the server)"
    )
    parser.add_argument(
        "--row-steps-per-call",
        type=int,
        help=f"the servers' --row-steps-per-call (default {d.row_steps_per_call}; 0: K stays fixed)",
    )
    parser.add_argument(
        "--call-budget-ms", type=float, help=f"the servers' --call-budget-ms (default {d.call_budget_ms:g})"
    )
    add_log_level_flag(parser)
    args = parser.parse_args(list(argv))
    model, engine, e2e, inter = ModelSpec(), EngineBenchConfig(), E2EConfig(), InterferenceConfig()
    untrusted = UntrustedConfig()
    burst = BurstConfig()
    reference, capacity = 64, 1000
    if args.quick:
        model = ModelSpec(units=16, embedding_dim=16, corpus_chars=20_000)
        engine = EngineBenchConfig(
            batch_sizes=(1, 4),
            repeats=2,
            max_steps=20,
            repeat_seconds=0.05,
            seed_tokens=3,
            onestep_tokens=10,
            variant_batch_sizes=(4,),
            steps_per_call=(4,),
            variant_repeats=1,
        )
        e2e, inter, untrusted, burst = QUICK_E2E, QUICK_INTERFERENCE, QUICK_UNTRUSTED, QUICK_BURST
        reference, capacity = 4, 4
    for name in ("units", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.units is not None:
        model = replace(model, units=args.units)
    if args.layers is not None:
        model = replace(model, layers=args.layers)
    if args.batches:
        engine = replace(engine, batch_sizes=args.batches)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        engine = replace(engine, repeats=args.repeats)
        e2e = replace(e2e, repeats=args.repeats)
    if args.steps_per_call is not None:
        if args.steps_per_call < 1:
            parser.error(f"--steps-per-call must be at least 1, got {args.steps_per_call}")
        e2e = replace(e2e, server_steps_per_call=args.steps_per_call)
    if args.row_steps_per_call is not None:
        if args.row_steps_per_call < 0:
            parser.error(f"--row-steps-per-call must be at least 0, got {args.row_steps_per_call}")
        e2e = replace(e2e, server_row_steps_per_call=args.row_steps_per_call)
    if args.call_budget_ms is not None:
        if args.call_budget_ms < 0:
            parser.error(f"--call-budget-ms must be at least 0, got {args.call_budget_ms}")
        e2e = replace(e2e, server_call_budget_ms=args.call_budget_ms)
    if args.streams:
        e2e = replace(e2e, streams=args.streams)
    if args.baseline_streams:
        e2e = replace(e2e, baseline_streams=args.baseline_streams)
    if reference not in engine.batch_sizes:
        engine = replace(engine, batch_sizes=tuple(sorted({*engine.batch_sizes, reference})))
    return BenchConfig(
        out=os.path.abspath(args.out),
        model=model,
        engine=engine,
        e2e=e2e,
        interference=inter,
        untrusted=untrusted,
        burst=burst,
        run_e2e=not args.no_e2e,
        run_interference=not args.no_interference,
        run_untrusted=not args.no_untrusted,
        run_burst=not args.no_burst,
        run_floor=not args.no_floor,
        profile=args.profile,
        overlap_startup=args.quick,
        reference_streams=reference,
        capacity_streams=capacity,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every part ran (targets may still fail), 1 when a part could not run."""
    config = parse_config(sys.argv[1:] if argv is None else argv)
    os.makedirs(config.out, exist_ok=True)
    results = run(config)
    from benchmarks.report import write_report

    paths = write_report(results, config.out)
    with open(paths["table.md"], encoding="utf-8") as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    failed = [k for k, v in results.get("e2e", {}).items() if v.get("error")]
    failed += [k for k in ("interference", "untrusted_prompts") if results.get(k, {}).get("error")]
    failed += [f"burst {p}" for p in BURST_PHASES if results.get("burst", {}).get(p, {}).get("error")]
    if failed:
        print(f"could not measure: {', '.join(failed)} (see {os.path.join(config.out, 'logs')})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    quiet_start(sys.argv[1:])
    sys.exit(main())
