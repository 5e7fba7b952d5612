"""Fixtures for the serving tests: real artifacts exported from real collections, real servers on
127.0.0.1 with an ephemeral port, stopped at teardown."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from tablezip.compress import Full, Hash, QR
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec
from tablezip.serving import Client, Server, ServerConfig
from tests.conftest import random_kjt

TOKEN = "s3cret-token"
DIM = 8
FEATURES = [FeatureSpec("a", 1000), FeatureSpec("b", 50, pooling="mean"), FeatureSpec("c", 300)]
NAMES = [f.name for f in FEATURES]
IDS_OOV = [0, 3, 49, 50, 51, 299, 999, 1000, 10**9]  # known ids and ids past each feature's id space


def trained_collection(seed: int = 0) -> CompressedEmbeddingBagCollection:
    """Three features over three methods, after one optimizer step (tables differ from init)."""
    coll = CompressedEmbeddingBagCollection(
        FEATURES, DIM, {"a": Hash(rows=97, seed=seed), "b": Full(), "c": QR(collisions=4)}, seed=seed
    )
    coll(random_kjt(NAMES, 16, 1000, seed=seed + 1)).values().sum().backward()
    return coll.eval()


def expected_lookup(coll: CompressedEmbeddingBagCollection, name: str, ids: list[int]) -> torch.Tensor:
    return coll.lookup(name, torch.tensor(ids, dtype=torch.int64))


@pytest.fixture(scope="module")
def model_a(tmp_path_factory) -> tuple[CompressedEmbeddingBagCollection, Path]:
    coll = trained_collection(seed=0)
    return coll, coll.export(tmp_path_factory.mktemp("artifacts") / "a")


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> tuple[CompressedEmbeddingBagCollection, Path]:
    coll = trained_collection(seed=1)
    return coll, coll.export(tmp_path_factory.mktemp("artifacts") / "b")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> tuple[str, Any]:
    """(URI, MlflowClient) of one sqlite-backed tracking store and model registry for the
    session: creating the database (MLflow's migrations) costs seconds, so the MLflow tests share
    it, each under its own experiment and model names."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """``serve(source, **ServerConfig fields)`` -> a started server; all are stopped afterwards."""
    servers: list[Server] = []

    def start(source, **config) -> Server:
        server = Server(str(source), ServerConfig(host="127.0.0.1", port=0, **config)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(server_or_target, **kwargs) -> Client:
        target = server_or_target if isinstance(server_or_target, str) else server_or_target.address
        client = Client(target, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
