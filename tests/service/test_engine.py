"""The engine with a real tiny model, driven from an asyncio loop in the test (no gRPC)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from service.batch import CallBudget
from service.engine import Engine
from service.errors import CapacityError, EngineClosedError
from service.metrics import ServingMetrics
from service.model_repository import LoadedModel, ModelRepository
from service.sampling import SamplingParams
from service.stream import Chunk, Stream
from tests.helpers import engine_config, wait_until

PROMPT = "The object "


@pytest.fixture(scope="module")
def model(tiny_model_repo) -> LoadedModel:
    repo = ModelRepository(str(tiny_model_repo), warmup_batch_sizes=(1, 8))
    repo.load_all()
    return repo.resolve("", 0)


@pytest.fixture(scope="module")
def word_model(tiny_word_model_repo) -> LoadedModel:
    repo = ModelRepository(str(tiny_word_model_repo))
    repo.load_all()
    return repo.resolve("", 0)


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics()


@pytest.fixture
def engine(metrics) -> Iterator[Engine]:
    engine = Engine(engine_config(max_concurrent=64, max_queue=64, max_batch_size=64), metrics)
    engine.start()
    yield engine
    engine.stop(5.0)


def submit(
    engine: Engine,
    model: LoadedModel,
    prompt: str,
    params: SamplingParams,
    loop: asyncio.AbstractEventLoop,
    deadline: float | None = None,
) -> Stream:
    """Submit ``prompt`` encoded by the model's tokenizer (the servicer encodes before it submits)."""
    return engine.submit(model, model.tokenizer.encode(prompt), params, loop, deadline)


async def collect(stream: Stream) -> tuple[str, list[Chunk]]:
    chunks = []
    while True:
        chunk = await stream.next_chunk()
        chunks.append(chunk)
        if chunk.finish_reason is not None:
            return "".join(c.text for c in chunks), chunks


def generate(engine: Engine, model: LoadedModel, prompt: str, params: SamplingParams) -> tuple[str, list[Chunk]]:
    async def run() -> tuple[str, list[Chunk]]:
        return await collect(submit(engine, model, prompt, params, asyncio.get_running_loop()))

    return asyncio.run(run())


def sample_value(metrics: ServingMetrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_max_tokens_is_exact_with_length(engine, model, metrics):
    text, chunks = generate(engine, model, PROMPT, SamplingParams(max_tokens=17, seed=3, include_tokens=True))
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.completion_tokens == 17
    assert last.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    ids = [i for c in chunks for i in c.token_ids]
    assert len(ids) == 17
    assert text == model.tokenizer.decode(ids)  # char level: the text is the tokens
    assert len([lp for c in chunks for lp in c.logprobs]) == 17
    assert all(lp <= 0.0 for c in chunks for lp in c.logprobs)
    assert last.time_to_first_token is not None and last.time_to_first_token >= 0
    assert sample_value(metrics, "textgen_generated_tokens_total", {"model": "tiny"}) == 17
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)


