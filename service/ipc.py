"""The wire between the engine process and the frontend processes: endpoints, messages, their encoding.

Transport: ZeroMQ over Unix sockets (``ipc://``). The engine binds one ROUTER socket; each
frontend connects one DEALER whose routing id is its name (``fe-<index>-<generation>``), and the
supervisor connects one to report dead frontends. Every message is a list of frames: a small JSON
header, then NumPy arrays as raw bytes (no pickle, no per-token objects).

Messages, each batched (never one per token):

* frontend -> engine ``req``: the requests this frontend opened since its last message (model,
  sampling fields, time left to the deadline; the prompts' ids concatenated in one int32 frame)
  and the request ids it cancels (client gone, a stop sequence matched).
* engine -> frontend ``out``: once per model call, the new tokens of every row of that frontend as
  three arrays (request id int64, token id int32, logprob float32; a row's tokens in order) and the
  requests that ended (id, finish reason, error).
* engine -> frontend ``models``: which versions serve (name, version, folder, vocabulary size)
  and whether the engine is ready; sent on a frontend's ``hello`` and on every change.
* supervisor -> engine ``gone``: a frontend died; the engine ends its rows. ``stop``: the
  frontends have drained, the engine process exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

ENGINE_SOCKET = "engine.sock"
SUPERVISOR_ID = b"supervisor"


def engine_endpoint(run_dir: str) -> str:
    """The engine's ROUTER address inside the server's private run folder."""
    return "ipc://" + os.path.join(run_dir, ENGINE_SOCKET)


def frontend_id(index: int, generation: int) -> bytes:
    """A frontend's routing id: a restarted frontend gets a new one, so late output for the old never reaches it."""
    return f"fe-{index}-{generation}".encode()


def _header(kind: str, **fields: Any) -> bytes:
    return json.dumps({"t": kind, **fields}, separators=(",", ":")).encode()


def decode(frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """``(header, array frames)`` of one message."""
    header = json.loads(frames[0])
    if not isinstance(header, dict) or "t" not in header:
        raise ValueError("a textgen message starts with a JSON object that has a 't' field")
    return header, frames[1:]


@dataclass(frozen=True)
class Submit:
    """One request a frontend opens: what the engine needs to run it (stop sequences stay in the frontend)."""

    rid: int
    model: str
    version: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    logprobs: bool
    deadline_in: float | None  # seconds left when sent; None: no deadline
    prompt: np.ndarray  # int32 ids


def encode_requests(submits: list[Submit], cancels: list[int], acks: int = 0) -> list[bytes]:
    """A frontend's requests and cancels of one loop turn, and how many ``out`` messages it handled since."""
    rows = [
        [s.rid, s.model, s.version, s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, int(s.logprobs),
         s.deadline_in, len(s.prompt)]
        for s in submits
    ]  # fmt: skip
    prompts = np.concatenate([s.prompt for s in submits]).astype(np.int32) if submits else np.zeros(0, np.int32)
    return [_header("req", reqs=rows, cancel=cancels, ack=acks), prompts.tobytes()]


def decode_requests(header: dict[str, Any], frames: list[bytes]) -> tuple[list[Submit], list[int], int]:
    prompts = np.frombuffer(frames[0], np.int32) if frames else np.zeros(0, np.int32)
    submits = []
    at = 0
    for rid, model, version, max_tokens, temperature, top_k, top_p, seed, logprobs, deadline_in, n in header["reqs"]:
        submits.append(
            Submit(
                int(rid), str(model), int(version), int(max_tokens), float(temperature), int(top_k), float(top_p),
                None if seed is None else int(seed), bool(logprobs),
                None if deadline_in is None else float(deadline_in), prompts[at : at + n],
            )
        )  # fmt: skip
        at += n
    return submits, [int(r) for r in header.get("cancel", ())], int(header.get("ack", 0))


Ends = list[tuple[int, str, str | None]]  # (request id, finish reason, error)


def encode_out(
    rids: np.ndarray,
    ids: np.ndarray,
    logprobs: np.ndarray,
    ends: Ends,
) -> list[bytes]:
    """One call's output for one frontend."""
    return [
        _header("out", ends=ends),
        rids.astype(np.int64, copy=False).tobytes(),
        ids.astype(np.int32, copy=False).tobytes(),
        logprobs.astype(np.float32, copy=False).tobytes(),
    ]


def decode_out(header: dict[str, Any], frames: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, Ends]:
    rids = np.frombuffer(frames[0], np.int64)
    ids = np.frombuffer(frames[1], np.int32)
    logprobs = np.frombuffer(frames[2], np.float32)
    ends = [(int(r), str(reason), error) for r, reason, error in header["ends"]]
    return rids, ids, logprobs, ends


def encode_models(ready: bool, why: str, versions: list[dict[str, Any]]) -> list[bytes]:
    return [_header("models", ready=ready, why=why, versions=versions)]


def encode_hello() -> list[bytes]:
    return [_header("hello")]


def encode_gone(frontend: bytes) -> list[bytes]:
    return [_header("gone", frontend=frontend.decode())]


def encode_stop() -> list[bytes]:
    return [_header("stop")]
