"""Two worker processes on 127.0.0.1, started with TF_CONFIG, train one model; only the chief exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_ports
from training.cli import main as train_main
from training.corpus import embedded_text
from training.distribute import ClusterSpec, parse_tf_config


def _worker_env(workers: list[str], index: int) -> dict[str, str]:
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
    return env


def _run_two_workers(
    tmp_path: Path, corpus: Path, epochs: int | None, *extra: str
) -> list[subprocess.CompletedProcess]:
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    per_epoch = ["--max-steps-per-epoch", "3", "--epochs", str(epochs)] if epochs is not None else []
    argv = [
        sys.executable, "-m", "training", "--corpus", str(corpus), "--out", "models/m", "--checkpoint-dir", "ck",
        "--log-dir", "logs", "--units", "16", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8",
        *per_epoch, "--sample-tokens", "4", *extra,
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            argv, cwd=tmp_path, env=_worker_env(workers, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _epoch_lines(stderr: str) -> list[str]:
    return [line.split(" (")[0] for line in stderr.splitlines() if line.startswith("textgen train: epoch ")]


@pytest.mark.timeout(900)  # real training runs; generous for a loaded 2-core machine
def test_two_workers_train_in_sync_and_exactly_one_version_is_exported(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(embedded_text()[:15_000], encoding="utf-8")
    chief, worker = _run_two_workers(tmp_path, corpus, epochs=2)
    assert chief.returncode == 0, chief.stderr[-3000:]
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert "strategy MultiWorkerMirroredStrategy, 2 replica(s)" in chief.stderr
    assert "(chief)" in chief.stderr and "the chief exports" in worker.stderr
    # Both workers saw the same all-reduced losses every epoch: they trained one model together.
    assert len(_epoch_lines(chief.stderr)) == 2
    assert _epoch_lines(chief.stderr) == _epoch_lines(worker.stderr)
    assert os.listdir(tmp_path / "models" / "m") == ["1"]
    info = json.loads((tmp_path / "models" / "m" / "1" / "assets" / "model.json").read_text())
    assert info["distribution"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert info["distribution"]["num_workers"] == 2 and info["epochs_completed"] == 2

    # Checkpoints and resume work under the strategy: asking for one more epoch trains only that one.
    chief, worker = _run_two_workers(tmp_path, corpus, 3, "--resume")
    assert chief.returncode == 0 and worker.returncode == 0, chief.stderr[-3000:] + worker.stderr[-3000:]
    assert "resuming after epoch 2 of 3" in chief.stderr and "resuming after epoch 2 of 3" in worker.stderr
    assert [line.split()[3] for line in _epoch_lines(chief.stderr)] == ["3/3:"]
    assert sorted(os.listdir(tmp_path / "models" / "m")) == ["1", "2"]


@pytest.mark.timeout(300)
def test_a_budgeted_run_across_workers_is_refused_naming_the_flag(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(embedded_text()[:15_000], encoding="utf-8")
    for run in _run_two_workers(tmp_path, corpus, None, "--time-budget", "30s", "--validation-fraction", "0.1"):
        assert run.returncode == 2, run.stderr[-3000:]
        assert "--time-budget trains on one replica, but the strategy has 2" in run.stderr
    assert not (tmp_path / "models").exists()


def test_tf_config_parsing() -> None:
    assert parse_tf_config({}) == ClusterSpec()
    two = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    spec = parse_tf_config({"TF_CONFIG": json.dumps(two)})
    assert spec.multi_worker and spec.num_workers == 2 and not spec.is_chief
    with_chief = {"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    spec = parse_tf_config({"TF_CONFIG": json.dumps(with_chief)})
    assert spec.num_workers == 2 and not spec.is_chief
    one = {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    assert not parse_tf_config({"TF_CONFIG": json.dumps(one)}).multi_worker


def test_bad_tf_config_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(embedded_text()[:5_000], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    assert train_main(["--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textgen train: error: TF_CONFIG is not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
