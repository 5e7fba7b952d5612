"""Bearer-token check for every RPC except health checks and reflection.

An interceptor rather than a check in each handler: no handler (present or future) can forget
it, and a refused call never reaches request parsing. Health and reflection stay open so load
balancers and ``grpcurl list`` work without the secret; they reveal no vectors.
"""
from __future__ import annotations

import hmac
import os
from typing import Callable

import grpc

from .metrics import Metrics

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
TOKEN_ENV = "TABLEZIP_TOKEN"


def token_from_env(token: str | None) -> str | None:
    """An explicit token, else ``$TABLEZIP_TOKEN`` (keeps the secret out of ``ps`` output)."""
    return token if token is not None else (os.environ.get(TOKEN_ENV) or None)


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without metadata ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str, metrics: Metrics) -> None:
        if not token:
            raise ValueError("token must be a non-empty string")
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(EXEMPT_PREFIXES):
            return continuation(details)
        sent = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if sent and hmac.compare_digest(str(sent[0]).encode(), self._expected):
            return continuation(details)
        reason = "wrong bearer token" if sent else "missing bearer token (metadata 'authorization: Bearer <token>')"
        return self._deny(_short(details.method), reason)

    def _deny(self, method: str, reason: str) -> grpc.RpcMethodHandler:
        def abort(request: bytes, context: grpc.ServicerContext) -> None:
            self._metrics.record(method, 0.0, grpc.StatusCode.UNAUTHENTICATED)  # refused before any work
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {reason}")

        return grpc.unary_unary_rpc_method_handler(abort)
