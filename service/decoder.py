"""A checked version's decode functions: its ``step`` or ``prefill`` signature and the sampler in one graph.

``Decoder`` turns a version that passed ``training.check.check_version`` into the functions
the engine runs, each one ``tf.function`` so logits never leave the device:

* ``decode``: one step for every row, then the in-graph sampler (``training/sampler.py``);
* ``decode_steps``: K of those in one ``tf.while_loop``, rows still reading their prompt fed it;
* ``prefill``: right-padded prompts through ``prefill``, then the sampler;
* ``prefill_from``: the same from given states, through ``prefill_from`` (contract version 2;
  ``has_prefill_from`` says whether the version has it).

Each is traced once (batch ``None``) and called as a concrete function: that skips
``tf.function``'s argument dispatch, which costs more than a small model's whole step on a CPU.
It is called through its flat call (``_flat``), which also skips binding the arguments to the
signature and casting each (about 0.2 ms a call): every caller passes tensors of the signature's types.
``warm_up`` runs every function at the batch sizes the engine will use before the version takes
traffic. Given ``XlaShapes``, ``decode_steps`` is compiled by XLA into one program per padded batch
size (all of them during warm-up): on a CPU that makes a small model's call several times cheaper,
since TensorFlow's per-op cost is most of it. ``configure_devices`` and ``configure_cpu_threads``
set TensorFlow up before any op runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
import tensorflow as tf
from tensorflow.types.experimental import ConcreteFunction

from service.config import XlaShapes
from training import contract
from training.check import CheckedVersion, check_version, input_specs
from training.sampler import SAMPLER_SIGNATURE, row_uniform, sample, sample_uniform

log = logging.getLogger(__name__)

DECODE = "decode"
DECODE_STEPS = "decode_steps"
PREFILL = "prefill"
PREFILL_FROM = "prefill_from"
SELECT = "select_state"
WARMUP_STEPS = 2  # decode_steps warms up with K > 1 and some rows reading a prompt
# decode_steps' packed int32 rows: tokens, top_k, left, source, position, seed (high, low 32 bits),
# temperature and top_p (their float32 bits), then ``forced`` (``pack_rows``).
PACKED_COLUMNS = 9

_configured = threading.Lock()
_devices_done: list[str] = []

Decoded = tuple[tf.Tensor, tf.Tensor, tf.Tensor]


def configure_cpu_threads(threads: int) -> bool:
    """Size TensorFlow's intra- and inter-op thread pools; False if TensorFlow had already started."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as exc:  # TensorFlow ran an op already (a server started inside another program)
        log.warning("keeping TensorFlow's thread pools: %s", exc)
        return False
    return True


def configure_devices() -> str:
    """Enable GPU memory growth (before any op runs) and return the device the models run on."""
    with _configured:
        if _devices_done:
            return _devices_done[0]
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError as exc:  # TF already initialised the device
                log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
        logical = tf.config.list_logical_devices("GPU")
        device = logical[0].name if logical else tf.config.list_logical_devices("CPU")[0].name
        log.info("models run on %s (GPUs visible: %d)", device, len(logical))
        _devices_done.append(device)
        return device