def test_greedy_is_deterministic_and_top_k_one_equals_greedy(engine, model):
    greedy = generate(engine, model, PROMPT, SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert generate(engine, model, PROMPT, SamplingParams(max_tokens=40, temperature=0.0))[0] == greedy
    assert generate(engine, model, PROMPT, SamplingParams(max_tokens=40, temperature=1.3, top_k=1))[0] == greedy


def test_stop_sequence_is_excluded_with_stop(engine, model):
    # Take a greedy continuation, pick a stop string from its middle: generation must end right before it.
    full = generate(engine, model, PROMPT, SamplingParams(max_tokens=60, temperature=0.0))[0]
    stop = full[20:23]
    cut = full.index(stop)
    text, chunks = generate(engine, model, PROMPT, SamplingParams(max_tokens=60, temperature=0.0, stop=(stop,)))
    assert chunks[-1].finish_reason == "stop"
    assert text == full[:cut]
    assert stop not in text


def test_empty_prompt_starts_from_the_start_state(engine, model):
    start_ids = list(model.tokenizer.start_ids)
    assert start_ids == model.tokenizer.encode("\n")  # the start text: a newline

    async def run(ids: list[int], params: SamplingParams) -> tuple[str, list[Chunk]]:
        return await collect(engine.submit(model, ids, params, asyncio.get_running_loop()))

    for params in (SamplingParams(max_tokens=10, seed=1), SamplingParams(max_tokens=10, temperature=0.0)):
        text, chunks = asyncio.run(run([], params))
        assert chunks[-1].prompt_tokens == 0
        assert chunks[-1].completion_tokens == 10
        assert chunks[-1].finish_reason == "length"
        # Exactly what a prompt of the start ids gives, seeded or greedy.
        explicit, explicit_chunks = asyncio.run(run(start_ids, params))
        assert explicit_chunks[-1].prompt_tokens == len(start_ids)
        assert text == explicit


def test_seeded_request_is_the_same_alone_and_in_a_crowd(engine, model):
    params = SamplingParams(max_tokens=50, temperature=1.0, top_p=0.95, seed=424242)
    alone = generate(engine, model, PROMPT, params)[0]

    async def crowd() -> str:
        loop = asyncio.get_running_loop()
        others = [
            submit(engine, model, f"x{i} " * (i + 1), SamplingParams(max_tokens=80, temperature=1.5), loop)
            for i in range(8)
        ]
        await asyncio.gather(*(s.next_chunk() for s in others))  # the others are running when ours arrives
        ours = submit(engine, model, PROMPT, params, loop)
        results = await asyncio.gather(collect(ours), *(collect(s) for s in others))
        return results[0][0]

    assert asyncio.run(crowd()) == alone


def test_unseeded_requests_differ(engine, model):
    params = SamplingParams(max_tokens=40, temperature=1.0)
    assert generate(engine, model, PROMPT, params)[0] != generate(engine, model, PROMPT, params)[0]


def test_sixteen_streams_share_steps(engine, model, metrics):
    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        streams = [submit(engine, model, PROMPT, SamplingParams(max_tokens=30, seed=i), loop) for i in range(16)]
        return [t for t, _ in await asyncio.gather(*(collect(s) for s in streams))]

    steps_before = engine.steps
    texts = asyncio.run(run())
    assert len(texts) == 16 and len(set(texts)) > 1
    # 16 x 30 tokens in far fewer than 16 x 30 steps, and batches above 1 were recorded.
    assert engine.steps - steps_before < 16 * 30 / 2
    at_most_one = sample_value(metrics, "textgen_batch_size_bucket", {"model": "tiny", "le": "1.0"})
    total = sample_value(metrics, "textgen_batch_size_count", {"model": "tiny"})
    assert total > at_most_one
    assert sample_value(metrics, "textgen_generated_tokens_total", {"model": "tiny"}) == 16 * 30


def test_cancel_frees_the_row_within_one_model_call(engine, model, metrics):
    async def run() -> tuple[Chunk, int]:
        stream = submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000), asyncio.get_running_loop())
        await stream.next_chunk()
        assert engine.active == 1
        at_cancel = engine.steps
        stream.cancel()
        _, chunks = await collect(stream)
        return chunks[-1], at_cancel

    last, at_cancel = asyncio.run(run())
    assert last.finish_reason == "cancelled"
    assert wait_until(lambda: engine.active == 0)
    assert wait_until(lambda: sample_value(metrics, "textgen_active_sequences", {"model": "tiny"}) == 0)
    # The engine finished the call it was in (at most max_steps_per_call steps), then no other.
    assert engine.steps - at_cancel <= engine.config.max_steps_per_call


