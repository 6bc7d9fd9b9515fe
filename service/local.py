"""``textgen generate --model DIR "prompt"``: the server's decoder without the network.

``DIR`` is a version folder (``models/textgen/3``) or a model folder, whose newest version is used.
Everything a server does with the request ``textgen generate --target`` would send happens here,
in this process, with the server's own code and defaults:

* the flags (``service.client.build_parser``, one definition for both) become that request
  (``build_request``), checked by ``validate_request`` against ``ServerConfig()``'s limits;
* the version is loaded as the server loads it (``load_model``: the contract check, the decode
  functions of ``service/decoder.py``, XLA-compiled as the server's are, their warm-up);
* the prompt and stop sequences go through ``service/prompt.py``;
* one in-process ``Engine`` built from ``ServerConfig().engine`` (K steps per call, the call
  budget) runs it, and each ``Chunk``'s text is written to stdout as it arrives.

So the same version, prompt, seed and flags print the same text as ``--target`` from a server
serving that version: the prompt first, then the text, then a newline; a summary line goes to
stderr unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import sys
import time
from typing import TextIO

from service.client import (
    SERVER_ONLY_FLAGS,
    FlagError,
    build_parser,
    build_request,
    parse_args,
    request_params,
    summary_line,
)
from service.config import ServerConfig, XlaShapes
from service.decoder import configure_devices
from service.engine import Engine
from service.model_repository import LoadedModel, load_model
from service.prompt import UnsafeTextError, encode_checked, normalize_stops
from service.sampling import SamplingParams
from service.servicer import RequestError, validate_request
from service.stream import Chunk, FinishReason
from training.check import failure_reason
from training.contract import SAVED_MODEL_FILE, is_version_name, list_versions
from training.tf_runtime import quiet_start, set_log_levels

# The flag each request field comes from, for validate_request's messages (they name the field).
_FIELD_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}
_STOP_SECONDS = 10.0


def resolve_version(path: str) -> str:
    """The version folder ``--model path`` means: ``path`` itself, or the newest version inside a model folder."""
    if not os.path.isdir(path):
        raise FlagError(f"--model {path}: no such folder")
    if os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
        return path
    versions = list_versions(path)
    if not versions:
        raise FlagError(
            f"--model {path}: neither a version folder ({SAVED_MODEL_FILE}) "
            "nor a model folder holding numbered versions"
        )
    return os.path.join(path, str(versions[-1]))


def model_key(version_path: str) -> tuple[str, int]:
    """The (name, version) the server would serve ``version_path`` as: its model folder's name and its number."""
    folder = os.path.abspath(version_path)
    base = os.path.basename(folder)
    return os.path.basename(os.path.dirname(folder)) or base, int(base) if is_version_name(base) else 0


def name_the_flag(message: str) -> str:
    """A ``validate_request`` message with the request field it starts with replaced by its flag."""
    field = re.match(r"[a-z_]+", message)
    if field is None:
        return message
    if field.group(0) == "stop":
        return f"--stop: {message}"
    flag = _FIELD_FLAGS.get(field.group(0))
    return message if flag is None else flag + message[field.end() :]


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags checked as a server checks the request ``--target`` sends; ``FlagError`` names the flag."""
    parser = build_parser()
    given = [flag for dest, flag in SERVER_ONLY_FLAGS.items() if getattr(args, dest) != parser.get_default(dest)]
    if given:
        raise FlagError(f"{given[0]} is for a server (--target HOST:PORT); --model DIR runs without one")
    request = build_request(args.prompt, **request_params(args))
    try:
        return validate_request(request, ServerConfig().limits)
    except RequestError as exc:
        raise FlagError(name_the_flag(exc.message)) from None


async def stream_text(
    engine: Engine, model: LoadedModel, prompt_ids: list[int], params: SamplingParams, out: TextIO
) -> Chunk:
    """Submit one request and write each chunk's text to ``out`` as it arrives; returns the final chunk."""
    stream = engine.submit(model, prompt_ids, params, asyncio.get_running_loop())
    last: Chunk | None = None
    try:
        async for chunk in stream:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
            last = chunk
    finally:
        stream.cancel()  # a no-op once it finished; Ctrl-C takes the row out of the batch
    assert last is not None  # a stream always ends with a chunk that carries its finish reason
    return last


def _one_row_xla(config: ServerConfig) -> XlaShapes | None:
    """The server's XLA setting for a batch that never has more than one row (one compiled size)."""
    return None if config.xla_shapes is None else XlaShapes.for_server(1, config.max_steps_per_call)


def generate(model: LoadedModel, prompt: str, params: SamplingParams, out: TextIO) -> Chunk:
    """Run ``prompt`` through an engine with the server's configuration; the prompt and text go to ``out``.

    Raises ``UnsafeTextError`` for a prompt or stop sequence the server refuses too.
    """
    params = dataclasses.replace(params, stop=normalize_stops(model.tokenizer, params.stop))
    prompt_ids = encode_checked(model.tokenizer, prompt)
    engine = Engine(ServerConfig().engine)
    engine.start()
    try:
        out.write(prompt)
        out.flush()
        return asyncio.run(stream_text(engine, model, prompt_ids, params, out))
    finally:
        engine.stop(_STOP_SECONDS)


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``textgen generate --model DIR "prompt"``: exit 0, 2 for a bad flag or DIR, 1 when generation fails."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    set_log_levels(args.log_level)
    try:
        if args.target is not None:
            raise FlagError("--target HOST:PORT is service.client's; this command runs --model DIR without a server")
        if not args.model:
            raise FlagError("--model DIR is required: a version folder, or a model folder (its newest version)")
        params = sampling_params(args)
        path = resolve_version(args.model)
    except FlagError as exc:
        print(f"textgen generate: error: {exc}", file=err)
        return 2
    configure_devices()
    name, version = model_key(path)
    try:
        model = load_model(name, version, path, xla=_one_row_xla(ServerConfig()))
    except Exception as exc:  # ContractError, or whatever TensorFlow raises for an unreadable SavedModel
        why = failure_reason(exc)
        print(f"textgen generate: error: --model {args.model}: version {path} cannot be served: {why}", file=err)
        return 2
    started = time.monotonic()
    try:
        last = generate(model, args.prompt, params, out)
    except UnsafeTextError as exc:
        print(f"textgen generate: error: {name_the_flag(str(exc))}", file=err)
        return 2
    except KeyboardInterrupt:
        out.write("\n")
        print("textgen generate: interrupted", file=err)
        return 130
    out.write("\n")
    out.flush()
    reason = last.finish_reason
    if reason not in (FinishReason.LENGTH, FinishReason.STOP):
        print(f"textgen generate: error: {reason.value if reason else '?'}: {last.error or 'no detail'}", file=err)
        return 1
    if not args.quiet:
        ttft = last.time_to_first_token or 0.0
        total = time.monotonic() - started
        print(
            summary_line(name, version, reason.value, last.prompt_tokens, last.completion_tokens, ttft, total), file=err
        )
    return 0


if __name__ == "__main__":
    quiet_start(sys.argv[1:])
    sys.exit(main())
