"""Training batches of a budgeted run, cut from the token id stream with NumPy, one step at a time.

A budgeted run counts optimizer steps, not epochs, and resumes at any step, so
its batches are a pure function of ``(seed, step)``:

* ``WindowBatches``: windows of ``seq_len + 1`` ids starting every ``stride``
  ids, in an order reshuffled each epoch (seeded by the epoch), each read from
  a zero state;
* ``StreamBatches`` (``--stateful``, truncated backpropagation through time as
  in char-rnn): the stream is cut into ``batch`` contiguous pieces, row ``i`` of
  step ``k`` is the ``k``-th window of piece ``i``, so the state a row ends a
  step with is the right start for the same row of the next step. The state is
  reset at the start of each epoch, and each epoch starts the windows at a
  different offset so that window edges move.

The model reads ``x = w[:-1]`` and predicts ``y = w[1:]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.windows import WindowError, window_starts


class WindowBatches:
    """Shuffled fresh-state windows, ``batch`` per step."""

    stateful = False

    def __init__(self, ids: np.ndarray, seq_len: int, stride: int, batch: int, seed: int) -> None:
        self.ids = np.asarray(ids, np.int32)
        self.seq_len = seq_len
        self.batch = batch
        self.seed = seed
        self.starts = window_starts(len(self.ids), seq_len, stride)
        if len(self.starts) < batch:
            raise WindowError(
                f"{len(self.starts)} training windows are fewer than --batch-size {batch}; lower --batch-size or "
                "--stride, or use a longer corpus"
            )
        self.steps_per_epoch = len(self.starts) // batch
        self._offsets = np.arange(seq_len + 1)
        self._order_epoch = -1
        self._order = self.starts

    def starts_new_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.starts)
            self._order_epoch = epoch
        starts = self._order[k * self.batch : (k + 1) * self.batch]
        w = self.ids[starts[:, None] + self._offsets]  # (batch, seq_len + 1)
        return w[:, :-1], w[:, 1:]


class StreamBatches:
    """``batch`` contiguous pieces of the stream read in order; the state carries from step to step."""

    stateful = True

    def __init__(self, ids: np.ndarray, seq_len: int, batch: int, seed: int) -> None:
        self.ids = np.asarray(ids, np.int32)
        self.seq_len = seq_len
        self.batch = batch
        self.seed = seed
        self.piece = len(self.ids) // batch
        # Each epoch may start up to seq_len - 1 ids into its pieces; a step needs seq_len + 1 ids.
        self.steps_per_epoch = (self.piece - seq_len) // seq_len
        if self.steps_per_epoch < 1:
            raise WindowError(
                f"--stateful cuts {len(self.ids)} training tokens into --batch-size {batch} pieces of {self.piece}, "
                f"shorter than two windows of --seq-len {seq_len}; lower --batch-size or --seq-len"
            )
        self._rows = np.arange(batch)[:, None] * self.piece
        self._offsets = np.arange(seq_len + 1)

    def starts_new_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def shift(self, epoch: int) -> int:
        """Where epoch ``epoch``'s windows start within each piece (0 in the first epoch)."""
        if epoch == 0:
            return 0
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len))

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, k = divmod(step, self.steps_per_epoch)
        first = self.shift(epoch) + k * self.seq_len
        w = self.ids[self._rows + first + self._offsets]  # (batch, seq_len + 1)
        return w[:, :-1], w[:, 1:]


def start_state(batches: WindowBatches | StreamBatches, step: int, carried: Any, zero: Any) -> Any:
    """The state a step starts from: ``carried`` within a stateful epoch, else ``zero``.

    Windows of ``WindowBatches`` are unrelated to the windows before them, so
    each starts from zeros, as the fresh-windows validation does.
    """
    if batches.stateful and not batches.starts_new_epoch(step):
        return carried
    return zero
