"""``textgen serve --frontends 2``: one engine process and two frontend processes, from the outside.

Each test starts the real server as a child process and talks to it over gRPC and HTTP (SSE).
Streams open on separate channels (separate connections), which ``SO_REUSEPORT`` spreads over the
frontends; with 12 connections the chance that all land on one of two frontends is 2 in 4096,
and the tests that need both check that both served.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api import textgen_pb2, textgen_pb2_grpc
from tests.helpers import ServerProcess, health_status, metric_sample, scrape, wait_until

pytestmark = pytest.mark.timeout(300)

LONG = 200_000  # tokens: a stream that runs until the test ends it
FLAGS = (
    "--frontends",
    "2",
    "--max-tokens-limit",
    str(LONG),
    "--steps-per-call",
    "1",
    "--row-steps-per-call",
    "0",
    "--grace-seconds",
    "20",
)
CONNECTIONS = 12


def children(pid: int) -> list[int]:
    """The server's processes: the engine and the frontends (not multiprocessing's resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == pid and b"resource_tracker" not in cmdline:
            out.append(int(entry))
    return out


def runs_tensorflow(pid: int) -> bool:
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
        return "libtensorflow" in f.read()


def engine_and_frontends(server: ServerProcess) -> tuple[int, list[int]]:
    pids = children(server.proc.pid)
    engines = [p for p in pids if runs_tensorflow(p)]
    assert len(engines) == 1, f"one engine process expected among {pids}"
    return engines[0], [p for p in pids if p != engines[0]]


@dataclass
class Outcome:
    code: str
    text_length: int
    ended_at: float
    peer: str


async def grpc_stream(target: str, max_tokens: int, seed: int, started: asyncio.Event | None = None) -> Outcome:
    """One Generate stream on a channel of its own."""
    text = 0
    peer = ""
    # A subchannel pool of its own: otherwise grpc shares one connection among a process's channels.
    async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = textgen_pb2_grpc.TextGenerationStub(channel)
        call = stub.Generate(textgen_pb2.GenerateRequest(prompt="The ", max_tokens=max_tokens, seed=seed))
        try:
            async for response in call:
                text += len(response.text)
                if started is not None and text:
                    started.set()
            return Outcome("OK", text, time.monotonic(), peer)
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code().name, text, time.monotonic(), peer)


async def sse_stream(http_port: int, max_tokens: int) -> Outcome:
    """One streamed completion over HTTP; an error event or a cut connection is the outcome's code."""
    text = 0
    try:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "The ", "max_tokens": max_tokens, "stream": True, "seed": 1}
            async with session.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body) as response:
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Outcome(str(event["error"].get("code") or "error"), text, time.monotonic(), "")
                    text += len(event["choices"][0]["text"])
        return Outcome("OK", text, time.monotonic(), "")
    except aiohttp.ClientError as exc:
        return Outcome(type(exc).__name__, text, time.monotonic(), "")


def http_port(server: ServerProcess) -> int:
    match = re.search(r"http on port (\d+)", server.log())
    assert match, server.log()
    return int(match.group(1))


def frontend_requests(server: ServerProcess) -> dict[str, int]:
    """Requests each frontend process logged."""
    counts: dict[str, int] = {}
    for line in server.log().splitlines():
        if "service.servicer: request " in line:
            name = line.split()[2].strip("[]")
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_frontends_share_the_port_and_the_engine(start_process: Callable[..., ServerProcess]) -> None:
    server = start_process("--frontends", "2")
    server.wait_serving()
    engine, frontends = engine_and_frontends(server)
    assert len(frontends) == 2
    assert not any(runs_tensorflow(p) for p in frontends), "a frontend process loaded TensorFlow"

    async def run() -> list[Outcome]:
        return await asyncio.gather(*(grpc_stream(server.target, 30, i) for i in range(CONNECTIONS)))

    outcomes = asyncio.run(run())
    assert [o.code for o in outcomes] == ["OK"] * CONNECTIONS
    served = frontend_requests(server)
    assert sorted(served) == ["textgen-frontend-0", "textgen-frontend-1"], served
    # One metrics port for every process: the frontends' request counts and the engine's steps.
    exposition = scrape(server.metrics_port)
    assert metric_sample(exposition, "textgen_requests_total", {"code": "OK", "protocol": "grpc"}) == CONNECTIONS
    assert metric_sample(exposition, "textgen_generated_tokens_total") == 30 * CONNECTIONS
    assert metric_sample(exposition, "textgen_step_duration_seconds_count") > 0
    assert metric_sample(exposition, "textgen_time_to_first_token_seconds_count") == CONNECTIONS
    gauges = [
        sample
        for family in text_string_to_metric_families(exposition)
        if family.name in ("textgen_active_sequences", "textgen_model_loaded")
        for sample in family.samples
    ]
    assert gauges and all("pid" not in sample.labels for sample in gauges), gauges
    assert metric_sample(exposition, "textgen_model_loaded") == 1


