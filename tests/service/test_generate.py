"""``textgen generate --model DIR`` (service/local.py) prints what ``--target`` prints from a server serving DIR.

Both command lines run in this process through their ``main(argv)`` (and once as a real subprocess),
against the session's real server (``serving``) and the same tiny version on disk.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.client import main as remote_main
from service.config import ServerConfig
from service.local import FlagError, name_the_flag, resolve_version
from service.local import main as local_main
from tests.helpers import RunningServer

ROOT = Path(__file__).resolve().parents[2]
MUST_SHOW = ["--max-tokens", "80", "--seed", "7", "--temperature", "0.9", "--top-p", "0.9", "To be"]
_SUMMARY = re.compile(r"\[(\S+)/(\d+) finish=(\w+) prompt_tokens=(\d+) completion_tokens=(\d+) ")


@pytest.fixture(scope="module")
def version(tiny_model_repo: Path) -> str:
    return str(tiny_model_repo / "tiny" / "1")


def run_local(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = local_main(argv, out, err)
    return code, out.getvalue(), err.getvalue()


def run_remote(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = remote_main(argv, out, err)
    return code, out.getvalue(), err.getvalue()


def local_text(version: str, argv: list[str]) -> str:
    code, out, err = run_local(["--model", version, *argv])
    assert code == 0, err
    return out


def remote_text(serving: RunningServer, argv: list[str]) -> str:
    code, out, err = run_remote(["--target", serving.target, *argv])
    assert code == 0, err
    return out


def summary(err: str) -> tuple[str, int, str, int, int]:
    match = _SUMMARY.search(err)
    assert match is not None, err
    name, number, finish, prompt_tokens, completion_tokens = match.groups()
    return name, int(number), finish, int(prompt_tokens), int(completion_tokens)


# ------------------------------------------------------------------------- the same text both ways
def test_the_issue_command_prints_exactly_what_the_server_prints(serving: RunningServer, version: str) -> None:
    code, local, err = run_local(["--model", version, *MUST_SHOW])
    assert code == 0, err
    assert summary(err) == ("tiny", 1, "length", len("To be"), 80)
    assert local == remote_text(serving, MUST_SHOW)
    assert local.startswith("To be") and local.endswith("\n")  # both echo the prompt and end the line
    # The text depends on the seed and the flags: a different local run would show.
    assert local_text(version, [*MUST_SHOW[:3], "8", *MUST_SHOW[4:]]) != local
    assert local_text(version, [*MUST_SHOW[:5], "0.5", *MUST_SHOW[6:]]) != local


def test_the_defaults_are_the_same_both_ways(serving: RunningServer, version: str) -> None:
    argv = ["--max-tokens", "60", "--seed", "3", "The "]  # --temperature, --top-k, --top-p left to their defaults
    local = local_text(version, argv)
    assert local == remote_text(serving, argv)
    # The old local default (temperature 0.8) gives other text, so different defaults would fail above.
    assert local_text(version, [*argv[:-1], "--temperature", "0.8", "The "]) != local
    assert local_text(version, [*argv[:-1], "--temperature", "1.0", "--top-k", "0", "--top-p", "1", "The "]) == local


def test_a_stop_sequence_ends_the_text_the_same_way_both_ways(serving: RunningServer, version: str) -> None:
    continuation = local_text(version, MUST_SHOW)[len("To be") : -1]
    stop = continuation[30:33]  # some text the run produces: it stops at its first occurrence
    argv = [*MUST_SHOW[:-1], "--stop", stop, "--stop", "never-generated", "To be"]
    code, local, err = run_local(["--model", version, *argv])
    assert code == 0, err
    assert local == remote_text(serving, argv)
    assert local == "To be" + continuation[: continuation.index(stop)] + "\n"
    assert summary(err)[2] == "stop"


def test_a_subprocess_of_the_textgen_command_prints_the_same_text(serving: RunningServer, version: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "generate", "--model", version, *MUST_SHOW],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == remote_text(serving, MUST_SHOW)
    assert summary(run.stderr) == ("tiny", 1, "length", len("To be"), 80)


# ------------------------------------------------------------------------- local runs
def test_an_unseeded_run_generates_the_server_default_number_of_tokens(version: str) -> None:
    code, out, err = run_local(["--model", version, "--quiet", "a"])
    assert code == 0, err
    assert out.startswith("a") and out.endswith("\n") and err == ""
    code, out, err = run_local(["--model", version, "a"])
    assert code == 0, err
    assert summary(err) == ("tiny", 1, "length", 1, ServerConfig().default_max_tokens)


def test_a_model_folder_runs_its_newest_version(version: str, tmp_path: Path) -> None:
    model = tmp_path / "mine"
    for number in ("2", "10"):
        shutil.copytree(version, model / number)
    (model / ".tmp-0123").mkdir()
    (model / "notes").mkdir()
    argv = ["--max-tokens", "20", "--seed", "1", "x"]
    code, out, err = run_local(["--model", str(model), *argv])
    assert code == 0, err
    assert summary(err)[:3] == ("mine", 10, "length")
    assert out == local_text(str(model / "10"), argv)


def test_resolve_version_picks_the_newest_numbered_folder(tmp_path: Path) -> None:
    for name in ("1", "10", "2", ".tmp-abc", "notes", "010"):
        (tmp_path / name).mkdir()
    (tmp_path / "10" / "saved_model.pb").write_bytes(b"")
    assert resolve_version(str(tmp_path)) == str(tmp_path / "10")
    assert resolve_version(str(tmp_path / "10")) == str(tmp_path / "10")
    with pytest.raises(FlagError, match="no such folder"):
        resolve_version(str(tmp_path / "nowhere"))
    with pytest.raises(FlagError, match="numbered versions"):
        resolve_version(str(tmp_path / "notes"))


# ------------------------------------------------------------------------- bad input
BAD_FLAGS = {
    "max-tokens below 0": (["--max-tokens", "-1"], "--max-tokens must be in [0, "),
    "max-tokens over the limit": (["--max-tokens", "5000"], "--max-tokens must be <= 4096"),
    "negative temperature": (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    "nan temperature": (["--temperature", "nan"], "got nan"),
    "top-p over 1": (["--top-p", "1.5"], "--top-p must be in [0, 1]"),
    "negative top-k": (["--top-k", "-2"], "--top-k must be in [0, "),
    "negative seed": (["--seed", "-1"], "--seed must be in [0, 2**64)"),
    "empty stop": (["--stop", ""], "--stop: stop[0] must not be empty"),
    "too many stops": (["--stop", "a"] * 17, "--stop: stop must hold at most 16"),
    "a server's flag": (["--timeout", "5"], "--timeout is for a server"),
    "no model": (["--model", ""], "--model DIR is required"),
    "missing folder": (["--model", "nowhere"], "--model nowhere: no such folder"),
    "not a version": (["--model", "."], "--model .: neither a version folder"),
    "unsafe prompt": (["x" + "\u0301" * 31], "prompt must be Stream-Safe"),
}


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_input_exits_2_naming_the_flag(
    name: str, version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, expected = BAD_FLAGS[name]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_local(["--model", version, *argv])
    assert code == 2, err
    assert err.startswith("textgen generate: error: ") and expected in err, err
    assert out == "" and "Traceback" not in err


def test_a_broken_version_exits_2_naming_the_folder(tmp_path: Path) -> None:
    broken = tmp_path / "m" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    code, out, err = run_local(["--model", str(tmp_path / "m"), "x"])
    assert code == 2 and out == ""
    assert f"--model {tmp_path / 'm'}: version {broken} cannot be served: " in err, err


def test_argparse_errors_and_help_return_their_codes(version: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert local_main(["--model", version, "--max-tokens", "many"]) == 2
    assert "--max-tokens" in capsys.readouterr().err
    assert local_main(["--help"]) == 0
    assert "--log-level" in capsys.readouterr().out


def test_validation_messages_are_given_the_flag_name() -> None:
    assert name_the_flag("top_p must be in [0, 1], got 2.0") == "--top-p must be in [0, 1], got 2.0"
    assert name_the_flag("max_tokens must be <= 9") == "--max-tokens must be <= 9"
    assert name_the_flag("stop[2] must not be empty") == "--stop: stop[2] must not be empty"
    assert name_the_flag("prompt must be at most 4 bytes") == "prompt must be at most 4 bytes"


def test_the_exports_smoke_sample_is_the_greedy_text_of_local_generation(version: str) -> None:
    from training.export import smoke_generate

    code, out, err = run_local(["--model", version, "--max-tokens", "12", "--temperature", "0", "The "])
    assert code == 0, err
    sample = smoke_generate(version, "The ", tokens=12)
    assert len(sample) > 0 and out == "The " + sample + "\n"
