"""Turn one benchmark run into results.json, a markdown table (with ratios and the issue's targets) and PNG plots."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.burst import markdown_lines as burst_lines
from benchmarks.proc_cpu import ROLES

RESULTS_JSON = "results.json"
TABLE_MD = "table.md"
THROUGHPUT_PNG = "throughput.png"
LATENCY_PNG = "latency.png"


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, evaluated on this run."""

    name: str
    value: float | None
    threshold: float
    higher_is_better: bool
    unit: str

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "comparison": ">=" if self.higher_is_better else "<=",
            "unit": self.unit,
            "passed": self.passed,
        }


def _level(rows: Sequence[dict[str, Any]], streams: int) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("streams") == streams), None)


def _engine_rate(results: dict[str, Any], batch: int) -> float | None:
    rows = results.get("engine", {}).get("batched", {}).get("rows", [])
    row = next((r for r in rows if r["batch"] == batch), None)
    return None if row is None else float(row["tokens_per_s"])


def _get(level: dict[str, Any] | None, key: str) -> float | None:
    value = None if level is None else level.get(key)
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(results: dict[str, Any]) -> list[Target]:
    """The issue's targets at ``reference_streams`` (64) and ``capacity_streams`` (1000)."""
    ref = int(results["config"]["reference_streams"])
    cap = int(results["config"]["capacity_streams"])
    e2e = results.get("e2e", {})
    batched = _level(e2e.get("batched", {}).get("levels", []), ref)
    single = _level(e2e.get("max_batch_size_1", {}).get("levels", []), ref)
    capacity = _level(e2e.get("batched", {}).get("levels", []), cap)
    seeds = results.get("engine", {}).get("seed_loop", {}).get("tokens_per_s")
    rate = None if batched is None else float(batched["tokens_per_s"])
    http = e2e.get("batched", {}).get("http")
    floor = _level(e2e.get("floor", {}).get("levels", []), ref)
    inter = results.get("interference", {})
    with_p99 = inter.get("with_arrivals", {}).get("itl_ms_p99")
    without_p50 = inter.get("without_arrivals", {}).get("itl_ms_p50")
    return [
        Target(
            f"{ref} streams: e2e tokens/s vs --max-batch-size 1",
            _ratio(rate, None if single is None else float(single["tokens_per_s"])),
            8.0,
            True,
            "x",
        ),
        Target(f"{ref} streams: e2e tokens/s vs the seeds' loop", _ratio(rate, seeds), 1000.0, True, "x"),
        Target(
            f"{ref} streams: e2e tokens/s vs engine-only at batch {ref}",
            _ratio(rate, _engine_rate(results, ref)),
            0.6,
            True,
            "x",
        ),
        Target("interference: ITL p99 with long prompts / p50 without", _ratio(with_p99, without_p50), 2.0, False, "x"),
        Target(
            f"{ref} streams: e2e tokens/s over HTTP SSE vs gRPC",
            _ratio(None if http is None else float(http["tokens_per_s"]), rate),
            0.7,
            True,
            "x",
        ),
        Target(
            f"{ref} streams: server CPU per token / the floor's",
            _ratio(_get(batched, "cpu_us_per_token"), _get(floor, "cpu_us_per_token")),
            2.0,
            False,
            "x",
        ),
        Target(f"{cap} streams: errors", None if capacity is None else float(capacity["errors"]), 0.0, False, ""),
        Target(
            f"{cap} streams: server RSS per stream (peak - RSS after warm-up) / streams",
            None if capacity is None else float(capacity["server_rss_kb_per_stream_since_warmup"]),
            64.0,
            False,
            "KiB",
        ),
    ]


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Informative ratios against the baselines measured in the same run."""
    engine = results.get("engine", {})
    seeds = engine.get("seed_loop", {}).get("tokens_per_s")
    onestep = engine.get("onestep", {}).get("tokens_per_s")
    rows = engine.get("batched", {}).get("rows", [])
    best = max((float(r["tokens_per_s"]) for r in rows), default=None)
    out: dict[str, float | None] = {
        "onestep / seeds' loop": _ratio(onestep, seeds),
        "best engine batch / onestep": _ratio(best, onestep),
        "best engine batch / seeds' loop": _ratio(best, seeds),
    }
    inter = results.get("interference", {})
    with_, without = inter.get("with_arrivals", {}), inter.get("without_arrivals", {})
    out["interference: ITL p99 with arrivals / p99 without"] = _ratio(
        with_.get("itl_ms_p99"), without.get("itl_ms_p99")
    )
    out["interference: ITL p50 with arrivals / p50 without"] = _ratio(
        with_.get("itl_ms_p50"), without.get("itl_ms_p50")
    )
    out["no arrivals: ITL p99 / p50 (the spread with no interference)"] = _ratio(
        without.get("itl_ms_p99"), without.get("itl_ms_p50")
    )
    for level in results.get("e2e", {}).get("batched", {}).get("levels", []):
        n = level["streams"]
        out[f"e2e {n} streams / seeds' loop"] = _ratio(float(level["tokens_per_s"]), seeds)
        out[f"e2e {n} streams / onestep"] = _ratio(float(level["tokens_per_s"]), onestep)
    return out


# --------------------------------------------------------------------------- markdown
def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _percent(cpu_s: float | None, seconds: float | None) -> float | None:
    """CPU seconds over wall seconds, in percent of one core."""
    return None if cpu_s is None or not seconds else 100.0 * cpu_s / seconds


def _untrusted_lines(u: dict[str, Any]) -> list[str]:
    """The untrusted-prompt scenario: running streams' largest gap between messages, alone and under the prompts."""
    if u.get("error"):
        return ["### Untrusted prompts", "", f"Not measured: {u['error']}", ""]
    if not u:
        return []
    lines = [
        f"### Untrusted prompts (largest gap between messages of {u['config']['streams']} running streams; "
        f"{u['attack']}, {u['prompt_bytes']:,} bytes each)",
        "",
        "| phase | median ms | max ms | stream errors | prompts' status codes |",
        "|---|---:|---:|---:|---|",
    ]
    for key, title in (("quiet", "nothing else arriving"), ("attacked", "prompts arriving")):
        p = u.get(key, {})
        codes = ", ".join(f"{c} x{n}" for c, n in p.get("codes", {}).items()) or "–"
        lines.append(
            f"| {title} | {_f(p.get('median_ms'))} | {_f(p.get('max_ms'))} "
            f"| {sum(p.get('stream_errors', {}).values())} | {codes} |"
        )
    return [
        *lines,
        "",
        f"Ratio with / without: median {_f(u.get('ratio_median'), 2)}x, max {_f(u.get('ratio_max'), 2)}x.",
        "",
    ]


