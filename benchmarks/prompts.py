"""The benchmark's text (CPython's embedded pydoc topics) and prompts cut from it; free of TensorFlow."""

from __future__ import annotations


def bench_corpus(chars: int) -> str:
    """The first ``chars`` characters of the embedded corpus (the same text training uses by default)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def prompt(index: int, chars: int, corpus: str) -> str:
    """A ``chars``-long slice of ``corpus`` that differs with ``index`` (so prompts are not all equal)."""
    if chars <= 0:
        return ""
    span = max(1, len(corpus) - chars)
    start = (index * 7919) % span
    text = corpus[start : start + chars]
    return text if len(text) == chars else (text * (chars // max(1, len(text)) + 1))[:chars]
