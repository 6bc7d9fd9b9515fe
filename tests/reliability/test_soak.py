"""Soak: a few thousand requests with random cancellations leak nothing and keep the server's RSS flat.

3000 requests (tiny max_tokens, 32 at a time, Generate and Complete) against a real server
process (``python -m service``, so that the RSS measured is the server's alone); about a third
are cancelled by the client at a random moment or given a deadline too short to meet.
Afterwards: the scraped gauges of active and waiting sequences at 0, only OK / CANCELLED /
DEADLINE_EXCEEDED seen, no stream still holding the model version (a new version takes over
and the old one is unloaded, which waits for its last stream), and the server's RSS grew by
less than ``RSS_BOUND_MB`` between the end of a warm-up of 400 requests and the end of the run.
"""

from __future__ import annotations

import asyncio
import collections
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from service.client import AsyncTextGenClient
from tests.helpers import ServerProcess, wait_until

TOTAL = 3000
WARMUP = 400
CONCURRENCY = 32
RSS_BOUND_MB = 30.0
FLAGS = ["--max-concurrent", "64", "--max-queue", "256", "--max-batch-size", "32"]
FLAGS += ["--max-tokens-limit", "64", "--default-max-tokens", "16"]


async def _one(client: AsyncTextGenClient, rng: random.Random, codes: collections.Counter[str]) -> None:
    kind = rng.random()
    prompt = rng.choice(["", "The ", "a" * rng.randint(1, 300), "def f(x):\n    return"])
    params = {"max_tokens": rng.randint(1, 8), "seed": rng.randrange(2**64), "temperature": rng.choice([0.0, 0.8])}
    try:
        if kind < 0.15:  # cancelled by the client after a random number of messages
            stop_after = rng.randint(0, 2)
            agen = client.generate(prompt, **params)
            seen = 0
            async for _ in agen:
                seen += 1
                if seen > stop_after:
                    break
            await agen.aclose()  # type: ignore[attr-defined]  # an async generator: closing cancels the call
            codes["CANCELLED" if seen > stop_after else "OK"] += 1
            return
        if kind < 0.25:  # cancelled from outside while it runs
            task = asyncio.ensure_future(client.complete(prompt, **{**params, "max_tokens": 64}))
            await asyncio.sleep(rng.random() * 0.01)
            task.cancel()
            try:
                await task
                codes["OK"] += 1
            except asyncio.CancelledError:
                codes["CANCELLED"] += 1
            return
        if kind < 0.33:  # a deadline too short to meet
            await client.complete(prompt, timeout=rng.choice([0.0005, 0.002, 0.01]), **params)
        elif kind < 0.66:
            async for _ in client.generate(prompt, **params):
                pass
        else:
            await client.complete(prompt, **params)
        codes["OK"] += 1
    except grpc.aio.AioRpcError as exc:
        codes[exc.code().name] += 1


async def _run(target: str, n: int, seed: int, codes: collections.Counter[str]) -> None:
    rng = random.Random(seed)
    async with AsyncTextGenClient(target, timeout=60) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await _one(client, rng, codes)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _assert_nothing_runs(server: ServerProcess) -> None:
    assert wait_until(lambda: server.sample("textgen_active_sequences") == 0), server.log()[-3000:]
    assert wait_until(lambda: server.sample("textgen_waiting_requests") == 0), server.log()[-3000:]


@pytest.mark.slow
def test_soak_with_random_cancellations_leaks_nothing(
    start_process: Callable[..., ServerProcess], tiny_model_repo: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_model_repo / "tiny" / "1", models / "tiny" / "1")
    server = start_process(*FLAGS, "--poll-seconds", "0.5", models=models)
    server.wait_serving()
    codes: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    asyncio.run(_run(server.target, WARMUP, 1, codes))
    _assert_nothing_runs(server)
    rss_after_warmup = server.rss_mb()
    asyncio.run(_run(server.target, TOTAL - WARMUP, 2, codes))
    _assert_nothing_runs(server)
    rss_after = server.rss_mb()
    print(
        f"soak: {TOTAL} requests in {time.monotonic() - started:.1f} s, codes {dict(codes)}, server RSS "
        f"{rss_after_warmup:.1f} MB after warm-up -> {rss_after:.1f} MB ({rss_after - rss_after_warmup:+.1f} MB)"
    )
    assert sum(codes.values()) == TOTAL
    assert set(codes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, codes
    assert codes["OK"] > TOTAL // 2 and codes["CANCELLED"] + codes["DEADLINE_EXCEEDED"] > TOTAL // 10, codes
    assert rss_after - rss_after_warmup < RSS_BOUND_MB
    # No stream still holds version 1: once version 2 takes over, version 1 is unloaded, which
    # waits for its last stream to end.
    shutil.copytree(models / "tiny" / "1", models / "tiny" / ".incoming")
    (models / "tiny" / ".incoming").rename(models / "tiny" / "2")
    assert wait_until(lambda: "unloaded model tiny version 1" in server.log(), 120), server.log()[-3000:]
