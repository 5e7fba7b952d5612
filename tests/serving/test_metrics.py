"""Latency percentiles from the fixed-bucket histogram, and what is counted."""
from __future__ import annotations

import grpc
import pytest

from tablezip.serving.metrics import Metrics


def test_percentiles_are_upper_bounds_within_one_bucket():
    metrics = Metrics()
    for ms in range(1, 101):  # 1..100 ms
        metrics.record("Lookup", ms / 1e3, ids=10)
    c = metrics.snapshot()["Lookup"]
    assert c.requests == 100 and c.ids == 1000 and c.errors == {}
    # never below the true value, at most one bucket (10**(1/20) = 12.2%) above it
    assert 0.050 <= c.percentile(50) <= 0.050 * 1.123
    assert 0.099 <= c.percentile(99) <= 0.100
    assert c.percentile(100) == c.max_seconds == 0.1


def test_errors_by_code_and_ids_only_for_successes():
    metrics = Metrics()
    metrics.record("LookupBags", 0.001, grpc.StatusCode.NOT_FOUND, ids=5)
    metrics.record("LookupBags", 0.002, grpc.StatusCode.NOT_FOUND)
    metrics.record("LookupBags", 0.003, grpc.StatusCode.DEADLINE_EXCEEDED)
    metrics.record("LookupBags", 0.004, ids=7)
    c = metrics.snapshot()["LookupBags"]
    assert c.requests == 4 and c.ids == 7 and c.errors == {"NOT_FOUND": 2, "DEADLINE_EXCEEDED": 1}
    assert Metrics().snapshot() == {}


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 5e3])
def test_extreme_latencies_land_in_the_edge_buckets(seconds):
    metrics = Metrics()
    metrics.record("Stats", seconds)
    assert metrics.snapshot()["Stats"].percentile(99) == pytest.approx(seconds)
