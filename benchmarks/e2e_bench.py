"""End-to-end load over gRPC: a server subprocess, an asyncio load generator in its own process, server RSS.

The load generator (``python -m benchmarks.e2e_bench --target HOST:PORT --streams N ...``)
opens N concurrent ``Generate`` streams at once and records when each message
arrives. A message carries every token produced since the previous one (the
server coalesces for slow readers), so a message of ``k`` tokens arriving
``gap`` seconds after the previous one counts as ``k`` inter-token samples of
``gap / k``; time to first token is from sending the request to the first
message with text. Tokens are counted from the final message's usage (text
length when a stream ends without one). Given ``--server-pid``, it reads the
CPU seconds of that process and all its descendants (``benchmarks.proc_cpu``)
just before opening the first channel and just after the last stream ends,
so the server's CPU per token and per request cover the load and nothing
else, and the same split by process role (engine, frontends, other; see
``benchmarks.proc_cpu``). It writes one JSON summary.

The harness side (``ServerProcess``, ``RssSampler``, ``run_load``,
``measure_level``) starts ``python -m service`` on 127.0.0.1, waits for health
SERVING, runs one load process per measurement while sampling the ``VmRSS``
of the server's process tree and scraping its step counters from
``/metrics``, and stops the server with SIGTERM. ``measure_level`` measures
anything that has a ``LoadTarget``'s attributes, such as the bare gRPC floor
(``benchmarks.floor_server``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from benchmarks.proc_cpu import find_engine, rss_kb, tree_cpu_seconds, tree_cpu_seconds_by_role, tree_pids
from benchmarks.prompts import bench_corpus, prompt

LOCALHOST = "127.0.0.1"


# --------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class StreamRecord:
    """What one ``Generate`` call produced, as seen by the client."""

    start: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in that message)
    completion_tokens: int = 0
    finished: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0][0] - self.start if self.arrivals else None

    def itl_samples(self) -> list[float]:
        samples: list[float] = []
        for (t0, _), (t1, k) in zip(self.arrivals, self.arrivals[1:], strict=False):
            samples.extend([(t1 - t0) / k] * k)
        return samples


def summarize(records: Sequence[StreamRecord]) -> dict[str, Any]:
    """Aggregate tokens/s, TTFT and ITL percentiles (milliseconds) and errors over ``records``."""
    tokens = sum(r.completion_tokens or sum(k for _, k in r.arrivals) for r in records)
    starts = [r.start for r in records]
    ends = [r.arrivals[-1][0] for r in records if r.arrivals]
    duration = (max(ends) - min(starts)) if ends else 0.0
    ttfts = [1000.0 * t for r in records if (t := r.ttft) is not None]
    itls = [1000.0 * s for r in records for s in r.itl_samples()]
    messages = sum(len(r.arrivals) for r in records)
    codes: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            codes[r.error] = codes.get(r.error, 0) + 1
    return {
        "requests": len(records),
        "completed": sum(1 for r in records if r.finished),
        "errors": sum(codes.values()),
        "error_codes": codes,
        "tokens": tokens,
        "seconds": duration,
        "tokens_per_s": tokens / duration if duration > 0 else 0.0,
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p99": percentile(ttfts, 99),
        "itl_ms_p50": percentile(itls, 50),
        "itl_ms_p99": percentile(itls, 99),
        "itl_samples": len(itls),
        "messages": messages,
        "tokens_per_message": tokens / messages if messages else None,
    }


# --------------------------------------------------------------------------- the load generator
def channel_pool(target: str, count: int) -> list[Any]:
    import grpc

    # A local subchannel pool gives each channel its own TCP connection, as separate clients would have.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


async def run_stream(stub: Any, request: Any, timeout: float) -> StreamRecord:
    """One ``Generate`` call from send to last message; errors are recorded by status code name."""
    import grpc

    record = StreamRecord(start=time.perf_counter())
    try:
        async for message in stub.Generate(request, timeout=timeout):
            now = time.perf_counter()
            if message.text:
                record.arrivals.append((now, len(message.text)))  # char model: one token per character
            if message.finish_reason:
                record.completion_tokens = message.usage.completion_tokens
                record.finished = True
    except grpc.aio.AioRpcError as e:
        record.error = e.code().name
    except asyncio.CancelledError:
        record.error = "CLIENT_TIMEOUT"
    return record


def generate_request(index: int, max_tokens: int, prompt_chars: int, corpus: str, model: str) -> Any:
    from service.api import textgen_pb2

    return textgen_pb2.GenerateRequest(
        prompt=prompt(index, prompt_chars, corpus),
        max_tokens=max_tokens,
        temperature=1.0,
        seed=index + 1,
        model=model,
    )


async def concurrent_load(
    target: str, streams: int, max_tokens: int, prompt_chars: int, timeout: float, model: str
) -> dict[str, Any]:
    """``streams`` concurrent Generate calls started together; returns ``summarize`` of them."""
    from service.api import textgen_pb2_grpc

    corpus = bench_corpus(200_000)
    channels = channel_pool(target, max(1, math.ceil(streams / 128)))
    try:
        stubs = [textgen_pb2_grpc.TextGenerationStub(c) for c in channels]
        requests = [generate_request(i, max_tokens, prompt_chars, corpus, model) for i in range(streams)]
        tasks = [asyncio.ensure_future(run_stream(stubs[i % len(stubs)], requests[i], timeout)) for i in range(streams)]
        done, pending = await asyncio.wait(tasks, timeout=timeout + 5.0)
        for task in pending:
            task.cancel()
        records = [t.result() for t in done] + [await t for t in pending]
    finally:
        for c in channels:
            await c.close()
    return summarize(records)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_figures(server_cpu_seconds: float | None, tokens: int, requests: int) -> dict[str, float | None]:
    """Server CPU per completion token (microseconds) and per request (milliseconds)."""
    cpu = server_cpu_seconds
    return {
        "server_cpu_seconds": cpu,
        "cpu_us_per_token": None if cpu is None or not tokens else 1e6 * cpu / tokens,
        "cpu_ms_per_request": None if cpu is None or not requests else 1e3 * cpu / requests,
    }


def cpu_us_per_token_by_role(
    before: dict[str, float] | None, after: dict[str, float] | None, tokens: int
) -> dict[str, float] | None:
    """Each role's CPU microseconds per completion token between two ``tree_cpu_seconds_by_role`` readings."""
    if before is None or after is None or not tokens:
        return None
    return {role: 1e6 * (after[role] - before[role]) / tokens for role in after}


