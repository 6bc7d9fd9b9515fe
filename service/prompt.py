"""A request's untrusted text made safe to normalise and tokenize: the Stream-Safe bound, stops, encoding.

Unicode normalisation reorders runs of combining marks, and that costs time quadratic in a run's
length (a 64 KB prompt of alternating marks takes about half a second to NFC-normalise). So a
prompt or stop sequence with more than ``MAX_NONSTARTERS`` combining marks in a row is refused,
as the Stream-Safe Text Format of Unicode UAX #15 bounds them, and normalisation then costs time
linear in the text. The check is one regular-expression scan (C speed).

Status messages quote a client's strings through ``echo``, cut to ``MAX_ECHO_CHARS``.

Encoding runs on the event loop only for prompts of at most ``INLINE_ENCODE_CHARS`` characters
(a bounded cost); longer prompts are encoded in a worker thread, so no event loop spends time
that grows with a client's input.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sys
import unicodedata
from collections.abc import Sequence

from training.tokenizer import Tokenizer

MAX_NONSTARTERS = 30  # UAX #15, Stream-Safe Text Format
INLINE_ENCODE_CHARS = 1024
# A status message quotes at most this many characters of a client's string: gRPC carries the
# message in a trailer, and a client's metadata limit (8 KiB by default) must never be passed.
MAX_ECHO_CHARS = 64


class UnsafeTextError(ValueError):
    """A field holds text that is not Stream-Safe; the message names the field, the run and the limit."""


@functools.cache
def _long_nonstarter_run() -> re.Pattern[str]:
    """More than MAX_NONSTARTERS characters of nonzero canonical combining class in a row."""
    ranges: list[list[int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.combining(chr(cp)):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    members = "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges)
    return re.compile(f"[{members}]{{{MAX_NONSTARTERS + 1},}}")


def prepare() -> None:
    """Build the check's tables now (about 0.2 s), so that no request waits for them."""
    _long_nonstarter_run()


def check_stream_safe(field: str, text: str) -> None:
    """Raise ``UnsafeTextError`` when ``text`` has more than MAX_NONSTARTERS combining marks in a row."""
    if text.isascii():
        return
    run = _long_nonstarter_run().search(text)
    if run is not None:
        raise UnsafeTextError(
            f"{field} must be Stream-Safe text (Unicode UAX #15): at most {MAX_NONSTARTERS} combining marks "
            f"in a row, got {run.end() - run.start()} from character {run.start()}"
        )


def encode_checked(tokenizer: Tokenizer, prompt: str) -> list[int]:
    check_stream_safe("prompt", prompt)
    return tokenizer.encode(prompt) if prompt else []


async def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids (empty for an empty prompt), computed off the event loop when it is long."""
    if len(prompt) <= INLINE_ENCODE_CHARS:
        return encode_checked(tokenizer, prompt)
    return await asyncio.get_running_loop().run_in_executor(None, encode_checked, tokenizer, prompt)


def echo(text: str) -> str:
    """A client's string as an error message quotes it: ``repr``, cut to MAX_ECHO_CHARS characters."""
    if len(text) <= MAX_ECHO_CHARS:
        return repr(text)
    return f"{text[:MAX_ECHO_CHARS]!r}... ({len(text)} characters)"


def normalize_stops(tokenizer: Tokenizer, stops: Sequence[str]) -> tuple[str, ...]:
    """Stop sequences normalised as the model's text is (its tokenizer's rules), so ``e`` + U+0301 matches é."""
    for i, stop in enumerate(stops):
        check_stream_safe(f"stop[{i}]", stop)
    return tuple(tokenizer.normalize(stop) for stop in stops)
