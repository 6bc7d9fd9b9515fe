"""The model repository with real folders and real (tiny) models: loading, checking, versions, polling."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import time
import weakref
from pathlib import Path

import pytest

from service.decoder import DECODE, DECODE_STEPS, PREFILL
from service.engine import Engine
from service.errors import ModelNotFoundError, NoModelLoadedError
from service.metrics import ServingMetrics
from service.model_repository import ModelRepository
from service.sampling import SamplingParams
from tests.helpers import engine_config, rss_mb, wait_until
from tests.training.broken_versions import BREAKERS, place
from training.check import main as check_main


@pytest.fixture(scope="module")
def good_version(tiny_model_repo) -> Path:
    return Path(tiny_model_repo) / "tiny" / "1"


def failures(metrics: ServingMetrics, model: str) -> float:
    return metrics.registry.get_sample_value("textgen_model_load_failures_total", {"model": model}) or 0.0


def loaded_gauge(metrics: ServingMetrics, model: str, version: int) -> float | None:
    return metrics.registry.get_sample_value("textgen_model_loaded", {"model": model, "version": str(version)})


def test_serves_the_newest_version_and_ignores_hidden_folders(tmp_path, good_version):
    place(good_version, tmp_path, "tiny", 1)
    place(good_version, tmp_path, "tiny", 3)
    shutil.copytree(good_version, tmp_path / "tiny" / ".tmp-half-written")
    shutil.copytree(good_version, tmp_path / ".hidden" / "1")
    (tmp_path / "tiny" / "notes").mkdir()
    metrics = ServingMetrics()
    repo = ModelRepository(str(tmp_path), metrics=metrics)
    repo.load_all()
    assert [(m.name, m.version) for m in repo.loaded()] == [("tiny", 3)]
    model = repo.resolve("", 0)
    assert model.version == 3 and repo.resolve("tiny", 3) is model
    assert model.vocab_size == model.tokenizer.vocab_size
    assert model.state_size == model.info["state_size"]
    assert loaded_gauge(metrics, "tiny", 3) == 1.0
    assert repo.has_model()


def test_errors_name_what_is_loaded(tmp_path, good_version):
    place(good_version, tmp_path, "tiny", 2)
    repo = ModelRepository(str(tmp_path))
    with pytest.raises(NoModelLoadedError, match="no model is loaded"):
        repo.resolve("", 0)
    repo.load_all()
    with pytest.raises(ModelNotFoundError, match=r"'nope' is not loaded; loaded: tiny \(versions 2\)"):
        repo.resolve("nope", 0)
    with pytest.raises(ModelNotFoundError, match=r"version 1 is not loaded; loaded: tiny \(versions 2\)"):
        repo.resolve("tiny", 1)


@pytest.mark.parametrize("kind", sorted(BREAKERS))
def test_a_bad_version_never_serves(kind, tmp_path, good_version, caplog):
    breaker, reason = BREAKERS[kind]
    place(good_version, tmp_path, "tiny", 1)
    metrics = ServingMetrics()
    repo = ModelRepository(str(tmp_path), metrics=metrics)
    repo.load_all()
    bad = tmp_path / "tiny" / "2"
    staging = place(good_version, tmp_path, "staging", 1)
    breaker(staging)
    os.rename(staging, bad)
    with caplog.at_level("ERROR", logger="service.model_repository"):
        repo.poll()
        repo.poll()  # unchanged: not tried (nor logged, nor counted) again
    assert failures(metrics, "tiny") == 1.0
    errors = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
    assert len(errors) == 1 and "version 2" in errors[0] and reason in errors[0]
    assert repo.resolve("tiny", 0).version == 1  # the previous version keeps serving
    assert loaded_gauge(metrics, "tiny", 2) is None
    # Touching the folder makes it a new candidate: tried (and refused) once more.
    (bad / "touched").write_text("x")
    repo.poll()
    assert failures(metrics, "tiny") == 2.0
    assert repo.resolve("tiny", 0).version == 1


@pytest.mark.parametrize("kind", ["missing signature", "vocabulary mismatch", "missing model.json"])
def test_the_server_refuses_a_bad_version_with_the_message_textgen_check_prints(
    kind, tmp_path, good_version, caplog, capsys
):
    bad = place(good_version, tmp_path, "tiny", 1)
    BREAKERS[kind][0](bad)
    assert check_main([str(bad)]) == 2
    command_says = capsys.readouterr().err.strip().split(": error: ", 1)[1]
    with caplog.at_level("ERROR", logger="service.model_repository"):
        ModelRepository(str(tmp_path)).load_all()
    [logged] = [r.getMessage() for r in caplog.records if "cannot be served" in r.getMessage()]
    assert logged.split(" cannot be served: ", 1)[1] == command_says
    assert BREAKERS[kind][1] in command_says


def test_every_decode_function_is_warmed_at_every_batch_size_before_serving(tmp_path, good_version):
    place(good_version, tmp_path, "tiny", 1)
    repo = ModelRepository(str(tmp_path), warmup_batch_sizes=(3, 8))
    repo.load_all()
    warmed = repo.resolve("", 0).decoder.warmed
    sizes = {name: sorted(b for n, b in warmed if n == name) for name in (DECODE, DECODE_STEPS, PREFILL)}
    assert sizes[DECODE] == [1, 3, 8]  # 1 always: a lone request
    assert sizes[DECODE_STEPS] == sizes[DECODE] and sizes[PREFILL] == sizes[DECODE]


def test_bad_newest_at_start_serves_the_previous_good_one(tmp_path, good_version):
    place(good_version, tmp_path, "tiny", 1)
    BREAKERS["empty folder"][0](place(good_version, tmp_path, "tiny", 2))
    metrics = ServingMetrics()
    repo = ModelRepository(str(tmp_path), metrics=metrics)
    repo.load_all()
    assert repo.resolve("", 0).version == 1
    assert failures(metrics, "tiny") == 1.0


async def _first_chunk_then_wait(stream):
    await stream.next_chunk()
    return stream


def test_new_version_takes_traffic_and_old_unloads_after_its_stream(tmp_path, good_version):
    place(good_version, tmp_path, "tiny", 1)
    metrics = ServingMetrics()
    changes = []
    repo = ModelRepository(str(tmp_path), metrics=metrics, on_change=lambda: changes.append(1))
    repo.load_all()
    engine = Engine(engine_config(), metrics)
    engine.start()
    try:

        async def run() -> list[str]:
            loop = asyncio.get_running_loop()
            old = repo.resolve("", 0)
            stream = engine.submit(old, old.tokenizer.encode("The "), SamplingParams(max_tokens=100_000), loop)
            await stream.next_chunk()
            place(good_version, tmp_path, "tiny", 2)
            await asyncio.to_thread(repo.poll)
            new = repo.resolve("", 0)
            assert new.version == 2 and old.streams == 1 and new.streams == 0
            assert [m.version for m in repo.retiring()] == [1]  # still streaming
            assert loaded_gauge(metrics, "tiny", 1) is None and loaded_gauge(metrics, "tiny", 2) == 1.0
            with pytest.raises(ModelNotFoundError):
                repo.resolve("tiny", 1)
            more = await stream.next_chunk()
            assert more.finish_reason is None  # the old stream goes on
            stream.cancel()
            while (await stream.next_chunk()).finish_reason is None:
                pass
            fresh = engine.submit(new, new.tokenizer.encode("The "), SamplingParams(max_tokens=5), loop)
            while (chunk := await fresh.next_chunk()).finish_reason is None:
                pass
            assert chunk.finish_reason == "length"
            return []

        asyncio.run(run())
        assert wait_until(lambda: repo.retiring() == [])  # once its last stream has ended
        assert [m.version for m in repo.loaded()] == [2]
        assert len(changes) >= 2
    finally:
        engine.stop(5.0)


def test_keep_versions_and_pinning(tmp_path, good_version):
    for v in (1, 2, 3):
        place(good_version, tmp_path, "tiny", v)
    repo = ModelRepository(str(tmp_path), keep_versions=2)
    repo.load_all()
    assert [m.version for m in repo.loaded()] == [2, 3]
    assert repo.resolve("tiny", 2).version == 2
    assert repo.resolve("tiny", 0).version == 3


def test_removing_a_version_folder_unloads_it(tmp_path, good_version):
    place(good_version, tmp_path, "tiny", 1)
    place(good_version, tmp_path, "tiny", 2)
    repo = ModelRepository(str(tmp_path))
    repo.load_all()
    newest = weakref.ref(repo.resolve("", 0))
    assert newest().version == 2
    shutil.rmtree(tmp_path / "tiny" / "2")
    repo.poll()
    assert [m.version for m in repo.loaded()] == [1]  # falls back to the remaining version
    assert repo.retiring() == []
    gc.collect()
    assert newest() is None  # nothing holds the unloaded version: its memory can go
    shutil.rmtree(tmp_path / "tiny" / "1")
    repo.poll()
    assert repo.loaded() == [] and not repo.has_model()
    with pytest.raises(NoModelLoadedError):
        repo.resolve("", 0)


def test_loaded_models_are_frozen_out_of_the_collectors_full_passes(tmp_path, good_version):
    """After a load, the model's objects sit in the permanent generation; an unload thaws and frees them."""
    place(good_version, tmp_path, "tiny", 1)
    repo = ModelRepository(str(tmp_path))
    gc.unfreeze()
    repo.load_all()
    model = repo.resolve("", 0)
    assert gc.get_freeze_count() > 0
    tracked = {id(o) for o in gc.get_objects()}  # every generation but the permanent one
    assert id(model) not in tracked and id(model.decoder) not in tracked
    refs = [weakref.ref(model), weakref.ref(model.decoder.checked.saved), weakref.ref(model.decoder)]
    del model
    shutil.rmtree(tmp_path / "tiny" / "1")
    repo.poll()
    # Frozen objects are not leaked: the poll that unloads thaws them before it collects.
    assert [ref() for ref in refs] == [None, None, None]


