"""The gRPC server: the lookup service, the standard health service and server reflection.

A synchronous grpc server with a small thread pool, not grpc.aio: torch releases the GIL inside
its kernels, so handler threads overlap on the lookups themselves, and on the 2-core machine a
bare sync server answered more requests per second than a bare aio one (4,000 vs 2,400 QPS with
one client, 512-id payloads). ``torch.set_num_threads(1)`` by default: requests are small, and
intra-op threads would only contend with the handler threads for the same cores (Full features
use no torch per request at all; on the model-forward path 1 and 2 threads measured the same).

Several processes can share one port (``ServerConfig.reuse_port``, SO_REUSEPORT; each loads the
model): the kernel assigns each client connection to one of them. In one process every request
passes through one GIL, and under load each microsecond a handler holds it makes the other
threads (grpc's poller, the other handlers) wait and wake more often; that hand-off, not the
handler's own work, is most of what the server spends per request beyond a bare grpc server
(benchmarks/NOTES.md, "Issue 5, 8 clients"). With 2 processes at 8 clients, tablezip served more
requests per second than a bare grpc server in one process.

Four request threads by default: handlers hold the GIL for most of their work, so more threads
only add GIL hand-offs and context switches. On the 2-core machine 2 and 4 workers served as
many requests as 8 or more (up to 1.3-1.5x at 4 clients), with up to ~20% less server CPU per
request, and no measurable difference between 2 and 4 (benchmarks/NOTES.md, "Serving"); 4
rather than 2 so that a few very large requests cannot occupy every thread while small ones wait.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tablezip.embeddings import ArtifactError

from .auth import BearerTokenInterceptor
from .metrics import Metrics, MetricsEndpoint, prometheus_text
from .model import LoadedModel, ModelHolder, load_model
from .service import SERVICE_NAME, EmbeddingLookupService, method_handlers
from .validation import DEFAULT_MAX_IDS, DEFAULT_MAX_MESSAGE_BYTES, Limits

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ServerConfig:
    """How to serve. ``port=0`` picks a free port (see ``Server.port``)."""

    host: str = "127.0.0.1"
    port: int = 0
    max_workers: int = 4  # see the module docstring
    max_concurrent_rpcs: int | None = 256  # beyond: RESOURCE_EXHAUSTED instead of an unbounded queue
    max_ids: int = DEFAULT_MAX_IDS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    torch_threads: int | None = 1
    grace_seconds: float = 5.0
    metrics_port: int | None = None  # Prometheus text on http://host:metrics_port/metrics; None: off
    # SO_REUSEPORT: several server processes (each with its own GIL and its own copy of the model)
    # bind the same port and the kernel spreads connections over them. Off: a second server on a
    # taken port fails instead of sharing it.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.token == "":
            raise ValueError("token must not be empty (leave it unset to serve without one)")
        Limits(self.max_ids)  # validates max_ids
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1 (or None: unbounded), got {self.max_concurrent_rpcs}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 (0: a free port), got {self.metrics_port}")


def _handler_thread_setup(torch_threads: int | None) -> None:
    """Per-thread torch state for a handler thread, set once instead of per request.

    Grad mode is per thread, and the intra-op thread count is set here as well so a handler
    thread never depends on what the main thread configured."""
    torch.set_grad_enabled(False)
    if torch_threads:
        torch.set_num_threads(torch_threads)


class Server:
    """A running tablezip server over one artifact; use as a context manager or start()/stop()."""

    def __init__(self, source: str | Path, config: ServerConfig = ServerConfig(), tracking_uri: str | None = None,
                 model: LoadedModel | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.holder = ModelHolder(model or load_model(str(source), tracking_uri), tracking_uri)
        self.port: int | None = None
        self.metrics_port: int | None = None  # the bound one, once started with config.metrics_port set
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._health = health.HealthServicer()
        interceptors = [BearerTokenInterceptor(config.token, self.metrics)] if config.token else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(config.max_workers, "tablezip-rpc", initializer=_handler_thread_setup,
                                       initargs=(config.torch_threads,)),
            interceptors=interceptors,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", int(config.reuse_port)),  # see ServerConfig.reuse_port
            ],
        )
        service = EmbeddingLookupService(self.holder, self.metrics, Limits(config.max_ids), allow_reload=bool(config.token))
        handlers = method_handlers(service)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self._server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self._server
        )

    @property
    def address(self) -> str:
        """``host:port`` to give a client (the bound port, also when config.port was 0)."""
        return _hostport(self.config.host, self.port)

    def start(self) -> "Server":
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        bind = _hostport(self.config.host, self.config.port)
        try:
            if self.config.tls_cert is not None and self.config.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())]
                )
                self.port = self._server.add_secure_port(bind, credentials)
            else:
                self.port = self._server.add_insecure_port(bind)
        except RuntimeError as err:
            raise OSError(f"cannot bind {bind}: {err}") from None
        if not self.port:
            raise OSError(f"cannot bind {bind}")
        if self.config.metrics_port is not None:
            self._metrics_endpoint = MetricsEndpoint(
                self.config.host, self.config.metrics_port, lambda: prometheus_text(self.metrics, self.holder)
            ).start()
            self.metrics_port = self._metrics_endpoint.port
        self._server.start()
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight requests finish (up to ``grace`` seconds), stop."""
        self._health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_seconds if grace is None else grace).wait()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def reload(self, source: str | None = None) -> LoadedModel:
        """What SIGHUP and the Reload RPC do; raises ``ArtifactError`` and keeps the old model."""
        return self.holder.reload(source)

    def __enter__(self) -> "Server":
        return self.start() if self.port is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)


def _hostport(host: str, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve_forever(source: str, config: ServerConfig, tracking_uri: str | None = None) -> int:
    """``tablezip serve``: load, bind, print the address, reload on SIGHUP, stop on SIGTERM/SIGINT."""
    server = Server(source, config, tracking_uri).start()
    model = server.holder.current
    scheme = "TLS" if config.tls_cert else "plaintext"
    print(
        f"tablezip serving {model.source} (checksum {model.checksum[:12]}, {len(model.feature_names)} features, "
        f"D={model.dim}, {model.dtype}) on {server.address} [{scheme}{', token' if config.token else ''}]",
        flush=True,
    )
    if server.metrics_port is not None:
        print(f"Prometheus metrics on http://{_hostport(config.host, server.metrics_port)}/metrics", flush=True)
    stop = threading.Event()

    def reload_in_background(*_: object) -> None:
        # Never load inside the signal handler: it runs between bytecodes of the main thread.
        threading.Thread(target=_reload_and_report, args=(server,), name="tablezip-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, reload_in_background)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    print("tablezip serve: stopping", flush=True)
    server.stop()
    return 0


def _reload_and_report(server: Server) -> None:
    try:
        model = server.reload()
    except ArtifactError as err:
        print(f"reload refused, still serving generation {server.holder.current.generation}: {err}", file=sys.stderr, flush=True)
        return
    print(f"reloaded {model.source}: generation {model.generation}, checksum {model.checksum[:12]}", flush=True)
