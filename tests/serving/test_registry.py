"""``tablezip serve models:/NAME/VERSION``: a model version registered in a real sqlite-backed
MLflow registry (in a temp dir), served over gRPC with the registry reached through
``--tracking-uri`` alone."""
from __future__ import annotations

import pytest

from tablezip.embeddings import ArtifactError
from tablezip.serving.model import load_model

from .conftest import IDS_OOV, trained_collection
from .test_reload import serves_from_mlflow


def test_serves_a_registered_model_version(tmp_path, connect, monkeypatch, mlflow_store):
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    coll = trained_collection(seed=3)
    run_dir = tmp_path / "run"
    coll.export(run_dir / "embeddings")  # the layout training logs: <run>/model/embeddings
    uri, registry = mlflow_store
    run = registry.create_run(registry.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri()))
    registry.log_artifacts(run.info.run_id, str(run_dir), artifact_path="model")
    registry.set_terminated(run.info.run_id)
    registry.create_registered_model("ctr-embeddings")
    version = registry.create_model_version("ctr-embeddings", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    assert str(version.version) == "1"
    registry.set_registered_model_alias("ctr-embeddings", "prod", "1")

    info = serves_from_mlflow("models:/ctr-embeddings/1", uri, coll, run_dir, IDS_OOV, connect)
    # The other registry spellings resolve to the same artifact.
    for other in ("models:/ctr-embeddings@prod", "models:/ctr-embeddings/latest", "models:/ctr-embeddings/1/embeddings"):
        assert load_model(other, uri).checksum == info["checksum"]
    with pytest.raises(ArtifactError, match=r"models:/ctr-embeddings/7: cannot download from MLflow.*not found"):
        load_model("models:/ctr-embeddings/7", uri)
