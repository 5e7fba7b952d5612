"""Request counters and latency histograms per RPC, read by the ``Stats`` RPC and, with
``--metrics-port``, by Prometheus (``prometheus_text`` / ``MetricsEndpoint``).

Latencies go into fixed log-spaced buckets (20 per decade, 1 us to 1000 s) instead of a list of
samples: memory stays constant however long the server runs, recording is a bisect and two
integer increments, and a percentile is read off the cumulative counts with <= 12% relative
error (each bucket's upper bound is reported, so p99 is never understated).

The Prometheus endpoint is the standard library's HTTP server in a daemon thread (no new
dependency); it renders the same counters in the text exposition format on each scrape, and
exports every 5th bucket bound (4 per decade, 10 us to 100 s, written to 6 significant digits):
Prometheus histograms are cumulative, so a subset of the bounds loses no counts, and 29 series
per method are plenty.
"""
from __future__ import annotations

import bisect
import http.server
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import grpc

if TYPE_CHECKING:
    from .model import ModelHolder

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
    total_seconds: float = 0.0

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
            counters.total_seconds += seconds
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
                name: RpcCounters(c.requests, c.ids, dict(c.errors), list(c.buckets), c.max_seconds, c.total_seconds)
                for name, c in sorted(self._rpcs.items())
            }

    def uptime(self) -> float:
        return time.monotonic() - self.started


# Exported bucket bounds: indices into _BOUNDS of 10 us, 17.8 us, ... 100 s (every 5th bound).
_EXPORTED = [i for i in range(len(_BOUNDS)) if i % 5 == 4 and 1e-5 * 0.999 <= _BOUNDS[i] <= 100 * 1.001]


def _label(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def prometheus_text(metrics: Metrics, holder: "ModelHolder | None" = None) -> str:
    """The counters in the Prometheus text exposition format (version 0.0.4)."""
    rpcs = metrics.snapshot()
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("tablezip_requests_total", "counter", "Finished requests per RPC method and gRPC status code.")
    for method, c in rpcs.items():
        ok = c.requests - sum(c.errors.values())
        for code, count in [("OK", ok), *sorted(c.errors.items())]:
            lines.append(f'tablezip_requests_total{{method="{_label(method)}",code="{_label(code)}"}} {count}')
    family("tablezip_ids_total", "counter", "Ids served by successful requests per RPC method.")
    for method, c in rpcs.items():
        lines.append(f'tablezip_ids_total{{method="{_label(method)}"}} {c.ids}')
    family("tablezip_request_duration_seconds", "histogram", "Server-side request latency per RPC method.")
    for method, c in rpcs.items():
        m = _label(method)
        cumulative = 0
        done = 0
        for i in _EXPORTED:
            cumulative += sum(c.buckets[done : i + 1])
            done = i + 1
            lines.append(f'tablezip_request_duration_seconds_bucket{{method="{m}",le="{_BOUNDS[i]:.6g}"}} {cumulative}')
        lines.append(f'tablezip_request_duration_seconds_bucket{{method="{m}",le="+Inf"}} {c.requests}')
        lines.append(f'tablezip_request_duration_seconds_sum{{method="{m}"}} {_number(c.total_seconds)}')
        lines.append(f'tablezip_request_duration_seconds_count{{method="{m}"}} {c.requests}')
    family("tablezip_uptime_seconds", "gauge", "Seconds since the server started.")
    lines.append(f"tablezip_uptime_seconds {_number(metrics.uptime())}")
    if holder is not None:
        model = holder.current
        family("tablezip_model_generation", "gauge", "Generation of the served model (1 at start, +1 per reload).")
        lines.append(f"tablezip_model_generation {model.generation}")
        family("tablezip_model_info", "gauge", "The served model; always 1, its identity is in the labels.")
        lines.append(f'tablezip_model_info{{checksum="{_label(model.checksum)}",source="{_label(model.source)}",'
                     f'dim="{model.dim}",dtype="{_label(model.dtype)}"}} 1')  # fmt: skip
        family("tablezip_reloads_total", "counter", "Successful model reloads.")
        lines.append(f"tablezip_reloads_total {holder.reloads}")
        family("tablezip_failed_reloads_total", "counter", "Refused model reloads (the old model kept serving).")
        lines.append(f"tablezip_failed_reloads_total {holder.failed_reloads}")
    return "\n".join(lines) + "\n"


class MetricsEndpoint:
    """``GET /metrics`` over HTTP on ``host:port`` (0: a free port, see ``port``), in a daemon
    thread; every other path is 404. Rendering happens per scrape, under the counters' lock only
    for the snapshot, so scrapes never block requests for long."""

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
                pass

        class HTTPServer(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        try:
            self._server = HTTPServer((host, port), Handler)
        except OSError as err:
            raise OSError(f"cannot bind the metrics endpoint to {host}:{port}: {err}") from None
        self.port: int = self._server.server_address[1]
        # serve_forever checks for shutdown every poll_interval: 0.1 s keeps stop() quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="tablezip-metrics", daemon=True)

    def start(self) -> "MetricsEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
