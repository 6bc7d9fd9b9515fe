"""The /metrics endpoint of a real server: names and types, exact counters, and `promtool check metrics`."""

from __future__ import annotations

import secrets
import subprocess
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import TextGenClient
from tests.helpers import RunningServer, need_tool, wait_until

EXPECTED_TYPES = {
    "textgen_request_duration_seconds": "histogram",
    "textgen_time_to_first_token_seconds": "histogram",
    "textgen_inter_token_latency_seconds": "histogram",
    "textgen_queue_duration_seconds": "histogram",
    "textgen_step_duration_seconds": "histogram",
    "textgen_batch_size": "histogram",
    "textgen_requests": "counter",  # exposed as textgen_requests_total
    "textgen_prompt_tokens": "counter",
    "textgen_generated_tokens": "counter",
    "textgen_model_load_failures": "counter",
    "textgen_active_sequences": "gauge",
    "textgen_waiting_requests": "gauge",
    "textgen_model_loaded": "gauge",
}


def _idle(serving: RunningServer) -> None:
    assert wait_until(lambda: serving.server.engine.active + serving.server.engine.waiting == 0)


def test_metric_names_exist_with_the_right_types(serving: RunningServer, client: TextGenClient) -> None:
    client.complete("The ", max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(serving.metrics_text())}
    for name, kind in EXPECTED_TYPES.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, f"{name} is a {families[name].type}, not a {kind}"
    sample_names = {s.name for f in families.values() for s in f.samples}
    assert "textgen_requests_total" in sample_names
    assert "textgen_generated_tokens_total" in sample_names
    assert 'le="+Inf"' in serving.metrics_text()
    # Buckets chosen for these times, not prometheus_client's defaults.
    step_bounds = {s.labels["le"] for s in families["textgen_step_duration_seconds"].samples if "le" in s.labels}
    assert "5e-05" in step_bounds or "0.00005" in step_bounds
    # Every textgen sample that names a model names a loaded one or the unresolved placeholder.
    models = {s.labels["model"] for f in families.values() for s in f.samples if "model" in s.labels}
    assert models <= {"tiny", "unresolved"}


def test_the_endpoint_speaks_the_prometheus_text_format(serving: RunningServer) -> None:
    url = f"http://127.0.0.1:{serving.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")


def test_token_counters_grow_by_exactly_the_tokens_of_the_requests(
    serving: RunningServer, client: TextGenClient
) -> None:
    _idle(serving)
    generated_before = serving.sample("textgen_generated_tokens_total", {"model": "tiny"})
    prompt_before = serving.sample("textgen_prompt_tokens_total", {"model": "tiny"})
    ok_before = serving.sample("textgen_requests_total", {"model": "tiny", "code": "OK"})
    durations_before = serving.sample("textgen_request_duration_seconds_count", {"model": "tiny"})
    ttft_before = serving.sample("textgen_time_to_first_token_seconds_count", {"model": "tiny"})

    completion, prompt = 0, 0
    for i, n in enumerate((1, 7, 33)):
        r = client.complete(f"prompt {i}: ", max_tokens=n, temperature=1.0, seed=i)
        completion += r.usage.completion_tokens
        prompt += r.usage.prompt_tokens
    streamed = list(client.generate("def f(x):", max_tokens=50, temperature=0.8, seed=9))
    completion += streamed[-1].usage.completion_tokens
    prompt += streamed[-1].usage.prompt_tokens
    assert completion == 1 + 7 + 33 + 50

    assert serving.sample("textgen_generated_tokens_total", {"model": "tiny"}) - generated_before == completion
    assert serving.sample("textgen_prompt_tokens_total", {"model": "tiny"}) - prompt_before == prompt
    assert serving.sample("textgen_requests_total", {"model": "tiny", "code": "OK"}) - ok_before == 4
    assert serving.sample("textgen_request_duration_seconds_count", {"model": "tiny"}) - durations_before == 4
    assert serving.sample("textgen_time_to_first_token_seconds_count", {"model": "tiny"}) - ttft_before == 4


def test_requests_total_counts_failures_by_code(serving: RunningServer, client: TextGenClient) -> None:
    labels = {"model": "unresolved", "code": "INVALID_ARGUMENT"}
    before = serving.sample("textgen_requests_total", labels)
    not_found_before = serving.sample("textgen_requests_total", {"model": "unresolved", "code": "NOT_FOUND"})
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            client.complete("x", top_p=2.0)
    with pytest.raises(grpc.RpcError):
        client.complete("x", model="missing")
    assert serving.sample("textgen_requests_total", labels) - before == 2
    assert serving.sample("textgen_requests_total", {"model": "unresolved", "code": "NOT_FOUND"}) == (
        not_found_before + 1
    )
    assert "UNKNOWN" not in serving.metrics_text()


def test_exposition_passes_promtool_check_metrics(serving: RunningServer, client: TextGenClient) -> None:
    promtool = need_tool("promtool")
    client.complete("The ", max_tokens=5)  # every histogram and counter has samples
    with pytest.raises(grpc.RpcError):
        client.complete("The ", temperature=-1)
    text = serving.metrics_text()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_names_sent_by_clients_never_become_label_values(serving: RunningServer, client: TextGenClient) -> None:
    """Unknown model names and request ids, however many, are counted under ``model="unresolved"`` only."""
    names = [f"nosuch-{secrets.token_hex(8)}" for _ in range(6)]
    request_ids = [f"rid-{secrets.token_hex(8)}" for _ in range(len(names) + 3)]
    not_found = {"model": "unresolved", "code": "NOT_FOUND"}
    invalid = {"model": "unresolved", "code": "INVALID_ARGUMENT"}
    not_found_before, invalid_before = (
        serving.sample("textgen_requests_total", not_found),
        serving.sample("textgen_requests_total", invalid),
    )
    for i, (name, request_id) in enumerate(zip(names, request_ids, strict=False)):
        with pytest.raises(grpc.RpcError) as info:
            if i % 2:
                list(client.generate("The ", model=name, request_id=request_id, max_tokens=2))
            else:
                client.complete("The ", model=name, request_id=request_id, max_tokens=2)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # A known model pinned to a version it does not have, a bad request naming an unknown model, a good one.
    with pytest.raises(grpc.RpcError) as info:
        client.complete("The ", model="tiny", model_version=987654, request_id=request_ids[-3], max_tokens=2)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        client.complete("The ", model=names[0], top_p=2.0, request_id=request_ids[-2])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.complete("The ", max_tokens=2, request_id=request_ids[-1]).usage.completion_tokens == 2

    assert serving.sample("textgen_requests_total", not_found) == not_found_before + len(names) + 1
    assert serving.sample("textgen_requests_total", invalid) == invalid_before + 1
    text = serving.metrics_text()
    values = {v for f in text_string_to_metric_families(text) for s in f.samples for v in s.labels.values()}
    assert values.isdisjoint(names + request_ids)
    assert not [sent for sent in names + request_ids if sent in text]  # not even inside another label or name
    models = {s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples if "model" in s.labels}
    assert models <= {"tiny", "unresolved"}
