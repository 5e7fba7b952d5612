"""End to end on a slice of the real Criteo sample: prepare -> train DLRM -> MLflow -> export."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from tablezip.embeddings import CompressedEmbeddingBagCollection
from tablezip.pipelines.cli import main
from tablezip.pipelines.dataset import CriteoSplit
from tablezip.pipelines.train import TrainConfig, train

from tests.conftest import prepare_sample_slice

SLICE_ROWS = 40_000


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_sample_slice(tmp_path_factory.mktemp("criteo"), SLICE_ROWS)


def test_full_dlrm_learns_and_is_logged(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    result = train(prepared, TrainConfig(method="full", epochs=1), tmp_path / "runs", tracking_uri=uri, experiment="smoke", progress=False)
    assert result.test_auc > 0.70, result  # a model that learned nothing scores 0.5
    assert result.ratio == 1.0 and result.embedding_bytes == result.full_bytes

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.data.params["method"] == "full"
    assert int(run.data.params["embedding_bytes"]) == result.embedding_bytes
    assert run.data.metrics["test_auc"] == pytest.approx(result.test_auc)
    assert [m.step for m in client.get_metric_history(result.run_id, "valid_auc")] == [1]
    logged = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/embeddings" in logged and "model/dense.safetensors" in logged

    # The exported artifact reproduces the trained tables bit for bit.
    loaded = CompressedEmbeddingBagCollection.load(result.artifact_dir)
    batch = next(CriteoSplit(prepared, "test").batches(512))
    with torch.no_grad():
        assert torch.equal(loaded(batch.sparse).values(), result.model.embeddings(batch.sparse).values())


def test_hash_at_10x_fits_budget_and_learns(prepared, tmp_path):
    result = train(prepared, TrainConfig(method="hash", ratio=10, epochs=1), tmp_path, tracking_uri=None, progress=False)
    assert result.embedding_bytes <= result.full_bytes / 10
    assert result.ratio > 9.5
    assert result.test_auc > 0.68
    saved = json.loads((tmp_path / "hash-x10" / "result.json").read_text())
    assert saved["test_auc"] == result.test_auc


def test_cli_prepare_and_train(prepared, tmp_path, capsys):
    out = tmp_path / "p"
    src = prepared.parent / "slice.tsv.gz"
    assert main(["prepare", str(src), "--out", str(out), "--split", "ordered", "--fractions", "0.7,0.1,0.2", "--no-progress"]) == 0
    assert "kept 40,000" in capsys.readouterr().out
    # a second prepare into the same dir refuses; --overwrite replaces it
    assert main(["prepare", str(src), "--out", str(out), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["prepare", str(src), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["train", "--data", str(out), "--methods", "full,hash", "--ratio", "20", "--max-train-rows", "5000",
                 "--out", str(tmp_path / "runs"), "--no-mlflow", "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "method" in table and "hash" in table and "test AUC" in table
    assert (tmp_path / "runs" / "hash-x20" / "embeddings" / "manifest.json").is_file()


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--no-mlflow", "--no-progress"]) == 2
    assert "not a prepared Criteo dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--methods", "zip"])
    assert "allowed" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2


def test_cli_train_sets_its_torch_threads_and_refuses_negative_ones(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["train", "--data", str(tmp_path), "--no-mlflow", "--no-progress"]) == 2  # default: 1 thread
        assert torch.get_num_threads() == 1
        assert main(["train", "--data", str(tmp_path), "--torch-threads", "0", "--no-mlflow", "--no-progress"]) == 2
        assert torch.get_num_threads() == 1  # 0: left as it was
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--torch-threads", "-1"])
    assert "expected a whole number >= 0, got -1" in capsys.readouterr().err


def test_dcn_v2_trains_through_the_same_pipeline(prepared, tmp_path):
    result = train(prepared, TrainConfig(model="dcn", method="hash", ratio=10), tmp_path, tracking_uri=None, progress=False)
    assert result.test_auc > 0.68
    assert (tmp_path / "dcn-hash-x10" / "embeddings" / "manifest.json").is_file()
    with pytest.raises(ValueError, match="TrainConfig.model"):
        TrainConfig(model="transformer")


def test_din_style_field_attention_trains_through_the_same_pipeline(prepared, tmp_path):
    config = TrainConfig(model="din", method="hash", ratio=10, query_fields=("C3", "C4"))
    result = train(prepared, config, tmp_path, tracking_uri=None, progress=False)
    assert result.test_auc > 0.68
    assert result.model.query_fields == ["C3", "C4"]
    assert (tmp_path / "din-hash-x10" / "embeddings" / "manifest.json").is_file()
