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
from pathlib import Path

import grpc
import pytest

from service.api import textgen_pb2
from tests.service.conftest import RunningServer, make_config, wait_until

LONG = 40_000  # tokens: long enough that the stream outlives loading version 2


def _copy_version(src: Path, models: Path, name: str, version: int) -> None:
    """Appear atomically, as an exporter does: copy to a hidden folder, then rename."""
    hidden = models / name / f".incoming-{version}"
    shutil.copytree(src, hidden)
    os.rename(hidden, models / name / str(version))


def _loaded(running: RunningServer) -> set[tuple[str, int]]:
    with running.client() as c:
        return {(m.name, m.version) for m in c.list_models().models}


def test_versions_and_models_come_and_go_without_breaking_a_stream(
    tmp_path: Path, tiny_model_repo: Path, tiny_word_model_repo: Path
) -> None:
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    v1 = tiny_model_repo / "tiny" / "1"
    _copy_version(v1, models, "tiny", 1)
    running = RunningServer(make_config(models, poll_seconds=0.2, max_tokens_limit=LONG, keep_versions=1))
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
