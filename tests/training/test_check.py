"""``textgen check``: the contract check the server runs on load, as a command (exit 0, or 2 with what is wrong)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.broken_versions import BREAKERS, broken_copy, place
from training.check import check_version, main
from training.contract import ContractError


@pytest.fixture(scope="module")
def good(tiny_model_repo: Path) -> Path:
    return tiny_model_repo / "tiny" / "1"


def run_check(capsys: pytest.CaptureFixture[str], *dirs: Path | str) -> tuple[int, str, str]:
    code = main([str(d) for d in dirs])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_good_version_passes_and_shows_what_was_found(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checked = check_version(str(good))
    code, out, err = run_check(capsys, good)
    assert code == 0 and err == ""
    assert out == (
        f"{good}: ok: signatures prefill, prefill_from, step; V={checked.vocab_size} S={checked.state_size}; "
        f"level char; contract version 2\n"
    )
    assert checked.vocab_size == checked.tokenizer.vocab_size and checked.state_size == checked.info["state_size"]


def test_a_model_folder_checks_every_version(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for version in (1, 2):
        place(good, tmp_path, "tiny", version)
    (tmp_path / "tiny" / ".tmp-half-written").mkdir()
    code, out, _ = run_check(capsys, tmp_path / "tiny")
    assert code == 0
    assert [line.split(": ok: ")[0] for line in out.splitlines()] == [
        os.path.join(tmp_path, "tiny", "1"),
        os.path.join(tmp_path, "tiny", "2"),
    ]


@pytest.mark.parametrize("kind", ["missing signature", "vocabulary mismatch", "missing model.json", "wrong signatures"])
def test_a_broken_version_exits_2_naming_the_problem(
    kind: str, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = broken_copy(good, tmp_path, kind)
    code, out, err = run_check(capsys, bad)
    assert code == 2 and out == ""
    assert err.startswith(f"{bad}: error: ") and BREAKERS[kind][1] in err
    with pytest.raises(ContractError, match=re.escape(BREAKERS[kind][1])):
        check_version(str(bad))


def test_every_version_is_reported_and_one_bad_one_fails_the_run(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    place(good, tmp_path, "tiny", 1)
    bad = place(good, tmp_path, "tiny", 2)
    (bad / "assets" / "model.json").unlink()
    code, out, err = run_check(capsys, tmp_path / "tiny")
    assert code == 2
    assert out.startswith(f"{tmp_path / 'tiny' / '1'}: ok: ")
    assert err == f"{bad}: error: assets/model.json is missing\n"


def test_a_missing_or_unrelated_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_check(capsys, tmp_path / "nope")
    assert (code, out) == (2, "") and err == f"{tmp_path / 'nope'}: error: no such folder\n"
    code, _, err = run_check(capsys, tmp_path)
    assert code == 2 and "neither a version folder (saved_model.pb) nor a model folder" in err
    (tmp_path / "3").mkdir()
    code, _, err = run_check(capsys, tmp_path / "3")  # named like a version: checked as one
    assert code == 2 and err == f"{tmp_path / '3'}: error: saved_model.pb is missing\n"


def test_no_folder_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: textgen check" in capsys.readouterr().err


def test_textgen_check_as_a_real_command(good: Path, tmp_path: Path) -> None:
    textgen = Path(sys.executable).parent / "textgen"
    assert textgen.is_file(), f"the console script is not installed beside {sys.executable}"
    done = subprocess.run([str(textgen), "check", str(good)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        rf"{re.escape(str(good))}: ok: signatures prefill, prefill_from, step; V=\d+ S=64; .*\n", done.stdout
    )
    bad = broken_copy(good, tmp_path, "vocabulary mismatch")
    done = subprocess.run([str(textgen), "check", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert f"{bad}: error: the model has " in done.stderr
