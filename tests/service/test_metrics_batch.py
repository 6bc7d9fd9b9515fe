"""``observe_weighted``: many histogram observations written at once, exactly as one by one."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram

from service.metrics import STEP_BUCKETS, observe_weighted


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _histogram() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    return registry, Histogram("t_seconds", "a test histogram", ["model"], buckets=STEP_BUCKETS, registry=registry)


def test_weighted_observations_equal_repeated_observe() -> None:
    # Values on bounds (le is inclusive), between them, below the first, past the last, and 0.
    values = [0.0, 0.00005, 0.00007, 0.001, 0.0011, 2.5, 3.0, 1e-9, 0.3]
    weights = [1, 3, 2, 1, 5, 1, 4, 1, 7]
    one_by_one, h1 = _histogram()
    for value, weight in zip(values, weights, strict=True):
        for _ in range(weight):
            h1.labels(model="m").observe(value)
    batched, h2 = _histogram()
    observe_weighted(h2.labels(model="m"), values, weights)
    expected, got = _samples(one_by_one), _samples(batched)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), key


def test_one_value_at_a_time_equals_repeated_observe() -> None:
    values = [0.0, 0.00005, 0.00007, 0.001, 2.5, 3.0, 0.3]
    one_by_one, h1 = _histogram()
    batched, h2 = _histogram()
    for n, value in enumerate(values, 1):
        for _ in range(n):
            h1.labels(model="m").observe(value)
        observe_weighted(h2.labels(model="m"), [value], [n])
    expected, got = _samples(one_by_one), _samples(batched)
    for key, value in expected.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), key


def test_nothing_to_observe_writes_nothing() -> None:
    registry, h = _histogram()
    observe_weighted(h.labels(model="m"), [], [])
    assert _samples(registry)[("t_seconds_count", "")] == 0


class _PlainChild:
    """Something with only ``observe``: the fallback path."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, value: float) -> None:
        self.seen.append(value)


def test_a_child_without_histogram_internals_is_observed_one_by_one() -> None:
    child = _PlainChild()
    observe_weighted(child, [0.5, 0.25], [2, 1])
    assert child.seen == [0.5, 0.5, 0.25]
