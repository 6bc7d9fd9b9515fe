"""Engine-only throughput: one batched decode step with in-graph sampling, and the two baselines.

Everything here runs in the harness's own process on one exported model:

* ``export_bench_model`` builds an untrained char model (speed does not depend
  on the weights) and exports it under the SavedModel contract;
* ``measure_batched`` times the server's own decode step (``Decoder.decode``
  from ``service/decoder.py``: ``step`` + in-graph sampler, sampled ids fetched
  to the host every step, as the engine does) at several batch sizes;
* ``measure_variants`` times ``step`` + argmax (no sampler) against the
  server's ``Decoder.decode`` and ``Decoder.decode_steps`` (K steps per call);
* ``measure_seed_loop`` times the seed tutorials' loop: ``model.predict`` on
  the whole window for every token;
* ``measure_onestep`` times the TF tutorial's OneStep: one stateful step call
  per token for one request, no batching.

Every loop is bounded in count and in time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from benchmarks.prompts import bench_corpus
from training.export import export_version
from training.model import ModelConfig, build_model
from training.tokenizer import Tokenizer

if TYPE_CHECKING:
    from service.decoder import Decoder

BENCH_MODEL_NAME = "bench"
SEED_WINDOW = 40  # the seed tutorials' maxlen


@dataclass(frozen=True)
class ModelSpec:
    """The benchmark model's shape (untrained weights: speed does not depend on them)."""

    units: int = 512
    layers: int = 1
    embedding_dim: int = 256
    corpus_chars: int = 200_000
    seed: int = 1234


@dataclass(frozen=True)
class EngineBenchConfig:
    """How long and how often each engine-only figure is measured."""

    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 512)
    repeats: int = 5
    max_steps: int = 400  # per repeat
    repeat_seconds: float = 0.4  # a repeat stops after this long (at least 3 steps)
    seed_tokens: int = 12  # seeds' loop: model.predict per token is slow
    onestep_tokens: int = 300
    temperature: float = 1.0
    # variants: no sampler, and K steps per call in one tf.while_loop
    variant_batch_sizes: tuple[int, ...] = (1, 64, 512)
    steps_per_call: tuple[int, ...] = (1, 8)
    variant_repeats: int = 3


@dataclass
class BenchModel:
    """An exported benchmark model plus the in-process objects the baselines use."""

    models_dir: str
    name: str
    path: str
    keras_model: keras.Model
    tokenizer: Tokenizer
    spec: ModelSpec

    @property
    def state_size(self) -> int:
        return 2 * self.spec.layers * self.spec.units


def export_bench_model(models_dir: str, spec: ModelSpec) -> BenchModel:
    """Build and export ``<models_dir>/bench/1`` (any previous bench model there is replaced)."""
    text = bench_corpus(spec.corpus_chars)
    keras.utils.set_random_seed(spec.seed)
    tokenizer = Tokenizer(level="char").fit_on_texts([text])
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, embedding_dim=spec.embedding_dim, units=spec.units, layers=spec.layers
    )
    model = build_model(config)
    base = os.path.join(models_dir, BENCH_MODEL_NAME)
    shutil.rmtree(base, ignore_errors=True)
    path = export_version(model, config, tokenizer, base, {"purpose": "benchmark (untrained weights)"})
    return BenchModel(models_dir, BENCH_MODEL_NAME, path, model, tokenizer, spec)


DecodeFn = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
# Given a batch size, a function that runs one decode step for the whole batch
# (sampled ids fetched to the host, as the engine must to hand them out).
StepRunner = Callable[[int], Callable[[], None]]


