"""benchmarks/ipc_bench.py at tiny sizes: every variant carries the same tokens between two real processes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import ipc_bench
from service import ipc

HAS_MSGSPEC = importlib.util.find_spec("msgspec") is not None


def _tokens(decoded: tuple[np.ndarray, np.ndarray, np.ndarray, ipc.Ends]) -> list[tuple]:
    rids, ids, logprobs, _ = decoded
    return list(zip(rids.tolist(), ids.tolist(), logprobs.tolist(), strict=True))


def test_pool_is_step_major_with_ended_rows() -> None:
    pool = ipc_bench.make_pool(rows=5, k=3, seed=1)
    out = pool[0]
    assert len(pool) == ipc_bench.POOL
    assert out.tokens == 15
    assert out.rids[:5] == out.rids[5:10] == out.rids[10:]  # each step: every row once, in the same order
    assert all(rid in out.rids for rid, _, _ in out.ends)


def test_pipe_framing_keeps_the_numpy_frames() -> None:
    out = ipc_bench.make_pool(rows=7, k=2, seed=2)[0]
    frames = ipc_bench.encode_numpy(out)
    unpacked = ipc_bench.unpack_frames(ipc_bench.pack_frames(frames))
    assert [bytes(f) for f in unpacked] == frames
    header, arrays = ipc.decode(unpacked)  # type: ignore[arg-type]
    assert _tokens(ipc.decode_out(header, arrays)) == list(zip(out.rids, out.ids, out.logprobs, strict=True))


@pytest.mark.parametrize("variant", ipc_bench.available_variants(ipc_bench.VARIANTS)[0])
def test_every_encoding_walks_the_same_tokens(variant: str) -> None:
    out = ipc_bench.make_pool(rows=9, k=2, seed=3)[1]
    frames: list = ipc_bench.ENCODERS[variant](out)
    if variant.startswith("pipe"):
        frames = ipc_bench.unpack_frames(ipc_bench.pack_frames(frames))
    assert ipc_bench.DECODERS[variant](frames) == sum(out.ids)


def test_tiny_run_prints_a_table_and_writes_json(tmp_path, capsys) -> None:
    path = tmp_path / "ipc.json"
    assert (
        ipc_bench.main(["--rows", "3,5", "--k", "1,2", "--messages", "4", "--repeats", "2", "--json", str(path)]) == 0
    )
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    ran = ipc_bench.available_variants(ipc_bench.VARIANTS)[0]
    assert {(r["variant"], r["rows"], r["k"]) for r in report["results"]} == {
        (v, rows, k) for v in ran for rows in (3, 5) for k in (1, 2)
    }
    for row in report["results"]:
        assert row["tokens"] == row["rows"] * row["k"]
        assert row["encode_us"] > 0 and row["decode_us"] > 0
        assert row["oneway_us"] >= row["decode_us"]  # the one-way time contains the receiver's decode
        assert row["send_cpu_us_per_token"] > 0 and row["recv_cpu_us_per_token"] > 0
        if row["variant"] == ipc_bench.BASELINE:
            assert row["cpu_vs_baseline"] == pytest.approx(1.0)
    assert table.count("| zmq+numpy |") == 4
    if HAS_MSGSPEC:
        assert "| zmq+msgspec |" in table and not report["notes"]


def test_without_msgspec_its_column_is_skipped_with_a_note() -> None:
    code = (
        "import sys\n"
        "sys.modules['msgspec'] = None  # import msgspec now raises ImportError\n"
        "from benchmarks import ipc_bench\n"
        "sys.exit(ipc_bench.main(['--rows', '2', '--k', '1', '--messages', '2', '--repeats', '1']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| zmq+numpy |" in done.stdout
    assert "| zmq+msgspec |" not in done.stdout
    assert "zmq+msgspec skipped: msgspec is not installed" in done.stdout
