"""Checkpoints: a resumed run ends bit-identical to an uninterrupted one, also after SIGKILL."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tablezip.pipelines.checkpoint import CheckpointError, list_checkpoints, read_meta
from tablezip.pipelines.cli import main
from tablezip.pipelines.dataset import CriteoSplit
from tablezip.pipelines.train import TrainConfig, train

from tests.conftest import prepare_sample_slice

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_sample_slice(tmp_path_factory.mktemp("criteo"), 20_000)


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor a finished run exported: the collection artifact and the dense weights."""
    tables = load_file(str(run_dir / "embeddings" / "tables.safetensors"))
    dense = load_file(str(run_dir / "dense.safetensors"))
    return {**{f"tables.{k}": v for k, v in tables.items()}, **{f"dense.{k}": v for k, v in dense.items()}}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def test_resume_from_any_checkpoint_is_bit_identical(prepared, tmp_path):
    # md: tables, method projections (dense params inside the collection) and Adam all resume.
    config = TrainConfig(method="md", ratio=2, batch_size=128, epochs=2, max_train_rows=3_000)
    reference = train(prepared, config, tmp_path / "ref", tracking_uri=None, progress=False)
    full = train(prepared, config, tmp_path / "ckpt", tracking_uri=None, progress=False, checkpoint_every=7, keep_checkpoints=100)
    assert_bit_identical(exported(tmp_path / "ref" / "md-x2"), exported(tmp_path / "ckpt" / "md-x2"))  # checkpointing changes nothing
    assert full.checkpoint_seconds > 0

    checkpoints = list_checkpoints(tmp_path / "ckpt" / "md-x2" / "checkpoints")
    steps = math.ceil(len(CriteoSplit(prepared, "train", max_rows=config.max_train_rows)) / config.batch_size)
    names = [c.name for c in checkpoints]
    # every 7 global steps, plus one after each epoch (steps 24 and 48)
    assert names == [f"ckpt-{s:09d}" for s in sorted({*range(7, 2 * steps, 7), steps, 2 * steps})]
    meta = read_meta(checkpoints[0])
    assert meta["progress"]["epoch"] == 0 and meta["progress"]["step"] == 7 and meta["adam"]
    assert "tbe.state.0.0" in load_file(str(checkpoints[0] / "state.safetensors"))  # rowwise Adagrad sums

    # mid epoch 1, the epoch boundary, mid epoch 2
    for chosen in (f"ckpt-{7:09d}", f"ckpt-{steps:09d}", f"ckpt-{35:09d}"):
        out = tmp_path / f"resume-{chosen}"
        shutil.copytree(tmp_path / "ckpt", out)
        for later in list_checkpoints(out / "md-x2" / "checkpoints"):
            if later.name > chosen:
                shutil.rmtree(later)
        resumed = train(prepared, config, out, tracking_uri=None, progress=False, resume=True)
        assert Path(resumed.resumed_from).name == chosen
        assert_bit_identical(exported(tmp_path / "ref" / "md-x2"), exported(out / "md-x2"))
        assert resumed.valid == reference.valid and resumed.test_auc == reference.test_auc


def test_resume_continues_the_mlflow_run_and_refuses_another_config_or_corrupt_state(prepared, tmp_path):
    config = TrainConfig(method="hash", ratio=10, batch_size=256, max_train_rows=1_000)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    first = train(prepared, config, tmp_path, tracking_uri=uri, experiment="ckpt", progress=False, checkpoint_every=2)
    run_dir = tmp_path / "hash-x10"
    assert len(list_checkpoints(run_dir / "checkpoints")) == 2  # the newest two kept
    logged = {a.path for a in mlflow.MlflowClient(tracking_uri=uri).list_artifacts(first.run_id, "model")}
    assert logged == {"model/embeddings", "model/dense.safetensors"}  # checkpoints stay local
    again = train(prepared, config, tmp_path, tracking_uri=uri, experiment="ckpt", progress=False, resume=True)
    assert again.run_id == first.run_id and again.test_auc == first.test_auc  # resumed at the end: same model, same run
    with pytest.raises(CheckpointError, match="'table_lr' differs"):
        train(prepared, TrainConfig(method="hash", ratio=10, batch_size=256, max_train_rows=1_000, table_lr=0.1),
              tmp_path, tracking_uri=None, progress=False, resume=True)
    latest = list_checkpoints(run_dir / "checkpoints")[-1]
    with open(latest / "state.safetensors", "r+b") as fh:  # flip a byte
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256"):
        train(prepared, config, tmp_path, tracking_uri=None, progress=False, resume=True)
    # a fresh start (no --resume) removes the run's old checkpoints instead of mixing them in
    train(prepared, config, tmp_path, tracking_uri=None, progress=False)
    assert not (run_dir / "checkpoints").exists()


def test_sigkilled_cli_run_resumes_to_the_uninterrupted_weights(prepared, tmp_path, capsys):
    args = ["train", "--data", str(prepared), "--methods", "full", "--batch-size", "64", "--epochs", "2",
            "--max-train-rows", "12000", "--no-mlflow", "--no-progress", "--out", str(tmp_path / "killed")]
    checkpoints = tmp_path / "killed" / "full-x1" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process (conftest): same float results
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tablezip.pipelines.cli", *args, "--checkpoint-every", "10"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not list_checkpoints(checkpoints):
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "full-x1" / "embeddings").exists(), "the run finished before the kill"
    assert 1 <= len(list_checkpoints(checkpoints)) <= 2

    # a different config is refused, naming the field
    assert main([*args, "--resume", "--batch-size", "128"]) == 2
    assert "'batch_size' differs" in capsys.readouterr().err

    assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    config = TrainConfig(method="full", batch_size=64, epochs=2, max_train_rows=12_000)
    train(prepared, config, tmp_path / "whole", tracking_uri=None, progress=False)
    assert_bit_identical(exported(tmp_path / "whole" / "full-x1"), exported(tmp_path / "killed" / "full-x1"))
    result = json.loads((tmp_path / "killed" / "full-x1" / "result.json").read_text())
    assert result["resumed_from"] and result["test_auc"] > 0.6