def _by_role(by_role: dict[str, float] | None) -> str:
    """A level's CPU µs per token of the engine, the frontends and the rest, as "e / f / o"."""
    if not by_role:
        return "–"
    return " / ".join(_f(by_role.get(role), 2) for role in ROLES)


def _cpu_lines(batched: dict[str, Any], floor: dict[str, Any]) -> list[str]:
    """The batched server's CPU per token and per request beside the floor's, level by level."""
    lines = [
        "### Server CPU per token and per request (the server's process tree, from /proc), against the floor",
        "",
    ]
    if floor.get("error"):
        lines += [f"The floor was not measured: {floor['error']}", ""]
    lines += [
        "| streams | tokens/stream | tokens/message | server processes | server CPU s "
        "| CPU µs/token | CPU µs/token: engine / frontends / other | CPU ms/request | floor: CPU µs/token "
        "| floor: CPU ms/request | floor: tokens/s | server / floor, per token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in batched.get("levels", []):
        f = _level(floor.get("levels", []), r["streams"]) or {}
        lines.append(
            f"| {r['streams']} | {r['max_tokens']} | {_f(r.get('tokens_per_message'), 2)} "
            f"| {_f(r.get('server_processes'))} | {_f(r.get('server_cpu_seconds'), 2)} "
            f"| {_f(r.get('cpu_us_per_token'), 2)} | {_by_role(r.get('cpu_us_per_token_by_role'))} "
            f"| {_f(r.get('cpu_ms_per_request'), 3)} | {_f(f.get('cpu_us_per_token'), 2)} "
            f"| {_f(f.get('cpu_ms_per_request'), 3)} "
            f"| {_f(f.get('tokens_per_s'))} | {_f(_ratio(r.get('cpu_us_per_token'), f.get('cpu_us_per_token')), 2)} |"
        )
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    """The whole run as markdown tables."""
    lines: list[str] = []
    m = results.get("machine", {})
    spec = results["config"]["model"]
    lines += [
        f"Machine: {m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores, {m.get('ram_gib', '?')} GiB RAM; "
        f"TensorFlow {m.get('tensorflow', '?')}, Python {m.get('python', '?')}.",
        f"Model: char LSTM, {spec['layers']} layer x {spec['units']} units, embedding {spec['embedding_dim']}, "
        f"vocab {results.get('engine', {}).get('vocab_size', '?')} (untrained weights). Run took "
        f"{_f(results.get('seconds'), 0)} s.",
        "",
    ]
    engine = results.get("engine", {})
    if engine:
        lines += [
            f"### Engine only (decode step: {engine.get('batched', {}).get('decode_fn', '?')})",
            "",
            "| batch | tokens/s | ms per step |",
            "|---:|---:|---:|",
        ]
        for r in engine.get("batched", {}).get("rows", []):
            lines.append(f"| {r['batch']} | {_f(r['tokens_per_s'])} | {_f(r['step_ms'], 2)} |")
        variants = engine.get("variants", {}).get("rows", [])
        if variants:
            lines += ["", "| decode variant | batch | tokens/s | ms per step |", "|---|---:|---:|---:|"]
            for r in variants:
                lines.append(f"| {r['variant']} | {r['batch']} | {_f(r['tokens_per_s'])} | {_f(r['ms_per_step'], 2)} |")
        seed, one = engine.get("seed_loop", {}), engine.get("onestep", {})
        lines += [
            "",
            "| baseline | ms per token | tokens/s |",
            "|---|---:|---:|",
            f"| seeds' loop (`model.predict` on the 40-char window per token) | {_f(seed.get('ms_per_token'), 2)} "
            f"| {_f(seed.get('tokens_per_s'), 2)} |",
            f"| OneStep per request (stateful step, batch 1) | {_f(one.get('ms_per_token'), 3)} "
            f"| {_f(one.get('tokens_per_s'))} |",
            "",
        ]
    e2e = results.get("e2e", {})
    for key, title in (("batched", "batched server"), ("max_batch_size_1", "`--max-batch-size 1`")):
        part = e2e.get(key)
        if not part:
            continue
        lines += [f"### End to end over gRPC, {title} ({_f(part.get('server_args'))})", ""]
        if part.get("error"):
            lines += [f"Not measured: {part['error']}", ""]
            continue
        lines += [
            "| streams | tokens/stream | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
            "| errors | server RSS KiB/stream: level / since warm-up | tokens/message | server CPU % | client CPU % "
            "| mean batch | ms/step | time in steps % |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in part.get("levels", []):
            lines.append(
                f"| {r['streams']} | {r['max_tokens']} | {_f(r['tokens_per_s'])} | {_f(r['ttft_ms_p50'])} "
                f"| {_f(r['ttft_ms_p99'])} | {_f(r['itl_ms_p50'], 2)} | {_f(r['itl_ms_p99'], 2)} | {r['errors']} "
                f"| {_f(r['server_rss_kb_per_stream'])} / {_f(r.get('server_rss_kb_per_stream_since_warmup'))} "
                f"| {_f(r.get('tokens_per_message'), 2)} "
                f"| {_f(_percent(r.get('server_cpu_seconds'), r.get('seconds')), 0)} "
                f"| {_f(r.get('client_cpu_percent'), 0)} | {_f(r.get('server_mean_batch'))} "
                f"| {_f(r.get('server_step_ms_mean'), 2)} | {_f(_percent(r.get('server_step_share'), 1.0), 0)} |"
            )
        http = part.get("http")
        if http:
            lines += [
                "",
                "| the same server over HTTP SSE: streams | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms "
                "| errors | server CPU % | server CPU µs/token | client CPU % |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {http['streams']} | {_f(http['tokens_per_s'])} | {_f(http['ttft_ms_p50'])} "
                f"| {_f(http['itl_ms_p50'], 2)} | {_f(http['itl_ms_p99'], 2)} | {http['errors']} "
                f"| {_f(_percent(http.get('server_cpu_seconds'), http.get('seconds')), 0)} "
                f"| {_f(http.get('cpu_us_per_token'), 2)} | {_f(http.get('client_cpu_percent'), 0)} |",
            ]
        lines.append("")
        if key == "batched":
            lines += _cpu_lines(part, e2e.get("floor", {}))
    inter = results.get("interference", {})
    if inter.get("error"):
        lines += ["### Interference", "", f"Not measured: {inter['error']}", ""]
    elif inter:
        lines += [
            "### Interference (running streams' inter-token latency)",
            "",
            "| phase | streams | ITL p50 ms | ITL p99 ms | arrivals | arrival TTFT p50 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, title in (("with_arrivals", "long prompts arriving"), ("without_arrivals", "no arrivals")):
            p = inter.get(key, {})
            lines.append(
                f"| {title} | {p.get('streams')} | {_f(p.get('itl_ms_p50'), 2)} | {_f(p.get('itl_ms_p99'), 2)} "
                f"| {p.get('arrivals')} | {_f(p.get('arrival_ttft_ms_p50'))} "
                f"| {(p.get('running_errors') or 0) + (p.get('arrival_errors') or 0)} |"
            )
        lines.append("")
    lines += _untrusted_lines(results.get("untrusted_prompts", {}))
    lines += burst_lines(results.get("burst", {}))
    prof = results.get("profile", {})
    if prof.get("error"):
        lines += ["### Server profile", "", f"Not measured: {prof['error']}", ""]
    elif prof:
        lines += [
            f"### Server profile at {prof['streams']} streams (py-spy, {prof['samples']} samples, "
            f"{_f(prof['tokens_per_s'])} tokens/s while profiled; raw stacks: `{prof['raw']}`)",
            "",
            "| thread | share |",
            "|---|---:|",
            *[f"| `{name}` | {100 * share:.1f}% |" for name, share in prof.get("threads", [])],
            "",
            "| on CPU in (self) | share | under (inclusive) | share |",
            "|---|---:|---|---:|",
        ]
        for (a, sa), (b, sb) in zip(prof["self"], prof["inclusive"], strict=False):
            lines.append(f"| `{a}` | {100 * sa:.1f}% | `{b}` | {100 * sb:.1f}% |")
        lines.append("")
    lines += ["### Targets", "", "| target | measured | needed | result |", "|---|---:|---:|---|"]
    for t in targets(results):
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t.passed]
        comparison = ">=" if t.higher_is_better else "<="
        measured = "–" if t.value is None else f"{_f(t.value, 2)}{t.unit}"
        lines.append(f"| {t.name} | {measured} | {comparison} {_f(t.threshold)}{t.unit} | {verdict} |")
    lines += ["", "### Ratios against the baselines of the same run", "", "| ratio | value |", "|---|---:|"]
    for name, value in ratios(results).items():
        lines.append(f"| {name} | {_f(value, 1)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
def plot_throughput(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = results.get("engine", {}).get("batched", {}).get("rows", [])
    if rows:
        ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "s--", label="engine only (batch = B)")
    e2e = results.get("e2e", {})
    for key, label in (
        ("batched", "end to end, batched"),
        ("max_batch_size_1", "end to end, --max-batch-size 1"),
        ("floor", "floor: bare gRPC server, no model"),
    ):
        levels = e2e.get(key, {}).get("levels", [])
        if levels:
            ax.plot([r["streams"] for r in levels], [r["tokens_per_s"] for r in levels], "o-", label=label)
    engine = results.get("engine", {})
    for key, label, style in (("onestep", "OneStep per request", ":"), ("seed_loop", "seeds' loop", "-.")):
        rate = engine.get(key, {}).get("tokens_per_s")
        if rate:
            ax.axhline(rate, linestyle=style, color="gray", label=f"{label} ({rate:,.1f} tokens/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams (engine only: batch size)")
    ax.set_ylabel("tokens/s (aggregate)")
    ax.set_title("Throughput against concurrency, with the baselines of the same run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    e2e = results.get("e2e", {})
    for ax, metric, title in ((axes[0], "ttft", "time to first token"), (axes[1], "itl", "inter-token latency")):
        for key, label in (("batched", "batched"), ("max_batch_size_1", "max-batch-size 1")):
            levels = [r for r in e2e.get(key, {}).get("levels", []) if r.get(f"{metric}_ms_p50") is not None]
            if not levels:
                continue
            x = [r["streams"] for r in levels]
            ax.plot(x, [r[f"{metric}_ms_p50"] for r in levels], "o-", label=f"{label} p50")
            ax.plot(x, [r[f"{metric}_ms_p99"] for r in levels], "^--", label=f"{label} p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    inter = results.get("interference", {})
    names, p50s, p99s = [], [], []
    for key, label in (("without_arrivals", "no arrivals"), ("with_arrivals", "long prompts\narriving")):
        phase = inter.get(key)
        if phase and phase.get("itl_ms_p50") is not None:
            names.append(label)
            p50s.append(phase["itl_ms_p50"])
            p99s.append(phase["itl_ms_p99"])
    ax = axes[2]
    xs = list(range(len(names)))
    if p50s:
        ax.axhline(2 * p50s[0], color="red", linestyle="--", label="target: p99 <= 2 x p50 without")
    ax.bar([x - 0.2 for x in xs], p50s, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99s, width=0.4, label="p99")
    ax.set_xticks(xs, names)
    ax.set_ylabel("ms")
    ax.set_title("interference: ITL of running streams")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write results.json (with targets and ratios), table.md and both plots; return their paths."""
    results = dict(results, targets=[t.to_dict() for t in targets(results)], ratios=ratios(results))
    paths = {name: os.path.join(out_dir, name) for name in (RESULTS_JSON, TABLE_MD, THROUGHPUT_PNG, LATENCY_PNG)}
    with open(paths[RESULTS_JSON], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    with open(paths[TABLE_MD], "w", encoding="utf-8") as f:
        f.write(markdown(results))
    plot_throughput(results, paths[THROUGHPUT_PNG])
    plot_latency(results, paths[LATENCY_PNG])
    return paths