def test_a_version_still_referenced_at_its_unload_is_freed_once_let_go(tmp_path, good_version):
    """A request handler may hold an unloaded version past the poll that unloads it; later polls free it."""
    place(good_version, tmp_path, "tiny", 1)
    repo = ModelRepository(str(tmp_path))
    repo.load_all()
    handler_holds = repo.resolve("", 0)
    # The function graphs are what sit in reference cycles (the model object itself goes by refcount).
    functions = handler_holds.decoder.functions
    graphs = [weakref.ref(functions[name].graph) for name in (DECODE, DECODE_STEPS, PREFILL)]
    graphs.append(weakref.ref(handler_holds.decoder.checked.step.graph))
    del functions
    shutil.rmtree(tmp_path / "tiny" / "1")
    repo.poll()  # unloads, collects and freezes while the handler still holds the version
    assert repo.loaded() == [] and all(g() is not None for g in graphs)
    del handler_holds
    gc.collect()  # an ordinary full collection does not look into frozen objects
    repo.poll()  # nothing changed on disk; the unloaded version is collected again
    assert [g() for g in graphs] == [None] * 4


def test_empty_start_then_polling_finds_models(tmp_path, good_version):
    seen = []
    repo = ModelRepository(str(tmp_path), poll_seconds=0.1, on_change=lambda: seen.append(repo.has_model()))
    repo.load_all()
    assert not repo.has_model()
    repo.start_polling()
    try:
        place(good_version, tmp_path, "tiny", 1)
        end = time.monotonic() + 30
        while not repo.has_model() and time.monotonic() < end:
            time.sleep(0.05)
        assert repo.resolve("", 0).name == "tiny"
        assert seen and seen[-1] is True
        place(good_version, tmp_path, "second", 4)
        while len(repo.loaded()) < 2 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        repo.stop()
    assert [(m.name, m.version) for m in repo.loaded()] == [("second", 4), ("tiny", 1)]
    with pytest.raises(ModelNotFoundError, match="no default model"):
        repo.resolve("", 0)
    assert repo.resolve("second", 0).version == 4


