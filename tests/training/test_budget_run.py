"""``textgen train --time-budget`` end to end: a planned run that exports on time, resumes, and meets the contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.budget import lr_at
from training.check import check_version
from training.checkpoints import PROGRESS_FILE
from training.cli import main as train_main
from training.corpus import embedded_text

TEXTGEN = str(Path(sys.executable).with_name("textgen"))
TINY = ["--units", "16", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8", "--sample-tokens", "5"]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(embedded_text()[:20_000], encoding="utf-8")
    return path


def _argv(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "--corpus", str(corpus), "--out", str(tmp_path / "m"), "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "logs"), "--validation-fraction", "0.1", *TINY, *extra,
    ]  # fmt: skip


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    """A real ``textgen train`` process: the budget counts from its start."""
    return subprocess.run([TEXTGEN, "train", *argv], capture_output=True, text=True, timeout=180)


def test_a_budgeted_stateful_run_plans_validates_and_exports_a_contract_model(
    tmp_path: Path, corpus_file: Path
) -> None:
    started = time.monotonic()
    regularised = ["--dropout", "0.2", "--dropout-mask", "sequence", "--weight-drop", "0.3", "--decay-share", "0.3"]
    regularised += ["--weight-average", "0.05"]
    run = _run(*_argv(tmp_path, corpus_file, "--time-budget", "30s", "--stateful", *regularised))
    assert run.returncode == 0, run.stderr
    assert "plan: " in run.stderr and "left of 0m30s" in run.stderr and "% of the 30 s budget" in run.stdout
    assert time.monotonic() - started < 30 + 15  # on time, with room for a loaded machine
    info = json.loads((tmp_path / "m" / "1" / "assets" / "model.json").read_text())
    plan = info["plan"]
    assert info["steps_completed"] == plan["total_steps"] > 0
    steps = [r["step"] for r in info["history"]]
    assert steps == sorted(steps) and steps[-1] == plan["total_steps"] and len(steps) >= 3
    for key in ("val_loss", "val_carried_loss", "val_carried_bits_per_token", "val_perplexity"):
        assert key in info and info[key] > 0, key
    assert info["training"]["stateful"] is True and info["training"]["schedule"] == "wsd"
    assert info["architecture"]["weight_drop"] == 0.3 and info["architecture"]["dropout_mask"] == "sequence"
    lrs = [r["lr"] for r in info["history"]]
    assert lrs[-1] < max(lrs)  # the schedule decayed
    assert info["training"]["decay_share"] == 0.3
    last = info["history"][-1]
    assert last["lr"] == pytest.approx(
        lr_at(
            last["step"] - 1,
            peak=info["training"]["learning_rate"],
            total_steps=plan["total_steps"],
            warmup_steps=plan["warmup_steps"],
            shape="wsd",
            decay_share=0.3,
        )
    )
    assert "sizing" not in info  # size flags were given
    # The weight average: the last validation kept the better of it and the trained weights.
    assert info["training"]["weight_average"] == pytest.approx(0.05)
    candidates = (last["average_val_bits_per_token"], last["trained_val_bits_per_token"])
    assert last["val_bits_per_token"] == min(candidates)
    assert "the weight average scores" in run.stderr
    best = min(info["history"], key=lambda r: r["val_loss"])
    assert info["exported_step"] == best["step"] and info["val_loss"] == best["val_loss"]
    check_version(str(tmp_path / "m" / "1"))
    assert list((tmp_path / "logs").iterdir())  # TensorBoard events


def test_without_size_flags_the_sizing_rule_chooses_and_says_why(tmp_path: Path, corpus_file: Path) -> None:
    argv = [
        "--corpus", str(corpus_file), "--out", str(tmp_path / "m"), "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "logs"), "--validation-fraction", "0.1", "--time-budget", "40s",
        "--seq-len", "16", "--batch-size", "8", "--sample-tokens", "0",
    ]  # fmt: skip
    run = _run(*argv)
    assert run.returncode == 0, run.stderr
    assert "sizing rule: " in run.stderr and "passes over the corpus" in run.stderr
    info = json.loads((tmp_path / "m" / "1" / "assets" / "model.json").read_text())
    sizing = info["sizing"]
    assert info["architecture"]["units"] == sizing["units"] and info["architecture"]["layers"] == sizing["layers"]
    assert info["training"]["auto_size"] is True


def test_a_killed_budgeted_run_resumes_with_what_is_left_of_its_budget(tmp_path: Path, corpus_file: Path) -> None:
    argv = [TEXTGEN, "train", *_argv(tmp_path, corpus_file, "--time-budget", "40s")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    progress_file = tmp_path / "ck" / PROGRESS_FILE
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # kill it after its second checkpoint
            if progress_file.exists() and len(json.loads(progress_file.read_text())["history"]) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = json.loads(progress_file.read_text())
    assert first["steps_done"] > 0 and first["plan"] and not first["exported"]
    run = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"resuming after step {first['steps_done']}" in run.stderr
    final = json.loads(progress_file.read_text())
    assert final["exported"] and final["steps_done"] > first["steps_done"]
    assert final["budget_used_s"] > first["budget_used_s"]
    steps = [r["step"] for r in final["history"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # What is left of the budget: both processes together stay near 40 s, not 40 s each.
    assert final["budget_used_s"] < 40


BAD = {
    "budget format": (["--time-budget", "ten minutes"], "--time-budget"),
    "budget too small": (["--time-budget", "3s"], "at least 10s"),
    "stateful needs a budget": (["--stateful"], "--stateful needs --time-budget"),
    "no validation": (["--time-budget", "60s", "--validation-fraction", "0"], "--validation-fraction"),
    "weight decay": (["--weight-decay", "2"], "--weight-decay"),
    "decay share": (["--time-budget", "60s", "--decay-share", "1.5"], "--decay-share"),
    "weight average": (["--time-budget", "60s", "--weight-average", "0.7"], "--weight-average must be in"),
    "clipping": (["--clipping", "sometimes"], "--clipping"),
    "clip norm": (["--clip-norm", "0"], "--clip-norm"),
    "epochs with a budget": (["--time-budget", "60s", "--epochs", "3"], "--epochs does not apply"),
    "patience with a budget": (["--time-budget", "60s", "--patience", "3"], "--patience does not apply"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_budget_flags_exit_2_naming_the_flag(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = BAD[name]
    monkeypatch.chdir(tmp_path)
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textgen train: error: ") and expected in err and "\n" not in err
    assert not list(tmp_path.iterdir())
