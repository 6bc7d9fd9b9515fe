"""benchmarks/compare.py: a candidate run's headline figures against the baselines' min-max."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.compare import HEADLINE, compare, main


def _results(scale: float) -> dict[str, Any]:
    engine_rows = [{"batch": b, "tokens_per_s": scale * b * 100} for b in (1, 64, 512)]
    variants = [
        {"batch": b, "sampler": True, "steps_per_call": k, "tokens_per_s": scale * b * 100 * k}
        for b in (1, 64, 512)
        for k in (1, 8)
    ]
    levels = [{"streams": s, "tokens_per_s": scale * 1000 + s} for s in (1, 16, 64, 256, 1000)]
    return {
        "engine": {
            "seed_loop": {"tokens_per_s": scale * 10},
            "onestep": {"tokens_per_s": scale * 800},
            "batched": {"rows": engine_rows},
            "variants": {"rows": variants},
        },
        "e2e": {"batched": {"levels": levels}, "max_batch_size_1": {"levels": levels}},
    }


def test_a_candidate_between_the_baselines_is_within_and_one_outside_is_not(tmp_path: Path, capsys) -> None:
    baselines = [_results(1.0), _results(1.2)]
    rows = compare(baselines, _results(1.1))
    assert [r["figure"] for r in rows] == [name for name, _ in HEADLINE]
    assert all(r["within"] for r in rows)
    assert not any(r["within"] for r in compare(baselines, _results(1.3)))
    missing = _results(1.1)
    del missing["e2e"]
    assert [r["within"] for r in compare(baselines, missing)][-1] is False
    paths = []
    for i, results in enumerate([*baselines, _results(1.1), _results(0.5)]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(results))
    assert main(["--baseline", str(paths[0]), str(paths[1]), "--candidate", str(paths[2])]) == 0
    assert main(["--baseline", str(paths[0]), str(paths[1]), "--candidate", str(paths[3])]) == 1
    assert "| e2e batched, 1000 streams |" in capsys.readouterr().out
