"""The running rows of one model version: their arrays, joining, compaction, and the call budget.

A ``Batch`` keeps one entry per running sequence in row-aligned NumPy arrays (next token to feed,
sampling parameters, position, deadline, prompt tokens still to read, and ``source``: which row of
the last call's state tensor each row continues, -1 for a zero state). Rows join at the end
(``join_riding``) and finished rows leave (``compact``) by indexing those arrays only; the next
K-step call selects its rows from the state in its own graph, so joins and leaves cost no
TensorFlow op of their own (other calls select them first, one op, ``live_state``). A row reads its
prompt either in slices (``prompt_slice``, ``advance_slice``: while no row of the batch generates)
or riding in the decode batch, one token per step (``feed_prompts``, ``forced_prompts``). A version
whose ``decode_steps`` XLA compiled runs at a padded batch size (``padded_rows``): the inputs
(``steps_inputs``) get padding rows, and the state keeps the call's padding rows after the batch's.

``CallBudget`` decides how many decode steps one model call makes (K): ``steps_per_call``, raised
for a small batch so that a call decodes about ``row_steps`` rows x steps (up to ``max_steps``),
then cut so that a call takes at most ``call_budget`` seconds by the batch's measured step time.
It is plain Python and is tested without a model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from service.decoder import pack_rows
from service.sampling import SamplingParams, StoppingCriteria
from service.stream import EngineStream

if TYPE_CHECKING:
    from service.model_repository import LoadedModel

_U64 = 1 << 64


def as_int64(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same bits (the sampler takes int64 seeds)."""
    seed %= _U64
    return seed - _U64 if seed >= 1 << 63 else seed


@dataclass(eq=False)
class Request:
    """What the engine keeps of one submitted request, from submit to its end."""

    stream: EngineStream
    model: LoadedModel
    params: SamplingParams
    prompt_ids: list[int]  # never empty: the tokenizer's start ids stand in for an empty prompt
    seed: int  # the seed actually used (drawn when the request had none)
    deadline: float | None  # time.monotonic() based
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Row:
    """One running sequence in a batch."""

    request: Request
    criteria: StoppingCriteria
    cursor: int = 1  # index of the next prompt token to feed
    last_id: int | None = None  # the previous token, for Tokenizer.piece
    last_token_time: float | None = None
    done: bool = False

    @classmethod
    def admit(cls, request: Request) -> Row:
        params = request.params
        return cls(
            request=request,
            criteria=StoppingCriteria(params.max_tokens, params.stop),
            last_id=request.prompt_ids[-1] if request.stream.prompt_tokens else None,
        )


