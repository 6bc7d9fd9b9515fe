"""What one training step costs on this machine, and what the choices around it change.

Times ``train_on_batch`` of the char LSTM (median of ``--steps`` after two
untimed ones) for each variant and batch size, in this one process, and
prints ms per step, thousands of tokens per second and the ratio to the
first row:

* ``textgen``: ``build_model`` as training uses it (dropout layers outside the
  recurrent loop);
* ``cell-dropout``: the dropout inside the LSTM layers instead (Keras's
  ``LSTM(dropout=...)``, one mask per sequence, applied in the loop);
* ``xla``: ``textgen`` compiled with ``jit_compile=True``;
* ``unroll``: the LSTM loop unrolled over the window.

    python -m benchmarks.train_step --units 320 --layers 2 --batches 64,128,256
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

VARIANTS = ("textgen", "cell-dropout", "xla", "unroll")


def _model(variant: str, vocab: int, units: int, layers: int, dropout: float) -> object:
    import keras

    from training.model import ModelConfig, build_model

    config = ModelConfig(vocab_size=vocab, embedding_dim=64, units=units, layers=layers, dropout=dropout)
    if variant in ("textgen", "xla"):
        return build_model(config)
    tokens = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(vocab, 64)(tokens)
    for _ in range(layers):
        if variant == "cell-dropout":
            x = keras.layers.LSTM(units, return_sequences=True, dropout=dropout)(x)
        else:  # unroll
            x = keras.layers.Dropout(dropout)(x)
            x = keras.layers.LSTM(units, return_sequences=True, unroll=True)(x)
    return keras.Model(tokens, keras.layers.Dense(vocab)(x))


def time_step(
    variant: str, *, vocab: int, units: int, layers: int, batch: int, seq_len: int, dropout: float, steps: int
) -> float:
    """Median seconds of one optimizer step."""
    import keras

    model = _model(variant, vocab, units, layers, dropout)
    model.compile(  # type: ignore[attr-defined]
        optimizer=keras.optimizers.AdamW(1e-3, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=variant == "xla",
    )
    x = np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    for _ in range(2):
        model.train_on_batch(x[:, :-1], x[:, 1:])  # type: ignore[attr-defined]
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(x[:, :-1], x[:, 1:])  # type: ignore[attr-defined]
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__)
    parser.add_argument("--units", type=int, default=320)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=105, help="the embedded corpus's char vocabulary")
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    print("| variant | batch | ms/step | k tokens/s | vs first row (tokens/s) |\n|---|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            seconds = time_step(
                variant,
                vocab=args.vocab,
                units=args.units,
                layers=args.layers,
                batch=batch,
                seq_len=args.seq_len,
                dropout=args.dropout,
                steps=args.steps,
            )
            rate = batch * args.seq_len / seconds
            rows.append(rate)
            print(f"| {variant} | {batch} | {1000 * seconds:.0f} | {rate / 1000:.1f} | {rate / rows[0]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