def test_deadline_frees_the_row_within_one_model_call(engine, model):
    async def run() -> tuple[Chunk, int]:
        deadline = time.monotonic() + 2.0
        stream = submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000), asyncio.get_running_loop(), deadline)
        while time.monotonic() < deadline:  # tokens pile up in the stream meanwhile
            await asyncio.sleep(0.05)
        at_deadline = engine.steps  # read once the deadline has passed: at least the steps made by then
        _, chunks = await collect(stream)
        return chunks[-1], at_deadline

    last, at_deadline = asyncio.run(run())
    assert last.finish_reason == "deadline"
    assert 0 < last.completion_tokens < 100_000
    assert wait_until(lambda: engine.active == 0)
    # The engine finished the call it was in when the deadline passed (at most max_steps_per_call steps), then no
    # other.
    assert engine.steps - at_deadline <= engine.config.max_steps_per_call


def test_capacity_error_at_once_when_full(model):
    engine = Engine(engine_config(max_concurrent=2, max_queue=1, max_batch_size=2))
    engine.start()
    try:

        async def run() -> None:
            loop = asyncio.get_running_loop()
            streams = [submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000), loop) for _ in range(3)]
            for _ in range(3):  # three waves: full, refused at once (never queued), freed, full again
                with pytest.raises(CapacityError, match="max_concurrent 2 \\+ max_queue 1"):
                    submit(engine, model, PROMPT, SamplingParams(max_tokens=5), loop)
                assert engine.active + engine.waiting == 3  # the refused request took no place
                streams[0].cancel()
                await collect(streams[0])
                streams = streams[1:] + [submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000), loop)]
            for s in streams:
                s.cancel()
                await collect(s)

        asyncio.run(run())
        assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)
    finally:
        engine.stop(5.0)


def test_slow_consumer_gets_coalesced_chunks(engine, model):
    async def run() -> tuple[str, list[Chunk]]:
        stream = submit(engine, model, PROMPT, SamplingParams(max_tokens=200, seed=5), asyncio.get_running_loop())
        first = await stream.next_chunk()
        while not stream.finished:  # the consumer reads nothing until the engine has made every token
            await asyncio.sleep(0.01)
        text, rest = await collect(stream)
        return first.text + text, [first, *rest]

    text, chunks = asyncio.run(run())
    assert chunks[-1].completion_tokens == 200
    assert len(chunks) == 2  # the first token, then the other 199 together
    assert len(chunks[-1].text) > 1
    fast = generate(engine, model, PROMPT, SamplingParams(max_tokens=200, seed=5))[0]
    assert text == fast


def test_close_refuses_new_requests_and_running_streams_finish(model):
    engine = Engine(engine_config())
    engine.start()
    try:

        async def run() -> Chunk:
            loop = asyncio.get_running_loop()
            stream = submit(engine, model, PROMPT, SamplingParams(max_tokens=30), loop)
            engine.close()
            with pytest.raises(EngineClosedError):
                submit(engine, model, PROMPT, SamplingParams(max_tokens=30), loop)
            return (await collect(stream))[1][-1]

        assert asyncio.run(run()).finish_reason == "length"
    finally:
        engine.stop(5.0)


def test_batch_size_one_runs_one_sequence_per_step(model, metrics):
    engine = Engine(engine_config(max_batch_size=1), metrics)
    engine.start()
    try:

        async def run() -> list[str]:
            loop = asyncio.get_running_loop()
            streams = [submit(engine, model, PROMPT, SamplingParams(max_tokens=10, seed=i), loop) for i in range(3)]
            return [t for t, _ in await asyncio.gather(*(collect(s) for s in streams))]

        assert len(asyncio.run(run())) == 3
        total = sample_value(metrics, "textgen_batch_size_count", {"model": "tiny"})
        at_most_one = sample_value(metrics, "textgen_batch_size_bucket", {"model": "tiny", "le": "1.0"})
        assert total == at_most_one > 0
    finally:
        engine.stop(5.0)


def test_word_model_generates_spaced_words(engine, word_model):
    text, chunks = generate(engine, word_model, "The value of", SamplingParams(max_tokens=30, temperature=0.0))
    assert chunks[-1].completion_tokens == 30
    assert text.startswith(" ") or text[:1] in ".,;:!?)\n"  # a new word after "of" is spaced
    assert "  " not in text
    words = text.split()
    assert len(words) >= 10