def stand_in_decode(loaded: Any, temperature: float) -> DecodeFn:
    """``step`` + temperature sampling in one ``tf.function``: the TF tutorial's OneStep."""
    temp = tf.constant(temperature, tf.float32)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)],
        reduce_retracing=True,
    )
    def decode(tokens: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # `loaded` itself (not just its signature) is captured so the variables stay alive.
        out = loaded.signatures["step"](tokens=tokens, state=state)
        ids = tf.random.categorical(out["logits"] / temp, 1, dtype=tf.int32)[:, 0]  # (b,)
        return ids, out["state"]

    return decode


def _stand_in_runner(path: str, state_size: int, temperature: float) -> StepRunner:
    decode = stand_in_decode(tf.saved_model.load(path), temperature)

    def runner(batch: int) -> Callable[[], None]:
        tokens = tf.constant(np.full([batch], 2, np.int32))
        state = tf.zeros([batch, state_size], tf.float32)

        def one() -> None:
            nonlocal tokens, state
            ids, state = decode(tokens, state)
            tokens = tf.constant(ids.numpy())

        return one

    return runner


def _decoder_runner(decoder: Decoder, temperature: float, k: int) -> StepRunner:
    """The server's decode call for a whole batch: ``decode`` (k = 1) or ``decode_steps`` with K = k.

    As the engine calls them: every row generating (none forced), the ids of all k steps fetched
    to the host per call and the last ones fed back.
    """

    def runner(batch: int) -> Callable[[], None]:
        tokens = tf.constant(np.full([batch], 2, np.int32))
        state = tf.zeros([batch, decoder.state_size], tf.float32)
        params = (
            tf.fill([batch], np.float32(temperature)),
            tf.zeros([batch], tf.int32),  # top_k off
            tf.ones([batch], tf.float32),  # top_p off
            tf.range(1, batch + 1, dtype=tf.int64),  # seeds
        )
        steps, forced, left = tf.constant(k, tf.int32), tf.zeros([batch, k], tf.int32), tf.zeros([batch], tf.int32)
        source = tf.range(batch)  # every row continues its own state
        position = 0

        def one() -> None:
            nonlocal tokens, state, position
            pos = tf.fill([batch], np.int64(position))
            if k == 1 and decoder.xla is None:
                ids, _logprobs, state = decoder.decode(tokens, state, *params, pos)
                tokens = tf.constant(ids.numpy())
            else:
                ids, _logprobs, state = decoder.decode_steps(tokens, state, *params, pos, steps, forced, left, source)
                tokens = tf.constant(ids.numpy()[-1])
            position += k

        return one

    return runner


def load_decoder(path: str) -> Decoder:
    """The server's ``Decoder`` for a version folder (the same contract check the server runs first)."""
    from service.decoder import Decoder

    return Decoder.load(path)


def engine_runner(path: str, state_size: int, temperature: float) -> tuple[StepRunner, str]:
    """The decode step the serving engine runs, and a name saying which one was measured.

    That is ``Decoder.decode`` from ``service/decoder.py`` (``LoadedModel.decoder.decode`` in the
    engine); without it (the service package missing or changed) the OneStep stand-in is measured
    and the name says so.
    """
    try:
        runner = _decoder_runner(load_decoder(path), temperature, 1)
        runner(1)()  # one real call proves the signature matches
        return runner, "service.decoder: LoadedModel.decoder.decode (step + in-graph sampler)"
    except (ImportError, AttributeError, TypeError) as e:
        return _stand_in_runner(path, state_size, temperature), f"stand-in: step + tf.random.categorical ({e})"


def _bounded_run(step_once: Callable[[], None], max_steps: int, seconds: float) -> tuple[int, float]:
    """Call ``step_once`` until ``max_steps`` or ``seconds`` (at least 3 calls); return (calls, elapsed)."""
    start = time.perf_counter()
    n = 0
    while n < max_steps:
        step_once()
        n += 1
        if n >= 3 and time.perf_counter() - start >= seconds:
            break
    return n, time.perf_counter() - start


@dataclass
class _Case:
    """One thing to time: a call, how many tokens it makes, and its measurements."""

    one: Callable[[], None]
    tokens_per_call: int
    max_calls: int
    rates: list[float] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)

    @property
    def row(self) -> dict[str, Any]:
        return {
            "tokens_per_s": statistics.median(self.rates),
            "tokens_per_s_all": self.rates,
            "call_ms": statistics.median(self.call_ms),
        }


def _run_interleaved(cases: list[_Case], repeats: int, seconds: float) -> None:
    """Warm every case up, then time them round-robin, so a burst of load elsewhere hits all cases alike."""
    for case in cases:
        for _ in range(2):  # trace and warm up
            case.one()
    for _ in range(repeats):
        for case in cases:
            n, elapsed = _bounded_run(case.one, case.max_calls, seconds)
            case.rates.append(case.tokens_per_call * n / elapsed)
            case.call_ms.append(1000.0 * elapsed / n)


def measure_batched(bench: BenchModel, config: EngineBenchConfig) -> dict[str, Any]:
    """Tokens/s of the decode step at each batch size (median over repeats)."""
    runner, kind = engine_runner(bench.path, bench.state_size, config.temperature)
    cases = [_Case(runner(batch), batch, config.max_steps) for batch in config.batch_sizes]
    _run_interleaved(cases, config.repeats, config.repeat_seconds)
    rows = []
    for batch, case in zip(config.batch_sizes, cases, strict=True):
        row = case.row
        rows.append({"batch": batch, **row, "step_ms": row.pop("call_ms")})
    return {"decode_fn": kind, "rows": rows}