def test_default_model_is_configurable(tmp_path, good_version):
    place(good_version, tmp_path, "a", 1)
    place(good_version, tmp_path, "b", 1)
    repo = ModelRepository(str(tmp_path), default_model="b")
    repo.load_all()
    assert repo.resolve("", 0).name == "b"


def test_two_models_generate_in_one_engine(tmp_path, good_version, tiny_word_model_repo):
    place(good_version, tmp_path, "chars", 1)
    place(Path(tiny_word_model_repo) / "tinyword" / "1", tmp_path, "words", 1)
    metrics = ServingMetrics()
    repo = ModelRepository(str(tmp_path), metrics=metrics)
    repo.load_all()
    engine = Engine(engine_config(), metrics)
    engine.start()
    try:

        async def run() -> list[tuple[str, int]]:
            loop = asyncio.get_running_loop()
            streams = []
            for i in range(4):
                for name in ("chars", "words"):
                    model = repo.resolve(name, 0)
                    prompt = model.tokenizer.encode("The ")
                    streams.append((name, engine.submit(model, prompt, SamplingParams(max_tokens=20, seed=i), loop)))
            out = []
            for name, s in streams:
                while (chunk := await s.next_chunk()).finish_reason is None:
                    pass
                out.append((name, chunk.completion_tokens))
            return out

        results = asyncio.run(run())
        assert sorted(results) == sorted([("chars", 20), ("words", 20)] * 4)
        for name in ("chars", "words"):
            value = metrics.registry.get_sample_value("textgen_generated_tokens_total", {"model": name})
            assert value == 80
    finally:
        engine.stop(5.0)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read RSS")
def test_memory_is_returned_after_unloads(tmp_path, good_version):
    """20 load/unload cycles after 3 warm-up cycles: RSS grows by less than 20 MB (seen: about 1 MB)."""
    repo = ModelRepository(str(tmp_path), warmup_batch_sizes=(1,))
    before = 0.0
    for version in range(1, 24):
        place(good_version, tmp_path, "tiny", version)
        repo.poll()  # loads the new version, retires and unloads the previous one
        if version > 1:
            shutil.rmtree(tmp_path / "tiny" / str(version - 1))
        assert [m.version for m in repo.loaded()] == [version] and repo.retiring() == []
        if version == 3:
            gc.collect()
            before = rss_mb()
    gc.collect()
    grown = rss_mb() - before
    assert grown < 20.0, f"RSS grew by {grown:.1f} MB over 20 load/unload cycles"