async def _long_prompt_arrives(engine: Engine, model: LoadedModel, long_prompt: str) -> tuple[int, int]:
    """A stream runs; a long prompt arrives. Returns (engine steps, tokens the running stream got) until the
    long prompt's first token."""
    loop = asyncio.get_running_loop()
    running = submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000, seed=1), loop)
    before = (await running.next_chunk()).completion_tokens
    steps_before = engine.steps
    late = submit(engine, model, long_prompt, SamplingParams(max_tokens=3, seed=2), loop)
    await late.next_chunk()
    steps = engine.steps - steps_before
    got = (await running.next_chunk()).completion_tokens - before
    running.cancel()
    await collect(running)
    await collect(late)
    return steps, got


LONG_PROMPT = ("The object " * 60)[:600]


def test_a_long_prompt_rides_along_without_stalling_running_streams(model):
    engine = Engine(engine_config(steps_per_call=1, row_steps_per_call=0))
    engine.start()
    try:
        steps, got = asyncio.run(_long_prompt_arrives(engine, model, LONG_PROMPT))
    finally:
        engine.stop(5.0)
    # The prompt was fed one token per shared step, and the running stream got a token at each of them.
    assert steps >= 600
    assert got >= 600


async def _seeded_in_a_crowd(engine: Engine, model: LoadedModel, prompt: str, params: SamplingParams) -> str:
    loop = asyncio.get_running_loop()
    others = [submit(engine, model, PROMPT, SamplingParams(max_tokens=200), loop) for _ in range(4)]
    await asyncio.gather(*(s.next_chunk() for s in others))  # the batch is running
    ours = submit(engine, model, prompt, params, loop)  # rides in the running batch
    text = (await collect(ours))[0]
    for s in others:
        s.cancel()
        await collect(s)
    return text


def test_riding_and_idle_prefilled_prompts_give_the_same_seeded_text(model):
    prompt = ("A seeded prompt that is read one token per step beside others. " * 3)[:150]
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=77)
    engine = Engine(engine_config())
    engine.start()
    try:
        alone = generate(engine, model, prompt, params)[0]  # no running row: the prefill signature
        crowded = asyncio.run(_seeded_in_a_crowd(engine, model, prompt, params))  # rides in the batch
    finally:
        engine.stop(5.0)
    assert alone == crowded


def test_wake_interval_groups_wake_ups_and_the_last_one_is_never_held(model):
    engine = Engine(engine_config(wake_interval=120.0))
    engine.start()
    try:

        async def run() -> list[Chunk]:
            stream = submit(engine, model, PROMPT, SamplingParams(max_tokens=40, seed=9), asyncio.get_running_loop())
            # Far less than the interval: the last wake-up is not held for it.
            return (await asyncio.wait_for(collect(stream), 60.0))[1]

        chunks = asyncio.run(run())
        # One wake-up for the first token, then none within the interval until the engine went idle.
        assert len(chunks) <= 3
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 40
    finally:
        engine.stop(5.0)


def test_waiting_requests_can_be_cancelled_or_expire_in_the_queue(model):
    engine = Engine(engine_config(max_concurrent=1, max_queue=4, max_batch_size=1))
    engine.start()
    try:

        async def run() -> tuple[Chunk, Chunk, Chunk]:
            loop = asyncio.get_running_loop()
            running = submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000), loop)
            await running.next_chunk()
            queued = submit(engine, model, PROMPT, SamplingParams(max_tokens=5), loop)
            expiring = submit(engine, model, PROMPT, SamplingParams(max_tokens=5), loop, time.monotonic() + 0.1)
            assert engine.waiting == 2
            queued.cancel()
            cancelled = (await collect(queued))[1][-1]
            expired = (await collect(expiring))[1][-1]
            assert engine.waiting == 0 and engine.active == 1
            running.cancel()
            return cancelled, expired, (await collect(running))[1][-1]

        cancelled, expired, running = asyncio.run(run())
        assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0
        assert expired.finish_reason == "deadline" and expired.completion_tokens == 0
        assert running.finish_reason == "cancelled"
        assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)
    finally:
        engine.stop(5.0)


