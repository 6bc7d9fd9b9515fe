"""``--max-connection-age``: the server ends old connections, and a client's channel reconnects with no error."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from service.client import TextGenClient
from tests.helpers import RunningServer, wait_until

AGE_SECONDS = 1.0
RECONNECTS = 3  # connection ages the client must live through
GIVE_UP_SECONDS = 90.0  # a bound for the loop when the server never ends a connection (the test then fails)


def test_a_client_looping_over_one_channel_reconnects_after_each_age_with_no_error(
    start_server: Callable[..., RunningServer],
) -> None:
    running = start_server(max_connection_age=AGE_SECONDS, grace_seconds=1.0)
    readies: list[float] = []
    errors: list[BaseException] = []
    calls = [0, 0]
    stop = threading.Event()

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            readies.append(time.monotonic())

    def loop(index: int, client: TextGenClient) -> None:
        try:
            while not stop.is_set():
                if (calls[index] + index) % 2:
                    parts = list(client.generate("The ", max_tokens=40, seed=calls[index]))
                    assert parts[-1].usage.completion_tokens == 40
                else:
                    assert client.complete("The ", max_tokens=20, seed=calls[index]).usage.completion_tokens == 20
                calls[index] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
            stop.set()

    with running.channel() as channel:
        channel.subscribe(on_state, try_to_connect=True)
        client = TextGenClient(running.target, channel=channel, timeout=60)
        threads = [threading.Thread(target=loop, args=(i, client), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        give_up = time.monotonic() + GIVE_UP_SECONDS
        # Two requests in flight on one channel most of the time, across RECONNECTS connection ends.
        while not stop.is_set() and len(readies) <= RECONNECTS and time.monotonic() < give_up:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        channel.unsubscribe(on_state)
    assert not errors, f"an error reached the caller: {errors[0]!r}"
    assert all(n > 0 for n in calls), calls
    # The channel connected once, then again after each connection age: the server did end its connections.
    assert len(readies) > RECONNECTS, f"the channel connected {len(readies)} times in {GIVE_UP_SECONDS} s"
    # Every request the client made was served, and counted OK, under the same model.
    ok = {"model": "tiny", "code": "OK"}
    assert wait_until(lambda: running.sample("textgen_requests_total", ok) >= sum(calls), 10.0)
    assert running.sample("textgen_requests_total", ok) == running.sample("textgen_requests_total") == sum(calls)
