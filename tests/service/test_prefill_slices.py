"""Prompts are read in slices of at most ``PREFILL_SLICE`` tokens, so a cancel or deadline frees a row within one call.

The engine reads an idle batch's prompts one slice per call (``prefill``, then ``prefill_from``);
a contract-1 version (no ``prefill_from``) reads the first slice and the rest rides. Every path
gives the same tokens as one ``prefill`` call over the whole prompt.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import tensorflow as tf

from service.batch import as_int64
from service.engine import PREFILL_SLICE, Engine
from service.model_repository import LoadedModel, ModelRepository
from service.sampling import SamplingParams
from service.stream import Chunk, Stream
from tests.helpers import RunningServer, engine_config, wait_until
from training.contract import MODEL_ASSET, PREFILL, STEP

SENTENCE = "The object is a list of numbers; each item may be another object. "
# Three whole slices and part of a fourth (char level: one token per character).
LONG = (SENTENCE * 20)[: 3 * PREFILL_SLICE + 50]
# The prompt: 60,000 characters, about 235 slices, several seconds of reading for the tiny model.
HUGE = (SENTENCE * 1000)[:60_000]
GREEDY = SamplingParams(max_tokens=40, temperature=0.0, include_tokens=True)
SEEDED = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.95, seed=9182, include_tokens=True)


def contract_1_copy(version: Path, base: Path) -> Path:
    """The same weights as ``version``, saved as a contract-1 export: ``prefill`` and ``step`` only."""
    loaded = tf.saved_model.load(str(version))
    path = base / "1"
    signatures = {name: loaded.signatures[name] for name in (PREFILL.name, STEP.name)}
    tf.saved_model.save(loaded, str(path), signatures=signatures)
    shutil.copytree(version / "assets", path / "assets", dirs_exist_ok=True)
    info_path = path / "assets" / MODEL_ASSET
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info["contract_version"] = 1
    info_path.write_text(json.dumps(info), encoding="utf-8")
    return path


def load(repo: Path) -> LoadedModel:
    models = ModelRepository(str(repo), warmup_batch_sizes=(1, 8))
    models.load_all()
    return models.resolve("", 0)


@pytest.fixture(scope="module")
def model(tiny_model_repo: Path) -> LoadedModel:
    return load(tiny_model_repo)


@pytest.fixture(scope="module")
def v1_model(tiny_model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    repo = tmp_path_factory.mktemp("contract1")
    contract_1_copy(tiny_model_repo / "tiny" / "1", repo / "tiny")
    return load(repo)


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine(engine_config(max_concurrent=64, max_queue=64, max_batch_size=64))
    engine.start()
    yield engine
    engine.stop(5.0)


def submit(engine: Engine, model: LoadedModel, prompt: str, params: SamplingParams, deadline: float | None = None):
    return engine.submit(model, model.tokenizer.encode(prompt), params, asyncio.get_running_loop(), deadline)


async def collect(stream: Stream) -> list[Chunk]:
    chunks = []
    while True:
        chunk = await stream.next_chunk()
        chunks.append(chunk)
        if chunk.finish_reason is not None:
            return chunks


def token_ids(chunks: list[Chunk]) -> list[int]:
    return [i for c in chunks for i in c.token_ids]


def generate(engine: Engine, model: LoadedModel, prompt: str, params: SamplingParams) -> list[int]:
    async def run() -> list[Chunk]:
        return await collect(submit(engine, model, prompt, params))

    chunks = asyncio.run(run())
    assert chunks[-1].finish_reason == "length"
    return token_ids(chunks)


def in_one_call(model: LoadedModel, prompt: str, params: SamplingParams) -> list[int]:
    """The reference: the whole prompt through one ``prefill`` call, then one ``decode`` per token."""
    decoder = model.decoder
    ids = model.tokenizer.encode(prompt)
    seed = 0 if params.seed is None else as_int64(params.seed)
    sampling = (
        tf.constant([params.temperature], tf.float32),
        tf.constant([params.top_k], tf.int32),
        tf.constant([params.top_p], tf.float32),
        tf.constant([seed], tf.int64),
    )
    next_id, _, state = decoder.prefill(
        tf.constant([ids], tf.int32), tf.constant([len(ids)], tf.int32), *sampling, tf.constant([0], tf.int64)
    )
    out = [int(next_id[0])]
    for position in range(1, params.max_tokens):
        next_id, _, state = decoder.decode(next_id, state, *sampling, tf.constant([position], tf.int64))
        out.append(int(next_id[0]))
    return out


def test_the_fixture_models_are_contract_2_and_contract_1(model: LoadedModel, v1_model: LoadedModel) -> None:
    assert model.decoder.has_prefill_from and model.decoder.checked.info["contract_version"] == 2
    assert not v1_model.decoder.has_prefill_from and v1_model.decoder.checked.info["contract_version"] == 1
    assert ("prefill_from", 8) in model.decoder.warmed


def test_a_long_prompt_is_read_in_slices_of_at_most_prefill_slice_tokens(engine: Engine, model: LoadedModel) -> None:
    generate(engine, model, LONG, GREEDY)
    assert engine.slices == math.ceil(len(LONG) / PREFILL_SLICE) == 4
    assert engine.widest_slice == PREFILL_SLICE


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_prompt_gives_the_same_tokens_in_one_call_in_slices_and_riding(
    engine: Engine, model: LoadedModel, params: SamplingParams
) -> None:
    reference = in_one_call(model, LONG, params)
    assert len(reference) == 40
    assert generate(engine, model, LONG, params) == reference  # in slices
    slices = engine.slices

    async def riding() -> list[int]:
        # A row that generates is running, so the long prompt rides in the decode batch.
        runner = submit(engine, model, "The ", SamplingParams(max_tokens=100_000, seed=1))
        while (await runner.next_chunk()).completion_tokens == 0:
            pass
        chunks = await collect(submit(engine, model, LONG, params))
        runner.cancel()
        await collect(runner)
        return token_ids(chunks)

    assert asyncio.run(riding()) == reference
    assert engine.slices == slices + 1  # the runner's own prompt; the long one read none


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_contract_1_version_reads_one_slice_and_the_rest_rides_to_the_same_tokens(
    engine: Engine, model: LoadedModel, v1_model: LoadedModel, params: SamplingParams
) -> None:
    assert generate(engine, v1_model, LONG, params) == in_one_call(model, LONG, params)
    assert engine.slices == 1 and engine.widest_slice == PREFILL_SLICE
    assert engine.steps > len(LONG) - PREFILL_SLICE  # the other prompt tokens rode, one step each


def test_a_cancel_while_a_long_prompt_is_read_frees_the_row_within_one_call(engine: Engine, model: LoadedModel) -> None:
    async def run() -> tuple[list[Chunk], int]:
        stream = submit(engine, model, HUGE, GREEDY)
        while engine.slices == 0:
            await asyncio.sleep(0.001)
        stream.cancel()
        calls_at_cancel = engine.calls  # read after the cancel: a call under way then is the one allowed
        return await collect(stream), calls_at_cancel

    chunks, calls_at_cancel = asyncio.run(run())
    assert wait_until(lambda: engine.active == 0)
    assert engine.calls <= calls_at_cancel + 1
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].completion_tokens == 0
    # It left before its prompt was read (on a loaded machine, perhaps before the first slice).
    assert engine.slices < math.ceil(len(HUGE) / PREFILL_SLICE)
    assert engine.widest_slice == PREFILL_SLICE


def test_a_deadline_passing_while_a_long_prompt_is_read_frees_the_row_within_one_call(
    engine: Engine, model: LoadedModel
) -> None:
    async def run() -> tuple[list[Chunk], int]:
        deadline = time.monotonic() + 0.5
        stream = submit(engine, model, HUGE, GREEDY, deadline=deadline)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.001)
        calls_at_deadline = engine.calls
        return await collect(stream), calls_at_deadline

    chunks, calls_at_deadline = asyncio.run(run())
    assert wait_until(lambda: engine.active == 0)
    assert engine.calls <= calls_at_deadline + 1
    assert chunks[-1].finish_reason == "deadline" and chunks[-1].completion_tokens == 0
    # It left before its prompt was read (on a loaded machine, perhaps before the first slice).
    assert engine.slices < math.ceil(len(HUGE) / PREFILL_SLICE)


def test_through_the_server_a_long_prompt_past_its_deadline_ends_deadline_exceeded_and_frees_its_row(
    start_server,
) -> None:
    running: RunningServer = start_server(max_prompt_bytes=65536)
    engine = running.server.engine
    with running.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            client.complete(HUGE, max_tokens=8, temperature=0.0, timeout=0.5)
        calls_at_deadline = engine.calls
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)
    # The server's deadline is the client's, seen a moment later: one call under way, perhaps one more.
    assert engine.calls <= calls_at_deadline + 2
    # It left before its prompt was read (on a loaded machine, perhaps before the first slice).
    assert engine.slices < math.ceil(len(HUGE) / PREFILL_SLICE)
    assert running.sample("textgen_generated_tokens_total") == 0  # the row left before its prompt was read
    assert running.sample("textgen_active_sequences") == 0
