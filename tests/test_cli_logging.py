"""Quiet by default: TensorFlow's start-up lines stay off the commands' stderr; ``--log-level`` on every command.

The commands run as real processes with ``TF_CPP_MIN_LOG_LEVEL`` removed from their environment
(``tests/conftest.py`` sets it for this process), so they must be quiet on their own. The
``--log-level debug`` run shows that TensorFlow on this machine does print such lines.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.tf_runtime import NoiseFilter, is_startup_noise, log_level_from_argv

ROOT = Path(__file__).resolve().parents[1]
TEXTGEN = str(Path(sys.executable).with_name("textgen"))
TENSORFLOW_LINE = re.compile(r"E0000|I0000|W0000|cuInit|oneDNN|absl::")

CUINIT = "E0000 00:00:1795909906.166591   12064 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error"
ABSL = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN = "I0000 00:00:1795909903.100513   12064 port.cc:153] oneDNN custom operations are on. You may see slightly"
DT_BOOL = "E0000 00:00:1795909906.467765   12064 util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512."
REAL_ERROR = "E0000 00:00:1795909907.000001   12064 kernel.cc:77] INVALID_ARGUMENT: indices[0] = 99 is not in [0, 40)"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CONFIG")}
    return {**env, **extra}


def _run(argv: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _tensorflow_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if TENSORFLOW_LINE.search(line)]


# ---------------------------------------------------------------------------------------- the filter itself
def test_notices_and_lines_below_the_level_are_noise_errors_are_not() -> None:
    for line in (CUINIT, ABSL, ONEDNN, DT_BOOL):
        assert is_startup_noise(line, "info"), line
        assert not is_startup_noise(line, "debug"), line
    assert not is_startup_noise(REAL_ERROR, "info") and not is_startup_noise(REAL_ERROR, "error")
    warning = "W0000 00:00:1795909907.1   12064 loader.cc:9] fingerprint not found"
    assert not is_startup_noise(warning, "info") and is_startup_noise(warning, "error")
    assert is_startup_noise("I0000 00:00:1795909907.1   12064 rendezvous.cc:405] End of sequence", "warning")
    assert not is_startup_noise("Traceback (most recent call last):", "error")


def test_filter_drops_noise_across_chunks_and_keeps_everything_else_in_order() -> None:
    noise = NoiseFilter("info")
    text = f"{ABSL}\n{ONEDNN}\nfirst\n{CUINIT}\n{REAL_ERROR}\nlast\n".encode()
    shown = b"".join(noise.feed(text[i : i + 7]) for i in range(0, len(text), 7)) + noise.end()
    lines = shown.decode().splitlines()
    assert lines[:3] == ["first", REAL_ERROR, "last"]  # then, TensorFlow never having started, the held ones
    assert lines[3:] == [ABSL, ONEDNN, CUINIT]


def test_filter_drops_what_it_held_once_tensorflow_started_and_passes_a_prompt_at_once() -> None:
    noise = NoiseFilter("info")
    assert noise.feed(f"{ABSL}\n{CUINIT}\n".encode()) == b""
    assert noise.feed(b"\x00textgen: TensorFlow started\n" + f"{DT_BOOL}\n".encode()) == b""
    assert noise.feed(b"Password: ") == b"Password: "  # no newline, cannot be a TensorFlow line
    assert noise.feed(b"E0000 00:00:1.5   1 util.cc:131] ") == b""  # might be: wait for the rest
    assert noise.feed(b"oneDNN supports DT_INT64 only on platforms with AVX-512.\n") == b""
    assert noise.end() == b""


def test_log_level_comes_from_the_last_flag_then_the_environment() -> None:
    assert log_level_from_argv(["--model", "m", "x"]) == "info"
    assert log_level_from_argv(["--log-level", "DEBUG"]) == "debug"
    assert log_level_from_argv(["--log-level=error", "--log-level", "warning"]) == "warning"
    assert log_level_from_argv([], {"TEXTGEN_LOG_LEVEL": "debug"}, "TEXTGEN_LOG_LEVEL") == "debug"
    assert log_level_from_argv(["--log-level", "error"], {"TEXTGEN_LOG_LEVEL": "debug"}, "TEXTGEN_LOG_LEVEL") == "error"
    assert log_level_from_argv(["--log-level", "loud"]) == "info"  # the command's parser rejects it
    assert log_level_from_argv(["--", "--log-level", "debug"]) == "info"


# ------------------------------------------------------ a stand-in TensorFlow: failed import, crash, errors after
FAKE_TENSORFLOW = f'''
import os
os.write(2, b"{ABSL}\\n{ONEDNN}\\n")
if os.environ["FAKE_TF"] == "broken":
    raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")
if os.environ["FAKE_TF"] == "crash":
    os.write(2, b"F0000 00:00:1795909903.2   12064 cpu_feature_guard.cc:9] This CPU lacks AVX\\n")
    os.abort()
class config:
    @staticmethod
    def list_physical_devices():
        os.write(2, b"{CUINIT}\\n")
        return []
'''

AFTER_START = f"""
import os
from training.tf_runtime import import_tensorflow_quietly
import_tensorflow_quietly("info")
os.write(2, b"{DT_BOOL}\\n{REAL_ERROR}\\n")
raise RuntimeError("the training step failed")
"""


def _run_fake(tmp_path: Path, mode: str, code: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "tensorflow").mkdir(exist_ok=True)
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW, encoding="utf-8")
    return _run([sys.executable, "-c", code], timeout=60, FAKE_TF=mode, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")


def test_after_a_quiet_start_real_errors_and_tracebacks_still_reach_stderr(tmp_path: Path) -> None:
    run = _run_fake(tmp_path, "ok", AFTER_START)
    assert run.returncode == 1
    assert REAL_ERROR in run.stderr.splitlines()
    assert "RuntimeError: the training step failed" in run.stderr and "Traceback" in run.stderr
    assert not any(line in run.stderr for line in (ABSL, ONEDNN, CUINIT, DT_BOOL)), run.stderr


def test_a_failed_import_shows_everything_it_printed(tmp_path: Path) -> None:
    run = _run_fake(tmp_path, "broken", "from training.tf_runtime import quiet_start; quiet_start([])")
    assert run.returncode == 1
    assert "ImportError: libtensorflow_framework.so.2: cannot open shared object file" in run.stderr
    assert ABSL in run.stderr and ONEDNN in run.stderr, run.stderr


def test_a_crash_inside_the_import_still_shows_what_was_printed(tmp_path: Path) -> None:
    run = _run_fake(tmp_path, "crash", "from training.tf_runtime import quiet_start; quiet_start([])")
    assert run.returncode == -signal.SIGABRT
    assert "This CPU lacks AVX" in run.stderr and ABSL in run.stderr and ONEDNN in run.stderr, run.stderr


# -------------------------------------------------------------------------------------- the real commands
@pytest.mark.timeout(300)
def test_generate_with_a_model_prints_no_tensorflow_lines_and_debug_shows_them(tiny_model_repo: Path) -> None:
    version = str(tiny_model_repo / "tiny" / "1")
    quiet = _run([TEXTGEN, "generate", "--model", version, "--max-tokens", "5", "--seed", "1", "x"])
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stdout.startswith("x") and len(quiet.stdout.strip()) > 1
    assert _tensorflow_lines(quiet.stderr) == [], quiet.stderr

    loud = _run(
        [TEXTGEN, "generate", "--model", version, "--max-tokens", "5", "--seed", "1", "--log-level", "debug", "x"]
    )
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert loud.stdout == quiet.stdout
    assert _tensorflow_lines(loud.stderr), (
        "TensorFlow printed nothing at --log-level debug: the test above proves nothing"
    )


@pytest.mark.timeout(300)
def test_train_prints_its_own_lines_and_no_tensorflow_lines(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    argv = [TEXTGEN, "train", "--corpus", str(corpus), "--out", str(tmp_path / "models" / "m")]
    argv += ["--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "logs"), "--epochs", "1"]
    argv += ["--units", "16", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8", "--sample-tokens", "5"]
    run = _run([*argv, "--max-steps-per-epoch", "3"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "textgen train: " in run.stderr  # the run's own INFO lines stay
    assert _tensorflow_lines(run.stderr) == [], run.stderr


@pytest.mark.timeout(300)
def test_serve_starts_without_tensorflow_lines(tiny_model_repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--models", str(tiny_model_repo), "--host", "127.0.0.1"]
            + ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--poll-seconds", "0"],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            end = time.monotonic() + 240
            while time.monotonic() < end and "ready: serving" not in log.read_text(encoding="utf-8"):
                assert proc.poll() is None, log.read_text(encoding="utf-8")
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    text = log.read_text(encoding="utf-8")
    assert "ready: serving tiny/1" in text and "stopped" in text, text
    assert _tensorflow_lines(text) == [], text


def _commands() -> dict[str, list[str]]:
    commands = {
        "train": ["train"],
        "serve": ["serve"],
        "generate --model": ["generate", "--model", "m"],
        "generate --target": ["generate", "--target", "localhost:1"],
        "bench": ["bench"],
    }
    if (ROOT / "training" / "check.py").exists():
        commands["check"] = ["check"]
    return commands


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(_commands()))
def test_every_command_lists_log_level_in_its_help(name: str) -> None:
    run = _run([TEXTGEN, *_commands()[name], "--help"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--log-level" in run.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(_commands()))
def test_a_bad_log_level_exits_2_naming_the_flag(name: str) -> None:
    argv = [*_commands()[name], "--log-level", "loud"]
    if name == "bench":
        argv += ["--out", "unused"]
    if name == "check":
        argv += ["unused"]
    run = _run([sys.executable, "-m", "service.cli", *argv])
    assert run.returncode == 2, run.stderr[-3000:]
    assert "--log-level" in run.stderr and "loud" in run.stderr.lower(), run.stderr


def test_generate_with_a_target_never_imports_tensorflow() -> None:
    code = (
        "import sys; from service.cli import main\n"
        "code = main(['generate', '--target', '127.0.0.1:1', '--timeout', '5', '--log-level', 'debug', 'x'])\n"
        "print(code, 'tensorflow' in sys.modules)"
    )
    run = _run([sys.executable, "-c", code], timeout=120)
    assert run.stdout.split()[-2:] == ["1", "False"], run.stdout + run.stderr
