"""The model lifecycle over real gRPC: versions dropped into a polled folder while streams run.

One server polls a real repository folder. The story: a long stream runs on version 1;
version 2 appears and takes new traffic while the stream finishes on version 1, which
takes no new traffic from then on and is unloaded once the stream ends; a truncated
version 3 is refused and counted while 2 keeps serving; a second model appears and
generates; removing its folder unloads it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api import textgen_pb2
from service.model_repository import ModelRepository
from tests.helpers import RunningServer, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# tokens: long enough that the stream outlives loading version 2 (a single row's calls make 32 steps:
# 5000 calls, 5000 messages)
LONG = 160_000


def _copy_version(src: Path, models: Path, name: str, version: int) -> None:
    """Appear atomically, as an exporter does: copy to a hidden folder, then rename."""
    hidden = models / name / f".incoming-{version}"
    shutil.copytree(src, hidden)
    os.rename(hidden, models / name / str(version))


def _loaded(running: RunningServer) -> set[tuple[str, int]]:
    with running.client() as c:
        return {(m.name, m.version) for m in c.list_models().models}


def test_versions_and_models_come_and_go_without_breaking_a_stream(
    tmp_path: Path, tiny_model_repo: Path, tiny_word_model_repo: Path, start_server: Callable[..., RunningServer]
) -> None:
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    v1 = tiny_model_repo / "tiny" / "1"
    _copy_version(v1, models, "tiny", 1)
    running = start_server(models, poll_seconds=0.2, max_tokens_limit=LONG, keep_versions=1)
    try:
        assert _loaded(running) == {("tiny", 1)}
        with running.client(timeout=300) as c:
            stream = c.generate("The ", max_tokens=LONG, temperature=0.0)
            first = next(stream)
            assert first.model_version == 1

            # Version 2 appears while the stream runs on version 1.
            _copy_version(v1, models, "tiny", 2)
            assert wait_until(lambda: ("tiny", 2) in _loaded(running), 60.0)
            repository = running.server.repository
            assert running.server.engine.active >= 1, "the long stream should still be running"
            # Version 1 is retiring: still loaded for its running stream, but it takes no new traffic.
            assert [(m.name, m.version) for m in repository.retiring()] == [("tiny", 1)]
            assert _loaded(running) == {("tiny", 2)}
            assert c.complete("The ", max_tokens=4).model_version == 2  # unpinned -> newest
            assert c.complete("The ", max_tokens=4, model_version=2).model_version == 2  # pinned -> its version
            with pytest.raises(grpc.RpcError) as caught:
                c.complete("The ", max_tokens=2, model_version=1)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND

            # The stream finishes normally, every message from version 1.
            rest = list(stream)
            assert all(m.model_version == 1 for m in rest)
            assert rest[-1].finish_reason == textgen_pb2.FINISH_REASON_LENGTH
            assert rest[-1].usage.completion_tokens == LONG
            # ... and then version 1 is unloaded.
            assert wait_until(lambda: not repository.retiring(), 30.0)
            assert running.sample("textgen_model_loaded", {"model": "tiny", "version": "1"}) == 0
            assert running.sample("textgen_model_loaded", {"model": "tiny", "version": "2"}) == 1

            # A truncated version 3 never serves: counted, and version 2 keeps serving.
            failures = running.sample("textgen_model_load_failures_total", {"model": "tiny"})
            bad = tmp_path / "bad"
            shutil.copytree(v1, bad)
            pb = bad / "saved_model.pb"
            pb.write_bytes(pb.read_bytes()[:100])
            _copy_version(bad, models, "tiny", 3)
            assert wait_until(
                lambda: running.sample("textgen_model_load_failures_total", {"model": "tiny"}) == failures + 1, 60.0
            )
            assert _loaded(running) == {("tiny", 2)}
            assert c.complete("The ", max_tokens=4).model_version == 2

            # A second model appears and generates; removing its folder unloads it.
            (models / "tinyword").mkdir()
            _copy_version(tiny_word_model_repo / "tinyword" / "1", models, "tinyword", 1)
            assert wait_until(lambda: ("tinyword", 1) in _loaded(running), 60.0)
            reply = c.complete("The ", max_tokens=6, model="tinyword")
            assert reply.model == "tinyword" and reply.usage.completion_tokens == 6
            shutil.rmtree(models / "tinyword" / "1")
            assert wait_until(lambda: _loaded(running) == {("tiny", 2)}, 30.0)
            with pytest.raises(grpc.RpcError) as caught:
                c.complete("The ", max_tokens=2, model="tinyword")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop(grace=0)


def _health(running: RunningServer, service: str) -> int:
    with running.channel() as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)


def _all_health(running: RunningServer) -> set[int]:
    return {_health(running, service) for service in ("", "textgen.v1.TextGeneration")}


def test_readiness_goes_back_to_not_serving_when_the_only_model_leaves(
    tmp_path: Path, tiny_model_repo: Path, start_server: Callable[..., RunningServer]
) -> None:
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    _copy_version(tiny_model_repo / "tiny" / "1", models, "tiny", 1)
    running = start_server(models, poll_seconds=0.2)
    try:
        assert _all_health(running) == {SERVING}
        os.rename(models / "tiny", tmp_path / "away")  # the only model leaves the repository
        assert wait_until(lambda: _all_health(running) == {NOT_SERVING}, 30.0)
        with running.client() as c, pytest.raises(grpc.RpcError) as caught:
            c.complete("The ", max_tokens=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        os.rename(tmp_path / "away", models / "tiny")  # and comes back
        assert wait_until(lambda: _all_health(running) == {SERVING}, 60.0)
        with running.client() as c:
            assert c.complete("The ", max_tokens=2).usage.completion_tokens == 2
    finally:
        running.stop(grace=0)


def test_readiness_follows_the_default_model(
    tmp_path: Path, tiny_model_repo: Path, start_server: Callable[..., RunningServer]
) -> None:
    models = tmp_path / "models"
    for name in ("main", "other"):
        (models / name).mkdir(parents=True)
        _copy_version(tiny_model_repo / "tiny" / "1", models, name, 1)
    running = start_server(models, poll_seconds=0.2, default_model="main")
    try:
        assert _all_health(running) == {SERVING}
        shutil.rmtree(models / "main" / "1")  # another model still serves, but not the default one
        assert wait_until(lambda: _all_health(running) == {NOT_SERVING}, 30.0)
        with running.client() as c:
            assert c.complete("The ", max_tokens=2, model="other").usage.completion_tokens == 2
    finally:
        running.stop(grace=0)


def test_renaming_a_model_folder_loads_the_new_name_before_retiring_the_old(
    tmp_path: Path, tiny_model_repo: Path
) -> None:
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    _copy_version(tiny_model_repo / "tiny" / "1", models, "m", 1)
    repo = ModelRepository(str(models))
    repo.load_all()
    seen: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(repo.can_serve())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        os.rename(models / "m", models / "z")
        assert repo.poll()
    finally:
        stop.set()
        watcher.join()
    assert [m.name for m in repo.loaded()] == ["z"]
    assert seen and all(seen), "a moment with no model serving: the old name left before the new one loaded"
