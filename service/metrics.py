"""Prometheus metrics of one server, in a registry of its own.

Each server builds its own ``ServingMetrics`` (and so its own
``CollectorRegistry``), so two servers in one process never share counters.
With frontend processes (``service/supervisor.py``) every process writes its samples to
``prometheus_client``'s multiprocess files and the supervisor serves their sum; the gauges
are then summed over live processes (only the engine process sets them).
Buckets are chosen for the times this service sees: a CPU step of a small
LSTM takes ~0.1-20 ms, a first token ~1 ms to seconds under load, whole
requests up to minutes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Per-token and per-step times: 50 us .. 2.5 s.
STEP_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
# Time to first token and time queued: 1 ms .. 60 s.
FIRST_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Whole requests: 10 ms .. 10 min.
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Sequences per step: powers of two up to the largest batch we allow.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ModelMetrics:
    """One model's metric children, ``labels()`` looked up once: what the engine writes per call."""

    def __init__(self, metrics: ServingMetrics, name: str) -> None:
        self.step_duration = metrics.step_duration.labels(model=name)
        self.batch_size = metrics.batch_size.labels(model=name)
        self.queue_duration = metrics.queue_duration.labels(model=name)
        self.time_to_first_token = metrics.time_to_first_token.labels(model=name)
        self.inter_token_latency = metrics.inter_token_latency.labels(model=name)
        self.prompt_tokens = metrics.prompt_tokens.labels(model=name)
        self.generated_tokens = metrics.generated_tokens.labels(model=name)
        self.active_sequences = metrics.active_sequences.labels(model=name)
        self.waiting_requests = metrics.waiting_requests.labels(model=name)


class ServingMetrics:
    """Every metric the server exports; all labelled by ``model`` where it applies."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._models: dict[str, ModelMetrics] = {}
        r = self.registry
        self.request_duration = Histogram(
            "textgen_request_duration_seconds",
            "Time from the arrival of a generation request to its last message.",
            ["model", "protocol"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "textgen_time_to_first_token_seconds",
            "Time from the arrival of a request to its first generated token.",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "textgen_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one sequence.",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "textgen_queue_duration_seconds",
            "Time a request waited before it joined the running batch.",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "textgen_step_duration_seconds",
            "Duration of one batched engine step (model step and sampling).",
            ["model"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "textgen_batch_size",
            "Sequences advanced together in one engine step.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.requests_total = Counter(
            "textgen_requests",
            "Generation requests finished, by gRPC status code (HTTP statuses map from these) and protocol.",
            ["model", "code", "protocol"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "textgen_prompt_tokens",
            "Prompt tokens fed to the model.",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "textgen_generated_tokens",
            "Tokens generated and delivered to requests.",
            ["model"],
            registry=r,
        )
        self.active_sequences = Gauge(
            "textgen_active_sequences",
            "Sequences in the running batch.",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.waiting_requests = Gauge(
            "textgen_waiting_requests",
            "Requests accepted but not yet in the running batch.",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_load_failures = Counter(
            "textgen_model_load_failures",
            "Model versions that failed to load or failed the contract check.",
            ["model"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "textgen_model_loaded",
            "1 for each model version loaded and taking traffic.",
            ["model", "version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def request_children(self, model: str, code: str, protocol: str) -> tuple[Any, Any]:
        """The ``requests_total`` and ``request_duration`` children of one outcome, ``labels()`` resolved once."""
        key = (model, code, protocol)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests_total.labels(model=model, code=code, protocol=protocol),
                self.request_duration.labels(model=model, protocol=protocol),
            )
        return children

    def model(self, name: str) -> ModelMetrics:
        """The children of model ``name``, built on first use."""
        children = self._models.get(name)
        if children is None:
            children = self._models[name] = ModelMetrics(self, name)
        return children


def observe_weighted(child: Any, values: Sequence[float], weights: Sequence[int]) -> None:
    """``child.observe(v)`` ``w`` times for each ``(v, w)``: one write per bucket touched, one to the sum.

    ``child`` is one labelled child of a ``Histogram``. In prometheus_client's multiprocess mode
    every ``observe`` writes two values to a memory-mapped file (about 5 us); a frontend that
    observed each token's latency spent a large part of its CPU there. The bucket a value falls
    into is the first whose upper bound is at least the value, as ``observe`` chooses it.
    """
    if not len(values):
        return
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:  # not the Histogram this was written for
        for value, weight in zip(values, weights, strict=True):
            for _ in range(int(weight)):
                child.observe(value)
        return
    if len(values) == 1:  # a bisection beats NumPy's call overhead for one value
        value, weight = float(values[0]), int(weights[0])
        at = bisect.bisect_left(bounds, value)
        if at < len(buckets) and value == value:  # a NaN falls in no bucket, as with observe
            buckets[at].inc(weight)
        total.inc(value * weight)
        return
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.int64)
    # [: len(bounds)]: a NaN sorts past the last bound, and observe counts it in no bucket either.
    counts = np.bincount(np.searchsorted(bounds, v, side="left"), weights=w, minlength=len(bounds))[: len(bounds)]
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    total.inc(float(np.dot(v, w)))
