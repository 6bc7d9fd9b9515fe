"""The documentation is reference: bounded in words, free of history, each fact in one place, links that resolve.

The docs are README.md, SECURITY.md, docs/*.md and benchmarks/README.md. ``ServerConfig`` and the
metrics are read from ``service/config.py`` and ``service/metrics.py`` with ``ast`` (nothing is
imported, so no TensorFlow). Each check returns the problems it found; the tests run every check on
the repository, and on a small tree of files made to break it, so none can pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORD_LIMIT = 11_000
FLAG_TABLE_HEADER = ["flag", "env", "default", "meaning"]
METRIC_TABLE_HEADER = "metric"
# A paragraph may name a metric or two it is about; more than this is a second list of the metrics.
MAX_METRICS_IN_PROSE = 2
# Phrases that tell what changed when: history belongs in commit messages.
HISTORY_PHRASES = (
    r"before this change",
    r"after this change",
    r"what changed",
    r"an earlier version",
    r"earlier runs?\b",
    r"the previous commit",
    r"\bwas [^.;]{1,60}, now\b",
)
_HEX_WORD = re.compile(r"(?<![0-9A-Za-z_])[0-9a-fA-F]{7,40}(?![0-9A-Za-z_])")
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_METRIC = re.compile(r"textgen_[a-z0-9_]+")
_FLAG_CELL = re.compile(r"^`(--[a-z0-9-]+)(?![a-z0-9-])")


def doc_files(root: Path) -> list[Path]:
    """The files that make up the documentation, in reading order."""
    files = [root / "README.md", root / "SECURITY.md", *sorted((root / "docs").glob("*.md"))]
    return [*files, root / "benchmarks" / "README.md"]


def outside_code_blocks(text: str) -> list[str]:
    """The lines of ``text`` that are not inside a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of ``text``: blank-line separated, outside code blocks and tables."""
    found, current = [], []
    for line in [*outside_code_blocks(text), ""]:
        if line.strip() and not line.strip().startswith("|"):
            current.append(line)
        elif current:
            found.append(" ".join(current))
            current = []
    return found


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table outside code blocks: a list of rows (separator rows left out), each a list of cells."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*outside_code_blocks(text), ""]:
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", stripped.strip("|"))]
            if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    anchors = set()
    for line in outside_code_blocks(text):
        match = _HEADING.match(line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def server_config_fields(root: Path) -> dict[str, object]:
    """``ServerConfig``'s fields and defaults, read from service/config.py without importing it."""
    tree = ast.parse((root / "service" / "config.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "ServerConfig":
            return {
                stmt.target.id: ast.literal_eval(stmt.value)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None
            }
    return {}


def metric_names(root: Path) -> set[str]:
    """The names the metrics of service/metrics.py are exposed under (a counter gains ``_total``)."""
    tree = ast.parse((root / "service" / "metrics.py").read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        name = node.args[0].value
        if kind in ("Counter", "Gauge", "Histogram", "Summary") and isinstance(name, str):
            names.add(name if kind != "Counter" or name.endswith("_total") else name + "_total")
    return names


def word_problems(root: Path, limit: int = WORD_LIMIT) -> list[str]:
    counts = {path: len(path.read_text(encoding="utf-8").split()) for path in doc_files(root) if path.exists()}
    total = sum(counts.values())
    if total <= limit:
        return []
    detail = ", ".join(f"{path.relative_to(root)} {n}" for path, n in counts.items())
    return [f"the docs hold {total} words, over the limit of {limit} ({detail})"]


def history_problems(root: Path) -> list[str]:
    problems = []
    for path in doc_files(root):
        for line in outside_code_blocks(path.read_text(encoding="utf-8")):
            for word in _HEX_WORD.findall(line):
                if re.search(r"[0-9]", word) and re.search(r"[a-fA-F]", word):
                    problems.append(f"{path.relative_to(root)}: {word!r} looks like a commit hash: {line.strip()}")
            for phrase in HISTORY_PHRASES:
                if re.search(phrase, line, re.IGNORECASE):
                    problems.append(f"{path.relative_to(root)}: tells history ({phrase!r}): {line.strip()}")
    return problems


def _default_matches(cell: str, default: object) -> bool:
    if default is None:
        return True
    quoted = re.match(r"`([^`]*)`", cell)
    token = quoted.group(1) if quoted else (cell.split() or [""])[0]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(token) == float(default)
        except ValueError:
            return False
    return token == str(default)


def flag_problems(root: Path) -> list[str]:
    fields = server_config_fields(root)
    flags = {"--" + name.replace("_", "-"): name for name in fields}
    serving = root / "docs" / "serving.md"
    flag_tables = [
        t for t in tables(serving.read_text(encoding="utf-8")) if [c.lower() for c in t[0]] == FLAG_TABLE_HEADER
    ]
    if len(flag_tables) != 1:
        return [f"docs/serving.md has {len(flag_tables)} tables headed {' | '.join(FLAG_TABLE_HEADER)}, not 1"]
    problems = []
    rows = flag_tables[0][1:]
    for flag, name in flags.items():
        matching = [row for row in rows if row[0] == f"`{flag}`"]
        if len(matching) != 1:
            problems.append(f"docs/serving.md's flag table has {len(matching)} rows for {flag}, not 1")
            continue
        row = matching[0]
        env = "TEXTGEN_" + name.upper()
        if len(row) < 4 or row[1] != f"`{env}`":
            problems.append(f"docs/serving.md: the row of {flag} does not give its variable `{env}`: {row}")
        elif not _default_matches(row[2], fields[name]):
            problems.append(f"docs/serving.md: the row of {flag} gives the default {row[2]!r}, not {fields[name]!r}")
    for row in rows:
        if row[0].strip("`") not in flags:
            problems.append(f"docs/serving.md's flag table has a row for {row[0]}, which is no ServerConfig field")
    for path in doc_files(root):
        if path == serving or not path.exists():
            continue
        for table in tables(path.read_text(encoding="utf-8")):
            for row in table:
                match = _FLAG_CELL.match(row[0])
                if match and match.group(1) in flags:
                    problems.append(
                        f"{path.relative_to(root)} has a table row for {match.group(1)}: "
                        "the server's flags are tabled once, in docs/serving.md"
                    )
    return problems


def metric_problems(root: Path) -> list[str]:
    names = metric_names(root)
    defining: dict[str, list[str]] = {}
    problems = []
    for path in doc_files(root):
        if not path.exists():
            continue
        where = path.relative_to(root)
        for table in tables(path.read_text(encoding="utf-8")):
            in_metric_table = table[0][0].lower() == METRIC_TABLE_HEADER
            for row in table[1:]:
                for name in _METRIC.findall(row[0]):
                    defining.setdefault(name, []).append(str(where))
                    if name not in names:
                        problems.append(f"{where} tables {name}, which service/metrics.py does not define")
                    elif not in_metric_table:
                        problems.append(f"{where} has a row for {name} outside a table headed 'metric'")
        for paragraph in paragraphs(path.read_text(encoding="utf-8")):
            listed = set(_METRIC.findall(paragraph)) & names
            if len(listed) > MAX_METRICS_IN_PROSE:
                problems.append(f"{where} lists {len(listed)} metrics in prose: the metrics table is the one list")
    for name in sorted(names):
        places = defining.get(name, [])
        if len(places) != 1:
            problems.append(f"{name} has {len(places)} metrics table rows ({', '.join(places) or 'none'}), not 1")
    return problems


def link_targets(text: str) -> list[str]:
    lines = [re.sub(r"`[^`]*`", "", line) for line in outside_code_blocks(text)]
    prose = "\n".join(lines)
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def link_problems(root: Path) -> list[str]:
    problems = []
    for path in doc_files(root):
        if not path.exists():
            continue
        where = path.relative_to(root)
        for target in link_targets(path.read_text(encoding="utf-8")):
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            where, _, fragment = target.partition("#")
            file = path if not where else (root / where.lstrip("/") if where.startswith("/") else path.parent / where)
            file = file.resolve()
            if not file.exists() or not file.is_relative_to(root.resolve()):
                problems.append(f"{where}: the link {target} points at no file of the repository")
            elif fragment and file.suffix == ".md" and fragment not in heading_anchors(file.read_text("utf-8")):
                problems.append(f"{where}: the link {target} names no heading of {file.name}")
    return problems


# ----------------------------------------------------------------------------- the repository's docs


def test_the_docs_stay_within_the_word_limit() -> None:
    assert word_problems(ROOT) == []


def test_the_docs_name_no_commit_and_tell_no_history() -> None:
    assert history_problems(ROOT) == []


def test_every_server_flag_has_one_row_in_the_serving_flag_table_and_none_elsewhere() -> None:
    assert len(server_config_fields(ROOT)) >= 20
    assert flag_problems(ROOT) == []


def test_every_metric_has_exactly_one_metrics_table_row() -> None:
    assert len(metric_names(ROOT)) >= 10
    assert metric_problems(ROOT) == []


def test_every_relative_link_points_at_a_file_that_exists() -> None:
    assert sum(len(link_targets(p.read_text(encoding="utf-8"))) for p in doc_files(ROOT)) >= 20
    assert link_problems(ROOT) == []


# ----------------------------------------------------------------------------- each check can fail

_CONFIG = """
from dataclasses import dataclass

@dataclass(frozen=True)
class ServerConfig:
    port: int = 50051
    grace_seconds: float = 25.0
    default_model: str | None = None
    log_level: str = "INFO"
"""
_METRICS = """
from prometheus_client import Counter, Gauge, Histogram
a = Histogram("textgen_step_duration_seconds", "doc", ["model"])
b = Counter("textgen_requests", "doc", ["model", "code"])
c = Gauge("textgen_active_sequences", "doc", ["model"])
"""
_SERVING = """# Serving

| flag | env | default | meaning |
|---|---|---|---|
| `--port` | `TEXTGEN_PORT` | `50051` | gRPC port |
| `--grace-seconds` | `TEXTGEN_GRACE_SECONDS` | `25` | shutdown grace |
| `--default-model` | `TEXTGEN_DEFAULT_MODEL` | the only model | model of a request naming none |
| `--log-level` | `TEXTGEN_LOG_LEVEL` | `INFO` | log level |

## Metrics

| metric | type | meaning |
|---|---|---|
| `textgen_step_duration_seconds` | histogram | one model call |
| `textgen_requests_total` | counter | finished RPCs |
| `textgen_active_sequences` | gauge | rows in the batch |
"""
_README = """# textgen

Serve it: [serving](docs/serving.md#metrics), [the flags](docs/serving.md#serving).
"""


def _tree(tmp_path: Path, changes: dict[str, str] | None = None) -> Path:
    """A small repository in ``tmp_path/repo`` that keeps every rule, with ``changes`` (path -> text) applied."""
    files = {
        "README.md": _README,
        "SECURITY.md": "# Security\n\nSee [the flags](docs/serving.md).\n",
        "docs/serving.md": _SERVING,
        "benchmarks/README.md": "# Benchmarks\n\n```\nrun abc1234 was 1, now 2\n```\n",
        "service/config.py": _CONFIG,
        "service/metrics.py": _METRICS,
    }
    root = tmp_path / "repo"
    for name, text in {**files, **(changes or {})}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_the_checks_pass_on_a_small_tree_that_keeps_the_rules(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert word_problems(root) == []
    assert history_problems(root) == []  # the hash and the history inside a code block do not count
    assert flag_problems(root) == []
    assert metric_problems(root) == []
    assert link_problems(root) == []


def test_the_word_check_fails_over_the_limit(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"SECURITY.md": "word " * 200})
    assert word_problems(root, limit=150) and "over the limit of 150" in word_problems(root, limit=150)[0]


@pytest.mark.parametrize(
    "line",
    [
        "The results are from commit `20aecc3`.",
        "Measured on 5860976234d0256f6d80e22ac62f711593c5ee60 (see git).",
        "Before this change a call took 4 ms.",
        "An earlier version drew Gumbel noise.",
        "The default was 1, now it is 8.",
    ],
)
def test_the_history_check_finds_hashes_and_history(tmp_path: Path, line: str) -> None:
    root = _tree(tmp_path, {"docs/engine.md": f"# Engine\n\n{line}\n"})
    assert len(history_problems(root)) == 1


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        (_SERVING.replace("| `--port` | `TEXTGEN_PORT` | `50051` | gRPC port |\n", ""), "0 rows for --port"),
        (_SERVING.replace("`TEXTGEN_PORT`", "`TEXTGEN_GRPC_PORT`"), "does not give its variable"),
        (_SERVING.replace("| `25` |", "| `30` |"), "gives the default"),
        (_SERVING.replace("| `INFO` |", "| `DEBUG` |"), "gives the default"),
        (
            _SERVING.replace("| log level |\n", "| log level |\n| `--gone` | `TEXTGEN_GONE` | `1` | gone |\n"),
            "no ServerConfig",
        ),
        (_SERVING.replace("| flag | env |", "| option | env |"), "tables headed"),
    ],
)
def test_the_flag_check_fails_on_a_missing_wrong_or_stale_row(tmp_path: Path, serving: str, expected: str) -> None:
    problems = flag_problems(_tree(tmp_path, {"docs/serving.md": serving}))
    assert any(expected in p for p in problems), problems


def test_the_flag_check_fails_on_a_second_flag_table(tmp_path: Path) -> None:
    security = "# Security\n\n| flag | meaning |\n|---|---|\n| `--port PORT` | the port |\n"
    problems = flag_problems(_tree(tmp_path, {"SECURITY.md": security}))
    assert problems == [
        "SECURITY.md has a table row for --port: the server's flags are tabled once, in docs/serving.md"
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"docs/serving.md": _SERVING.replace("| `textgen_active_sequences` | gauge | rows in the batch |\n", "")},
         "textgen_active_sequences has 0"),
        ({"README.md": _README + "\n| metric | type |\n|---|---|\n| `textgen_requests_total{code}` | counter |\n"},
         "textgen_requests_total has 2"),
        ({"README.md": _README + "\nMetrics: `textgen_requests_total`, `textgen_active_sequences`,\n"
                        "`textgen_step_duration_seconds`.\n"},
         "lists 3 metrics in prose"),
        ({"docs/serving.md": _SERVING.replace("textgen_requests_total", "textgen_requests")},
         "does not define"),
        ({"SECURITY.md": "# Security\n\n| name | value |\n|---|---|\n| `textgen_active_sequences` | 1 |\n"},
         "outside a table headed 'metric'"),
    ],
)  # fmt: skip
def test_the_metric_check_fails_on_a_missing_repeated_or_unknown_row(
    tmp_path: Path, change: dict[str, str], expected: str
) -> None:
    problems = metric_problems(_tree(tmp_path, change))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("link", "expected"),
    [
        ("[gone](docs/gone.md)", "points at no file"),
        ("![plot](benchmarks/results/plot.png)", "points at no file"),
        ("[outside](../elsewhere/DESIGN.md)", "points at no file"),
        ("[anchor](docs/serving.md#no-such-heading)", "names no heading"),
    ],
)
def test_the_link_check_fails_on_a_broken_link(tmp_path: Path, link: str, expected: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "DESIGN.md").write_text("# Design\n", encoding="utf-8")
    problems = link_problems(_tree(tmp_path, {"README.md": _README + f"\nSee {link}.\n"}))
    assert len(problems) == 1 and expected in problems[0], problems
