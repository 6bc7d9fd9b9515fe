"""The training measurements run end to end: the ablation table from real runs, and the stdlib corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import stdlib_corpus, train_ablation, train_step
from training.corpus import embedded_text

TINY = [
    "--units", "16", "--layers", "1", "--embedding-dim", "8", "--seq-len", "16", "--batch-size", "8",
    "--sample-tokens", "0", "--validation-fraction", "0.1",
]  # fmt: skip


def test_two_variants_side_by_side_give_a_table_against_the_baseline(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded_text()[:30_000], encoding="utf-8")
    out = tmp_path / "abl"
    argv = ["--budget", "30s", "--out", str(out), "--variants", "baseline,stateful", "--parallel", "2"]
    assert train_ablation.main([*argv, "--", "--corpus", str(corpus), *TINY]) == 0
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["baseline", "stateful"]
    for row in rows:
        assert row["exit"] == 0 and row["steps"] > 0 and 0 < row["bits_fresh"] < 8 and row["bits_carried"] > 0
        assert 0 < row["budget_pct"] < 150
    info = json.loads(next((out / "stateful" / "model").glob("*/assets/model.json")).read_text())
    assert info["training"]["stateful"] is True and info["training"]["schedule"] == "constant"
    table = (out / "ablation.md").read_text()
    assert "| stateful |" in table and "+0.0000" in table  # the baseline against itself


def test_the_stdlib_corpus_skips_tests_and_site_packages_in_sorted_path_order(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for rel, text in {
        "b.py": "b = 2\n",
        "a/z.py": "z = 26\n",
        "a/m.py": "m = 13\n",
        "test/t.py": "skip\n",
        "a/tests/t.py": "skip\n",
        "site-packages/p.py": "skip\n",
        "notes.txt": "skip\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    out = tmp_path / "stdlib.txt"
    files, chars = stdlib_corpus.write_corpus(str(root), str(out))
    assert files == 3 and out.read_text(encoding="utf-8") == "m = 13\n\nz = 26\n\nb = 2\n\n"
    assert chars == len(out.read_text(encoding="utf-8"))


def test_the_step_benchmark_times_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--units", "16", "--layers", "1", "--seq-len", "8", "--batches", "4,8", "--steps", "2"]
    assert train_step.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [line.split(" | ")[0][2:] for line in lines] == [v for v in train_step.VARIANTS for _ in (4, 8)]
    assert lines[0].endswith("| 1.00x |")
