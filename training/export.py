"""Export a trained model as one version of the SavedModel contract, atomically.

The contract (docs/contract.md explains it; ``training/contract.py`` names its parts):

``<base>/<version>/`` holds a SavedModel with three signatures, batch ``None``:

* ``prefill(tokens int32[B,T], lengths int32[B]) -> {logits float32[B,V], state float32[B,S]}``
  runs right-padded prompts through the fused recurrent layers and returns the
  state after each row's last real token and the logits for the next token;
* ``prefill_from(tokens int32[B,T], lengths int32[B], state float32[B,S]) -> {logits, state}``
  is ``prefill`` starting from the given state (contract version 2; ``prefill`` is
  ``prefill_from`` from a zero state), so a long prompt can be read in slices;
* ``step(tokens int32[B], state float32[B,S]) -> {logits float32[B,V], state float32[B,S]}``
  advances every row by one token;

plus ``assets/tokenizer.json`` and ``assets/model.json``. A version is written
into a hidden temporary folder beside the final one and renamed into place, so
a server polling ``<base>`` never sees half a model.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.check import input_specs
from training.contract import (
    ASSETS_DIR,
    CONTRACT_VERSION,
    CONTRACT_VERSIONS,
    MODEL_ASSET,
    PREFILL,
    PREFILL_FROM,
    STEP,
    TOKENIZER_ASSET,
    asset_path,
    next_version,
    read_json_asset,
)
from training.fused_step import input_projection_table, step_from_projection
from training.model import ModelConfig, build_model, pack_state, rnn_layers, unpack_state
from training.tokenizer import Tokenizer


class ServingModule(tf.Module):
    """The ``prefill``, ``prefill_from`` and ``step`` functions over a trained Keras model's layers.

    ``step`` gathers the first layer's input projection from a table built here
    when it fits (``fused_step.py``); ``folded`` says whether it did.
    """

    def __init__(self, model: keras.Model, config: ModelConfig) -> None:
        super().__init__(name="textgen_lm")
        self.model = model  # tracked: its variables are saved
        self.config = config
        self._embedding = model.get_layer("embedding")
        self._rnns = rnn_layers(model, config)
        self._dense = model.get_layer("logits")
        # The first layer's input projection for every token, when it is small enough (fused_step.py).
        table = input_projection_table(
            np.asarray(self._embedding.embeddings, np.float32), self._rnns[0].cell, config.cell
        )
        self._input_table = None if table is None else tf.Variable(table, trainable=False, name="input_table")

    @property
    def folded(self) -> bool:
        """Whether ``step`` gathers the first layer's input projection from a table."""
        return self._input_table is not None

    @tf.function(input_signature=input_specs(PREFILL))
    def prefill(self, tokens: tf.Tensor, lengths: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._read(tokens, lengths, None)

    @tf.function(input_signature=input_specs(PREFILL_FROM))
    def prefill_from(self, tokens: tf.Tensor, lengths: tf.Tensor, state: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._read(tokens, lengths, unpack_state(state, self.config))

    def _read(
        self, tokens: tf.Tensor, lengths: tf.Tensor, initial: list[list[tf.Tensor]] | None
    ) -> dict[str, tf.Tensor]:
        """Right-padded prompts through the fused layers, from ``initial`` per-layer states (None: zeros)."""
        lengths = tf.clip_by_value(lengths, 1, tf.shape(tokens)[1])
        mask = tf.sequence_mask(lengths, maxlen=tf.shape(tokens)[1])  # (b, t)
        x = self._embedding(tokens)  # (b, t, e)
        states: list[tf.Tensor] = []
        for i, rnn in enumerate(self._rnns):
            # Masked steps carry the state through, so each row's final state
            # is the one after its last real token (right padding is inert).
            start = None if initial is None else [tf.cast(s, rnn.compute_dtype) for s in initial[i]]
            outputs = rnn(x, mask=mask, initial_state=start, training=False)
            x = outputs[0]  # (b, t, units)
            states.extend(outputs[1:])
        last = tf.gather(x, lengths - 1, axis=1, batch_dims=1)  # (b, units)
        logits = tf.cast(self._dense(last), tf.float32)  # (b, vocab)
        return {"logits": logits, "state": pack_state(states)}

    @tf.function(input_signature=input_specs(STEP))
    def step(self, tokens: tf.Tensor, state: tf.Tensor) -> dict[str, tf.Tensor]:
        layer_states = unpack_state(state, self.config)
        rnns = self._rnns
        new_states: list[tf.Tensor] = []
        if self._input_table is not None:
            projection = tf.gather(self._input_table, tokens)  # (b, gates * units): embedding @ kernel + bias
            new_states = step_from_projection(rnns[0].cell, self.config.cell, projection, layer_states[0])
            x = new_states[0]
            rnns, layer_states = rnns[1:], layer_states[1:]
        else:
            x = self._embedding(tokens)  # (b, e)
        for rnn, layer_state in zip(rnns, layer_states, strict=True):
            dtype = rnn.compute_dtype
            cell_state = [tf.cast(s, dtype) for s in layer_state]
            # The cell is the single-step form of the fused layer: same weights.
            x, next_state = rnn.cell(x, cell_state if len(cell_state) > 1 else cell_state[0], training=False)
            new_states.extend(next_state if isinstance(next_state, (list, tuple)) else [next_state])
        logits = tf.cast(self._dense(x), tf.float32)  # (b, vocab)
        return {"logits": logits, "state": pack_state(new_states)}


def export_version(
    model: keras.Model,
    config: ModelConfig,
    tokenizer: Tokenizer,
    base_dir: str,
    metadata: dict[str, Any],
    *,
    before_rename: Callable[[str], None] | None = None,
    contract_version: int = CONTRACT_VERSION,
) -> str:
    """Write the next version of ``base_dir`` and return its path.

    ``before_rename`` is called with the temporary folder once everything is
    written (tests use it to fail mid-export); on any error the temporary
    folder is removed and no numbered folder appears. ``contract_version`` 1
    writes an export without ``prefill_from``.
    """
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model has {config.vocab_size} logits")
    if contract_version not in CONTRACT_VERSIONS:
        raise ValueError(f"contract_version is {contract_version!r}, must be one of {CONTRACT_VERSIONS}")
    serving = inference_copy(model, config)
    os.makedirs(base_dir, exist_ok=True)
    tmp = os.path.join(base_dir, f".tmp-{uuid.uuid4().hex}")
    try:
        module = ServingModule(serving, config)
        signatures = {PREFILL.name: module.prefill, STEP.name: module.step}
        if contract_version >= 2:
            signatures[PREFILL_FROM.name] = module.prefill_from
        tf.saved_model.save(module, tmp, signatures=signatures)
        os.makedirs(os.path.join(tmp, ASSETS_DIR), exist_ok=True)
        tokenizer.save(asset_path(tmp, TOKENIZER_ASSET))
        info = {
            "contract_version": contract_version,
            "architecture": config.to_dict(),
            "state_size": config.state_size,
            "step_input_table": module.folded,
            "level": tokenizer.level,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **metadata,
        }
        with open(asset_path(tmp, MODEL_ASSET), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        _fsync_tree(tmp)
        if before_rename is not None:
            before_rename(tmp)
        return _rename_to_next_version(tmp, base_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def inference_copy(model: keras.Model, config: ModelConfig) -> keras.Model:
    """The same weights in a fresh float32 model without dropout, outside any distribution strategy.

    This is what gets exported: dropout layers carry seed-generator variables
    that a SavedModel signature cannot capture, a mixed-precision model would
    export float16 layers, and a model built under a strategy holds
    distributed variables (call this outside ``strategy.scope()``).
    """
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        copy = build_model(dataclasses.replace(config, dropout=0.0))
        copy.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return copy


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _rename_to_next_version(tmp: str, base_dir: str) -> str:
    # Another exporter may take a number between our listing and our rename:
    # rename onto an existing non-empty folder fails, so try the next number.
    for _ in range(100):
        final = os.path.join(base_dir, str(next_version(base_dir)))
        try:
            os.rename(tmp, final)
        except OSError:
            if os.path.exists(final):
                continue
            raise
        return final
    raise RuntimeError(f"could not find a free version number in {base_dir}")


def load_exported(path: str) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """Load a version folder: the SavedModel, its tokenizer and its model.json."""
    loaded = tf.saved_model.load(path)
    tokenizer = Tokenizer.load(asset_path(path, TOKENIZER_ASSET))
    return loaded, tokenizer, read_json_asset(path, MODEL_ASSET)


def smoke_generate(path: str, prompt: str = "The ", tokens: int = 8) -> str:
    """Reload an export and generate a few tokens greedily through its ``prefill`` and ``step`` signatures.

    Each token comes from ``training/sampler.py``'s ``sample`` at temperature 0, the sampler the
    server's decoder and ``textgen generate`` run (greedy: the likeliest token, never padding).
    """
    from training.sampler import sample

    loaded, tokenizer, _ = load_exported(path)
    ids = tokenizer.encode(prompt) or tokenizer.start_ids
    out = loaded.signatures[PREFILL.name](
        tokens=tf.constant([ids], tf.int32), lengths=tf.constant([len(ids)], tf.int32)
    )
    # temperature 0 (greedy), top_k 0 and top_p 1 (off), seed 0: one row
    greedy = (tf.zeros([1], tf.float32), tf.zeros([1], tf.int32), tf.ones([1], tf.float32), tf.zeros([1], tf.int64))
    generated: list[int] = []
    for position in range(tokens):
        next_ids, _ = sample(out["logits"], *greedy, tf.constant([position], tf.int64))
        generated.append(int(next_ids[0]))
        out = loaded.signatures[STEP.name](tokens=next_ids, state=out["state"])
    return tokenizer.decode(generated, previous_id=ids[-1])
