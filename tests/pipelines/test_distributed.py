"""Data-parallel training: shards rebuild the single-process batch, and 2 real Ray Train
workers end with bit-identical replicas that match the in-process run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tablezip.pipelines.checkpoint import list_checkpoints
from tablezip.pipelines.dataset import CriteoSplit, _sparse_kjt
from tablezip.pipelines.distributed import Replica, merge_kjts, model_state, shard_bounds, state_digest
from tablezip.pipelines.train import TrainConfig, epoch_batches, train

from tests.conftest import prepare_sample_slice


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_sample_slice(tmp_path_factory.mktemp("criteo"), 20_000)


@pytest.mark.parametrize("rows,world", [(256, 2), (7, 3), (1, 2), (0, 2), (10, 1)])
def test_shards_cover_the_batch_in_order(rows, world):
    bounds = [shard_bounds(rows, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_worker_shards_rebuild_the_single_process_batches(prepared):
    split = CriteoSplit(prepared, "train", max_rows=1_001)
    single = list(split.batches(200, shuffle=True, seed=3))
    ones = list(epoch_batches(split, 200, seed=3))
    assert len(single) == len(ones) == 6
    for a, (rows, b) in zip(single, ones):  # one worker: exactly CriteoSplit.batches
        assert rows == len(a) and torch.equal(a.dense, b.dense) and torch.equal(a.sparse.values(), b.sparse.values())
    shards = [list(epoch_batches(split, 200, seed=3, replica=Replica(r, 3))) for r in range(3)]
    for i, batch in enumerate(single):
        parts = [s[i][1] for s in shards]
        assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)
        merged = merge_kjts([p.sparse for p in parts])
        assert torch.equal(merged.values(), batch.sparse.values()) and torch.equal(merged.lengths(), batch.sparse.lengths())
    # resuming at batch 4 replays the same permutation
    assert torch.equal(next(epoch_batches(split, 200, seed=3, skip=4))[1].labels, single[4].labels)


def test_merge_kjts_with_jagged_and_empty_shards():
    ids = torch.randint(0, 50, (9, 4), dtype=torch.int32)
    keys = ["a", "b", "c", "d"]
    merged = merge_kjts([_sparse_kjt(ids[:5], keys), _sparse_kjt(ids[5:5], keys), _sparse_kjt(ids[5:], keys)])
    whole = _sparse_kjt(ids, keys)
    assert merged.stride() == 9
    assert torch.equal(merged.values(), whole.values()) and torch.equal(merged.lengths(), whole.lengths())


def test_state_digest_sees_one_changed_table_entry(prepared):
    from tablezip.pipelines.train import build_model, feature_specs

    model = build_model(feature_specs(prepared), TrainConfig(method="hash", ratio=10), num_dense=13)
    before = state_digest(model_state(model))
    assert state_digest(model_state(model)) == before
    with torch.no_grad():
        model.embeddings.table_weights()[5][3, 1] += 1e-7
    assert state_digest(model_state(model)) != before


def test_two_ray_workers_hold_identical_replicas_close_to_one_process(prepared, tmp_path, monkeypatch):
    import ray

    # Ray Train gives a worker group 60 s to start; a busy 2-core box can need more.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

    # 2 x 5 global batches of 128 and a last batch of ONE row: worker 1's shard is empty there.
    config = TrainConfig(method="md", ratio=2, batch_size=128, max_train_rows=2 * 128 * 5 + 1)
    local = train(prepared, config, tmp_path / "local", tracking_uri=None, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        result = train(prepared, config, tmp_path / "ray", tracking_uri=uri, experiment="dp", progress=False,
                       workers=2, checkpoint_every=4)
    finally:
        ray.shutdown()

    # (a) both workers hold bit-identical tables, TBE optimizer state, dense params and Adam state
    assert result.workers == 2 and len(result.replica_sha256) == 2
    assert result.replica_sha256[0] == result.replica_sha256[1]

    # (b) the same global batches in one process: equal up to float summation order
    def assert_close_models(a: torch.nn.Module, b: torch.nn.Module) -> None:
        for x, y in zip(a.embeddings.table_weights(), b.embeddings.table_weights()):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
        state_b = b.state_dict()
        for name, value in a.state_dict().items():
            if ".tbe." not in name:
                torch.testing.assert_close(state_b[name], value, rtol=1e-4, atol=1e-5, msg=name)

    assert_close_models(local.model, result.model)
    assert result.test_auc == pytest.approx(local.test_auc, abs=1e-4)
    assert result.run_id is not None and result.artifact_dir.endswith("embeddings")  # rank 0 logged and exported once

    # rank 0's checkpoints are complete: resuming the step-8 one here finishes close to the Ray run
    shutil.copytree(tmp_path / "ray", tmp_path / "resumed")
    for later in list_checkpoints(tmp_path / "resumed" / "md-x2" / "checkpoints")[1:]:
        shutil.rmtree(later)
    resumed = train(prepared, config, tmp_path / "resumed", tracking_uri=None, progress=False, resume=True)
    assert Path(resumed.resumed_from).name == "ckpt-000000008"
    assert_close_models(result.model, resumed.model)
