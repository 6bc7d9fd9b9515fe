"""A budgeted run's batches: fresh windows reshuffled per epoch, and ``--stateful`` streams kept in order."""

from __future__ import annotations

import numpy as np
import pytest

from training.batches import StreamBatches, WindowBatches, start_state
from training.windows import WindowError

IDS = np.arange(10_007, dtype=np.int32)  # every id is its own position: order is visible


def test_stateful_rows_continue_their_own_stream_from_step_to_step() -> None:
    b = StreamBatches(IDS, seq_len=10, batch=4, seed=1)
    xs, ys = zip(*(b(k) for k in range(b.steps_per_epoch)), strict=True)
    for row in range(4):
        read = np.concatenate([x[row] for x in xs])
        # One contiguous piece of the stream, in order, inside this row's quarter.
        assert np.array_equal(read, np.arange(read[0], read[0] + len(read)))
        assert row * b.piece <= read[0] and read[-1] < (row + 1) * b.piece
        targets = np.concatenate([y[row] for y in ys])
        assert np.array_equal(targets, read + 1)  # y is x shifted by one token


def test_stateful_epochs_start_at_the_beginning_of_a_step_and_move_the_window_edges() -> None:
    b = StreamBatches(IDS, seq_len=10, batch=4, seed=1)
    assert b.starts_new_epoch(0) and b.starts_new_epoch(b.steps_per_epoch) and not b.starts_new_epoch(1)
    first = b(0)[0][:, 0]
    assert np.array_equal(first, np.arange(4) * b.piece)  # epoch 0 reads each piece from its start
    shifts = {b.shift(e) for e in range(1, 20)}
    assert len(shifts) > 1 and all(0 <= s < 10 for s in shifts)
    # Every step of every epoch stays inside its piece.
    for step in range(3 * b.steps_per_epoch):
        x, _ = b(step)
        assert np.all(x[:, -1] // b.piece == np.arange(4))


def test_fresh_windows_cover_every_window_once_per_epoch_in_a_new_order() -> None:
    b = WindowBatches(IDS, seq_len=10, stride=5, batch=8, seed=3)
    epoch0 = np.concatenate([b(k)[0][:, 0] for k in range(b.steps_per_epoch)])
    epoch1 = np.concatenate([b(b.steps_per_epoch + k)[0][:, 0] for k in range(b.steps_per_epoch)])
    assert len(set(epoch0.tolist())) == len(epoch0) == b.steps_per_epoch * 8
    assert set(epoch0.tolist()) <= set(range(0, len(IDS), 5))
    assert not np.array_equal(epoch0, epoch1)
    again = WindowBatches(IDS, seq_len=10, stride=5, batch=8, seed=3)
    assert np.array_equal(again(b.steps_per_epoch + 2)[0], b(b.steps_per_epoch + 2)[0])  # a resume sees the same
    x, y = b(0)
    assert np.array_equal(y, x + 1)


def test_too_few_windows_name_the_flag() -> None:
    with pytest.raises(WindowError, match="--batch-size"):
        WindowBatches(IDS[:100], seq_len=10, stride=10, batch=64, seed=0)
    with pytest.raises(WindowError, match="--stateful"):
        StreamBatches(IDS[:100], seq_len=10, batch=8, seed=0)


def test_fresh_windows_start_every_step_from_zeros_and_streams_carry_within_an_epoch() -> None:
    ids = np.arange(2000, dtype=np.int32)
    zero, carried = "zero", "carried"
    windows = WindowBatches(ids, seq_len=10, stride=10, batch=4, seed=0)
    assert [start_state(windows, step, carried, zero) for step in range(3)] == [zero] * 3
    streams = StreamBatches(ids, seq_len=10, batch=4, seed=0)
    epoch = streams.steps_per_epoch
    assert start_state(streams, 0, carried, zero) == zero
    assert start_state(streams, 1, carried, zero) == carried
    assert start_state(streams, epoch, carried, zero) == zero
    assert start_state(streams, epoch + 1, carried, zero) == carried
