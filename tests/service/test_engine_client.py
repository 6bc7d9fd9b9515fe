"""A frontend's ``EngineClient`` over a real ZeroMQ socket: what it sends while the engine does not read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import zmq

from service import ipc
from service.catalog import ModelCatalog, RemoteModel
from service.engine_client import EngineClient
from service.sampling import SamplingParams
from training.tokenizer import Tokenizer

# More messages than ZeroMQ's default high-water marks hold (1000 queued by the sender, 1000 by the receiver).
REQUESTS = 3000


def test_a_burst_while_the_engine_is_busy_queues_every_request(tmp_path: Path) -> None:
    """The engine reads nothing while the requests arrive, one loop turn each: none may fail to send."""
    endpoint = "ipc://" + str(tmp_path / "engine")
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    tokenizer = Tokenizer(level="char").fit_on_texts(["abc "])
    model = RemoteModel("m", 1, str(tmp_path), tokenizer, {}, tokenizer.vocab_size)

    async def run() -> tuple[int, int]:
        client = EngineClient(endpoint, b"fe-0-0", ModelCatalog(str(tmp_path), None))
        await client.start()
        loop = asyncio.get_running_loop()
        streams = []
        for _ in range(REQUESTS):
            streams.append(client.submit(model, [1, 2], SamplingParams(max_tokens=4), loop))
            await asyncio.sleep(0)  # each request leaves in a message of its own
        submitted = 0
        # The engine reads at last: every request is there (until nothing more comes for 2 s).
        while submitted < REQUESTS and await asyncio.to_thread(router.poll, 2000):
            header, arrays = ipc.decode(router.recv_multipart()[1:])
            if header["t"] == "req":
                submitted += len(ipc.decode_requests(header, arrays)[0])
        ended = sum(stream.finished for stream in streams)  # a send that failed ends its stream UNAVAILABLE
        client.stop()
        await client.aclose()
        return submitted, ended

    try:
        submitted, ended = asyncio.run(run())
    finally:
        context.destroy(linger=0)
    assert (submitted, ended) == (REQUESTS, 0)
