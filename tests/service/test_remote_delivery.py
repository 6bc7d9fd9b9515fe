"""The engine process's hand-off of a call's tokens: ``Batch.record_steps``, ``RemoteOutbox.push``, flow control."""

from __future__ import annotations

import time

import numpy as np

from service.batch import Batch, CallBudget
from service.engine_host import WINDOW, FrontendBuffer, RemoteOutbox, RemoteStream
from service.sampling import StoppingCriteria


def _batch(rows: int) -> Batch:
    batch = Batch(None, CallBudget(8, 0.0))  # type: ignore[arg-type]  # record_* never touch the model
    batch.tokens = np.arange(100, 100 + rows, dtype=np.int32)
    batch.position = np.arange(rows, dtype=np.int64)
    return batch


def test_record_steps_equals_recording_each_step() -> None:
    k, rows = 8, 6
    ids = np.arange(k * rows, dtype=np.int32).reshape(k, rows)
    first = np.array([0, 3, 8, 0, 5, 2])  # row 2 reads its prompt the whole call
    take = np.array([8, 5, 0, 2, 1, 6])  # row 3 reached max_tokens after 2, row 4 after 1
    one_by_one = _batch(rows)
    for j in range(k):
        which = np.flatnonzero((first <= j) & (j < first + take))
        one_by_one.record_sampled(ids[j], which)
    at_once = _batch(rows)
    at_once.record_steps(ids, first, take)
    assert at_once.tokens.tolist() == one_by_one.tokens.tolist()
    assert at_once.position.tolist() == one_by_one.position.tolist()


def test_within_max_tokens_keeps_what_the_stopping_criteria_keep() -> None:
    rng = np.random.default_rng(7)
    rows = 200
    batch = _batch(rows)
    batch.max_tokens = rng.integers(1, 40, rows)
    batch.position = rng.integers(0, batch.max_tokens)  # every row below its max_tokens
    count = rng.integers(0, 12, rows)  # 0: the row read its prompt the whole call
    take, ending = batch.within_max_tokens(count)
    expected_take, expected_ending = [], []
    for i in range(rows):
        criteria = StoppingCriteria(int(batch.max_tokens[i]))
        criteria.tokens = int(batch.position[i])
        _, taken, finish = criteria.feed([""] * int(count[i])) if count[i] else ("", 0, None)
        expected_take.append(taken)
        if finish is not None:
            expected_ending.append(i)
    assert take.tolist() == expected_take
    assert ending.tolist() == expected_ending
    assert 0 < len(expected_ending) < rows  # the table has rows that end and rows that go on


def test_push_sends_each_frontend_its_rows_tokens_in_order() -> None:
    outbox = RemoteOutbox(lambda name, frames: None, lambda timeout: None)
    a, b = outbox.buffer(b"fe-0-0"), outbox.buffer(b"fe-1-0")
    streams = [RemoteStream(a, 11, 1), RemoteStream(b, 21, 1), RemoteStream(a, 12, 1)]
    rows = np.array([0, 1, 2, 0, 2, 0])  # step order: row 0 three tokens, row 1 one, row 2 two
    ids = np.array([1, 2, 3, 4, 5, 6], np.int32)
    logprobs = np.array([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6], np.float32)
    outbox.push(streams, rows, ids, logprobs)  # type: ignore[arg-type]
    assert list(a.rids) == [11, 12, 11, 12, 11] and list(a.ids) == [1, 3, 4, 5, 6]
    assert list(b.rids) == [21] and list(b.ids) == [2]
    assert np.allclose(list(a.logprobs), [-0.1, -0.3, -0.4, -0.5, -0.6])
    single = FrontendBuffer(b"fe-2-0")
    outbox.push([RemoteStream(single, 7, 1)], np.array([0, 0]), ids[:2], logprobs[:2])  # type: ignore[arg-type]
    assert list(single.rids) == [7, 7] and list(single.ids) == [1, 2]


def test_the_engine_waits_for_a_frontend_two_messages_behind_until_it_acknowledges() -> None:
    sent: list[bytes] = []
    pumped: list[float] = []
    outbox = RemoteOutbox(lambda name, frames: sent.append(name), pumped.append)
    buffer = outbox.buffer(b"fe-0-0")
    stream = RemoteStream(buffer, 1, 1)
    for _ in range(WINDOW):
        assert outbox.wait_for_room(0.05)  # behind by fewer than WINDOW messages: no waiting
        stream.push(5, "", "", -0.1, None, 0.0)
        outbox.flush()
    assert sent == [b"fe-0-0"] * WINDOW and buffer.unacked == WINDOW and not pumped
    began = time.monotonic()
    assert not outbox.wait_for_room(0.05)  # no acknowledgement comes: it gives up after the timeout
    assert time.monotonic() - began >= 0.05 and pumped and all(0 < t <= 0.05 for t in pumped)

    def acknowledge(timeout: float) -> None:  # the frontend's message arrives during the first pump
        outbox.acked(b"fe-0-0", 1)

    outbox.pump = acknowledge
    assert outbox.wait_for_room(5.0) and buffer.unacked == WINDOW - 1
    outbox.flush()  # nothing new for the frontend: no message, nothing more to acknowledge
    assert buffer.unacked == WINDOW - 1
    outbox.drop(b"fe-0-0")  # a frontend that is gone is waited for no more
    assert outbox.wait_for_room(0.0)
