"""The engine's ``out`` message between two processes: the server's encoding and transport against alternatives.

Run: ``python -m benchmarks.ipc_bench [--json PATH]``. The harness's own process is the sender
(the engine process's side); one child process is the receiver (a frontend's side). For every
batch size (``--rows``) and tokens per row (``--k``) the sender starts from what
``RemoteOutbox.flush`` holds after one model call (three Python lists: request id, token id,
logprob, step-major as the engine pushes them, plus a few ended rows) and each variant carries it
to the receiver, which decodes it and walks every token as ``EngineClient._output`` does:

* ``zmq+numpy`` (the server's path): ``np.array`` of each list, ``service.ipc.encode_out``, a
  ZeroMQ ROUTER (``ROUTER_MANDATORY``, as the engine host's) to a DEALER over ``ipc://``;
  ``recv_multipart``, ``service.ipc.decode`` + ``decode_out``, ``.tolist()`` and ``zip``;
* ``zmq+msgspec``: the same sockets, one msgpack frame encoded from the lists by msgspec and
  decoded into a typed ``msgspec.Struct`` (already lists: no ``.tolist()``); skipped with a note
  when msgspec is missing (it is in the ``bench`` extra);
* ``zmq+json``: the same sockets, one JSON frame of the lists (the stdlib ``json``);
* ``pipe+numpy``: the server's NumPy frames joined behind a frame-length prefix, sent with
  ``multiprocessing`` ``Connection.send_bytes`` over a Unix pipe, split back as memoryviews.

Each repeat runs every variant and size in turn (so outside load hits all alike) twice:

* *latency*: lock-step, the receiver acks each message with an empty one. *encode* is the
  sender's time to turn the lists into frames; *decode+iter* the receiver's time from the
  received frames to the end of the token loop; *one-way* from before the encode to the end of
  the receiver's token loop, both read from ``CLOCK_MONOTONIC`` (one clock for every process);
  *RTT* from before the encode to the ack's arrival;
* *CPU*: the sender sends ``--messages`` messages back to back (flow control is the socket's
  high-water mark or the pipe's buffer), the receiver acks only the last. ``time.process_time``
  of each process (every thread, ZeroMQ's I/O thread included) over the burst, per token.

Figures are medians over ``--repeats`` (each repeat's value is the median over its messages);
ratios are against ``zmq+numpy`` of the same run. The ZeroMQ ``inproc://`` hop inside the engine
process (engine thread to main thread) and the frontend's asyncio socket are not included: they
are the same for every encoding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import zmq

from service import ipc

try:
    import msgspec
except ImportError:  # the bench extra is not installed: that column is skipped
    msgspec = None  # type: ignore[assignment]

VARIANTS = ("zmq+numpy", "zmq+msgspec", "zmq+json", "pipe+numpy")
BASELINE = "zmq+numpy"
ROUTING_ID = b"fe-0-0"
TIMEOUT_MS = 30_000  # a receive that waits longer means the other side is gone
POOL = 8  # distinct messages per size, sent in turn
FIRST_RID = 500_000  # a server that has run a while: request ids take a few bytes


@dataclass(frozen=True)
class IpcBenchConfig:
    """What the benchmark measures and how often."""

    rows: tuple[int, ...] = (64, 256, 1000)
    k: tuple[int, ...] = (1, 8)
    messages: int = 200  # per variant, size, repeat and mode
    repeats: int = 5
    variants: tuple[str, ...] = VARIANTS
    seed: int = 1234


@dataclass(frozen=True)
class OutLists:
    """One call's output for one frontend as ``RemoteOutbox.flush`` holds it: Python lists."""

    rids: list[int]
    ids: list[int]
    logprobs: list[float]
    ends: ipc.Ends

    @property
    def tokens(self) -> int:
        return len(self.ids)


