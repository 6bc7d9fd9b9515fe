"""``textgen generate --model DIR "prompt"``: sample text from an exported version, locally, no server.

Stateful, like the server: the prompt is run once through ``prefill``, then
every new token costs one ``step`` on the carried state. ``DIR`` is a version
folder (``models/textgen/3``) or a model's base folder, whose newest version is
used. Text streams to stdout as it is sampled.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import NoReturn, TextIO

import numpy as np


class GenerateError(ValueError):
    """A flag or model folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    prompt: str = ""
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise GenerateError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerateError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"--top-k must be at least 0 (0 = off), got {self.top_k}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise GenerateError(message)


def parse_args(argv: list[str]) -> GenerateConfig:
    p = _Parser(prog="textgen generate", description="Sample text from an exported model, locally (no server).")
    p.add_argument("--model", required=True, metavar="DIR", help="a version folder, or a base folder (newest version)")
    p.add_argument("prompt", nargs="?", default="", help="text to continue (default: start of a text)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = always the most likely token")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    a = p.parse_args(argv)
    return GenerateConfig(a.model, a.prompt, a.max_tokens, a.temperature, a.top_k, a.seed)


def resolve_version(path: str) -> str:
    """A version folder as given, or the newest version inside a base folder."""
    from training.export import list_versions

    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if not os.path.isdir(path):
        raise GenerateError(f"--model {path}: no such folder")
    versions = list_versions(path)
    if not versions:
        raise GenerateError(f"--model {path}: neither a SavedModel version nor a folder holding numbered versions")
    return os.path.join(path, str(versions[-1]))


def sample_next(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One id from ``logits`` (V,): argmax at temperature 0, else softmax(logits / T) over the top k.

    Padding (id 0) is never a real token, so it is never drawn.
    """
    scaled = logits.astype(np.float64)
    scaled[0] = -np.inf
    if temperature == 0:
        return int(np.argmax(scaled))
    scaled = scaled / temperature
    if 0 < top_k < len(scaled) - 1:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - np.max(scaled))
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(config: GenerateConfig, out: TextIO) -> str:
    """Stream the continuation of ``config.prompt`` to ``out`` and return it."""
    import tensorflow as tf

    from training.export import load_exported

    path = resolve_version(config.model)
    loaded, tokenizer, _ = load_exported(path)
    prefill, step = loaded.signatures["prefill"], loaded.signatures["step"]
    ids = tokenizer.encode(config.prompt) or tokenizer.start_ids
    rng = np.random.default_rng(config.seed)
    result = prefill(tokens=tf.constant([ids], tf.int32), lengths=tf.constant([len(ids)], tf.int32))
    out.write(config.prompt)
    out.flush()
    previous: int | None = ids[-1]
    pieces = []
    for _ in range(config.max_tokens):
        token = sample_next(result["logits"].numpy()[0], config.temperature, config.top_k, rng)
        piece = tokenizer.piece(previous, token)
        pieces.append(piece)
        out.write(piece)
        out.flush()
        previous = token
        result = step(tokens=tf.constant([token], tf.int32), state=result["state"])
    out.write("\n")
    out.flush()
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = parse_args(args)
        resolve_version(config.model)
    except GenerateError as exc:
        print(f"textgen generate: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    generate(config, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