def _build(checked: CheckedVersion, shapes: XlaShapes | None) -> dict[str, ConcreteFunction]:
    """The sampler-fused functions over the version's signatures, as concrete functions.

    With ``shapes``, ``decode_steps`` is compiled by XLA (``jit_compile``) for its fixed widths.
    """
    step_fn = checked.step
    prefill_fn = checked.prefill
    prefill_from_fn = checked.prefill_from
    # step's inputs (tokens[B], state[B,S]), then the sampler's per-row parameters
    decode_signature = [*input_specs(contract.STEP), *SAMPLER_SIGNATURE[1:]]

    @tf.function(input_signature=decode_signature)
    def _decode(tokens, state, temperature, top_k, top_p, seed, position):  # type: ignore[no-untyped-def]
        out = step_fn(tokens=tokens, state=state)
        ids, logprobs = sample(out["logits"], temperature, top_k, top_p, seed, position)
        return ids, logprobs, out["state"]

    # prefill's inputs (tokens[B,T], lengths[B]), then the sampler's per-row parameters
    @tf.function(input_signature=[*input_specs(contract.PREFILL), *SAMPLER_SIGNATURE[1:]])
    def _prefill(tokens, lengths, temperature, top_k, top_p, seed, position):  # type: ignore[no-untyped-def]
        out = prefill_fn(tokens=tokens, lengths=lengths)
        ids, logprobs = sample(out["logits"], temperature, top_k, top_p, seed, position)
        return ids, logprobs, out["state"]

    width = None if shapes is None else shapes.max_steps

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, checked.state_size], tf.float32, name="state"),
            tf.TensorSpec([None, None if width is None else PACKED_COLUMNS + width], tf.int32, name="rows"),
            tf.TensorSpec([], tf.int32, name="steps"),
        ],
        jit_compile=shapes is not None,
    )
    def _decode_steps(state, rows, steps):  # type: ignore[no-untyped-def]
        # The per-row inputs arrive packed (``pack_rows``): one tensor a call instead of ten.
        tokens, top_k, left, source = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        position = tf.cast(rows[:, 4], tf.int64)
        seed_hi = tf.bitwise.left_shift(tf.cast(rows[:, 5], tf.int64), 32)
        seed = tf.bitwise.bitwise_or(seed_hi, tf.bitwise.bitwise_and(tf.cast(rows[:, 6], tf.int64), 0xFFFFFFFF))
        temperature = tf.bitcast(rows[:, 7], tf.float32)
        top_p = tf.bitcast(rows[:, 8], tf.float32)
        forced = rows[:, PACKED_COLUMNS:]
        # Row i continues row source[i] of the given state (-1: a zero state, a row that just
        # joined): joins and compactions cost the engine no TensorFlow op of their own.
        state = select_state(state, source)
        # A generating row feeds back its own sample at position + (i - left); a row still
        # reading its prompt is fed its next prompt token: exactly the tokens `steps` calls
        # of _decode would give (with the engine feeding prompts), in one call.
        # Every step's uniforms at once, before the loop: row_uniform(seed, position + generated) of
        # each (step, row), the same values a step computes for itself, with far fewer ops per step.
        # Under XLA every shape is fixed at compile time: the uniforms and outputs have `width`
        # steps, the loop runs `steps` of them, and the rows after `steps` are zeros.
        k = steps if width is None else width
        generated = tf.cast(tf.maximum(tf.range(k)[:, None] - left[None, :], 0), tf.int64)  # (k, b)
        positions = position[None, :] + generated
        seeds = tf.broadcast_to(seed[None, :], tf.shape(positions))
        uniforms = tf.reshape(row_uniform(tf.reshape(seeds, [-1]), tf.reshape(positions, [-1])), tf.shape(positions))

        def body(i, tokens, state, ids_ta, logprobs_ta):  # type: ignore[no-untyped-def]
            out = step_fn(tokens=tokens, state=state)
            ids, logprobs = sample_uniform(out["logits"], temperature, top_k, top_p, uniforms[i])
            fed = tf.where(i >= left, ids, tf.gather(forced, i, axis=1))
            return i + 1, fed, out["state"], ids_ta.write(i, ids), logprobs_ta.write(i, logprobs)

        loop_vars = [
            tf.constant(0),
            tokens,
            state,
            tf.TensorArray(tf.int32, size=k),
            tf.TensorArray(tf.float32, size=k),
        ]
        _, _, state, ids_ta, logprobs_ta = tf.while_loop(lambda i, *_: i < steps, body, loop_vars)
        return ids_ta.stack(), logprobs_ta.stack(), state  # (k, b), (k, b), (b, S)

    @tf.function(
        input_signature=[tf.TensorSpec([None, checked.state_size], tf.float32), tf.TensorSpec([None], tf.int32)]
    )
    def _select(state, source):  # type: ignore[no-untyped-def]
        return select_state(state, source)

    functions = {
        SELECT: _select.get_concrete_function(),
        DECODE: _decode.get_concrete_function(),
        PREFILL: _prefill.get_concrete_function(),
        DECODE_STEPS: _decode_steps.get_concrete_function(),
    }
    if prefill_from_fn is not None:
        # prefill_from's inputs (tokens[B,T], lengths[B], state[B,S]), then the sampler's per-row parameters
        @tf.function(input_signature=[*input_specs(contract.PREFILL_FROM), *SAMPLER_SIGNATURE[1:]])
        def _prefill_from(tokens, lengths, state, temperature, top_k, top_p, seed, position):  # type: ignore[no-untyped-def]
            out = prefill_from_fn(tokens=tokens, lengths=lengths, state=state)
            ids, logprobs = sample(out["logits"], temperature, top_k, top_p, seed, position)
            return ids, logprobs, out["state"]

        functions[PREFILL_FROM] = _prefill_from.get_concrete_function()
    return functions