class CallBudget:
    """K, the decode steps of the next call: ``steps_per_call``, or more for a small batch, cut to ``call_budget``.

    A call has a fixed cost (its inputs, the call itself, delivering its output) that its tokens
    share: a batch of fewer than ``row_steps / steps_per_call`` rows takes ``ceil(row_steps / rows)``
    steps, at most ``max_steps`` (``row_steps`` 0: never more than ``steps_per_call``). Then
    ``record`` folds each call's time per step into a moving average (about the last 8 calls); a
    batch size outside 0.8-1.25 times the one last timed restarts it, and rows that joined since
    scale the estimate up (a step's cost grows less than linearly with its rows, so the scaled
    figure errs long and the call short of its budget). With no step timed yet, K is 1.
    """

    def __init__(self, steps_per_call: int, call_budget: float, max_steps: int = 0, row_steps: int = 0) -> None:
        self.steps_per_call = steps_per_call
        self.max_steps = max(max_steps, steps_per_call)
        self.row_steps = row_steps
        self.call_budget = call_budget
        self.step_seconds = 0.0  # moving average of one decode step's time (0: none yet)
        self.step_rows = 0  # the batch size when step_seconds was last updated

    def record(self, rows: int, seconds_per_step: float) -> None:
        if self.step_rows > 0 and 0.8 <= rows / self.step_rows <= 1.25:
            self.step_seconds += (seconds_per_step - self.step_seconds) / 8.0
        else:
            self.step_seconds = seconds_per_step
        self.step_rows = rows

    def estimate(self, rows: int) -> float:
        """The next step's time for ``rows`` rows (a batch that shrank keeps its larger figure)."""
        return self.step_seconds * max(1.0, rows / max(self.step_rows, 1))

    def wanted(self, rows: int) -> int:
        """K before the time budget: ``steps_per_call``, or enough steps for ``row_steps`` rows x steps."""
        if self.row_steps <= 0 or rows <= 0:
            return self.steps_per_call
        return min(self.max_steps, max(self.steps_per_call, -(-self.row_steps // rows)))

    def steps(self, rows: int) -> int:
        k = self.wanted(rows)
        if k == 1 or self.call_budget <= 0.0:
            return k
        if self.step_seconds <= 0.0:
            return 1  # time one step first
        return max(1, min(k, int(self.call_budget / self.estimate(rows))))


class Batch:
    """The running rows of one (model, version) and their state, row-aligned."""

    ARRAYS = (
        "tokens", "temperature", "top_k", "top_p", "seed", "position", "max_tokens", "deadline", "prompt_left", "source"
    )  # fmt: skip

    def __init__(self, model: LoadedModel, budget: CallBudget) -> None:
        self.model = model
        self.budget = budget
        self.rows: list[Row] = []
        # Row i's state is row source[i] of ``state`` (-1: zeros, a row that joined since the last call):
        # joins and compactions only index ``source``; the next call selects the rows in its graph.
        self.state: Any = None  # tf.Tensor (any rows, S); None before the first call
        self.source = np.zeros(0, np.int32)
        self._selected = True  # whether source is 0..rows-1 and ``state`` has exactly the batch's rows
        self.tokens = np.zeros(0, np.int32)  # the next token to feed each row
        self.temperature = np.zeros(0, np.float32)
        self.top_k = np.zeros(0, np.int32)
        self.top_p = np.zeros(0, np.float32)
        self.seed = np.zeros(0, np.int64)
        self.position = np.zeros(0, np.int64)  # tokens generated so far
        self.max_tokens = np.zeros(0, np.int64)
        self.deadline = np.zeros(0, np.float64)
        self.prompt_left = np.zeros(0, np.int64)  # prompt tokens still to feed after `tokens`
        # Tensors reused from step to step while the rows do not change (a numpy -> tensor
        # conversion costs about as much as a small model's step).
        self.params_t: tuple[tf.Tensor, ...] | None = None  # (temperature, top_k, top_p, seed)
        self.tokens_t: Any = None  # the previous step's sampled ids, when every row is generating
        self.want_logprobs = False

    def __len__(self) -> int:
        return len(self.rows)

    def padded_rows(self) -> int:
        """The rows a call runs with: the compiled batch size above the batch's (XLA), else the batch's own."""
        xla = self.model.decoder.xla
        return len(self.rows) if xla is None else xla.padded(len(self.rows))

    def sampling_tensors(self, rows: int | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(temperature, top_k, top_p, seed) as tensors of ``rows`` rows (default: the batch's), converted
        once per change of rows; padding rows are greedy."""
        n = rows or len(self.rows)
        if self.params_t is None or self.params_t[0].shape[0] != n:
            self.params_t = (
                tf.constant(padded(self.temperature, n)),
                tf.constant(padded(self.top_k, n)),
                tf.constant(padded(self.top_p, n, fill=1.0)),
                tf.constant(padded(self.seed, n)),
            )
        return self.params_t

    def tokens_tensor(self) -> tf.Tensor:
        return self.tokens_t if self.tokens_t is not None else tf.constant(self.tokens)

    def set_state(self, state: tf.Tensor) -> None:
        """A call's new state: row i is the batch's row i (rows after the batch's are an XLA call's padding)."""
        self.state = state
        self.source = np.arange(len(self.rows), dtype=np.int32)
        self._selected = state.shape[0] == len(self.rows)

    def live_state(self) -> tf.Tensor:
        """The batch's rows' state, exactly one row each (one op selects them after rows joined or left)."""
        if self.state is None:
            self.set_state(tf.zeros([len(self.rows), self.model.state_size], tf.float32))
        elif not self._selected:
            self.set_state(self.model.decoder.select_state(self.state, tf.constant(self.source)))
        return self.state

    def steps_inputs(self, k: int) -> tuple[list[tf.Tensor], np.ndarray, np.ndarray]:
        """``decode_steps_packed``' inputs for a ``k``-step call, padded to ``padded_rows()`` rows (padding
        rows are greedy and ignored), and the call's unpadded ``forced`` and ``left`` (``forced_prompts``).

        One array becomes a tensor a call: every row's inputs, packed (``pack_rows``).
        """
        xla = self.model.decoder.xla
        rows = self.padded_rows()
        forced, left = self.forced_prompts(k, None if xla is None else xla.max_steps)
        state, source = self._steps_state(rows)
        packed = pack_rows(
            padded(self.tokens, rows),
            padded(self.top_k, rows),
            padded(left, rows),
            source,
            padded(self.position, rows),
            padded(self.seed, rows),
            padded(self.temperature, rows),
            padded(self.top_p, rows, fill=1.0),
            padded(forced, rows),
        )
        return [state, tf.constant(packed), steps_tensor(k)], forced, left

    def _steps_state(self, rows: int) -> tuple[tf.Tensor, np.ndarray]:
        """``(state, source)`` for a ``decode_steps`` call of ``rows`` rows, ``source`` padded with -1.

        An XLA call takes a state of exactly ``rows`` rows (its compiled shape): when the padded size
        changed, one op selects the rows first; otherwise the call selects them itself.
        """
        if self.state is None:
            self.state = tf.zeros([rows, self.model.state_size], tf.float32)  # every row's source is -1
        elif self.model.decoder.xla is not None and self.state.shape[0] != rows:
            self.set_state(self.model.decoder.select_state(self.state, tf.constant(padded(self.source, rows, -1))))
        return self.state, padded(self.source, rows, -1)

    def expired(self, now: float) -> list[Row]:
        """Rows whose deadline has passed."""
        return [self.rows[int(i)] for i in np.nonzero(self.deadline <= now)[0]] if self.rows else []

    def join_riding(self, rows: list[Row]) -> None:
        """New rows join with a zero state, feeding their prompt one token per step."""
        first = np.array([r.request.prompt_ids[0] for r in rows], np.int32)
        left = np.array([len(r.request.prompt_ids) - 1 for r in rows], np.int64)
        self._append(rows, first, left)

    def _append(self, rows: list[Row], first: np.ndarray, left: np.ndarray) -> None:
        requests = [r.request for r in rows]
        add = {
            "tokens": first,
            "temperature": np.array([q.params.temperature for q in requests], np.float32),
            "top_k": np.array([q.params.top_k for q in requests], np.int32),
            "top_p": np.array([q.params.top_p for q in requests], np.float32),
            "seed": np.array([as_int64(q.seed) for q in requests], np.int64),
            "position": np.zeros(len(rows), np.int64),
            "max_tokens": np.array([q.params.max_tokens for q in requests], np.int64),
            "deadline": np.array([np.inf if q.deadline is None else q.deadline for q in requests], np.float64),
            "prompt_left": left,
            "source": np.full(len(rows), -1, np.int32),
        }
        for name in self.ARRAYS:
            setattr(self, name, np.concatenate([getattr(self, name), add[name]]))
        self.rows.extend(rows)
        self._rows_changed()

    def compact(self) -> None:
        """Drop finished rows: one fancy index per array (the next call selects the state's rows)."""
        if not any(r.done for r in self.rows):
            return
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        self.rows = [self.rows[i] for i in keep]
        index = np.array(keep, np.int64)
        for name in self.ARRAYS:
            setattr(self, name, getattr(self, name)[index])
        if not keep:
            self.state = None
        self._rows_changed()

    def _rows_changed(self) -> None:
        """After a join or a compaction: the cached tensors and what is derived from the rows are stale."""
        self._selected = False
        self.params_t = self.tokens_t = None
        self.want_logprobs = any(r.request.params.include_tokens for r in self.rows)

    def reading(self) -> bool:
        """Whether no row has generated yet: every row is still reading its prompt (the batch may read slices).

        A reading row's unread prompt is ``prompt_ids[cursor - 1:]``: ``tokens`` holds its first
        token, ``prompt_left`` counts the rest, and the state is the one after the tokens before.
        """
        return bool(self.rows) and not self.position.any()

    def unread_from_start(self) -> bool:
        """Whether no row has read any prompt token yet (every state is the zero start state)."""
        return all(row.cursor == 1 for row in self.rows)

    def prompt_slice(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The next slice of every reading row's prompt: ``(tokens[rows, T], lengths[rows])``, T <= ``limit``.

        Each row gives its next ``min(unread, limit)`` prompt tokens, right-padded with 0.
        """
        lengths = np.minimum(self.prompt_left + 1, limit).astype(np.int32)
        tokens = np.zeros((len(self.rows), int(lengths.max())), np.int32)
        for i, row in enumerate(self.rows):
            start = row.cursor - 1
            tokens[i, : lengths[i]] = row.request.prompt_ids[start : start + int(lengths[i])]
        return tokens, lengths

    def advance_slice(self, lengths: np.ndarray) -> np.ndarray:
        """After a slice call: move each row past what it read; returns the rows that read their whole prompt.

        Those generate next: the call's sample is their first token (``record_sampled``).
        """
        finished = lengths > self.prompt_left
        for i, row in enumerate(self.rows):
            prompt = row.request.prompt_ids
            row.cursor = min(row.cursor + int(lengths[i]), len(prompt))
            if not finished[i]:
                self.tokens[i] = prompt[row.cursor - 1]
        self.prompt_left = np.where(finished, 0, self.prompt_left - lengths)
        self.tokens_t = None
        return np.nonzero(finished)[0]

    def feed_prompts(self) -> np.ndarray | None:
        """After a one-step call: rows still reading their prompt get their next prompt token.

        Returns the indices of the rows that generated a token in that step, or None when all did.
        """
        prompting = self.prompt_left > 0
        if not prompting.any():
            return None
        for i in np.nonzero(prompting)[0]:
            row = self.rows[int(i)]
            self.tokens[i] = row.request.prompt_ids[row.cursor]
            row.cursor += 1
        self.prompt_left[prompting] -= 1
        self.tokens_t = None
        return np.nonzero(~prompting)[0]

    def forced_prompts(self, k: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For a K-step call: ``(forced[rows, width], left[rows])``, the prompt tokens each row is fed in the graph.

        A row with ``n`` prompt tokens left is fed the next ``min(n, k)`` of them and generates
        from step ``n`` on. ``width`` (at least ``k``, default ``k``) is ``forced``'s fixed width
        for an XLA call; the columns after ``k`` are 0.
        """
        left = np.minimum(self.prompt_left, k).astype(np.int32)
        forced = np.zeros((len(self.rows), width or k), np.int32)
        for i in np.nonzero(left)[0].tolist():
            row = self.rows[i]
            forced[i, : left[i]] = row.request.prompt_ids[row.cursor : row.cursor + int(left[i])]
        return forced, left

    def advance_prompts(self, forced: np.ndarray, left: np.ndarray, k: int) -> None:
        """After a ``k``-step call: move each row's prompt cursor past what the call fed it."""
        for i in np.nonzero(left)[0].tolist():
            self.rows[i].cursor += int(left[i])
            if left[i] == k:  # read its prompt for the whole call: the last token it was given is fed next
                self.tokens[i] = forced[i, k - 1]
        self.prompt_left -= left
        self.tokens_t = None  # self.tokens holds each row's next token

    def within_max_tokens(self, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(take, ending)`` for rows that generated ``count[i]`` tokens in a call: what each keeps, which end.

        A row keeps at most ``max_tokens`` minus the tokens it had (``position``) and ends when it
        reaches ``max_tokens``: what ``StoppingCriteria.feed`` gives without stop sequences, for the
        whole batch in array arithmetic.
        """
        take = np.minimum(count, np.maximum(self.max_tokens - self.position, 1))
        return take, np.flatnonzero((take > 0) & (self.position + take >= self.max_tokens))

    def record_steps(self, ids: np.ndarray, first: np.ndarray, take: np.ndarray) -> None:
        """After a K-step call: each row that took ``take[i] > 0`` tokens from step ``first[i]`` on feeds its last next.

        What ``record_sampled`` for each step's rows in turn gives, at once: ``ids`` is ``(k, rows)``.
        """
        took = np.flatnonzero(take)
        if len(took):
            self.tokens[took] = ids[first[took] + take[took] - 1, took]
            self.position[took] += take[took]

    def record_sampled(self, ids: np.ndarray, which: np.ndarray | None) -> None:
        """Sampled ids become the next tokens fed: for every row (``which`` None) or rows ``which``."""
        if which is None:
            self.tokens = ids.astype(np.int32, copy=True)
            self.position += 1
        elif len(which):
            self.tokens[which] = ids[which]
            self.position[which] += 1


_STEPS: dict[int, tf.Tensor] = {}


def steps_tensor(k: int) -> tf.Tensor:
    """The scalar ``k`` as a tensor, made once per value (the engine thread is its only caller)."""
    tensor = _STEPS.get(k)
    if tensor is None:
        tensor = _STEPS[k] = tf.constant(k, tf.int32)
    return tensor


def padded(values: np.ndarray, rows: int, fill: float = 0) -> np.ndarray:
    """``values`` (one entry per row, first axis) with ``fill`` rows added up to ``rows`` rows."""
    if len(values) == rows:
        return values
    out = np.full((rows, *values.shape[1:]), fill, values.dtype)
    out[: len(values)] = values
    return out
