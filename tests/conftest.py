"""Shared fixtures: a tiny trained model exported under the SavedModel contract.

The model is real (Keras fit, real export) but small (32 units) and trained
for a moment on a slice of the embedded corpus, so the suite stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_TEXT_CHARS = 20_000


def _export_tiny(base_dir: Path, level: str = "char", units: int = 32, seed: int = 7) -> str:
    from pydoc_data.topics import topics

    import keras
    import numpy as np
    import tensorflow as tf

    from training.export import export_version
    from training.model import ModelConfig, build_model
    from training.tokenizer import Tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))[:TINY_TEXT_CHARS]
    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer(level=level, num_words=400 if level == "word" else None).fit_on_texts([text])
    ids = np.array(tokenizer.encode(text), dtype=np.int32)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=16, units=units, layers=1)
    model = build_model(config)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    seq = 32
    n = (len(ids) - 1) // seq
    x = ids[: n * seq].reshape(n, seq)
    y = ids[1 : n * seq + 1].reshape(n, seq)
    model.fit(tf.constant(x), tf.constant(y), batch_size=32, epochs=2, verbose=0)
    return export_version(model, config, tokenizer, str(base_dir), {"fixture": "tiny"})


@pytest.fixture(scope="session")
def tiny_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository ``<repo>/tiny/1`` holding one tiny char-level version."""
    repo = tmp_path_factory.mktemp("models")
    _export_tiny(repo / "tiny")
    return repo


@pytest.fixture(scope="session")
def tiny_word_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository ``<repo>/tinyword/1`` holding one tiny word-level version."""
    repo = tmp_path_factory.mktemp("wordmodels")
    _export_tiny(repo / "tinyword", level="word")
    return repo