def test_stop_cancels_running_streams_and_joins(model):
    engine = Engine(engine_config())
    engine.start()

    async def run() -> Chunk:
        stream = submit(engine, model, PROMPT, SamplingParams(max_tokens=100_000), asyncio.get_running_loop())
        await stream.next_chunk()
        await asyncio.to_thread(engine.stop, 5.0)
        return (await asyncio.wait_for(collect(stream), 5.0))[1][-1]

    assert asyncio.run(run()).finish_reason == "cancelled"
    assert engine.active == 0


def test_include_tokens_with_a_stop_sequence(engine, model):
    full, chunks = generate(engine, model, PROMPT, SamplingParams(max_tokens=40, temperature=0.0, include_tokens=True))
    texts = [t for c in chunks for t in c.token_texts]
    assert "".join(texts) == full
    stop = full[10:12]
    text, chunks = generate(
        engine, model, PROMPT, SamplingParams(max_tokens=40, temperature=0.0, stop=(stop,), include_tokens=True)
    )
    assert text == full[: full.index(stop)]
    ids = [i for c in chunks for i in c.token_ids]
    assert len(ids) == chunks[-1].completion_tokens  # the tokens that made the stop text are counted
    assert "".join(t for c in chunks for t in c.token_texts).startswith(text + stop)


def test_several_steps_per_call_give_the_same_streams_as_one(model, metrics):
    """K steps per call is a speed option: seeded text, token ids, logprobs, max_tokens and stops are unchanged."""
    cases = [
        (PROMPT, SamplingParams(max_tokens=45, temperature=1.0, top_p=0.9, seed=11, include_tokens=True)),
        ("The ", SamplingParams(max_tokens=13, temperature=0.7, top_k=5, seed=12, include_tokens=True)),
        (PROMPT, SamplingParams(max_tokens=60, temperature=1.0, seed=14, stop=("e",), include_tokens=True)),
        ("x", SamplingParams(max_tokens=3, temperature=1.3, seed=13, include_tokens=True)),
    ]

    def run(
        steps_per_call: int, call_budget_ms: float = 0.0
    ) -> tuple[list[tuple[str, list[int], list[float], str | None, int]], Engine]:
        config = engine_config(
            max_concurrent=8,
            max_queue=8,
            steps_per_call=steps_per_call,
            row_steps_per_call=0,  # K is exactly steps_per_call, however few the rows
            call_budget_ms=call_budget_ms,
        )
        engine = Engine(config, metrics)
        engine.start()
        try:

            async def together() -> list[tuple[str, list[Chunk]]]:
                loop = asyncio.get_running_loop()
                streams = [submit(engine, model, prompt, params, loop) for prompt, params in cases]
                return await asyncio.gather(*(collect(s) for s in streams))

            out = []
            for text, chunks in asyncio.run(together()):
                ids = [i for c in chunks for i in c.token_ids]
                logprobs = [p for c in chunks for p in c.logprobs]
                out.append((text, ids, logprobs, chunks[-1].finish_reason, chunks[-1].completion_tokens))
            return out, engine
        finally:
            engine.stop(5.0)

    one, one_engine = run(1)
    many, many_engine = run(8)
    assert [o[:2] + o[3:] for o in many] == [o[:2] + o[3:] for o in one]
    for (_, _, lp_many, _, _), (_, _, lp_one, _, _) in zip(many, one, strict=True):
        assert lp_many == pytest.approx(lp_one, abs=1e-5)
    assert [o[3] for o in one] == ["length", "length", "stop", "length"]
    assert one[0][4] == 45 and one[1][4] == 13 and one[3][4] == 3
    # The same steps, in far fewer calls (prompts ride in one-step calls first).
    assert many_engine.steps >= 45
    assert many_engine.calls < one_engine.calls / 2
    # A call budget below any step's time keeps K at 1; one far above every step's time lets
    # K reach steps_per_call after the first (timed) call. The streams never change.
    for budget_ms, calls_like in ((1e-6, one_engine), (10_000.0, many_engine)):
        budgeted, engine = run(8, budget_ms)
        assert [o[:2] + o[3:] for o in budgeted] == [o[:2] + o[3:] for o in one]
        if calls_like is one_engine:
            assert engine.calls == engine.steps
        else:
            assert engine.calls < one_engine.calls / 2 and engine.steps > engine.calls


