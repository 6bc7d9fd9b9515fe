"""The in-graph sampler and the stopping criteria, without any model."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from service.sampling import StoppingCriteria, StopSequenceMatcher
from training.sampler import SAMPLER_SIGNATURE, row_uniform, sample, unit_float

VOCAB = 50


@pytest.fixture(scope="module")
def sampler():
    return tf.function(sample, input_signature=SAMPLER_SIGNATURE)


def _run(sampler, logits, temperature=1.0, top_k=0, top_p=1.0, seed=1, position=0):
    logits = np.asarray(logits, np.float32)
    b = logits.shape[0]

    def col(value, dtype):
        return tf.constant(np.broadcast_to(np.asarray(value, dtype), (b,)).copy())

    ids, logprobs = sampler(
        tf.constant(logits),
        col(temperature, np.float32),
        col(top_k, np.int32),
        col(top_p, np.float32),
        col(seed, np.int64),
        col(position, np.int64),
    )
    return ids.numpy(), logprobs.numpy()


def _random_logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, size=(rows, VOCAB)).astype(np.float32)


def test_greedy_is_argmax_and_logprob_is_the_models(sampler):
    logits = _random_logits(16)
    logits[:, 0] = 100.0  # padding is never chosen, however likely
    ids, logprobs = _run(sampler, logits, temperature=0.0, seed=np.arange(16))
    masked = logits.copy()
    masked[:, 0] = -np.inf
    assert (ids == masked.argmax(axis=1)).all()
    expected = masked - np.log(np.exp(masked[:, 1:]).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(logprobs, expected[np.arange(16), ids], rtol=1e-5, atol=1e-5)


def test_top_k_one_equals_greedy_at_any_temperature(sampler):
    logits = _random_logits(32, seed=3)
    greedy, _ = _run(sampler, logits, temperature=0.0)
    for t in (0.5, 1.0, 5.0):
        ids, _ = _run(sampler, logits, temperature=t, top_k=1, seed=np.arange(32) * 7919)
        assert (ids == greedy).all()


def test_top_k_only_draws_from_the_k_best(sampler):
    logits = np.tile(_random_logits(1, seed=5), (400, 1))
    ids, _ = _run(sampler, logits, temperature=3.0, top_k=3, seed=np.arange(400))
    masked = logits[0].copy()
    masked[0] = -np.inf
    best3 = set(np.argsort(-masked)[:3].tolist())
    assert set(ids.tolist()) == best3  # all three show up in 400 hot draws, nothing else does


def test_top_p_masks_the_tail(sampler):
    # probabilities 0.5, 0.3, 0.15, 0.05 on ids 1..4
    row = np.full(VOCAB, -np.inf, np.float32)
    row[1:5] = np.log([0.5, 0.3, 0.15, 0.05])
    logits = np.tile(row, (600, 1))
    ids, _ = _run(sampler, logits, top_p=0.7, seed=np.arange(600))
    assert set(ids.tolist()) == {1, 2}
    ids, _ = _run(sampler, logits, top_p=0.9, seed=np.arange(600))
    assert set(ids.tolist()) == {1, 2, 3}
    ids, _ = _run(sampler, logits, top_p=0.0, seed=np.arange(600))
    assert set(ids.tolist()) == {1}  # the best token is always kept
    ids, _ = _run(sampler, logits, top_p=1.0, seed=np.arange(600))
    assert set(ids.tolist()) == {1, 2, 3, 4}


def test_sampling_follows_the_distribution(sampler):
    row = np.full(VOCAB, -np.inf, np.float32)
    row[1:3] = np.log([0.8, 0.2])
    ids, _ = _run(sampler, np.tile(row, (2000, 1)), seed=np.arange(2000) + 11)
    share = float((ids == 2).mean())
    assert 0.16 < share < 0.24


def test_truncated_sampling_follows_the_renormalised_distribution(sampler):
    row = np.full(VOCAB, -np.inf, np.float32)
    row[1:5] = np.log([0.5, 0.3, 0.15, 0.05])
    logits = np.tile(row, (4000, 1))
    ids, _ = _run(sampler, logits, top_k=2, seed=np.arange(4000) + 3)
    assert set(ids.tolist()) == {1, 2}
    assert 0.34 < float((ids == 2).mean()) < 0.41  # 0.3 / 0.8 = 0.375
    ids, _ = _run(sampler, logits, top_p=0.9, seed=np.arange(4000) + 5)
    assert 0.13 < float((ids == 3).mean()) < 0.18  # 0.15 / 0.95 = 0.158


def test_per_row_parameters_are_independent(sampler):
    logits = np.tile(_random_logits(1, seed=9), (3, 1))
    ids, _ = _run(sampler, logits, temperature=[0.0, 1.0, 1.0], top_k=[0, 1, 0], seed=[1, 2, 3])
    assert ids[0] == ids[1]  # greedy row and top_k=1 row agree, whatever row 2 does


def test_a_row_does_not_depend_on_its_batch(sampler):
    rng = np.random.default_rng(1)
    target = _random_logits(1, seed=21)
    alone = [_run(sampler, target, seed=1234, position=p)[0][0] for p in range(20)]
    for p in range(20):
        others = rng.normal(0, 2, size=(8, VOCAB)).astype(np.float32)
        where = int(rng.integers(0, 9))
        batch = np.insert(others, where, target[0], axis=0)
        seeds = rng.integers(0, 2**62, size=9)
        seeds[where] = 1234
        positions = rng.integers(0, 1000, size=9)
        positions[where] = p
        temps = rng.uniform(0.1, 2.0, size=9).astype(np.float32)
        temps[where] = 1.0
        # Batch-mates asking for top-k/top-p make the batch take the sorting branch (every other p).
        top_k = rng.choice([0, 3, 10], size=9) * (p % 2)
        top_p = np.where(p % 2, rng.choice([1.0, 0.5, 0.9], size=9), 1.0).astype(np.float32)
        top_k[where], top_p[where] = 0, 1.0
        ids, _ = _run(sampler, batch, temperature=temps, top_k=top_k, top_p=top_p, seed=seeds, position=positions)
        assert ids[where] == alone[p]


def test_different_seeds_and_positions_differ():
    seeds = np.array([1, 2, 1, -5, 2**40 + 1], np.int64)  # rows 0 and 4 differ only in the seed's high half
    positions = np.array([0, 0, 1, 0, 0], np.int64)
    u = row_uniform(tf.constant(seeds), tf.constant(positions)).numpy()
    assert len(set(u[:5].tolist())) == 5
    many = row_uniform(tf.constant(np.arange(20_000, dtype=np.int64)), tf.zeros([20_000], tf.int64)).numpy()
    assert many.min() > 0.0 and many.max() < 1.0
    assert 0.49 < many.mean() < 0.51
    counts = np.histogram(many, bins=10, range=(0.0, 1.0))[0]
    assert counts.min() > 1800 and counts.max() < 2200  # ~2000 per tenth
    # consecutive positions of one seed are uncorrelated
    walk = row_uniform(tf.fill([20_000], tf.constant(7, tf.int64)), tf.range(20_000, dtype=tf.int64)).numpy()
    assert abs(np.corrcoef(walk[:-1], walk[1:])[0, 1]) < 0.03


def test_unit_floats_never_reach_0_or_1():
    extremes = unit_float(tf.constant([0, 511, 512, 2**31, 2**32 - 1], tf.int64)).numpy()
    assert extremes.dtype == np.float32
    assert (extremes > 0.0).all() and (extremes < 1.0).all()
    assert extremes[0] == extremes[1] < extremes[2] < extremes[3] < extremes[4]


def test_a_row_with_a_nan_logit_draws_the_same_beside_truncating_rows(sampler):
    broken = _random_logits(1, seed=8)
    broken[0, 7] = np.nan
    others = _random_logits(3, seed=9)
    for p in range(10):
        alone, _ = _run(sampler, broken, seed=77, position=p)
        mixed, _ = _run(sampler, np.concatenate([broken, others]), top_k=[0, 3, 0, 5], seed=[77, 1, 2, 3], position=p)
        assert alone[0] == mixed[0] and alone[0] != 7


def test_unseeded_style_draws_differ(sampler):
    logits = np.tile(_random_logits(1, seed=2), (2, 1))
    seqs = []
    for seed in np.random.default_rng().integers(0, 2**62, size=2):
        seqs.append([_run(sampler, logits[:1], temperature=1.5, seed=seed, position=p)[0][0] for p in range(30)])
    assert seqs[0] != seqs[1]


# --------------------------------------------------------------------------- stopping
def test_stop_matcher_holds_back_possible_starts():
    m = StopSequenceMatcher(["\n\n", "END"])
    assert m.feed("hello") == ("hello", False)
    assert m.feed(" E") == (" ", False)  # "E" could start "END"
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)  # resolved: not a stop
    assert m.feed("\n") == ("", False)
    assert m.feed("\nmore") == ("", True)
    assert m.feed("after") == ("", True)
    assert m.flush() == ""


def test_stop_matcher_across_many_chunks():
    text = "abc STOP def"
    for cut in range(1, len(text)):
        m = StopSequenceMatcher(["STOP"])
        out = []
        stopped = False
        for piece in (text[:cut], text[cut:]):
            emit, stopped = m.feed(piece)
            out.append(emit)
            if stopped:
                break
        assert "".join(out) == "abc "
        assert stopped


def test_stop_matcher_earliest_stop_wins_and_flush_releases():
    m = StopSequenceMatcher(["cde", "bc"])
    assert m.feed("abcde") == ("a", True)
    m = StopSequenceMatcher(["xyz"])
    assert m.feed("abxy") == ("ab", False)
    assert m.flush() == "xy"


def test_stopping_criteria_like_tgi():
    criteria = StoppingCriteria(5, ["/test;"])
    assert criteria("a") == ("a", None)
    assert criteria("/te") == ("", None)
    assert criteria("st;") == ("", "stop")

    criteria = StoppingCriteria(3, ["xyz"])
    assert criteria("a") == ("a", None)
    assert criteria("x") == ("", None)
    assert criteria("y") == ("xy", "length")  # held-back text is released at the end


@pytest.mark.parametrize("stops", [(), ("/test;",), ("xyz", "a b")])
@pytest.mark.parametrize("size", [1, 3, 8])
def test_feeding_several_pieces_equals_one_call_per_piece(stops, size):
    pieces = ["a", " ", "b", "/te", "st;", "x", "y", "z", "c", "d", "e", "f", "g"]
    for max_tokens in (1, 4, 7, 13, 40):
        one = StoppingCriteria(max_tokens, stops)
        expected, finish = [], None
        for piece in pieces:
            emit, finish = one(piece)
            expected.append(emit)
            if finish is not None:
                break
        many = StoppingCriteria(max_tokens, stops)
        got, taken, last = [], 0, None
        for at in range(0, len(pieces), size):
            emit, n, last = many.feed(pieces[at : at + size])
            got.append(emit)
            taken += n
            assert n == len(pieces[at : at + size]) or last is not None
            if last is not None:
                break
        assert ("".join(got), taken, last) == ("".join(expected), len(expected), finish), (stops, size, max_tokens)
        assert many.flush() == one.flush()


def test_hundreds_of_stop_sequences():
    stops = [f"stop{i:03d}" for i in range(500)]
    m = StopSequenceMatcher(stops)
    assert m.feed("go sto") == ("go ", False)
    assert m.feed("p04") == ("", False)  # could still become stop040..stop049
    assert m.feed("9!") == ("", True)


def test_extreme_parameters_still_give_valid_tokens(sampler):
    logits = _random_logits(6, seed=4) * 50.0
    ids, logprobs = _run(
        sampler,
        logits,
        temperature=[1e-30, 1e-6, 1e6, 1.0, 1.0, 1.0],
        top_k=[0, 0, 0, 10_000, -3, 0],
        top_p=[1.0, 1.0, 1.0, 1.0, 1.0, 1e-9],
        seed=[0, -1, 2**63 - 1, -(2**63), 5, 6],
    )
    assert ((ids >= 1) & (ids < VOCAB)).all()  # never padding, always in the vocabulary
    assert np.isfinite(logprobs).all()
    masked = logits.copy()
    masked[:, 0] = -np.inf
    assert ids[0] == masked[0].argmax() and ids[5] == masked[5].argmax()  # ~greedy: tiny T, tiny top_p
