"""Character- and word-level tokenizer shared by training and serving.

This module is free of TensorFlow: the server imports it to encode prompts and
decode sampled ids, training imports it to build the id stream. It follows the
semantics of the Keras 2 ``Tokenizer`` the seed tutorials used (``fit_on_texts``,
``texts_to_sequences``, ``sequences_to_texts``, ``num_words``, ``oov_token``),
which Keras 3 no longer ships, with two differences made on purpose:

* punctuation and newlines are tokens of their own at word level (Keras
  filtered them away), so generated text keeps its shape;
* the JSON form (``to_json``/``from_json``) holds everything needed to decode,
  and it is stored inside every exported model (``assets/tokenizer.json``) so it
  can never drift from the weights it belongs to.

Ids: 0 is padding (decodes to nothing), 1 is the out-of-vocabulary token, then
tokens by descending corpus frequency (ties: first appearance).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

FORMAT = "textgen.tokenizer/1"
LEVELS = ("char", "word")
PADDING_ID = 0
OOV_ID = 1

# A word is a run of letters/digits/underscore (unicode-aware), optionally with
# inner apostrophes (don't, l'eau); every other non-space character and every
# newline is a token of its own. Spaces and tabs only separate tokens.
WORD_PATTERN = r"\n|\w+(?:['’]\w+)*|[^\w\s]"
# Word-level joining: a space goes between two tokens unless the right one is
# in NO_SPACE_BEFORE or the left one is in NO_SPACE_AFTER.
NO_SPACE_BEFORE = ".,;:!?)]}%\n"
NO_SPACE_AFTER = "([{\n"

DEFAULT_OOV = {"char": "\ufffd", "word": "<unk>"}


class TokenizerError(ValueError):
    """A tokenizer file or argument that cannot be used; the message names it."""


@dataclass
class Tokenizer:
    """Maps text to ids and back, at ``char`` or ``word`` level.

    ``num_words`` caps the vocabulary size *including* padding and OOV, like the
    Keras argument; tokens past the cap encode to ``OOV_ID``.
    """

    level: str = "char"
    num_words: int | None = None
    lowercase: bool = False
    normalization: str = "NFC"
    oov_token: str | None = None
    start_text: str = "\n"
    vocab: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise TokenizerError(f"level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.num_words is not None and self.num_words < 3:
            raise TokenizerError(f"num_words must be at least 3 (padding, OOV and one token), got {self.num_words}")
        if self.normalization not in ("", "NFC", "NFKC"):
            raise TokenizerError(f"normalization must be '', 'NFC' or 'NFKC', got {self.normalization!r}")
        if self.oov_token is None:
            self.oov_token = DEFAULT_OOV[self.level]
        self._word_re = re.compile(WORD_PATTERN)
        self._index: dict[str, int] = {}
        self._no_space_before: list[bool] = []
        self._no_space_after: list[bool] = []
        if self.vocab:
            self._build_index()

    # ----------------------------------------------------------------- fitting
    def fit_on_texts(self, texts: Iterable[str]) -> Tokenizer:
        """Count tokens over ``texts`` and fix the vocabulary (replacing any previous one)."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(self.split(text))
        # Counter.most_common keeps first-appearance order among equal counts.
        ordered = [token for token, _ in counts.most_common()]
        limit = None if self.num_words is None else self.num_words - 2
        self.vocab = ["", str(self.oov_token)] + ordered[:limit]
        self._build_index()
        return self

    def _build_index(self) -> None:
        if len(self.vocab) < 2 or self.vocab[PADDING_ID] != "":
            raise TokenizerError("vocab must start with the padding token '' and the OOV token")
        self._index = {token: i for i, token in enumerate(self.vocab) if i >= 2}
        if len(self._index) != len(self.vocab) - 2:
            raise TokenizerError("vocab has duplicate tokens")
        self._no_space_before = [t in NO_SPACE_BEFORE and t != "" for t in self.vocab]
        self._no_space_after = [t in NO_SPACE_AFTER and t != "" for t in self.vocab]

    # -------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def word_index(self) -> dict[str, int]:
        """Token -> id, as in the Keras Tokenizer (padding excluded, OOV included)."""
        return {str(self.oov_token): OOV_ID, **self._index}

    @property
    def index_word(self) -> dict[int, str]:
        return {i: t for t, i in self.word_index.items()}

    def normalize(self, text: str) -> str:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)  # type: ignore[arg-type]
        if self.lowercase:
            text = text.lower()
        return text

    def split(self, text: str) -> list[str]:
        """The token strings of ``text`` (after normalisation), before id lookup."""
        text = self.normalize(text)
        if self.level == "char":
            return list(text)
        return self._word_re.findall(text)

    def encode(self, text: str) -> list[int]:
        self._require_vocab()
        index = self._index
        return [index.get(token, OOV_ID) for token in self.split(text)]

    def texts_to_sequences(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @property
    def start_ids(self) -> list[int]:
        """What an empty prompt feeds the model: the encoded ``start_text`` (a newline)."""
        return self.encode(self.start_text) or [OOV_ID]

    # -------------------------------------------------------------- decoding
    def piece(self, previous_id: int | None, token_id: int) -> str:
        """The text ``token_id`` adds after ``previous_id`` (None at the start).

        Decoding one token at a time with ``piece`` gives exactly ``decode`` of
        the whole sequence, which is what a streaming server needs.
        """
        if token_id < 0 or token_id >= len(self.vocab):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary of {len(self.vocab)}")
        text = self.vocab[token_id]
        if token_id == PADDING_ID or self.level == "char":
            return text
        if previous_id is None or previous_id == PADDING_ID:
            return text
        if self._no_space_before[token_id] or self._no_space_after[previous_id]:
            return text
        return " " + text

    def decode(self, ids: Sequence[int], previous_id: int | None = None) -> str:
        self._require_vocab()
        parts = []
        prev = previous_id
        for token_id in ids:
            token_id = int(token_id)
            if token_id == PADDING_ID:
                continue
            parts.append(self.piece(prev, token_id))
            prev = token_id
        return "".join(parts)

    def sequences_to_texts(self, sequences: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(seq) for seq in sequences]

    def _require_vocab(self) -> None:
        if not self.vocab:
            raise TokenizerError("the tokenizer has no vocabulary: call fit_on_texts or load one")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "level": self.level,
            "vocab": list(self.vocab),
            "padding_id": PADDING_ID,
            "oov_id": OOV_ID,
            "oov_token": self.oov_token,
            "num_words": self.num_words,
            "lowercase": self.lowercase,
            "normalization": self.normalization,
            "start_text": self.start_text,
            "word_pattern": WORD_PATTERN,
            "join": {
                "separator": "" if self.level == "char" else " ",
                "no_space_before": NO_SPACE_BEFORE,
                "no_space_after": NO_SPACE_AFTER,
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        if data.get("format") != FORMAT:
            raise TokenizerError(f"tokenizer format must be {FORMAT!r}, got {data.get('format')!r}")
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise TokenizerError("tokenizer 'vocab' must be a list of strings")
        return cls(
            level=str(data.get("level")),
            num_words=data.get("num_words"),
            lowercase=bool(data.get("lowercase", False)),
            normalization=str(data.get("normalization", "NFC")),
            oov_token=data.get("oov_token"),
            start_text=str(data.get("start_text", "\n")),
            vocab=vocab,
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"tokenizer JSON is not valid: {exc}") from exc
        if not isinstance(data, dict):
            raise TokenizerError("tokenizer JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
