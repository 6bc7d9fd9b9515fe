"""Fixtures every test folder shares: tiny trained models, and the servers started from them.

The models are real (Keras fit, real export) but small (32 units) and trained for a moment on a
slice of the embedded corpus, so the suite stays fast. Servers:

* ``serving``: one in-process server for the whole session serving ``tiny_model_repo``
  (``tests.helpers.make_config``'s limits);
* ``start_server(models=None, *, config=None, scope="function", wait_ready=True, **overrides)``:
  the one way a test starts an in-process server of its own (``RunningServer``), stopped when the
  test ends, or shared by the module's tests with ``scope="module"``;
* ``start_process(*flags, models=None, env=None)``: ``python -m service`` as a child process
  (``ServerProcess``), stopped when the test ends.

At the end of a run, tests skipped for a missing tool (``tests.helpers.need_tool``) are named in a
warning line per tool.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.client import TextGenClient
from service.config import ServerConfig
from tests.helpers import MISSING, RunningServer, ServerProcess, make_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_TEXT_CHARS = 20_000


def _export_tiny(base_dir: Path, level: str = "char", units: int = 32, seed: int = 7) -> str:
    from pydoc_data.topics import topics

    import keras
    import numpy as np
    import tensorflow as tf

    from training.export import export_version
    from training.model import ModelConfig, build_model
    from training.tokenizer import Tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))[:TINY_TEXT_CHARS]
    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer(level=level, num_words=400 if level == "word" else None).fit_on_texts([text])
    ids = np.array(tokenizer.encode(text), dtype=np.int32)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=16, units=units, layers=1)
    model = build_model(config)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    seq = 32
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1 : n * seq + 1].reshape(n, seq)
    model.fit(tf.constant(x), tf.constant(y), batch_size=32, epochs=2, verbose=0)
    return export_version(model, config, tokenizer, str(base_dir), {"fixture": "tiny"})


@pytest.fixture(scope="session")
def tiny_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository ``<repo>/tiny/1`` holding one tiny char-level version."""
    repo = tmp_path_factory.mktemp("models")
    _export_tiny(repo / "tiny")
    return repo


@pytest.fixture(scope="session")
def tiny_word_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository ``<repo>/tinyword/1`` holding one tiny word-level version."""
    repo = tmp_path_factory.mktemp("wordmodels")
    _export_tiny(repo / "tinyword", level="word")
    return repo


class _SharedServers:
    """Servers shared beyond one test, by configuration: the session's and each module's."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str], RunningServer] = {}  # (owner, repr(config)) -> server
        self.owners: set[str] = set()  # modules whose end stops their servers

    def get(self, owner: str, config: ServerConfig) -> RunningServer | None:
        return self.running.get((owner, repr(config)))

    def add(self, owner: str, config: ServerConfig, server: RunningServer) -> None:
        self.running[(owner, repr(config))] = server

    def stop(self, owner: str) -> None:
        self.owners.discard(owner)
        for key in [k for k in self.running if k[0] == owner]:
            self.running.pop(key).stop(grace=0)


@pytest.fixture(scope="session")
def _shared_servers() -> Iterator[_SharedServers]:
    shared = _SharedServers()
    yield shared
    for owner in sorted({owner for owner, _ in shared.running}):
        shared.stop(owner)


@pytest.fixture(scope="session")
def serving(tiny_model_repo: Path, _shared_servers: _SharedServers) -> RunningServer:
    """The session's shared server (max_concurrent 64, batch 32, max_tokens_limit 100000, 4096 prompt bytes)."""
    config = make_config(tiny_model_repo)
    running = _shared_servers.get("session", config)
    if running is None:
        running = RunningServer(config)
        _shared_servers.add("session", config, running)
    return running


@pytest.fixture
def client(serving: RunningServer) -> Iterator[TextGenClient]:
    with serving.client() as c:
        yield c


@pytest.fixture
def start_server(
    request: pytest.FixtureRequest, tiny_model_repo: Path, _shared_servers: _SharedServers
) -> Iterator[Callable[..., RunningServer]]:
    """Starts in-process servers: ``make_config(models or tiny_model_repo)`` (or ``config``) with ``overrides``.

    ``scope="function"`` (the default): a server of the test's own, stopped (grace 0) when it ends.
    ``scope="module"``: the module's tests that ask for the same configuration share one server,
    stopped when the module's last test has run. ``wait_ready=False`` returns once it listens.
    """
    started: list[RunningServer] = []

    def start(
        models: Path | None = None,
        *,
        config: ServerConfig | None = None,
        scope: str = "function",
        wait_ready: bool = True,
        **overrides: Any,
    ) -> RunningServer:
        base = config if config is not None else make_config(models or tiny_model_repo)
        wanted = dataclasses.replace(base, **overrides)
        if scope == "function":
            running = RunningServer(wanted, wait_ready=wait_ready)
            started.append(running)
            return running
        if scope != "module" or not wait_ready:
            raise ValueError(f"scope must be 'function' or 'module' (ready servers only), got {scope!r}")
        module = request.node.getparent(pytest.Module)
        assert module is not None, "scope='module' needs a test in a module"
        owner = module.nodeid
        shared = _shared_servers.get(owner, wanted)
        if shared is None:
            if owner not in _shared_servers.owners:  # the module's first shared server: stop them all at its end
                _shared_servers.owners.add(owner)
                module.addfinalizer(lambda: _shared_servers.stop(owner))
            shared = RunningServer(wanted)
            _shared_servers.add(owner, wanted, shared)
        return shared

    yield start
    for running in started:
        running.stop(grace=0)


@pytest.fixture
def start_process(tmp_path: Path, tiny_model_repo: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts ``python -m service *flags`` on ``models`` (default ``tiny_model_repo``); each is stopped
    (SIGTERM, then SIGKILL) when the test ends. Logs go to ``tmp_path/server<N>.log``."""
    started: list[ServerProcess] = []

    def start(*flags: str, models: Path | None = None, env: dict[str, str] | None = None) -> ServerProcess:
        log_path = tmp_path / f"server{len(started)}.log"
        process = ServerProcess(models or tiny_model_repo, log_path, *flags, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


# ---- tests skipped for a missing tool, named at the end of the run ------------------------------

_SKIPPED_FOR_TOOL: dict[str, list[str]] = {}
_TOOL_SKIP = re.compile(rf"(\S+){re.escape(MISSING)} ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        match = _TOOL_SKIP.search(str(report.longrepr[2]))
        if match:
            _SKIPPED_FOR_TOOL.setdefault(match.group(1), []).append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for tool, nodeids in sorted(_SKIPPED_FOR_TOOL.items()):
        terminalreporter.write_line(
            f"WARNING: {tool}{MISSING}; {len(nodeids)} test{'s' if len(nodeids) != 1 else ''} skipped: "
            f"{', '.join(nodeids)}",
            yellow=True,
            bold=True,
        )
