"""tablezip.serving: a gRPC lookup service over an exported tablezip artifact, and its client.

``Client`` imports only grpc and numpy; the server side (torch, the collection) loads on first
use of ``Server``/``ServerConfig``, so a client process stays light.
"""
from __future__ import annotations

from typing import Any

from .client import Client

__all__ = ["Client", "Server", "ServerConfig"]


def __getattr__(name: str) -> Any:
    if name in ("Server", "ServerConfig"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'tablezip.serving' has no attribute {name!r}")