def select_state(state: tf.Tensor, source: tf.Tensor) -> tf.Tensor:
    """Row i of the result is row ``source[i]`` of ``state``, or zeros where ``source[i]`` is -1."""
    picked = tf.gather(state, tf.maximum(source, 0))
    return tf.where(source[:, None] >= 0, picked, tf.zeros_like(picked))


def pack_rows(
    tokens: np.ndarray,
    top_k: np.ndarray,
    left: np.ndarray,
    source: np.ndarray,
    position: np.ndarray,
    seed: np.ndarray,
    temperature: np.ndarray,
    top_p: np.ndarray,
    forced: np.ndarray,
) -> np.ndarray:
    """``decode_steps``' per-row inputs as one int32 ``(B, PACKED_COLUMNS + K)`` array.

    ``position`` must fit in int32 (it counts a row's tokens, at most ``--max-tokens-limit``); the
    int64 ``seed`` travels as its two 32-bit halves and the graph joins them again; the float32
    ``temperature`` and ``top_p`` travel as their bits (``tf.bitcast`` reads them back exactly).
    """
    seed = np.asarray(seed, np.int64)
    packed = np.empty((len(tokens), PACKED_COLUMNS + forced.shape[1]), np.int32)
    packed[:, 0] = tokens
    packed[:, 1] = top_k
    packed[:, 2] = left
    packed[:, 3] = source
    packed[:, 4] = position
    packed[:, 5] = seed >> 32
    packed[:, 6] = (seed & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    packed[:, 7] = np.asarray(temperature, np.float32).view(np.int32)
    packed[:, 8] = np.asarray(top_p, np.float32).view(np.int32)
    packed[:, PACKED_COLUMNS:] = forced
    return packed


def _flat(function: ConcreteFunction) -> Callable[..., Decoded]:
    """``function(*tensors)`` through ``ConcreteFunction._call_flat``: the same outputs, without the binding.

    ``__call__`` binds the arguments to the signature and casts each to its spec before the same
    flat call. TensorFlow is pinned to one minor version; without ``_call_flat`` this is ``__call__``.
    """
    call_flat = getattr(function, "_call_flat", None)
    if call_flat is None:
        return cast(Callable[..., Decoded], function)

    def call(*tensors: tf.Tensor) -> Decoded:
        outputs: Decoded = call_flat(list(tensors), function.captured_inputs)
        return outputs

    return call


class Decoder:
    """One version's typed decode functions; every argument and result is a ``tf.Tensor``.

    The sampler's per-row parameters, shared by all of them: ``temperature`` float32[B] (0 = greedy),
    ``top_k`` int32[B] (0 = off), ``top_p`` float32[B] (1 = off), ``seed`` int64[B] and
    ``position`` int64[B] (which draw of the row's stream this is). A row's draw depends only on its
    own logits, parameters, seed and position, never on its batch-mates.
    """

    def __init__(self, checked: CheckedVersion, xla: XlaShapes | None = None) -> None:
        self.checked = checked
        self.xla = xla
        self._functions = _build(checked, xla)
        self._decode = _flat(self._functions[DECODE])
        self._prefill = _flat(self._functions[PREFILL])
        self._decode_steps = _flat(self._functions[DECODE_STEPS])
        self._select = self._functions[SELECT]
        prefill_from = self._functions.get(PREFILL_FROM)
        self._prefill_from = None if prefill_from is None else _flat(prefill_from)
        self._warmed: set[tuple[str, int]] = set()

    @classmethod
    def load(cls, path: str, xla: XlaShapes | None = None) -> Decoder:
        """Check the version folder at ``path`` (``ContractError`` says what is wrong) and build its decoder."""
        return cls(check_version(path), xla)

    @property
    def state_size(self) -> int:
        """S: the width of the state the functions take and return."""
        return self.checked.state_size

    @property
    def functions(self) -> dict[str, ConcreteFunction]:
        """The concrete functions by name (``decode``, ``decode_steps``, ``prefill``, and ``prefill_from``)."""
        return dict(self._functions)

    @property
    def has_prefill_from(self) -> bool:
        """Whether the version has ``prefill_from`` (contract version 2), so a prompt can be read in slices."""
        return self._prefill_from is not None

    @property
    def warmed(self) -> frozenset[tuple[str, int]]:
        """The (function name, batch size) pairs ``warm_up`` has run."""
        return frozenset(self._warmed)

    def decode(
        self,
        tokens: tf.Tensor,
        state: tf.Tensor,
        temperature: tf.Tensor,
        top_k: tf.Tensor,
        top_p: tf.Tensor,
        seed: tf.Tensor,
        position: tf.Tensor,
    ) -> Decoded:
        """One step for every row, then one sampled token per row.

        ``tokens`` int32[B] (each row's latest token), ``state`` float32[B,S] ->
        ``(ids int32[B], logprobs float32[B], state float32[B,S])``. ``logprobs`` is the model's
        log-softmax of the chosen id (temperature 1, no truncation).
        """
        return self._decode(tokens, state, temperature, top_k, top_p, seed, position)

    def decode_steps(
        self,
        tokens: tf.Tensor,
        state: tf.Tensor,
        temperature: tf.Tensor,
        top_k: tf.Tensor,
        top_p: tf.Tensor,
        seed: tf.Tensor,
        position: tf.Tensor,
        steps: tf.Tensor,
        forced: tf.Tensor,
        left: tf.Tensor,
        source: tf.Tensor,
    ) -> Decoded:
        """K = ``steps`` decode steps in one call (one ``tf.while_loop``).

        ``tokens`` int32[B], ``state`` float32[R,S], ``steps`` int32[], ``forced`` int32[B,K],
        ``left`` int32[B], ``source`` int32[B] -> ``(ids int32[K,B], logprobs float32[K,B],
        state float32[B,S])``. Row i starts from row ``source[i]`` of ``state`` (-1: zeros; R may
        differ from B), as ``select_state`` gives.

        Compiled by XLA (``xla`` set), B must be one of ``xla.batch_sizes`` (pad the rows: a padding
        row's results are ignored), R equals B, ``forced`` is ``xla.max_steps`` wide and ids and
        logprobs have ``xla.max_steps`` rows, of which the first ``steps`` are the call's.

        A row with ``left = n > 0`` is still reading its prompt: at steps 0..n-1 it is fed
        ``forced[:, i]`` (its next prompt tokens) instead of its sample, and it generates from
        step n on, with sampler position ``position + i - n``. Step i's ids are what K calls of
        ``decode`` would give.
        """
        inputs = (tokens, top_k, left, source, position, seed, temperature, top_p, forced)
        return self.decode_steps_packed(state, tf.constant(pack_rows(*(t.numpy() for t in inputs))), steps)

    def decode_steps_packed(self, state: tf.Tensor, rows: tf.Tensor, steps: tf.Tensor) -> Decoded:
        """``decode_steps`` with its per-row inputs packed: what the engine calls, one conversion a call.

        ``rows`` int32[B, PACKED_COLUMNS + K] is ``pack_rows``' array.
        """
        return self._decode_steps(state, rows, steps)

    def select_state(self, state: tf.Tensor, source: tf.Tensor) -> tf.Tensor:
        """``state`` float32[R,S], ``source`` int32[B] -> float32[B,S]: row ``source[i]``, or zeros for -1."""
        return self._select(state, source)

    def prefill(
        self,
        tokens: tf.Tensor,
        lengths: tf.Tensor,
        temperature: tf.Tensor,
        top_k: tf.Tensor,
        top_p: tf.Tensor,
        seed: tf.Tensor,
        position: tf.Tensor,
    ) -> Decoded:
        """Whole prompts through ``prefill``, then the first sampled token per row.

        ``tokens`` int32[B,T] right-padded with 0, ``lengths`` int32[B] (1..T) ->
        ``(ids int32[B], logprobs float32[B], state float32[B,S])``: the state after each row's
        last prompt token, which ``decode`` continues from.
        """
        return self._prefill(tokens, lengths, temperature, top_k, top_p, seed, position)

    def prefill_from(
        self,
        tokens: tf.Tensor,
        lengths: tf.Tensor,
        state: tf.Tensor,
        temperature: tf.Tensor,
        top_k: tf.Tensor,
        top_p: tf.Tensor,
        seed: tf.Tensor,
        position: tf.Tensor,
    ) -> Decoded:
        """``prefill`` from ``state`` float32[B,S] (each row's state after what it read before) instead of zeros.

        Same results as ``prefill``: the state after each row's last token of ``tokens`` and one
        sampled token per row. ``ValueError`` when the version has no ``prefill_from``.
        """
        if self._prefill_from is None:
            raise ValueError(f"{self.checked.path} has no prefill_from signature (contract version 1)")
        return self._prefill_from(tokens, lengths, state, temperature, top_k, top_p, seed, position)

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every function once at each batch size (``decode_steps`` with K > 1, half its rows forced).

        Compiled by XLA, ``decode_steps`` runs at ``xla.batch_sizes`` instead, each compiled now.
        """
        start = self.checked.tokenizer.start_ids[0]
        if self.xla is not None:
            for batch in self.xla.batch_sizes:
                self._warm_steps(batch, min(WARMUP_STEPS, self.xla.max_steps), self.xla.max_steps)
        for batch in sorted(set(batch_sizes)):
            if batch < 1:
                raise ValueError(f"warm-up batch sizes must be at least 1, got {batch}")
            params = _greedy_params(batch)
            state = tf.zeros([batch, self.state_size])
            self.decode(tf.fill([batch], start), state, *params)
            self._warmed.add((DECODE, batch))
            self.prefill(tf.fill([batch, 2], start), tf.fill([batch], 2), *params)
            self._warmed.add((PREFILL, batch))
            if self.has_prefill_from:
                self.prefill_from(tf.fill([batch, 2], start), tf.fill([batch], 2), state, *params)
                self._warmed.add((PREFILL_FROM, batch))
            if self.xla is None:
                self._warm_steps(batch, WARMUP_STEPS, WARMUP_STEPS)

    def _warm_steps(self, batch: int, steps: int, width: int) -> None:
        start = self.checked.tokenizer.start_ids[0]
        left = tf.constant((np.arange(batch) % 2 == 0).astype(np.int32))  # rows 0, 2, ... read a prompt token
        self.decode_steps(
            tf.fill([batch], start),
            tf.zeros([batch, self.state_size]),
            *_greedy_params(batch),
            tf.constant(steps),
            tf.fill([batch, width], start),
            left,
            tf.range(batch),
        )
        self._warmed.add((DECODE_STEPS, batch))


def _greedy_params(batch: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """temperature, top_k, top_p, seed, position for ``batch`` greedy rows at position 0."""
    return (
        tf.zeros([batch], tf.float32),
        tf.zeros([batch], tf.int32),
        tf.ones([batch], tf.float32),
        tf.zeros([batch], tf.int64),
        tf.zeros([batch], tf.int64),
    )
