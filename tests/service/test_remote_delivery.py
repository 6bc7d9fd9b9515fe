"""The engine process's bulk hand-off of a call's tokens: ``Batch.record_steps`` and ``RemoteOutbox.push``."""

from __future__ import annotations

import numpy as np
import zmq

from service.batch import Batch, CallBudget
from service.engine_host import FrontendBuffer, RemoteOutbox, RemoteStream


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


def test_push_sends_each_frontend_its_rows_tokens_in_order() -> None:
    outbox = RemoteOutbox(zmq.Context.instance())
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