def make_pool(rows: int, k: int, seed: int) -> list[OutLists]:
    """``POOL`` messages of ``rows`` rows × ``k`` tokens, step-major (every row's 1st token, then every 2nd, ...)."""
    rng = np.random.default_rng(seed + rows * 16 + k)
    pool = []
    for _ in range(POOL):
        row_rids = list(range(FIRST_RID, FIRST_RID + rows))
        ids = rng.integers(0, 96, rows * k).astype(np.int32)
        logprobs = np.log(rng.uniform(0.01, 1.0, rows * k)).astype(np.float32)
        ended = random.Random(int(rng.integers(1 << 30))).sample(row_rids, max(1, rows // 64))
        pool.append(OutLists(row_rids * k, ids.tolist(), logprobs.tolist(), [(r, "length", None) for r in ended]))
    return pool


# ------------------------------------------------------------------ encodings
if msgspec is not None:

    class OutMessage(msgspec.Struct, array_like=True):
        """The ``out`` message as one msgpack array."""

        ends: list[tuple[int, str, str | None]]
        rids: list[int]
        ids: list[int]
        logprobs: list[float]

    _msgpack_encoder = msgspec.msgpack.Encoder()
    _msgpack_decoder = msgspec.msgpack.Decoder(OutMessage)


def encode_numpy(out: OutLists) -> list[bytes]:
    """What ``RemoteOutbox.flush`` does: arrays of the lists, then ``ipc.encode_out``."""
    return ipc.encode_out(
        np.array(out.rids, np.int64), np.array(out.ids, np.int32), np.array(out.logprobs, np.float32), out.ends
    )


def encode_msgspec(out: OutLists) -> list[bytes]:
    return [_msgpack_encoder.encode(OutMessage(out.ends, out.rids, out.ids, out.logprobs))]


def encode_json(out: OutLists) -> list[bytes]:
    message = {"t": "out", "ends": out.ends, "rids": out.rids, "ids": out.ids, "logprobs": out.logprobs}
    return [json.dumps(message, separators=(",", ":")).encode()]


def _walk(rids: list[int], ids: list[int], logprobs: list[float]) -> int:
    """The frontend's token loop without its per-token work (detokenizing, stops, metrics)."""
    total = 0
    for _rid, token_id, _logprob in zip(rids, ids, logprobs, strict=True):
        total += token_id
    return total


def decode_numpy(frames: Sequence[bytes | memoryview]) -> int:
    """What ``EngineClient._read`` and ``_output`` do with an ``out`` message, up to the token loop."""
    header, arrays = ipc.decode(list(frames))  # type: ignore[arg-type]  # np.frombuffer takes memoryviews too
    rids, ids, logprobs, _ends = ipc.decode_out(header, arrays)
    return _walk(rids.tolist(), ids.tolist(), logprobs.tolist())


def decode_msgspec(frames: Sequence[bytes | memoryview]) -> int:
    message = _msgpack_decoder.decode(frames[0])
    return _walk(message.rids, message.ids, message.logprobs)


def decode_json(frames: Sequence[bytes | memoryview]) -> int:
    message = json.loads(frames[0])
    if not isinstance(message, dict) or message.get("t") != "out":
        raise ValueError("not an out message")
    return _walk(message["rids"], message["ids"], message["logprobs"])


ENCODERS: dict[str, Callable[[OutLists], list[bytes]]] = {
    "zmq+numpy": encode_numpy,
    "zmq+msgspec": encode_msgspec,
    "zmq+json": encode_json,
    "pipe+numpy": encode_numpy,
}
DECODERS: dict[str, Callable[[Sequence[bytes | memoryview]], int]] = {
    "zmq+numpy": decode_numpy,
    "zmq+msgspec": decode_msgspec,
    "zmq+json": decode_json,
    "pipe+numpy": decode_numpy,
}


def pack_frames(frames: list[bytes]) -> bytes:
    """Frames as one pipe message: their count and lengths (uint32), then the frames."""
    return b"".join([struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)), *frames])


def unpack_frames(data: bytes) -> list[bytes | memoryview]:
    """The frames of ``pack_frames``: the header as bytes (``json.loads`` wants them), the arrays as memoryviews."""
    view = memoryview(data)
    (count,) = struct.unpack_from("<I", data)
    lengths = struct.unpack_from(f"<{count}I", data, 4)
    frames: list[bytes | memoryview] = []
    at = 4 + 4 * count
    for n in lengths:
        frames.append(view[at : at + n] if frames else bytes(view[at : at + n]))
        at += n
    return frames


