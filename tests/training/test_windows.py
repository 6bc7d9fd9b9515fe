"""Sliding windows: targets are inputs shifted by one, the stride holds, validation never overlaps training."""

from __future__ import annotations

import numpy as np
import pytest

from training.windows import WindowError, make_dataset, split_ids, window_starts


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_targets_are_inputs_shifted_by_one() -> None:
    ids = np.arange(100, 150, dtype=np.int32)
    x, y = _collect(make_dataset(ids, seq_len=8, stride=3, batch_size=4, shuffle=True, seed=1))
    assert x.shape[1] == 8 and y.shape == x.shape
    assert (x[:, 1:] == y[:, :-1]).all()
    assert (y == x + 1).all()  # ids are consecutive integers, so each target is its input + 1


def test_stride_is_honoured_and_every_window_is_full() -> None:
    ids = np.arange(0, 40, dtype=np.int32)
    starts = window_starts(len(ids), seq_len=9, stride=5)
    assert starts.tolist() == [0, 5, 10, 15, 20, 25, 30]
    x, _ = _collect(make_dataset(ids, seq_len=9, stride=5, batch_size=3, shuffle=False))
    assert x[:, 0].tolist() == [0, 5, 10, 15, 20, 25, 30]
    shuffled, _ = _collect(make_dataset(ids, seq_len=9, stride=5, batch_size=3, shuffle=True, seed=3))
    assert sorted(shuffled[:, 0].tolist()) == [0, 5, 10, 15, 20, 25, 30]
    assert window_starts(9, seq_len=9, stride=1).tolist() == []  # needs seq_len + 1 ids


def test_max_batches_caps_an_epoch() -> None:
    ids = np.arange(0, 400, dtype=np.int32)
    batches = list(make_dataset(ids, seq_len=4, stride=1, batch_size=2, shuffle=False, max_batches=3))
    assert len(batches) == 3


def test_validation_is_the_tail_and_never_overlaps_training_windows() -> None:
    ids = np.arange(1, 1001, dtype=np.int32)  # every id is unique, so overlap is visible
    split = split_ids(ids, seq_len=10, validation_fraction=0.1)
    assert split.cut == 900 and len(split.validation) == 100
    train_x, train_y = _collect(make_dataset(split.train, 10, 1, 64, shuffle=False))
    val_x, val_y = _collect(make_dataset(split.validation, 10, 10, 64, shuffle=False))
    seen_in_training = set(np.unique(np.concatenate([train_x.ravel(), train_y.ravel()])).tolist())
    seen_in_validation = set(np.unique(np.concatenate([val_x.ravel(), val_y.ravel()])).tolist())
    assert seen_in_training.isdisjoint(seen_in_validation)
    assert max(seen_in_training) < min(seen_in_validation)
    assert max(seen_in_training) == 900  # training windows reach the cut


def test_split_errors_name_the_flag_to_change() -> None:
    with pytest.raises(WindowError, match="shorter than one window"):
        split_ids(np.arange(20), seq_len=50, validation_fraction=0.0)
    with pytest.raises(WindowError, match="validation tail"):
        split_ids(np.arange(200), seq_len=50, validation_fraction=0.1)
    with pytest.raises(WindowError, match="validation-fraction"):
        split_ids(np.arange(200), seq_len=5, validation_fraction=1.0)
    assert len(split_ids(np.arange(200), seq_len=5, validation_fraction=0.0).validation) == 0