def test_the_same_seed_gives_the_same_text_as_one_process(start_process: Callable[..., ServerProcess]) -> None:
    one = start_process("--frontends", "0", "--event-loop", "asyncio")  # and the frontends on uvloop
    two = start_process("--frontends", "2")
    one.wait_serving()
    two.wait_serving()
    # With and without a stop sequence; each message of the engine carries several tokens of a row.
    for stop in (["e t"], []):
        request = {"max_tokens": 60, "seed": 7, "temperature": 0.9, "top_p": 0.9, "stop": stop, "include_tokens": True}
        with one.client() as a, two.client() as b:
            first = a.complete("To be", **request)
            second = b.complete("To be", **request)
        assert first.text == second.text
        assert first.finish_reason == second.finish_reason
        assert [(t.id, t.text) for t in first.tokens] == [(t.id, t.text) for t in second.tokens]
        assert [t.logprob for t in first.tokens] == pytest.approx([t.logprob for t in second.tokens], abs=1e-5)
        assert first.usage.completion_tokens == second.usage.completion_tokens == len(second.tokens)


def test_sigterm_drains_streams_on_both_frontends(start_process: Callable[..., ServerProcess]) -> None:
    server = start_process(*FLAGS)
    server.wait_serving()
    port = http_port(server)

    async def run() -> list[Outcome]:
        started = [asyncio.Event() for _ in range(CONNECTIONS)]
        tasks = [asyncio.create_task(grpc_stream(server.target, 3000, i, started[i])) for i in range(CONNECTIONS)]
        tasks.append(asyncio.create_task(sse_stream(port, 3000)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(run())
    assert [o.code for o in outcomes] == ["OK"] * (CONNECTIONS + 1), outcomes
    assert all(o.text_length == 3000 for o in outcomes)
    assert server.proc.wait(60) == 0, server.log()
    # Each frontend had streams running when the signal came, and drained them.
    draining = re.findall(
        r"\[(textgen-frontend-\d+)\] INFO service\.server: shutting down: (\d+) running", server.log()
    )
    assert len(draining) == 2 and all(int(n) > 0 for _, n in draining), draining


def test_engine_death_fails_every_stream_at_once(start_process: Callable[..., ServerProcess]) -> None:
    server = start_process(*FLAGS)
    server.wait_serving()
    port = http_port(server)
    engine, _ = engine_and_frontends(server)

    async def run() -> tuple[float, list[Outcome]]:
        started = [asyncio.Event() for _ in range(CONNECTIONS)]
        tasks = [asyncio.create_task(grpc_stream(server.target, LONG, i, started[i])) for i in range(CONNECTIONS)]
        tasks.append(asyncio.create_task(sse_stream(port, LONG)))
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        await asyncio.sleep(0.2)  # the SSE stream is under way too
        killed = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        return killed, await asyncio.gather(*tasks)

    killed, outcomes = asyncio.run(run())
    grpc_outcomes, sse = outcomes[:-1], outcomes[-1]
    assert {o.code for o in grpc_outcomes} == {"UNAVAILABLE"}, grpc_outcomes
    assert sse.code != "OK" and sse.text_length > 0, sse
    slowest = max(o.ended_at for o in outcomes) - killed
    assert slowest < 1.0, f"the last stream ended {slowest:.2f} s after the engine died"
    assert server.proc.wait(60) != 0
    assert "the engine process exited" in server.log()


def test_a_dead_frontend_is_replaced_and_the_others_finish(start_process: Callable[..., ServerProcess]) -> None:
    server = start_process(*FLAGS)
    server.wait_serving()
    _, frontends = engine_and_frontends(server)
    victim = frontends[0]

    async def run() -> list[Outcome]:
        started = [asyncio.Event() for _ in range(CONNECTIONS)]
        tasks = [asyncio.create_task(grpc_stream(server.target, 6000, i, started[i])) for i in range(CONNECTIONS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        os.kill(victim, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(run())
    codes = [o.code for o in outcomes]
    assert "OK" in codes and "UNAVAILABLE" in codes, codes  # streams were on both frontends
    assert all(o.text_length == 6000 for o in outcomes if o.code == "OK")
    # The engine ended the dead frontend's rows, and a new frontend took its place.
    assert wait_until(lambda: "is gone: ending its" in server.log())
    assert wait_until(lambda: len(engine_and_frontends(server)[1]) == 2 and victim not in children(server.proc.pid))
    assert wait_until(lambda: server.sample("textgen_active_sequences") == 0)

    async def again() -> list[Outcome]:
        return await asyncio.gather(*(grpc_stream(server.target, 20, i) for i in range(CONNECTIONS)))

    assert wait_until(lambda: health_status(server.target) == 1)
    assert [o.code for o in asyncio.run(again())] == ["OK"] * CONNECTIONS
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log()
