"""Load the training text: corpus files and folders, or the embedded default corpus.

``load_corpus`` reads every given path (a file, or a folder whose ``.txt`` files
are read in sorted order), joins the parts with a blank line and returns the text
with its sha256, so an exported model can name exactly what it was trained on.
With no path it uses the documentation every CPython ships
(``pydoc_data.topics``), so ``textgen train`` works on a fresh machine offline.
Every problem a user can cause raises ``CorpusError`` naming the path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

EMBEDDED_NAME = "pydoc_data.topics"
PART_SEPARATOR = "\n\n"


class CorpusError(ValueError):
    """A corpus that cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class Corpus:
    """The training text and where it came from."""

    text: str
    sources: tuple[str, ...]
    sha256: str

    @property
    def chars(self) -> int:
        return len(self.text)

    def describe(self) -> dict[str, object]:
        return {"sources": list(self.sources), "sha256": self.sha256, "chars": self.chars}


def embedded_text() -> str:
    """The embedded corpus: ``pydoc_data.topics`` joined in sorted key order."""
    from pydoc_data.topics import topics

    return PART_SEPARATOR.join(topics[key] for key in sorted(topics))


def _files_of(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found: list[str] = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found.extend(os.path.join(root, name) for name in sorted(files) if name.endswith(".txt"))
        if not found:
            raise CorpusError(f"--corpus {path}: the folder holds no .txt files")
        return found
    raise CorpusError(f"--corpus {path}: no such file or folder")


def _read_utf8(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CorpusError(f"--corpus {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"--corpus {path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            "cannot be decoded (convert the file to UTF-8)"
        ) from exc
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def load_corpus(paths: Sequence[str] = ()) -> Corpus:
    """Read ``paths`` (files or folders of .txt files); no paths means the embedded corpus."""
    if not paths:
        text = embedded_text()
        sources: tuple[str, ...] = (EMBEDDED_NAME,)
    else:
        files: list[str] = []
        for path in paths:
            files.extend(_files_of(path))
        parts = [_read_utf8(f) for f in files]
        text = PART_SEPARATOR.join(p for p in parts if p.strip())
        sources = tuple(files)
    if not text.strip():
        named = ", ".join(sources)
        raise CorpusError(f"--corpus {named}: the corpus is empty (no text to train on)")
    return Corpus(text=text, sources=sources, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
