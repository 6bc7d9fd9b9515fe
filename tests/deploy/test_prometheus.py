"""The Prometheus side of the deployment: rules pass promtool, alerts fire when they should, and a
real Prometheus scrapes a real textgen server and answers the latency queries the rules and the
HPA depend on.

Needs the ``prometheus`` Debian package (``promtool`` and ``prometheus``); ``scripts/test.sh``
installs it. Where a binary is absent, each test that needs it is skipped, saying so, and under
``CI=true`` fails instead.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.helpers import ServerProcess, free_ports, need_tool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "textgen-rules.yaml"
RULES_TESTS = Path(__file__).resolve().parent / "textgen_rules_test.yaml"
ADAPTER = PROMETHEUS_DIR / "prometheus-adapter.yaml"
TTFT_P50 = "histogram_quantile(0.5, sum by (le) (rate(textgen_time_to_first_token_seconds_bucket[1m])))"

T = TypeVar("T")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


# ---- promtool ------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_alerts_fire_on_bad_series_and_stay_quiet_on_good_ones() -> None:
    out = promtool("test", "rules", RULES_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    broken["groups"][0]["rules"][0]["expr"] += " by ("
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert promtool("check", "rules", path).returncode != 0


def test_local_prometheus_config_is_valid() -> None:
    out = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def adapter_query(matchers: str, group_by: str) -> str:
    """The adapter rule's metricsQuery as prometheus-adapter expands its templates."""
    (rule,) = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))["rules"]
    series = rule["seriesQuery"].split("{")[0]
    query: str = rule["metricsQuery"]
    for template, value in (("<<.Series>>", series), ("<<.LabelMatchers>>", matchers), ("<<.GroupBy>>", group_by)):
        query = query.replace(template, value)
    assert "<<" not in query, f"template left unexpanded in {query!r}"
    return query


def test_adapter_metrics_query_is_valid_promql(tmp_path: Path) -> None:
    query = adapter_query('namespace="default",pod=~"textgen-a|textgen-b"', "pod")
    rules = {"groups": [{"name": "adapter", "rules": [{"record": "adapter:check", "expr": query}]}]}
    path = tmp_path / "adapter-query.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    out = promtool("check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- a real Prometheus scraping a real server ---------------------------------------------------


@dataclass
class Process:
    """A child process started by a fixture, and the file its output goes to."""

    popen: subprocess.Popen[bytes]
    log: Path


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, processes: list[Process]) -> T:
    """Polls ``probe`` until it returns something other than None; fails with the processes' logs
    as soon as one of them has exited, or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        dead = [p for p in processes if p.popen.poll() is not None]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.log.name}:\n{p.log.read_text(errors='replace')[-3000:]}" for p in processes)
    why = f"{dead[0].log.stem} exited with {dead[0].popen.returncode}" if dead else f"timed out after {timeout:.0f} s"
    pytest.fail(f"{why} while waiting for {what}\n{tails}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any | None:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]] | None:
        data = self.get("/api/v1/query", query=promql)
        return None if data is None else data["result"]

    def scalar(self, promql: str) -> float | None:
        """The query's single value once it is a finite number, else None."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None


@pytest.fixture
def textgen_server(start_process: Callable[..., ServerProcess]) -> tuple[int, int, Process]:
    """A real ``python -m service`` on loopback: (gRPC port, metrics port, the process)."""
    server = start_process("--grace-seconds", "2")
    return server.port, server.metrics_port, Process(server.proc, server.log_path)


@pytest.fixture
def prometheus(textgen_server: tuple[int, int, Process], tmp_path: Path) -> Iterator[tuple[PrometheusAPI, Process]]:
    """A real Prometheus scraping the server every second and evaluating the textgen rules."""
    binary = need_tool("prometheus")
    _, metrics_port, _ = textgen_server
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "textgen",
                # What the ServiceMonitor attaches in a cluster, so the adapter's query can be run here.
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"namespace": "test", "pod": "textgen-0"}}
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (port,) = free_ports(1)
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield PrometheusAPI(port), Process(process, log)
    finally:
        stop(process)


def serving(port: int) -> bool | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service="textgen.v1.TextGeneration"), timeout=2)
                .status
            )
        except grpc.RpcError:
            return None
    return True if status == health_pb2.HealthCheckResponse.SERVING else None


def generate(port: int, seed: int) -> str:
    from service.client import TextGenClient

    with TextGenClient(f"127.0.0.1:{port}", timeout=30) as client:
        return "".join(r.text for r in client.generate("The ", max_tokens=16, temperature=0.8, seed=seed))


def server_ttft_buckets(metrics_port: int) -> list[tuple[float, float]]:
    """The server's own TTFT histogram: (upper bound, cumulative count) per bucket, summed over models."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "textgen_time_to_first_token_seconds_bucket":
                le = float(sample.labels["le"])
                counts[le] = counts.get(le, 0.0) + sample.value
    return sorted(counts.items())


def test_prometheus_scrapes_a_real_server_and_answers_the_ttft_quantile(
    textgen_server: tuple[int, int, Process], prometheus: tuple[PrometheusAPI, Process]
) -> None:
    port, metrics_port, server = textgen_server
    api, prometheus_process = prometheus
    logs = [server, prometheus_process]
    wait_for("the server's health to be SERVING", lambda: serving(port), 120, logs)

    # A rate needs the counters to grow between two scrapes: one request, a scrape, then more.
    assert generate(port, seed=1)
    wait_for(
        "Prometheus to scrape the first request",
        lambda: True if (api.scalar("sum(textgen_requests_total)") or 0) >= 1 else None,
        30,
        logs,
    )
    assert generate(port, seed=2) and generate(port, seed=3)
    wait_for(
        "Prometheus to scrape all three requests",
        lambda: True if (api.scalar("sum(textgen_requests_total)") or 0) >= 3 else None,
        30,
        logs,
    )
    p50 = wait_for("a finite p50 time to first token", lambda: api.scalar(TTFT_P50), 30, logs)

    # Prometheus's estimate lies inside the buckets the server itself counted those requests in.
    buckets = server_ttft_buckets(metrics_port)
    assert buckets[-1][1] >= 3
    lower = max((le for le, count in buckets if count == 0), default=0.0)
    upper = min(le for le, count in buckets if count == buckets[-1][1])
    assert lower <= p50 <= upper, (p50, buckets)

    # The recording rules and alerts load and evaluate in a real Prometheus.
    recorded = wait_for(
        "the recording rule model:textgen_time_to_first_token_seconds:p50_5m",
        lambda: api.scalar("model:textgen_time_to_first_token_seconds:p50_5m"),
        30,
        logs,
    )
    assert lower <= recorded <= upper
    groups = (api.get("/api/v1/rules") or {}).get("groups", [])
    assert {g["name"] for g in groups} == {g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]}
    assert all(rule["health"] != "err" for g in groups for rule in g["rules"]), groups

    # The HPA's metric, as prometheus-adapter finds it (seriesQuery) and asks for it: one value per pod.
    (rule,) = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))["rules"]
    discovered = api.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
    assert discovered and {(s["namespace"], s["pod"]) for s in discovered} == {("test", "textgen-0")}
    per_pod = api.query(adapter_query('namespace="test",pod=~"textgen-0"', "pod"))
    assert per_pod is not None and [s["metric"] for s in per_pod] == [{"pod": "textgen-0"}]
    assert float(per_pod[0]["value"][1]) >= 0