def available_variants(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(variants that can run, notes about those that cannot)``."""
    notes: list[str] = []
    run = []
    for variant in wanted:
        if variant == "zmq+msgspec" and msgspec is None:
            notes.append("zmq+msgspec skipped: msgspec is not installed (pip install -e '.[bench]')")
        else:
            run.append(variant)
    return run, notes


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# ------------------------------------------------------------------ the receiver (child process)
def receiver_main(endpoint: str, control: Connection, data: Connection) -> None:
    """The frontend's side: connect, then run each burst the harness announces on ``control``."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, ROUTING_ID)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    dealer.connect(endpoint)
    dealer.send(b"hello")
    try:
        while True:
            command = json.loads(control.recv_bytes())
            if command["cmd"] == "stop":
                return
            control.send_bytes(json.dumps(_receive_burst(command, dealer, control, data)).encode())
    finally:
        dealer.close(0)
        context.term()


def _receive_burst(
    command: dict[str, Any], dealer: zmq.Socket, control: Connection, data: Connection
) -> dict[str, Any]:
    variant, n, lockstep = command["variant"], command["messages"], command["mode"] == "latency"
    decode = DECODERS[variant]
    if variant.startswith("pipe"):

        def receive() -> Sequence[bytes | memoryview]:
            if not data.poll(TIMEOUT_MS / 1000):
                raise TimeoutError("the sender sent nothing")
            return unpack_frames(data.recv_bytes())

        def ack() -> None:
            data.send_bytes(b"")
    else:

        def receive() -> Sequence[bytes | memoryview]:
            return dealer.recv_multipart()

        def ack() -> None:
            dealer.send(b"")

    decode_ns, done_ns = [], []
    checksum = 0
    cpu0 = time.process_time()
    control.send_bytes(b"ready")
    for i in range(n):
        frames = receive()
        t0 = _now_ns()
        checksum += decode(frames)
        t1 = _now_ns()
        decode_ns.append(t1 - t0)
        done_ns.append(t1)
        if lockstep or i == n - 1:
            ack()
    cpu = time.process_time() - cpu0
    return {"decode_ns": decode_ns, "done_ns": done_ns, "cpu_s": cpu, "checksum": checksum}


# ------------------------------------------------------------------ the sender (the harness's process)
class Sender:
    """The engine's side: the ROUTER, the data pipe, and the receiver process."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="textgen-ipc-")
        endpoint = ipc.engine_endpoint(self._dir)
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        self._router.bind(endpoint)
        spawn = multiprocessing.get_context("spawn")
        self._control, control = spawn.Pipe()
        self._data, data = spawn.Pipe()
        self._process = spawn.Process(target=receiver_main, args=(endpoint, control, data), daemon=True)
        self._process.start()
        control.close()
        data.close()
        name, hello = self._router.recv_multipart()  # the DEALER is connected and known by its id
        if (name, hello) != (ROUTING_ID, b"hello"):
            raise RuntimeError(f"unexpected first message {name!r} {hello!r}")

    def close(self) -> None:
        try:
            self._control.send_bytes(json.dumps({"cmd": "stop"}).encode())
        except OSError:
            pass
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._router.close(0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _control_recv(self) -> bytes:
        if not self._control.poll(TIMEOUT_MS / 1000):
            raise TimeoutError("the receiver process does not answer")
        return self._control.recv_bytes()

    def burst(self, variant: str, pool: list[OutLists], messages: int, mode: str) -> dict[str, Any]:
        """Send ``messages`` messages of ``pool`` in turn; the receiver's and the sender's timings."""
        encode = ENCODERS[variant]
        lockstep = mode == "latency"
        if variant.startswith("pipe"):
            data = self._data

            def send(frames: list[bytes]) -> None:
                data.send_bytes(pack_frames(frames))

            def wait_ack() -> None:
                if not data.poll(TIMEOUT_MS / 1000):
                    raise TimeoutError("the receiver sent no ack")
                data.recv_bytes()
        else:
            router = self._router

            def send(frames: list[bytes]) -> None:
                router.send_multipart([ROUTING_ID, *frames])

            def wait_ack() -> None:
                router.recv_multipart()

        self._control.send_bytes(
            json.dumps({"cmd": "burst", "variant": variant, "messages": messages, "mode": mode}).encode()
        )
        if self._control_recv() != b"ready":
            raise RuntimeError("the receiver is not ready")
        start_ns, encode_ns, rtt_ns = [], [], []
        size = 0
        cpu0 = time.process_time()
        for i in range(messages):
            out = pool[i % len(pool)]
            t0 = _now_ns()
            frames = encode(out)
            t1 = _now_ns()
            send(frames)
            if lockstep:
                wait_ack()
                rtt_ns.append(_now_ns() - t0)
            start_ns.append(t0)
            encode_ns.append(t1 - t0)
            size += sum(map(len, frames))
        if not lockstep:
            wait_ack()
        cpu = time.process_time() - cpu0
        received = json.loads(self._control_recv())
        expected = sum(sum(pool[i % len(pool)].ids) for i in range(messages))
        if received["checksum"] != expected:
            raise RuntimeError(f"{variant}: the receiver's tokens differ from those sent")
        tokens = sum(pool[i % len(pool)].tokens for i in range(messages))
        result: dict[str, Any] = {"bytes": size / messages}
        if lockstep:
            oneway = [done - start for done, start in zip(received["done_ns"], start_ns, strict=True)]
            result.update(
                encode_us=statistics.median(encode_ns) / 1e3,
                decode_us=statistics.median(received["decode_ns"]) / 1e3,
                oneway_us=statistics.median(oneway) / 1e3,
                rtt_us=statistics.median(rtt_ns) / 1e3,
            )
        else:
            result.update(
                send_cpu_us_per_token=cpu / tokens * 1e6, recv_cpu_us_per_token=received["cpu_s"] / tokens * 1e6
            )
        return result


# ------------------------------------------------------------------ the run
FIELDS = ("bytes", "encode_us", "decode_us", "oneway_us", "rtt_us", "send_cpu_us_per_token", "recv_cpu_us_per_token")


def run(config: IpcBenchConfig) -> dict[str, Any]:
    """Every variant at every size, ``repeats`` times round-robin; medians and ratios against ``zmq+numpy``."""
    variants, notes = available_variants(config.variants)
    sizes = [(rows, k) for rows in config.rows for k in config.k]
    pools = {size: make_pool(*size, config.seed) for size in sizes}
    samples: dict[tuple[str, int, int], list[dict[str, Any]]] = {(v, *s): [] for v in variants for s in sizes}
    with Sender() as sender:
        for variant in variants:  # warm-up: imports, first allocations, socket buffers
            for size in sizes:
                sender.burst(variant, pools[size], min(20, config.messages), "latency")
        for _ in range(config.repeats):
            for size in sizes:
                for variant in variants:
                    one = sender.burst(variant, pools[size], config.messages, "latency")
                    one.update(sender.burst(variant, pools[size], config.messages, "cpu"))
                    samples[(variant, *size)].append(one)
    results = []
    for (variant, rows, k), repeats in samples.items():
        row: dict[str, Any] = {"variant": variant, "rows": rows, "k": k, "tokens": rows * k}
        for name in FIELDS:
            row[name] = statistics.median(r[name] for r in repeats)
        row["cpu_us_per_token"] = row["send_cpu_us_per_token"] + row["recv_cpu_us_per_token"]
        results.append(row)
    base = {(r["rows"], r["k"]): r for r in results if r["variant"] == BASELINE}
    for row in results:
        ref = base.get((row["rows"], row["k"]))
        if ref is not None:
            row["oneway_vs_baseline"] = row["oneway_us"] / ref["oneway_us"]
            row["cpu_vs_baseline"] = row["cpu_us_per_token"] / ref["cpu_us_per_token"]
    results.sort(key=lambda r: (r["rows"], r["k"], variants.index(r["variant"])))
    return {
        "config": asdict(config),
        "notes": notes,
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "python": sys.version.split()[0]},
        "versions": {
            "numpy": np.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "msgspec": None if msgspec is None else msgspec.__version__,
        },
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table, then the notes."""
    lines = [
        "| variant | rows | K | bytes/msg | encode µs | decode+iter µs | one-way µs | RTT µs "
        "| send CPU µs/tok | recv CPU µs/tok | one-way vs (a) | CPU vs (a) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ratios = f"{r['oneway_vs_baseline']:.2f}x | {r['cpu_vs_baseline']:.2f}x" if "cpu_vs_baseline" in r else "- | -"
        lines.append(
            f"| {r['variant']} | {r['rows']} | {r['k']} | {r['bytes']:,.0f} | {r['encode_us']:.1f} "
            f"| {r['decode_us']:.1f} | {r['oneway_us']:.1f} | {r['rtt_us']:.1f} | {r['send_cpu_us_per_token']:.3f} "
            f"| {r['recv_cpu_us_per_token']:.3f} | {ratios} |"
        )
    lines += [f"\n{note}" for note in report["notes"]]
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _variants(text: str) -> tuple[str, ...]:
    values = tuple(text.split(","))
    unknown = [v for v in values if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if BASELINE not in values:
        values = (BASELINE, *values)  # the ratios need it
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ipc_bench", description=__doc__.splitlines()[0])
    defaults = IpcBenchConfig()
    parser.add_argument("--rows", type=_ints, default=defaults.rows, help="rows per message (default 64,256,1000)")
    parser.add_argument("--k", type=_ints, default=defaults.k, help="tokens per row per message (default 1,8)")
    parser.add_argument("--messages", type=int, default=defaults.messages, help="messages per burst (default 200)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="repeats (default 5)")
    parser.add_argument("--variants", type=_variants, default=defaults.variants, help=", ".join(VARIANTS))
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeats < 1:
        parser.error("--messages and --repeats must be at least 1")
    config = IpcBenchConfig(args.rows, args.k, args.messages, args.repeats, args.variants)
    report = run(config)
    print(format_table(report))
    load = report["machine"]["load_average"]
    print(f"\n{report['machine']['cpus']} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
