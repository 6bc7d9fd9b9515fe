"""A burst of Generate calls that arrive while the server's event loop is busy: every call is answered and counted.

gRPC holds the calls the servicer has not picked up yet; past ``--max-pending-calls`` calls, or
after ``--request-timeout`` seconds, it cancels one before any handler runs (the client sees
CANCELLED, ``textgen_requests_total`` never counts it). The tests hold the server's event loop
while a burst arrives, so its calls wait there, then let it go: within the limits each call is
served or refused RESOURCE_EXHAUSTED (``--max-concurrent`` and ``--max-queue`` are tiny) and
counted by its code; past either limit gRPC cancels calls unseen, which is what the limits mean.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable

import grpc
import pytest

from service.api import textgen_pb2, textgen_pb2_grpc
from tests.helpers import RunningServer, wait_until

# Above gRPC's own default (1000 pending calls, random drops up to 3000), which cancelled some.
BURST = 1500
STREAMS_PER_CHANNEL = 100
# How long the burst's requests get to reach gRPC's queue while the loop waits (far under the
# tests' --request-timeout, 60 s, for which gRPC holds a call): later arrivals only shrink the burst.
SETTLE = 2.0


async def _burst(target: str, streams: int, release: threading.Event) -> Counter[str]:
    """Starts ``streams`` Generate calls, lets the server's loop go ``SETTLE`` seconds later; their codes."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, as separate clients
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(-(-streams // STREAMS_PER_CHANNEL))]
    try:
        stubs = [textgen_pb2_grpc.TextGenerationStub(c) for c in channels]
        calls = [
            stubs[i % len(stubs)].Generate(
                textgen_pb2.GenerateRequest(prompt="The ", max_tokens=2, seed=i + 1), timeout=120
            )
            for i in range(streams)
        ]
        # The requests go out meanwhile; the first message a call could wait for is the server's.
        await asyncio.sleep(SETTLE)
        release.set()

        async def outcome(call: grpc.aio.UnaryStreamCall) -> str:
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        return Counter(await asyncio.gather(*(outcome(c) for c in calls)))
    finally:
        for c in channels:
            await c.close()


def _burst_while_the_loop_waits(running: RunningServer, streams: int) -> Counter[str]:
    release = threading.Event()
    running.loop.call_soon_threadsafe(release.wait, 60.0)  # the loop picks up no call until released
    try:
        return asyncio.run(_burst(running.target, streams, release))
    finally:
        release.set()


def _counted(running: RunningServer) -> Counter[str]:
    codes = ("OK", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")
    counted = Counter({code: int(running.sample("textgen_requests_total", {"code": code})) for code in codes})
    return +counted  # zeros dropped


@pytest.mark.timeout(300)
def test_every_call_of_a_burst_is_served_or_refused_resource_exhausted_and_counted(
    start_server: Callable[..., RunningServer],
) -> None:
    running = start_server(max_concurrent=2, max_queue=2)
    codes = _burst_while_the_loop_waits(running, BURST)
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.total() == BURST
    assert wait_until(lambda: _counted(running).total() == BURST)
    assert _counted(running) == codes


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "limit",
    [{"max_pending_calls": 100}, {"request_timeout": 1.0}],  # fewer calls, or for less time, than the burst needs
    ids=["max_pending_calls", "request_timeout"],
)
def test_past_its_limits_grpc_cancels_calls_the_server_never_sees(
    start_server: Callable[..., RunningServer], limit: dict[str, float]
) -> None:
    streams = 400
    running = start_server(max_concurrent=2, max_queue=2, **limit)
    codes = _burst_while_the_loop_waits(running, streams)
    assert codes.total() == streams
    assert codes["CANCELLED"] > 0, codes
    assert wait_until(lambda: _counted(running).total() == streams - codes["CANCELLED"])
    assert "CANCELLED" not in _counted(running)