def _server_cpu(root: int | None, engine: int | None) -> tuple[float | None, dict[str, float] | None]:
    """The tree's CPU seconds and, with an engine, their split by role, from one reading so the parts add up."""
    if root is None:
        return None, None
    if engine is None:
        return tree_cpu_seconds(root), None
    by_role = tree_cpu_seconds_by_role(root, engine)
    return (None, None) if by_role is None else (sum(by_role.values()), by_role)


LoadFn = Callable[[str, int, int, int, float, str], Coroutine[Any, Any, dict[str, Any]]]


def load_main(prog: str, load: LoadFn, what: str, argv: Sequence[str] | None = None) -> int:
    """The load generator's command line, for a ``load(target, streams, max_tokens, prompt_chars, timeout, model)``."""
    parser = argparse.ArgumentParser(prog=prog, description=f"{what}: one load level, summary as JSON")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--streams", type=int, required=True, help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, required=True, help="tokens per stream")
    parser.add_argument("--prompt-chars", type=int, default=16)
    parser.add_argument("--model", default="", help="model name ('' = the server's default)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole load")
    parser.add_argument("--server-pid", type=int, help="report the CPU of this process and its descendants")
    parser.add_argument("--out-json", required=True)
    args = parser.parse_args(argv)
    for name in ("streams", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    # The engine (the process that loads TensorFlow) is found once, before the level; None for a server without it.
    engine = None if args.server_pid is None else find_engine(args.server_pid)
    server_before, by_role_before = _server_cpu(args.server_pid, engine)
    cpu_before, wall_before = _own_cpu_seconds(), time.perf_counter()
    summary = asyncio.run(load(args.target, args.streams, args.max_tokens, args.prompt_chars, args.timeout, args.model))
    # What the load generator took from the cores the server also runs on.
    summary["client_cpu_percent"] = 100.0 * (_own_cpu_seconds() - cpu_before) / (time.perf_counter() - wall_before)
    if args.server_pid is not None:
        server_after, by_role_after = _server_cpu(args.server_pid, engine)
        server_cpu = None if server_before is None or server_after is None else server_after - server_before
        summary.update(cpu_figures(server_cpu, summary["tokens"], summary["requests"]))
        summary["server_processes"] = len(tree_pids(args.server_pid))
        summary["engine_is_root"] = None if engine is None else engine == args.server_pid
        summary["cpu_us_per_token_by_role"] = cpu_us_per_token_by_role(by_role_before, by_role_after, summary["tokens"])
    with open(args.out_json, "w", encoding="utf-8") as f:
        json.dump(summary, f)
    return 0


# --------------------------------------------------------------------------- the server process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


def tree_rss_kb(pids: Sequence[int]) -> int | None:
    """The summed ``VmRSS`` of ``pids`` in KiB (gone processes count 0); None when all are gone."""
    values = [v for v in map(rss_kb, pids) if v is not None]
    return sum(values) if values else None


class RssSampler:
    """Samples the summed RSS of a process tree every ``interval`` s in a thread; ``peak_kb`` is the largest seen.

    The tree's pids are looked up again every ``tree_interval`` seconds (a walk of /proc costs
    about a millisecond; reading a few ``status`` files, much less).
    """

    def __init__(self, pid: int, interval: float = 0.02, tree_interval: float = 0.5) -> None:
        self._pid = pid
        self._interval = interval
        self._tree_interval = tree_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_kb = 0

    def _run(self) -> None:
        pids, looked_up = [self._pid], -math.inf
        while not self._stop.is_set():
            if time.monotonic() - looked_up >= self._tree_interval:
                pids, looked_up = tree_pids(self._pid) or [self._pid], time.monotonic()
            value = tree_rss_kb(pids)
            if value is not None:
                self.peak_kb = max(self.peak_kb, value)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server for a measurement."""

    models_dir: str
    model: str
    max_batch_size: int
    max_concurrent: int = 1024
    max_queue: int = 1024
    startup_timeout: float = 180.0
    extra_args: tuple[str, ...] = ()


class LoadTarget(Protocol):
    """What ``measure_level`` needs of a running server: where to send load, whose CPU and RSS to read."""

    @property
    def pid(self) -> int: ...  # the root of the server's process tree

    @property
    def target(self) -> str: ...  # gRPC HOST:PORT

    @property
    def http_target(self) -> str | None: ...  # HTTP HOST:PORT, None without an HTTP API

    @property
    def metrics_port(self) -> int | None: ...  # None without /metrics

    @property
    def model(self) -> str: ...  # the model name requests ask for

    def rss_kb(self) -> int | None: ...


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 30 s (no-op once the process has exited)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10.0)


class ServerProcess:
    """``python -m service`` on 127.0.0.1 with free ports; a context manager that always stops it."""

    def __init__(self, spec: ServerSpec, log_path: str) -> None:
        self.spec = spec
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        self.target = f"{LOCALHOST}:{self.port}"
        self.http_target = f"{LOCALHOST}:{self.http_port}"  # the OpenAI-compatible API (benchmarks/http_bench.py)
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def pid(self) -> int:
        proc = self._proc or self._stopped
        assert proc is not None, "the server was never launched"
        return proc.pid

    @property
    def model(self) -> str:
        return self.spec.model

    def command(self) -> list[str]:
        s = self.spec
        return [
            sys.executable,
            "-m",
            "service",
            "--models",
            s.models_dir,
            "--default-model",
            s.model,
            "--host",
            LOCALHOST,
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--http-port",
            str(self.http_port),
            "--max-batch-size",
            str(s.max_batch_size),
            "--max-concurrent",
            str(s.max_concurrent),
            "--max-queue",
            str(s.max_queue),
            *s.extra_args,
        ]

    def launch(self) -> None:
        """Start the process without waiting for it (``with`` waits for SERVING; ``__exit__`` stops it)."""
        if self._proc is not None:
            return
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> ServerProcess:
        self.launch()
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.spec.startup_timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self._proc.returncode} during startup: {self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"server not SERVING after {self.spec.startup_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def rss_kb(self) -> int | None:
        """The summed RSS of the server and its descendants."""
        return tree_rss_kb(tree_pids(self.pid))

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._stopped = proc  # keeps the pid readable for reports


def py_spy_path() -> str | None:
    """The py-spy executable beside this interpreter (the ``bench`` extra installs it) or on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` of a process and its subprocesses while the ``with`` block runs (no pausing of them)."""

    def __init__(self, pid: int, out_path: str, rate: int = 100, max_seconds: float = 300.0) -> None:
        exe = py_spy_path()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy, or the 'bench' extra)")
        self.out_path = out_path
        self._cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate), "--format", "raw"]
        self._cmd += ["--output", out_path, "--nonblocking", "--duration", str(int(max_seconds))]
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let it attach before the load starts
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            proc.wait(timeout=30.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10.0)


def strip_local_paths(path: str, names: dict[str, str]) -> None:
    """Rewrite a raw profile in place with each of ``names``' local paths replaced by its name.

    py-spy names each process by its command line, which holds the interpreter's and the run
    folder's absolute paths; a profile kept with the results names neither.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for local, name in sorted(names.items(), key=lambda item: -len(item[0])):  # longest first
        text = text.replace(local, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# py-spy --subprocesses starts each stack with one frame per process from the root down.
_PROCESS_FRAME = re.compile(r'process (\d+):"([^"]*)";')


def summarize_profile(path: str, top: int = 12) -> dict[str, Any]:
    """Shares of samples by thread, and by function (file:line dropped): on top (self) and anywhere (inclusive).

    When the stacks come from several processes, a thread is named with its process's pid, and
    ``processes`` maps each pid to its command line.
    """
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    processes: dict[str, str] = {}
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            pid = None
            while match := _PROCESS_FRAME.match(stack):
                pid, stack = match.group(1), stack[match.end() :]
                processes[pid] = match.group(2)[:200]
            frames = [_frame_name(fr) for fr in stack.split(";")]
            thread = _thread_of(frames)
            if pid is not None:
                thread = f"pid {pid}: {thread}"
            threads[thread] = threads.get(thread, 0) + count
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
            for name in set(frames):
                inclusive[name] = inclusive.get(name, 0) + count

    def ranked(counts: dict[str, int]) -> list[list[Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(n / total, 4)] for name, n in best]

    return {
        "samples": total,
        "threads": ranked(threads) if total else [],
        "self": ranked(self_counts) if total else [],
        "inclusive": ranked(inclusive) if total else [],
        "processes": processes,
    }


def _thread_of(frames: list[str]) -> str:
    """A thread's target (the frame under ``Thread.run``); stacks without one are the main thread's."""
    for i, frame in enumerate(frames[:-1]):
        if frame.startswith("Thread.run ("):
            return frames[i + 1]
    return "main thread (asyncio event loop: gRPC, servicer)"


def _frame_name(frame: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (to/file.py)``."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(file.split("/")[-2:])
    return f"{name} ({short})" if file else name


SCRAPED = {
    "textgen_step_duration_seconds_sum": "step_seconds",
    "textgen_step_duration_seconds_count": "steps",
    "textgen_batch_size_sum": "batch_rows",
    "textgen_generated_tokens_total": "generated_tokens",
}


def scrape_server(metrics_port: int) -> dict[str, float]:
    """The server's own step and token counters (summed over models) from its /metrics; {} if unreachable."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{metrics_port}/metrics", timeout=5.0) as response:
            text = response.read().decode("utf-8")
    except OSError:
        return {}
    totals = dict.fromkeys(SCRAPED.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SCRAPED:
                totals[SCRAPED[sample.name]] += sample.value
    return totals


def server_view(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float | None]:
    """What the server says happened during a level: steps, mean batch, mean step time, share of time in steps."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in after}
    steps = d["steps"]
    return {
        "server_steps": steps,
        "server_generated_tokens": d["generated_tokens"],
        "server_mean_batch": d["batch_rows"] / steps if steps else None,
        "server_step_ms_mean": 1000.0 * d["step_seconds"] / steps if steps else None,
        "server_step_share": d["step_seconds"] / seconds if seconds > 0 else None,
    }


def run_load(module: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m module args --out-json F`` in its own process and return the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="textgen-bench-") as tmp:
        out = os.path.join(tmp, "load.json")
        cmd = [sys.executable, "-m", module, *args, "--out-json", out]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not os.path.exists(out):
            stderr = proc.stderr.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"load generator {module} exited with {proc.returncode}: {stderr}")
        with open(out, encoding="utf-8") as f:
            result: dict[str, Any] = json.load(f)
            return result


def measure_level(
    server: LoadTarget,
    streams: int,
    max_tokens: int,
    prompt_chars: int,
    timeout: float,
    protocol: str = "grpc",
) -> dict[str, Any]:
    """One concurrency level against a running server, with its RSS before and at peak and its CPU.

    ``protocol`` "grpc" loads it with Generate streams (this module), "http" with SSE completions
    (``benchmarks.http_bench``); the summaries compare directly. RSS and CPU are those of the
    server's whole process tree; the load generator reads the CPU (``--server-pid``).
    """
    before = server.rss_kb() or 0
    counters_before = scrape_server(server.metrics_port) if server.metrics_port is not None else {}
    if protocol == "http":
        if server.http_target is None:
            raise ValueError("this server has no HTTP API")
        target, module = server.http_target, "benchmarks.http_bench"
    else:
        target, module = server.target, "benchmarks.e2e_bench"
    args = ["--target", target, "--streams", str(streams), "--max-tokens", str(max_tokens)]
    args += ["--prompt-chars", str(prompt_chars), "--model", server.model, "--timeout", str(timeout)]
    args += ["--server-pid", str(server.pid)]
    with RssSampler(server.pid) as sampler:
        summary = run_load(module, args, timeout=timeout + 60.0)
    if server.metrics_port is not None:
        summary.update(server_view(counters_before, scrape_server(server.metrics_port), summary["seconds"]))
    summary.update(
        streams=streams,
        max_tokens=max_tokens,
        protocol=protocol,
        server_rss_kb_before=before,
        server_rss_kb_peak=sampler.peak_kb,
        server_rss_kb_per_stream=max(0, sampler.peak_kb - before) / streams,
    )
    return summary


if __name__ == "__main__":
    sys.exit(load_main("python -m benchmarks.e2e_bench", concurrent_load, "gRPC Generate streams"))