def _cumulative_shares(metrics: ServingMetrics, histogram: str) -> tuple[float, dict[float, float]]:
    """(observations, {bucket bound: share of the observations at most that bound}) of a histogram."""
    buckets: dict[float, float] = {}
    count = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == f"{histogram}_bucket":
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == f"{histogram}_count":
                count = sample.value
    return count, {bound: n / count for bound, n in buckets.items()}


def test_multi_step_calls_spread_inter_token_latency_over_their_tokens(model):
    """K tokens of a call arrive together: each gets a share of the gap, not K-1 near-zeros and one whole gap.

    A token's share of the gap since the row's previous token is at least its share of the model
    call (a step's duration: the call's time / K). So, bucket by bucket, no larger a part of the
    inter-token latencies lies at or below a bound than of the step durations (the margin covers
    the prefill call, timed as a step but giving no inter-token latency). A stall anywhere only
    moves latencies up. Unspread, 7 of every 8 latencies with K = 8 would be the microseconds
    between two deliveries of one call, below nearly every step.
    """
    for k in (1, 8):
        metrics = ServingMetrics()
        engine = Engine(engine_config(max_concurrent=32, max_queue=32, steps_per_call=k, row_steps_per_call=0), metrics)
        engine.start()
        try:

            async def many(engine: Engine) -> list[tuple[str, list[Chunk]]]:
                loop = asyncio.get_running_loop()
                params = [SamplingParams(max_tokens=64, temperature=1.0, seed=100 + i) for i in range(32)]
                streams = [submit(engine, model, PROMPT, p, loop) for p in params]
                return await asyncio.gather(*(collect(s) for s in streams))

            asyncio.run(many(engine))
        finally:
            engine.stop(5.0)
        count, itl = _cumulative_shares(metrics, "textgen_inter_token_latency_seconds")
        assert count == 32 * 63  # one observation per token after the first, whatever K is
        _, steps = _cumulative_shares(metrics, "textgen_step_duration_seconds")
        for bound in sorted(itl):
            assert itl[bound] <= steps[bound] + 0.1, (k, bound, itl, steps)