def _argmax_runner(path: str, state_size: int) -> StepRunner:
    """``step`` + argmax in one ``tf.function``, no sampler: what sampling in the graph costs, by difference."""
    loaded = tf.saved_model.load(path)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)])
    def decode(tokens: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        out = loaded.signatures["step"](tokens=tokens, state=state)
        return tf.argmax(out["logits"], axis=-1, output_type=tf.int32), out["state"]

    def runner(batch: int) -> Callable[[], None]:
        tokens = tf.constant(np.full([batch], 2, np.int32))
        state = tf.zeros([batch, state_size], tf.float32)

        def one() -> None:
            nonlocal tokens, state
            ids, state = decode(tokens, state)
            tokens = tf.constant(ids.numpy())

        return one

    return runner


def measure_variants(bench: BenchModel, config: EngineBenchConfig) -> dict[str, Any]:
    """Tokens/s of decode variants at a few batch sizes: no sampler, and the server's K steps per call.

    The sampled variants are the server's own ``Decoder.decode`` (K = 1) and ``Decoder.decode_steps``,
    op by op and XLA-compiled (``--xla on``, compiled for these batch sizes before timing).
    """
    from service.config import XlaShapes
    from service.decoder import Decoder

    decoder = load_decoder(bench.path)
    variants = [("step + argmax, 1 step per call", 1, False, False)]
    variants += [(f"step + sampler, {k} steps per call", k, True, False) for k in config.steps_per_call]
    variants += [(f"step + sampler, {k} steps per call, XLA", k, True, True) for k in config.steps_per_call]
    keys, cases = [], []
    for name, k, sampled, xla in variants:
        if xla:
            compiled = Decoder(decoder.checked, XlaShapes(tuple(sorted(set(config.variant_batch_sizes))), k))
            compiled.warm_up([])
            runner = _decoder_runner(compiled, config.temperature, k)
        elif sampled:
            runner = _decoder_runner(decoder, config.temperature, k)
        else:
            runner = _argmax_runner(bench.path, bench.state_size)
        for batch in config.variant_batch_sizes:
            keys.append((name, k, sampled, batch))
            cases.append(_Case(runner(batch), batch * k, max(3, config.max_steps // k)))
    _run_interleaved(cases, config.variant_repeats, config.repeat_seconds)
    rows = []
    for (name, k, sampled, batch), case in zip(keys, cases, strict=True):
        row = case.row
        ms_per_step = row.pop("call_ms") / k
        rows.append(
            {
                "variant": name,
                "steps_per_call": k,
                "sampler": sampled,
                "batch": batch,
                **row,
                "ms_per_step": ms_per_step,
            }
        )
    return {"rows": rows}


def measure_onestep(bench: BenchModel, config: EngineBenchConfig) -> dict[str, Any]:
    """The TF tutorial's OneStep for one request: a stateful step per token, the id fetched each time."""
    decode = stand_in_decode(tf.saved_model.load(bench.path), config.temperature)
    token = tf.constant([2], tf.int32)
    state = tf.zeros([1, bench.state_size], tf.float32)
    for _ in range(2):
        ids, state = decode(token, state)
    per_token = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        n = 0
        deadline = start + config.repeat_seconds
        while n < config.onestep_tokens and (n < 3 or time.perf_counter() < deadline):
            ids, state = decode(token, state)
            token = tf.constant([int(ids.numpy()[0])], tf.int32)
            n += 1
        per_token.append((time.perf_counter() - start) / n)
    ms = 1000.0 * statistics.median(per_token)
    return {"ms_per_token": ms, "tokens_per_s": 1000.0 / ms, "ms_per_token_all": [1000.0 * t for t in per_token]}


def measure_seed_loop(bench: BenchModel, config: EngineBenchConfig) -> dict[str, Any]:
    """The seed tutorials' loop: ``model.predict`` on the last 40 ids for every new token."""
    rng = np.random.default_rng(bench.spec.seed)
    window = bench.tokenizer.encode(bench_corpus(SEED_WINDOW))[-SEED_WINDOW:]
    model = bench.keras_model
    model.predict(np.array([window], np.int32), verbose=0)  # build the predict function once
    per_token = []
    for _ in range(config.seed_tokens):
        start = time.perf_counter()
        logits = model.predict(np.array([window], np.int32), verbose=0)[0, -1].astype(np.float64)  # (vocab,)
        logits = logits / config.temperature
        probs = np.exp(logits - logits.max())
        next_id = int(rng.choice(len(probs), p=probs / probs.sum()))
        window = window[1:] + [next_id]
        per_token.append(time.perf_counter() - start)
    ms = 1000.0 * statistics.median(per_token)
    return {
        "ms_per_token": ms,
        "tokens_per_s": 1000.0 / ms,
        "tokens": config.seed_tokens,
        "window": SEED_WINDOW,
    }
