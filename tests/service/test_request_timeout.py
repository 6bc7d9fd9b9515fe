"""``--request-timeout``: a request whose client sets no deadline ends DEADLINE_EXCEEDED and leaves the batch."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import pytest

from service.api import textgen_pb2_grpc
from service.client import build_request
from tests.helpers import RunningServer, wait_until

# Far more tokens than the tiny model makes before the server's default deadline ends the request.
MAX_TOKENS = 1_000_000
# If the server never ends the request, the test cancels it after this long (and fails on the CANCELLED code).
GIVE_UP_SECONDS = 120.0


@pytest.mark.parametrize("method", ["Generate", "Complete"])
def test_request_timeout_ends_a_request_that_has_no_deadline(
    start_server: Callable[..., RunningServer], method: str
) -> None:
    running = start_server(request_timeout=2.0, max_tokens_limit=MAX_TOKENS)
    request = build_request("The ", max_tokens=MAX_TOKENS, seed=1, request_id=f"no-deadline-{method}")
    with running.channel() as channel:
        stub = textgen_pb2_grpc.TextGenerationStub(channel)
        received = 0
        if method == "Generate":
            call = stub.Generate(request)  # no timeout: the call carries no deadline
            assert call.time_remaining() is None
            give_up = threading.Timer(GIVE_UP_SECONDS, call.cancel)
            give_up.start()
            try:
                with pytest.raises(grpc.RpcError) as info:
                    for response in call:
                        received += len(response.text)
            finally:
                give_up.cancel()
            # The stream ran (tokens arrived) and was ended by the server, long before max_tokens.
            assert 0 < received < MAX_TOKENS
        else:
            future = stub.Complete.future(request)  # no timeout either
            try:
                with pytest.raises(grpc.RpcError) as info:
                    future.result(timeout=GIVE_UP_SECONDS)
            finally:
                future.cancel()
        error = info.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (error.code(), error.details())
        assert "deadline" in (error.details() or "")
    # Its row left the batch: nothing runs or waits, and the engine stopped making tokens for it.
    engine = running.server.engine
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0, 10.0)
    assert running.sample("textgen_active_sequences") == 0
    generated = running.sample("textgen_generated_tokens_total")
    assert 0 < generated < MAX_TOKENS
    assert running.sample("textgen_requests_total", {"model": "tiny", "code": "DEADLINE_EXCEEDED"}) == 1
    # A later request on the same server is served as usual.
    with running.client() as client:
        assert client.complete("The ", max_tokens=4, seed=2).usage.completion_tokens == 4
    assert running.sample("textgen_generated_tokens_total") == generated + 4
