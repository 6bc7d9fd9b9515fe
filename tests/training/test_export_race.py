"""Two exporters writing the same model folder at once: each gets its own number, both versions whole.

docs/contract.md: of two exporters racing for one number, the one whose rename fails takes the next
number. The exporters run in two threads of this process; their SavedModel writes never overlap
(one waits in a hook while the other writes), only the numbering and the renames race.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import keras
import pytest

import training.export
from training.check import check_version
from training.contract import MODEL_ASSET, list_versions, read_json_asset
from training.export import export_version
from training.model import ModelConfig, build_model
from training.tokenizer import Tokenizer

WAIT_SECONDS = 120.0


@pytest.fixture(scope="module")
def tiny() -> tuple[keras.Model, ModelConfig, Tokenizer]:
    tokenizer = Tokenizer(level="char").fit_on_texts(["the quick brown fox jumps over the lazy dog\n"])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, embedding_dim=8, units=16, layers=1)
    keras.utils.set_random_seed(3)
    return build_model(config), config, tokenizer


def _exporter(
    tiny: tuple[keras.Model, ModelConfig, Tokenizer],
    base: Path,
    name: str,
    results: dict[str, str | BaseException],
    before_rename: Callable[[str], None] | None = None,
) -> threading.Thread:
    model, config, tokenizer = tiny

    def run() -> None:
        try:
            results[name] = export_version(
                model, config, tokenizer, str(base), {"exporter": name}, before_rename=before_rename
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            results[name] = exc

    return threading.Thread(target=run, name=f"exporter-{name}", daemon=True)


def _assert_whole(base: Path, results: dict[str, str | BaseException]) -> dict[str, int]:
    """Both exports succeeded into versions 1 and 2, each passing the contract check with its own model.json."""
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    assert list_versions(str(base)) == [1, 2]
    assert sorted(os.listdir(base)) == ["1", "2"]  # no temporary folder left behind
    numbers = {}
    for name, path in results.items():
        assert isinstance(path, str)
        check_version(path)  # loads the SavedModel and calls both signatures
        assert read_json_asset(path, MODEL_ASSET)["exporter"] == name
        numbers[name] = int(os.path.basename(path))
    assert sorted(numbers.values()) == [1, 2]
    return numbers


def test_an_exporter_held_before_its_rename_takes_the_number_after_the_one_that_overtook_it(
    tiny: tuple[keras.Model, ModelConfig, Tokenizer], tmp_path: Path
) -> None:
    base = tmp_path / "m"
    held, overtaken = threading.Event(), threading.Event()

    def hold(tmp: str) -> None:
        held.set()  # written in full, not yet numbered
        assert overtaken.wait(WAIT_SECONDS)

    results: dict[str, str | BaseException] = {}
    first = _exporter(tiny, base, "first", results, before_rename=hold)
    first.start()
    assert held.wait(WAIT_SECONDS)
    second = _exporter(tiny, base, "second", results)
    second.start()
    second.join(WAIT_SECONDS)
    overtaken.set()
    first.join(WAIT_SECONDS)
    assert _assert_whole(base, results) == {"second": 1, "first": 2}


def test_two_exporters_that_both_chose_number_1_end_as_1_and_2(
    tiny: tuple[keras.Model, ModelConfig, Tokenizer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both list the folder before either renames: one rename wins number 1, the other's fails and it takes 2."""
    base = tmp_path / "m"
    both_listed = threading.Barrier(2, timeout=WAIT_SECONDS)
    chosen: list[tuple[str, int]] = []
    next_version = training.export.next_version

    def next_version_after_both_listed(base_dir: str) -> int:
        number = next_version(base_dir)
        name = threading.current_thread().name
        first_listing = name not in {n for n, _ in chosen}
        chosen.append((name, number))
        if first_listing:
            both_listed.wait()  # neither renames until both have chosen a number
        return number

    monkeypatch.setattr(training.export, "next_version", next_version_after_both_listed)
    saved = threading.Event()
    results: dict[str, str | BaseException] = {}
    first = _exporter(tiny, base, "first", results, before_rename=lambda tmp: saved.set())
    first.start()
    assert saved.wait(WAIT_SECONDS)  # its SavedModel is written; it now waits at the barrier
    second = _exporter(tiny, base, "second", results)
    second.start()
    for t in (first, second):
        t.join(WAIT_SECONDS)
    numbers = _assert_whole(base, results)
    # Both chose 1; the loser's rename failed, and it listed again and took 2.
    first_choice: dict[str, int] = {}
    for name, number in chosen:
        first_choice.setdefault(name, number)
    assert first_choice == {"exporter-first": 1, "exporter-second": 1}, chosen
    loser = "exporter-" + max(numbers, key=lambda n: numbers[n])
    assert [number for name, number in chosen if name == loser] == [1, 2], chosen
