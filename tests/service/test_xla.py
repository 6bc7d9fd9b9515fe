"""The XLA-compiled K-step decode: its padded shapes, and that it gives what TensorFlow's op-by-op run gives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tensorflow as tf

from service.config import ConfigError, ServerConfig, XlaShapes, padded_batch_sizes
from service.decoder import DECODE_STEPS, Decoder, pack_rows
from service.engine import Engine
from service.model_repository import LoadedModel, ModelRepository
from service.sampling import SamplingParams
from tests.helpers import engine_config
from training.check import check_version
from training.contract import list_versions


def test_padded_batch_sizes_double_to_64_then_grow_by_a_third_at_most() -> None:
    assert padded_batch_sizes(256) == (8, 16, 32, 64, 96, 128, 192, 256)
    assert padded_batch_sizes(32) == (8, 16, 32)
    assert padded_batch_sizes(100) == (8, 16, 32, 64, 96, 100)
    assert padded_batch_sizes(5) == (5,)
    sizes = padded_batch_sizes(1024)
    assert sizes[-1] == 1024
    assert all(b / a <= 2.0 if a < 64 else b / a <= 1.5 for a, b in zip(sizes, sizes[1:], strict=False))
    with pytest.raises(ValueError, match="max_batch_size"):
        padded_batch_sizes(0)


def test_a_call_runs_at_the_next_compiled_size() -> None:
    shapes = XlaShapes((8, 16, 32), 4)
    assert [shapes.padded(n) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError, match="33 rows is more than the largest compiled batch size 32"):
        shapes.padded(33)
    with pytest.raises(ValueError, match="ascending"):
        XlaShapes((16, 8), 4)


def test_the_server_compiles_its_batch_sizes_unless_xla_is_off() -> None:
    config = ServerConfig(max_batch_size=32, steps_per_call=4, max_steps_per_call=16)
    assert config.xla_shapes == XlaShapes((8, 16, 32), 16)  # as wide as a small batch's longest call
    with pytest.raises(ConfigError, match=r"--max-steps-per-call must be >= --steps-per-call \(8\), got 4"):
        ServerConfig(steps_per_call=8, max_steps_per_call=4)
    assert ServerConfig(xla="off").xla_shapes is None
    with pytest.raises(ConfigError, match=r"--xla must be on or off, got 'yes'"):
        ServerConfig(xla="yes")


def _version(tiny_model_repo) -> str:
    base = tiny_model_repo / "tiny"
    return str(base / str(list_versions(str(base))[-1]))


def _pad(values: np.ndarray, rows: int, fill: float = 0) -> tf.Tensor:
    out = np.full((rows, *values.shape[1:]), fill, values.dtype)
    out[: len(values)] = values
    return tf.constant(out)


def test_xla_decode_steps_give_the_op_by_op_results_at_every_padded_size(tiny_model_repo) -> None:
    checked = check_version(_version(tiny_model_repo))
    plain = Decoder(checked)
    width = 4
    xla = Decoder(checked, XlaShapes((8, 16, 32), width))
    xla.warm_up([1])
    assert {b for name, b in xla.warmed if name == DECODE_STEPS} == {8, 16, 32}
    b = 5
    temperature = np.array([1.0, 0.0, 0.7, 1.0, 2.0], np.float32)
    top_k = np.array([0, 0, 3, 0, 0], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.9, 1.0], np.float32)
    seed = np.arange(10, 10 + b, dtype=np.int64)
    for rows in (8, 16, 32):
        tokens = np.array([3, 4, 5, 6, 7], np.int32)
        position = np.array([0, 4, 9, 1, 2], np.int64)
        plain_state = tf.random.stateless_normal([b, plain.state_size], seed=[1, 2])
        xla_state = tf.concat([plain_state, tf.zeros([rows - b, plain.state_size])], 0)
        for k in (4, 1, 3):  # fewer steps than the compiled width too
            left = np.array([0, 1, min(3, k), 0, 2 if k > 1 else 0], np.int32)
            forced = np.full([b, width], 6, np.int32)
            ids, logprobs, plain_state = plain.decode_steps(
                tf.constant(tokens),
                plain_state,
                *(tf.constant(a) for a in (temperature, top_k, top_p, seed, position)),
                tf.constant(k),
                tf.constant(forced[:, :k]),
                tf.constant(left),
                tf.range(b),
            )
            xids, xlogprobs, xla_state = xla.decode_steps(
                _pad(tokens, rows),
                xla_state,
                _pad(temperature, rows),
                _pad(top_k, rows),
                _pad(top_p, rows, 1.0),
                _pad(seed, rows),
                _pad(position, rows),
                tf.constant(k),
                _pad(forced, rows),
                _pad(left, rows),
                tf.range(rows),
            )
            assert xids.shape == (width, rows) and xla_state.shape[0] == rows
            np.testing.assert_array_equal(xids.numpy()[:k, :b], ids.numpy(), err_msg=f"rows {rows}, k {k}")
            np.testing.assert_allclose(xlogprobs.numpy()[:k, :b], logprobs.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(xla_state.numpy()[:b], plain_state.numpy(), rtol=1e-4, atol=1e-5)
            tokens = ids.numpy()[-1].copy()
            position = position + k - left


def _load(tiny_model_repo, xla: XlaShapes | None) -> LoadedModel:
    repo = ModelRepository(str(tiny_model_repo), warmup_batch_sizes=(1, 8), xla=xla)
    repo.load_all()
    return repo.resolve("", 0)


def _texts(model: LoadedModel, requests: list[tuple[str, SamplingParams]]) -> list[str]:
    """Every request at once through one engine (rows join, finish and leave at different calls)."""
    engine = Engine(engine_config(max_concurrent=16, max_queue=64, max_batch_size=16, steps_per_call=4))
    engine.start()

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        streams = [engine.submit(model, model.tokenizer.encode(p), params, loop) for p, params in requests]
        texts = []
        for stream in streams:
            parts = []
            while True:
                chunk = await stream.next_chunk()
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    break
            texts.append("".join(parts))
        return texts

    try:
        return asyncio.run(run())
    finally:
        engine.stop(5.0)


def test_an_engine_on_xla_streams_what_the_op_by_op_engine_streams(tiny_model_repo) -> None:
    # 20 requests on 16 rows: some wait, so calls of one step happen too; prompts of several lengths
    # ride in the batch; rows of 5 to 43 tokens leave at different calls, so the padded size changes.
    requests = [
        (
            "The object " * (i % 4) + "def",
            SamplingParams(max_tokens=5 + 2 * i, seed=100 + i, temperature=0.5 + 0.1 * (i % 7), top_k=5 * (i % 3)),
        )
        for i in range(20)
    ]
    plain = _texts(_load(tiny_model_repo, None), requests)
    xla = _texts(_load(tiny_model_repo, XlaShapes((8, 16), 4)), requests)
    assert xla == plain
    assert len({len(t) for t in plain}) > 5  # the rows really did end at different calls


def test_a_step_xla_cannot_compile_decodes_op_by_op_with_a_warning(tmp_path, caplog) -> None:
    from service.model_repository import load_model
    from tests.reliability.faulty_model import export_faulty

    # The faulty model's out-of-memory trap fills a tensor whose shape is known only at run time.
    path = export_faulty(tmp_path / "faulty")
    with caplog.at_level("WARNING", logger="service.model_repository"):
        model = load_model("faulty", 1, str(path), (1, 8), XlaShapes((8, 16), 4))
    assert model.decoder.xla is None
    assert "model faulty version 1: XLA cannot compile its decode" in caplog.text
    assert "compile-time constant" in caplog.text  # TensorFlow's own reason
    assert {b for name, b in model.decoder.warmed if name == DECODE_STEPS} == {1, 8}  # op by op, warmed


def test_packed_rows_carry_every_int64_seed_and_draw_what_decode_draws(tiny_model_repo) -> None:
    """decode_steps takes its per-row inputs packed in int32 (the seed as two halves, temperature and top_p
    as their bits): K = 1 draws what decode draws."""
    decoder = Decoder(check_version(_version(tiny_model_repo)))
    seed = np.array([0, 1, -1, 2**31, 2**32 + 5, -(2**63), 2**63 - 1, -(2**31) - 7], np.int64)
    b = len(seed)
    tokens = np.arange(3, 3 + b, dtype=np.int32)
    temperature = np.array([1.0, 0.0, 0.7, 2.0, 1e-3, 1.3, 0.5, 1.0], np.float32)
    top_k = np.zeros(b, np.int32)
    top_p = np.array([1.0, 1.0, 0.9, 0.5, 1.0, 0.95, 1.0, 0.3], np.float32)
    zeros = np.zeros(b, np.int32)
    packed = pack_rows(tokens, top_k, zeros, zeros, zeros, seed, temperature, top_p, np.zeros((b, 1), np.int32))
    np.testing.assert_array_equal(packed[:, 7].view(np.float32), temperature)  # bit for bit
    np.testing.assert_array_equal(packed[:, 8].view(np.float32), top_p)
    position = np.arange(b, dtype=np.int64) * 1000
    state = tf.random.stateless_normal([b, decoder.state_size], seed=[3, 4])
    sampler = [tf.constant(a) for a in (temperature, top_k, top_p, seed, position)]
    ids, logprobs, new_state = decoder.decode(tf.constant(tokens), state, *sampler)
    steps_ids, steps_logprobs, steps_state = decoder.decode_steps(
        tf.constant(tokens),
        state,
        *sampler,
        tf.constant(1),
        tf.zeros([b, 1], tf.int32),
        tf.zeros([b], tf.int32),
        tf.range(b),
    )
    np.testing.assert_array_equal(steps_ids.numpy()[0], ids.numpy())
    np.testing.assert_allclose(steps_logprobs.numpy()[0], logprobs.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(steps_state.numpy(), new_state.numpy(), rtol=1e-5, atol=1e-6)
    # The draws depend on the seed: with every seed's low half alone they differ somewhere.
    low_only = tf.constant(seed & 0xFFFFFFFF)
    other, _, _ = decoder.decode(tf.constant(tokens), state, *sampler[:3], low_only, sampler[4])
    assert not np.array_equal(other.numpy(), ids.numpy())
