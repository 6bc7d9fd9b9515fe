"""A frontend process of ``textgen serve --frontends N``: the gRPC and HTTP ports, without the model.

It runs the same ``Server`` as a single-process server, with a ``FrontendRole``: requests are
validated, authenticated, tokenized, detokenized and stop-matched here, and the engine process
runs them (``service/engine_client.py``). It never imports TensorFlow. It binds the ports the
supervisor resolved with ``SO_REUSEPORT``, so the kernel spreads connections over the frontends.

SIGTERM drains this frontend's streams for ``--grace-seconds`` and exits 0. When the engine process
goes away, the streams have already ended UNAVAILABLE; it exits ``EXIT_ENGINE_LOST``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from service.config import ServerConfig
from service.server import FrontendRole, Server, run_event_loop

log = logging.getLogger(__name__)

EXIT_ENGINE_LOST = 3


async def serve(config: ServerConfig, role: FrontendRole, bound: Any = None) -> int:
    """Serves until SIGTERM/SIGINT (drain, exit 0) or the engine's loss (exit ``EXIT_ENGINE_LOST``)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches every process: the supervisor decides
    server = Server(config, role)
    await server.start()
    if bound is not None:
        bound.put(role.name)
    stopped = asyncio.create_task(stop.wait())
    lost = asyncio.create_task(server.lost.wait())
    await asyncio.wait([stopped, lost], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    lost.cancel()
    if server.lost.is_set():
        await server.shutdown(grace=0)
        return EXIT_ENGINE_LOST
    await server.shutdown()
    return 0


def run(config: ServerConfig, endpoint: str, name: bytes, bound: Any = None) -> int:
    try:
        return run_event_loop(serve(config, FrontendRole(endpoint, name), bound), config.event_loop)
    except OSError as exc:
        log.error("frontend %s could not start: %s", name.decode(), exc)
        return 1
