"""End-to-end load over the HTTP API: N concurrent ``POST /v1/completions`` streams (SSE), in a process of its own.

The load generator (``python -m benchmarks.http_bench --target HOST:HTTP_PORT --streams N ...``)
sends the requests the gRPC generator sends (same prompts, seeds, temperature and
``max_tokens``), one connection per stream as separate clients would have, and records when
each ``data:`` event with text arrives; tokens come from the usage chunk
(``stream_options.include_usage``). The summary is ``e2e_bench.summarize``'s, so the two
protocols' figures compare directly. ``e2e_bench.measure_level(..., protocol="http")`` runs it
against a running ``e2e_bench.ServerProcess``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from benchmarks.e2e_bench import (
    StreamRecord,
    load_main,
    summarize,
)
from benchmarks.prompts import bench_corpus, prompt


def completion_body(index: int, max_tokens: int, prompt_chars: int, corpus: str, model: str) -> dict[str, Any]:
    """The HTTP twin of ``e2e_bench.generate_request``."""
    return {
        "model": model or None,
        "prompt": prompt(index, prompt_chars, corpus),
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": index + 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def run_http_stream(session: Any, url: str, body: dict[str, Any]) -> StreamRecord:
    """One streamed completion from send to ``[DONE]``; an error is recorded by HTTP status or event code."""
    import aiohttp

    record = StreamRecord(start=time.perf_counter())
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                record.error = f"HTTP_{response.status}"
                return record
            buffer = b""
            async for data in response.content.iter_any():
                now = time.perf_counter()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    payload = event.removeprefix(b"data: ")
                    if payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        record.error = str(chunk["error"].get("code", "error")).upper()
                    elif chunk.get("usage"):
                        record.completion_tokens = int(chunk["usage"]["completion_tokens"])
                        record.finished = True
                    elif chunk["choices"] and chunk["choices"][0]["text"]:
                        record.arrivals.append((now, len(chunk["choices"][0]["text"])))  # char model
    except aiohttp.ClientError as e:
        record.error = type(e).__name__
    except asyncio.CancelledError:
        record.error = "CLIENT_TIMEOUT"
    return record


async def concurrent_http_load(
    target: str, streams: int, max_tokens: int, prompt_chars: int, timeout: float, model: str
) -> dict[str, Any]:
    """``streams`` concurrent streamed completions started together; returns ``summarize`` of them."""
    import aiohttp

    corpus = bench_corpus(200_000)
    url = f"http://{target}/v1/completions"
    bodies = [completion_body(i, max_tokens, prompt_chars, corpus, model) for i in range(streams)]
    connector = aiohttp.TCPConnector(limit=0)  # a connection per stream
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.ensure_future(run_http_stream(session, url, body)) for body in bodies]
        done, pending = await asyncio.wait(tasks, timeout=timeout + 5.0)
        for task in pending:
            task.cancel()
        records = [t.result() for t in done] + [await t for t in pending]
    return summarize(records)


if __name__ == "__main__":
    sys.exit(load_main("python -m benchmarks.http_bench", concurrent_http_load, "HTTP SSE completions"))
