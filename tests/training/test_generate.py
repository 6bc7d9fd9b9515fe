"""Local generation's sampler and model-folder resolution (the end-to-end run is in test_train_cli.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.generate import GenerateConfig, GenerateError, resolve_version, sample_next


def test_temperature_zero_and_top_k_one_are_greedy_and_padding_is_never_drawn() -> None:
    logits = np.array([5.0, 0.1, 2.0, 3.0], np.float32)  # id 0 is padding, and the largest here
    rng = np.random.default_rng(0)
    assert sample_next(logits, 0.0, 0, rng) == 3
    assert {sample_next(logits, 1.0, 1, rng) for _ in range(20)} == {3}
    draws = [sample_next(logits, 1.0, 0, rng) for _ in range(300)]
    assert 0 not in draws and {2, 3} <= set(draws)


def test_same_seed_same_draws() -> None:
    logits = np.linspace(0, 1, 50).astype(np.float32)
    a = [sample_next(logits, 1.2, 10, np.random.default_rng(7)) for _ in range(5)]
    b = [sample_next(logits, 1.2, 10, np.random.default_rng(7)) for _ in range(5)]
    assert a == b and all(i >= 40 for i in a)  # top 10 of 50 ascending logits


def test_resolve_version_picks_the_newest_numbered_folder(tmp_path: Path) -> None:
    for name in ("1", "10", "2", ".tmp-abc", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "10" / "saved_model.pb").write_bytes(b"")
    assert resolve_version(str(tmp_path)) == str(tmp_path / "10")
    assert resolve_version(str(tmp_path / "10")) == str(tmp_path / "10")


def test_config_limits_name_the_flag() -> None:
    with pytest.raises(GenerateError, match="--temperature"):
        GenerateConfig(model="m", temperature=float("nan"))
    with pytest.raises(GenerateError, match="--max-tokens"):
        GenerateConfig(model="m", max_tokens=0)
