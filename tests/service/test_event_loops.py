"""``--event-loop``: the processes that own connections run on uvloop (the default) or asyncio's own loop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from service.config import ConfigError, ServerConfig
from service.server import run_event_loop


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_each_kind_runs_its_own_loop() -> None:
    assert ServerConfig().event_loop == "uvloop"
    assert run_event_loop(_loop_type(), "uvloop") is uvloop.Loop
    plain = run_event_loop(_loop_type(), "asyncio")
    assert plain is not uvloop.Loop and issubclass(plain, asyncio.BaseEventLoop)


def test_an_unknown_loop_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"--event-loop must be uvloop or asyncio, got 'tokio'"):
        ServerConfig(event_loop="tokio")
