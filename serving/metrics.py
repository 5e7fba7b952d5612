"""Request counters and latency histograms per RPC, read by the ``Stats`` RPC.

Latencies go into fixed log-spaced buckets (20 per decade, 1 us to 1000 s) instead of a list of
samples: memory stays constant however long the server runs, recording is a bisect and two
integer increments, and a percentile is read off the cumulative counts with <= 12% relative
error (each bucket's upper bound is reported, so p99 is never understated).
"""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field

import grpc

_PER_DECADE = 20
# Upper bounds in seconds: 1e-6 * 10**(i/20) for i in 1..180 (1 us .. 1000 s), then +inf.
_BOUNDS: list[float] = [1e-6 * 10 ** (i / _PER_DECADE) for i in range(1, 9 * _PER_DECADE + 1)]


@dataclass
class RpcCounters:
    """What one RPC method has done since the server started."""

    requests: int = 0
    ids: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))
    max_seconds: float = 0.0

    def percentile(self, q: float) -> float:
        """Upper bound (seconds) of the bucket holding the q-th percentile; 0 with no data."""
        total = sum(self.buckets)
        if total == 0:
            return 0.0
        rank = q / 100.0 * total
        seen = 0
        for i, count in enumerate(self.buckets):
            seen += count
            if seen >= rank and count:
                return min(_BOUNDS[i], self.max_seconds) if i < len(_BOUNDS) else self.max_seconds
        return self.max_seconds


class Metrics:
    """Thread-safe counters shared by the servicer and the auth interceptor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rpcs: dict[str, RpcCounters] = {}
        self.started = time.monotonic()

    def record(self, method: str, seconds: float, code: grpc.StatusCode = grpc.StatusCode.OK, ids: int = 0) -> None:
        """One finished request: its server-side latency, status and (if OK) the ids it served."""
        index = bisect.bisect_left(_BOUNDS, seconds)
        with self._lock:
            counters = self._rpcs.get(method)
            if counters is None:
                counters = self._rpcs[method] = RpcCounters()
            counters.requests += 1
            counters.buckets[index] += 1
            if seconds > counters.max_seconds:
                counters.max_seconds = seconds
            if code is grpc.StatusCode.OK:
                counters.ids += ids
            else:
                counters.errors[code.name] = counters.errors.get(code.name, 0) + 1

    def snapshot(self) -> dict[str, RpcCounters]:
        """A consistent copy, so a reader never sees a half-updated method."""
        with self._lock:
            return {
                name: RpcCounters(c.requests, c.ids, dict(c.errors), list(c.buckets), c.max_seconds)
                for name, c in sorted(self._rpcs.items())
            }

    def uptime(self) -> float:
        return time.monotonic() - self.started
