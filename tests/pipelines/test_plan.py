"""`tablezip plan` -> plan JSON -> `tablezip train --plan` / sweep trials, on a real Criteo slice."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tablezip.compress import full_bytes
from tablezip.embeddings import load_inference
from tablezip.pipelines.cli import MODEL_NAMES, main
from tablezip.pipelines.plan import read_plan
from tablezip.pipelines.sweep import Trial, plan_trials, run_trial
from tablezip.pipelines.train import MODELS, TrainConfig, feature_specs, train

from tests.conftest import prepare_sample_slice


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_sample_slice(tmp_path_factory.mktemp("criteo"), 20_000)


@pytest.fixture(scope="module")
def plan_file(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "p50.json"
    assert main(["plan", "--data", str(prepared), "--ratio", "50", "--out", str(out), "--no-progress"]) == 0
    return out


def test_cli_plan_fits_the_budget_and_keeps_small_features_full(prepared, plan_file, capsys):
    plan = read_plan(plan_file)
    full = full_bytes(feature_specs(prepared), 16)
    assert plan.bytes <= plan.budget_bytes == int(full / 50)
    small = [f.name for f in feature_specs(prepared) if f.num_embeddings < 100]
    assert small and all(plan.methods[n].kind == "full" for n in small)
    assert plan.notes["model"] == "dlrm"


def test_train_with_a_plan_serves_the_planned_bytes(prepared, plan_file, tmp_path):
    plan = read_plan(plan_file)
    result = train(prepared, TrainConfig(method="plan", plan=str(plan_file), ratio=50), tmp_path, tracking_uri=None, progress=False)
    assert result.embedding_bytes == plan.bytes <= plan.budget_bytes
    assert result.dtype == plan.dtype
    assert result.test_auc > 0.68
    served = load_inference(result.artifact_dir)
    assert served.dtype == plan.dtype and served.memory_bytes() == plan.bytes
    assert {n: m for n, m in served.methods.items()} == dict(plan.methods)
    if plan.dtype != "float32":  # quantization costs little (benchmarks/results/quantization.md)
        assert abs(result.test_auc - result.test_auc_fp32) < 0.01


def test_a_plan_for_other_data_is_refused_with_the_feature_named(prepared, plan_file, tmp_path, capsys):
    data = json.loads(plan_file.read_text())
    data["features"][0]["name"] = "C99"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["train", "--data", str(prepared), "--plan", str(bad), "--no-mlflow", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "unknown features ['C99']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="TrainConfig.plan"):
        TrainConfig(method="plan")
    with pytest.raises(ValueError, match="TrainConfig.plan"):
        TrainConfig(method="hash", plan=str(plan_file))


def test_plan_budget_parsing_and_errors(prepared, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--data", str(prepared), "--budget", "0.2MiB", "--out", str(out), "--no-progress",
                 "--dtypes", "float32"]) == 0
    plan = read_plan(out)
    assert plan.budget_bytes == int(0.2 * 2**20) and plan.dtype == "float32"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["plan", "--data", str(prepared), "--budget", "12 parsecs", "--out", str(out)])
    assert "expected a size like 20MB" in capsys.readouterr().err
    assert main(["plan", "--data", str(prepared), "--budget", "100", "--out", str(out), "--no-progress"]) == 2
    assert "below the smallest plan" in capsys.readouterr().err


def test_sweep_plan_trials_are_named_by_file_and_run(prepared, plan_file, tmp_path):
    trials = plan_trials(prepared, [plan_file])
    assert list(trials) == ["plan:p50"] and trials["plan:p50"][1] == pytest.approx(50, rel=1e-3)
    with pytest.raises(ValueError, match="distinct names"):
        plan_trials(prepared, [plan_file, plan_file])
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.create_experiment("plans"))  # a sweep's parent run, not active here
    record = run_trial(str(prepared), Trial("plan:p50", 50.0, "dlrm", 0), str(tmp_path), uri, "plans",
                       parent.info.run_id, "k", 4000, str(plan_file))
    assert "error" not in record, record
    assert record["embedding_bytes"] == read_plan(plan_file).bytes


def test_cli_model_names_are_the_trainable_models():
    assert sorted(MODEL_NAMES) == sorted(MODELS)
