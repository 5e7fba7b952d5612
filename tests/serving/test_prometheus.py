"""``--metrics-port``: Prometheus text over real HTTP from a real server, parsed by a small
parser written against the exposition format (prometheus_client is not installed)."""
from __future__ import annotations

import re
import urllib.error
import urllib.request

import grpc
import pytest

from tablezip.serving.server import ServerConfig

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """(family -> type, (name, labels) -> value); raises on any line the format does not allow."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"} and name not in types
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, raw_labels, value = match.groups()
        labels: dict[str, str] = {}
        position = 0
        while raw_labels and position < len(raw_labels):
            label = _LABEL.match(raw_labels, position)
            assert label, f"bad labels in {line!r}"
            labels[label.group(1)] = label.group(2)
            position = label.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE line before it"
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return types, samples


def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_endpoint_counts_real_rpcs(model_a, serve, connect):
    server = serve(model_a[1], metrics_port=0)
    assert server.metrics_port and server.metrics_port != server.port
    content_type, text = scrape(server.metrics_port)
    assert content_type.startswith("text/plain; version=0.0.4")
    types, before = parse(text)
    assert types["tablezip_requests_total"] == "counter" and types["tablezip_request_duration_seconds"] == "histogram"
    assert value(before, "tablezip_requests_total", method="Lookup", code="OK") == 0
    assert value(before, "tablezip_model_generation") == 1

    client = connect(server)
    client.lookup("a", [1, 2, 3])
    client.lookup("a", [4])
    with pytest.raises(grpc.RpcError):
        client.lookup("nope", [1])
    _, text = scrape(server.metrics_port)
    types, after = parse(text)
    assert value(after, "tablezip_requests_total", method="Lookup", code="OK") == 2
    assert value(after, "tablezip_requests_total", method="Lookup", code="NOT_FOUND") == 1
    assert value(after, "tablezip_ids_total", method="Lookup") == 4
    # A histogram: cumulative buckets, +Inf == _count == requests, a positive _sum.
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in after.items()
        if name == "tablezip_request_duration_seconds_bucket" and dict(labels)["method"] == "Lookup"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1] == (float("inf"), 3)
    assert value(after, "tablezip_request_duration_seconds_count", method="Lookup") == 3
    assert 0 < value(after, "tablezip_request_duration_seconds_sum", method="Lookup") < 10
    info = [dict(labels) for (name, labels) in after if name == "tablezip_model_info"]
    assert info and info[0]["checksum"] == server.holder.current.checksum

    with pytest.raises(urllib.error.HTTPError) as err:
        scrape(server.metrics_port, "/other")
    assert err.value.code == 404


def test_metrics_endpoint_is_off_by_default_and_validated(model_a, serve):
    assert serve(model_a[1]).metrics_port is None
    with pytest.raises(ValueError, match="metrics_port"):
        ServerConfig(metrics_port=70000)


def test_label_values_are_escaped():
    from tablezip.serving.metrics import Metrics, prometheus_text

    metrics = Metrics()
    metrics.record('odd"method\\with\nnewline', 0.001)
    _, samples = parse(prometheus_text(metrics))
    assert value(samples, "tablezip_requests_total", method='odd\\"method\\\\with\\nnewline', code="OK") == 1