def test_prompts_ride_inside_multi_step_calls_with_the_same_streams_as_one_step(model, metrics):
    """Requests that join a running batch read their prompts inside K-step calls; every stream is unchanged."""
    long_prompt = "The object of this module is the " * 2  # 66 characters: rides across several 8-step calls
    joiners = [
        (long_prompt, SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=21, include_tokens=True)),
        ("The ", SamplingParams(max_tokens=12, temperature=0.8, top_k=7, seed=22, include_tokens=True)),
        (PROMPT + "is", SamplingParams(max_tokens=25, temperature=1.0, seed=23, stop=("e",), include_tokens=True)),
        # 8 and 16 prompt tokens after the first: a call reads exactly the rest of the prompt
        ("The objec", SamplingParams(max_tokens=10, temperature=1.0, seed=24, include_tokens=True)),
        ("The object of thi", SamplingParams(max_tokens=10, temperature=1.0, seed=25, include_tokens=True)),
    ]
    first = (PROMPT, SamplingParams(max_tokens=400, temperature=1.0, seed=20, include_tokens=True))

    def run(steps_per_call: int) -> tuple[list[tuple[str, list[int], list[float], str | None]], Engine]:
        config = engine_config(max_concurrent=8, max_queue=8, steps_per_call=steps_per_call, row_steps_per_call=0)
        engine = Engine(config, metrics)
        engine.start()
        try:

            async def joined() -> list[tuple[str, list[Chunk]]]:
                loop = asyncio.get_running_loop()
                running = submit(engine, model, first[0], first[1], loop)
                await running.next_chunk()  # the batch is running: the others join it and ride
                streams = [submit(engine, model, prompt, params, loop) for prompt, params in joiners]
                return await asyncio.gather(collect(running), *(collect(s) for s in streams))

            out = []
            for text, chunks in asyncio.run(joined())[1:]:
                ids = [i for c in chunks for i in c.token_ids]
                logprobs = [p for c in chunks for p in c.logprobs]
                out.append((text, ids, logprobs, chunks[-1].finish_reason))
            return out, engine
        finally:
            engine.stop(5.0)

    one, _ = run(1)
    many, many_engine = run(8)
    assert [(t, i, f) for t, i, _, f in many] == [(t, i, f) for t, i, _, f in one]
    for (_, _, lp_many, _), (_, _, lp_one, _) in zip(many, one, strict=True):
        assert lp_many == pytest.approx(lp_one, abs=1e-5)
    assert [len(i) for _, i, _, _ in one][:2] == [30, 12] and one[2][3] == "stop"
    # The long prompt was read in 8-step calls too: nearly every call made 8 steps.
    assert many_engine.calls <= many_engine.steps / 6


def test_the_call_budget_follows_the_batch_size():
    """A batch that grows is not given K from its small-batch step time; a new size restarts the average."""
    budget = CallBudget(steps_per_call=8, call_budget=0.025)
    assert budget.steps(64) == 1  # no step timed yet
    for _ in range(5):
        budget.record(64, 0.003)
    assert budget.steps(64) == 8  # 25 ms / 3 ms
    assert budget.estimate(1000) >= 0.003 * 1000 / 64  # 936 rows joined before the next call
    assert budget.steps(1000) == 1
    budget.record(1000, 0.037)  # the first step at the new size replaces the average
    assert budget.step_seconds == 0.037 and budget.steps(1000) == 1
    budget.record(1100, 0.040)  # a similar size blends in
    assert 0.037 < budget.step_seconds < 0.040
    assert budget.steps(64) == 1  # shrunk: the larger figure holds until a step is timed
    budget.record(64, 0.003)
    assert budget.steps(64) == 8


def test_a_small_batch_takes_more_steps_up_to_the_ceiling():
    """K grows for a batch of fewer than row_steps / steps_per_call rows, never past max_steps or the budget."""
    budget = CallBudget(steps_per_call=8, call_budget=0.0, max_steps=32, row_steps=256)
    assert [budget.steps(rows) for rows in (1, 8, 9, 16, 31, 32, 64, 1000)] == [32, 32, 29, 16, 9, 8, 8, 8]
    assert CallBudget(steps_per_call=8, call_budget=0.0, max_steps=32, row_steps=0).steps(1) == 8  # off
    assert CallBudget(steps_per_call=8, call_budget=0.0, max_steps=4, row_steps=256).steps(1) == 8  # never below K
    timed = CallBudget(steps_per_call=8, call_budget=0.025, max_steps=32, row_steps=256)
    timed.record(4, 0.001)
    assert timed.steps(4) == 25  # wanted 32; 25 ms / 1 ms
    fast = CallBudget(steps_per_call=8, call_budget=0.025, max_steps=32, row_steps=256)
    fast.record(4, 0.0001)
    assert fast.steps(4) == 32


def test_one_step_per_call_or_no_budget_ignores_the_timing():
    assert CallBudget(steps_per_call=1, call_budget=0.025).steps(64) == 1
    unlimited = CallBudget(steps_per_call=8, call_budget=0.0)
    assert unlimited.steps(64) == 8  # no budget: K from the first call on
    unlimited.record(64, 1.0)
    assert unlimited.steps(64) == 8
