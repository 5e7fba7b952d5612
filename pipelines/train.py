"""Train and evaluate a CTR model over a compressed collection on prepared Criteo data.

``train`` runs in this process (``workers=0``, the default: no Ray at all) or data-parallel on
Ray Train workers (``workers >= 1``; distributed.py says how the fused-optimizer tables stay
identical on every worker), and can checkpoint and resume bit-exactly (checkpoint.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tablezip.compress import full_bytes, methods_for_budget
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer
from tablezip.models import DLRM, DCNv2, FieldAttention, default_query_fields

from .dataset import Batch, CriteoSplit, _sparse_kjt
from .criteo import DENSE, load_counts, read_manifest
from .checkpoint import (
    Progress,
    check_compatible,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from .distributed import Replica, ReplicatedTables, allreduce_grads, model_state, replica_digests, shard_bounds, state_digest
from .metrics import auc_logloss
from . import tracking

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result; all of it is logged to MLflow."""

    method: str = "full"
    model: str = "dlrm"           # a key of MODELS
    ratio: float = 1.0            # embedding bytes of Full / bytes allowed for this method
    dim: int = 16
    epochs: int = 1
    batch_size: int = 256
    dense_lr: float = 1e-3
    table_lr: float = 0.05
    table_weight_decay: float = 0.0
    bottom: tuple[int, ...] = (64,)
    top: tuple[int, ...] = (128, 64)
    seed: int = 0
    max_train_rows: int | None = None
    eval_batch_size: int = 8192
    plan: str | None = None       # a `tablezip plan` JSON; only with method="plan"
    query_fields: tuple[str, ...] = ()  # model "din": the ad-side query group (default: 4 largest fields)

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("ratio", math.isfinite(self.ratio) and self.ratio >= 1, ">= 1"),
            ("dim", self.dim >= 1, ">= 1"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("dense_lr", math.isfinite(self.dense_lr) and self.dense_lr > 0, "> 0"),
            ("table_lr", math.isfinite(self.table_lr) and self.table_lr > 0, "> 0"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("max_train_rows", self.max_train_rows is None or self.max_train_rows >= 1, ">= 1 or None"),
        ]
        checks.append(("model", self.model in MODELS, f"one of {sorted(MODELS)}"))
        checks.append(("plan", (self.method == "plan") == (self.plan is not None), "a plan file exactly when method is 'plan'"))
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {allowed}, got {getattr(self, name)!r}")
        object.__setattr__(self, "bottom", tuple(self.bottom))
        object.__setattr__(self, "top", tuple(self.top))
        object.__setattr__(self, "query_fields", tuple(self.query_fields))


@dataclass
class RunResult:
    method: str
    ratio_target: float
    embedding_bytes: int
    full_bytes: int
    test_auc: float
    test_logloss: float
    valid: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    examples_per_second: float = 0.0
    wall_seconds: float = 0.0
    artifact_dir: str | None = None
    run_id: str | None = None
    workers: int = 0                      # 0: trained in the calling process
    replica_sha256: list[str] = field(default_factory=list)  # per worker, all equal (checked)
    resumed_from: str | None = None       # the checkpoint this run continued from
    checkpoint_seconds: float = 0.0       # time spent writing checkpoints (not in train_seconds)
    dtype: str = "float32"                # the served tables' dtype (a plan may quantize them)
    test_auc_fp32: float | None = None    # before quantization, when dtype is not float32
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def ratio(self) -> float:
        return self.full_bytes / self.embedding_bytes

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "model"}
        return {**data, "ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        names = {f.name for f in fields(cls)} - {"model"}
        return cls(**{k: v for k, v in data.items() if k in names})


def feature_specs(prepared_dir: str | Path) -> list[FeatureSpec]:
    """FeatureSpecs of a prepared dir, with the train counts frequency-aware methods need."""
    return [
        FeatureSpec(f["name"], f["num_embeddings"], counts=load_counts(prepared_dir, f["name"]))
        for f in read_manifest(prepared_dir)["features"]
    ]


# Models over (dense, KeyedJaggedTensor) batches, built from a collection; one entry each.
MODELS: dict[str, Callable[[CompressedEmbeddingBagCollection, int, "TrainConfig"], torch.nn.Module]] = {
    "dlrm": lambda coll, num_dense, cfg: DLRM(coll, num_dense=num_dense, bottom=cfg.bottom, top=cfg.top),
    "dcn": lambda coll, num_dense, cfg: DCNv2(coll, num_dense=num_dense),
    # DIN's target attention over Criteo's fields (no behaviour histories there): models/field_attention.py
    "din": lambda coll, num_dense, cfg: FieldAttention(
        coll, num_dense=num_dense, query_fields=cfg.query_fields or default_query_fields(coll.features, 4)
    ),
}


def build_model(
    features: Sequence[FeatureSpec], config: TrainConfig, num_dense: int, device: torch.device | None = None
) -> torch.nn.Module:
    if config.plan is not None:
        from .plan import read_plan

        methods = read_plan(config.plan).methods_for(features, config.dim)
    else:
        budget = int(full_bytes(features, config.dim) / config.ratio)
        methods = methods_for_budget(config.method, features, config.dim, budget)
    collection = CompressedEmbeddingBagCollection(
        features,
        config.dim,
        methods,
        optimizer=TableOptimizer(lr=config.table_lr, weight_decay=config.table_weight_decay),
        device=device,
        seed=config.seed,
    )
    torch.manual_seed(config.seed)
    model = MODELS[config.model](collection, num_dense, config)
    return model.to(device) if device is not None else model


def run_name(config: TrainConfig) -> str:
    """The run's folder under ``out_dir`` (and its MLflow run name)."""
    if config.model == "dlrm":
        return f"{config.method}-x{config.ratio:g}"
    return f"{config.model}-{config.method}-x{config.ratio:g}"


def load_model(run_dir: str | Path, config: TrainConfig, num_dense: int = len(DENSE)) -> torch.nn.Module:
    """A trained model from a run folder's exports (``embeddings/`` + ``dense.safetensors``),
    checksums verified; for evaluation and for runs trained on Ray workers."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    collection = CompressedEmbeddingBagCollection.load(run_dir / "embeddings")
    model = MODELS[config.model](collection, num_dense, config)
    missing, unexpected = model.load_state_dict(load_file(str(run_dir / "dense.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("embeddings.")]
    if missing or unexpected:
        raise ValueError(f"{run_dir}/dense.safetensors does not fit a {config.model} model (missing {missing}, unexpected {unexpected})")
    return model


def data_fingerprint(prepared_dir: str | Path) -> dict[str, str]:
    """What a resume checks the data against: the prepared manifest minus its timestamp."""
    manifest = {k: v for k, v in read_manifest(prepared_dir).items() if k != "created"}
    return {"manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()}


def epoch_batches(
    split: CriteoSplit, batch_size: int, seed: int, replica: Replica = Replica(), skip: int = 0
) -> Iterator[tuple[int, Batch]]:
    """(global batch rows, this worker's shard) for each global batch of one shuffled epoch,
    from batch ``skip`` on.

    The order is ``split.batches(batch_size, shuffle=True, seed=seed)``'s (the same seeded
    permutation), so the shards of all workers together are exactly the single-process batch,
    and a resumed epoch replays the permutation and starts after the batches already done.
    """
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keys = split.keys
    for start in range(skip * batch_size, n, batch_size):
        rows = order[start : min(start + batch_size, n)]
        lo, hi = shard_bounds(len(rows), replica.rank, replica.world_size)
        local = rows[lo:hi]
        yield len(rows), Batch(dense=split.dense[local], sparse=_sparse_kjt(split.ids[local], keys), labels=split.labels[local])


def _to(batch: Batch, device: torch.device | None) -> Batch:
    if device is None or device.type == "cpu":
        return batch
    return Batch(dense=batch.dense.to(device), sparse=batch.sparse.to(device), labels=batch.labels.to(device))


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: CriteoSplit, batch_size: int, device: torch.device | None = None) -> tuple[float, float]:
    model.eval()
    labels, probs = [], []
    for batch in split.batches(batch_size):
        batch = _to(batch, device)
        probs.append(torch.sigmoid(model(batch.dense, batch.sparse)).cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
    model.train()
    return auc_logloss(np.concatenate(labels), np.concatenate(probs))



@dataclass(frozen=True)
class _Job:
    """Everything one training process needs: plain data, so Ray can ship it to its workers."""

    prepared_dir: str
    config: TrainConfig
    out_dir: str
    tracking_uri: str | None
    experiment: str
    progress: bool
    checkpoint_every: int | None
    keep_checkpoints: int
    resume_from: str | None
    workers: int

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / run_name(self.config)


def train(
    prepared_dir: str | Path,
    config: TrainConfig,
    out_dir: str | Path,
    tracking_uri: str | None = tracking.DEFAULT_TRACKING_URI,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    progress: bool = True,
    *,
    workers: int = 0,
    address: str | None = None,
    use_gpu: bool = False,
    checkpoint_every: int | None = None,
    resume: bool = False,
    keep_checkpoints: int = 2,
) -> RunResult:
    """Train, evaluate per epoch on valid and at the end on test, export the collection, and
    log it all to MLflow (``tracking_uri=None`` skips MLflow, for quick experiments).

    ``workers=0`` trains in this process. ``workers=N`` trains data-parallel on N Ray Train
    workers (gloo on CPU, nccl with ``use_gpu``; a local Ray unless ``address`` names a
    cluster, whose nodes must then see ``prepared_dir`` and ``out_dir`` at the same paths);
    the global batch stays ``config.batch_size``. Evaluation, export and MLflow happen once,
    on rank 0, and the returned RunResult is the same either way.

    ``checkpoint_every``: None writes no checkpoints; 0 one per epoch; K also one every K
    steps, into ``<out_dir>/<run name>/checkpoints/`` (the newest ``keep_checkpoints`` kept).
    ``resume`` continues from the newest checkpoint there (refused if it was written for
    another config or other data); without it, stale checkpoints of the run are removed.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: once per epoch) or None, got {checkpoint_every}")
    if use_gpu and workers == 0:
        raise ValueError("use_gpu needs workers >= 1 (the in-process path trains on CPU)")
    run_dir = Path(out_dir) / run_name(config)
    resume_from = _resume_point(run_dir, config, prepared_dir, resume)
    job = _Job(
        prepared_dir=str(prepared_dir),
        config=config,
        out_dir=str(out_dir),
        tracking_uri=tracking_uri,
        experiment=experiment,
        progress=progress,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        resume_from=str(resume_from) if resume_from else None,
        workers=workers,
    )
    if workers == 0:
        result = _run(job, Replica())
        assert result is not None
        return result
    return _train_on_ray(job, address, use_gpu)


def _resume_point(run_dir: Path, config: TrainConfig, prepared_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to continue from (validated against config and data), or None."""
    root = checkpoint_dir(run_dir)
    if not resume:
        if root.exists():
            logger.warning("starting %s from scratch: removing its old checkpoints in %s", run_dir.name, root)
            shutil.rmtree(root)
        return None
    latest = latest_checkpoint(root)
    if latest is None:
        logger.warning("--resume: no checkpoint in %s, so %s starts from scratch", root, run_dir.name)
        return None
    check_compatible(read_meta(latest), _run_identity(config, prepared_dir), latest)
    return latest


def _run_identity(config: TrainConfig, prepared_dir: str | Path) -> dict[str, Any]:
    """What a checkpoint is tied to: a resume must match it field for field."""
    return {"config": asdict(config), "data": data_fingerprint(prepared_dir)}


def _run(job: _Job, replica: Replica, device: torch.device | None = None) -> RunResult | None:
    """One training process: the whole run when alone, one data-parallel worker otherwise.
    Returns the RunResult on rank 0, None on the other ranks."""
    wall_start = time.perf_counter()
    process = _Process(job, replica, device)
    main = replica.is_main
    with _mlflow_run(job, run_name(job.config), process.state.mlflow_run_id, enabled=main) as (run, reopened):
        if run is not None:
            process.state.mlflow_run_id = run.info.run_id
            if not reopened:
                process.log_params()
        for epoch in range(process.state.epoch, job.config.epochs):
            process.train_epoch(epoch)
            if main:
                process.validate(epoch, run)
            if process.checkpointing:
                process.save()
        if replica.distributed:
            process.check_replicas()
        if not main:
            return None
        result = process.finish(run, wall_start)
    (job.run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


class _Process:
    """One training process's model, dense optimizer and progress, with the steps of a run."""

    def __init__(self, job: _Job, replica: Replica, device: torch.device | None) -> None:
        config = self.config = job.config
        self.job, self.replica, self.device = job, replica, device
        torch.manual_seed(config.seed)
        self.train_split = CriteoSplit(job.prepared_dir, "train", max_rows=config.max_train_rows)
        self.model = build_model(feature_specs(job.prepared_dir), config, num_dense=len(DENSE), device=device)
        self.collection = self.model.embeddings
        fused = {id(p) for p in self.collection.fused_parameters()}
        dense_params = [p for p in self.model.parameters() if id(p) not in fused]
        self.optimizer = torch.optim.Adam(dense_params, lr=config.dense_lr)
        self.state = Progress()
        if job.resume_from:
            self.state = load_checkpoint(job.resume_from, self.model, self.collection, self.optimizer)
        if replica.distributed:
            self.step = _replicated_step(self.model, self.optimizer, dense_params, replica)
        else:
            self.step = _local_step(self.model, self.optimizer)
        self.checkpointing = replica.is_main and job.checkpoint_every is not None
        self.steps_per_epoch = math.ceil(len(self.train_split) / config.batch_size)
        self.valid_split = CriteoSplit(job.prepared_dir, "valid") if replica.is_main else None
        self.result = RunResult(
            method=config.method,
            ratio_target=config.ratio,
            embedding_bytes=self.collection.memory_bytes(),
            full_bytes=self.collection.full_bytes(),
            test_auc=float("nan"),
            test_logloss=float("nan"),
            workers=job.workers,
            resumed_from=job.resume_from,
        )

    def log_params(self) -> None:
        tracking.log_params(
            {
                **asdict(self.config),
                "methods": json.dumps({n: m.to_dict() for n, m in self.collection.methods.items()}),
                "embedding_bytes": self.result.embedding_bytes,
                "full_bytes": self.result.full_bytes,
                "compression_ratio": round(self.result.ratio, 3),
                "train_rows": len(self.train_split),
                "workers": self.job.workers,
            }
        )

    def train_epoch(self, epoch: int) -> None:
        """The epoch's remaining global batches (all of them unless resumed mid-epoch)."""
        state, config, every = self.state, self.config, self.job.checkpoint_every or 0
        started = time.perf_counter()
        bar = tqdm(
            epoch_batches(self.train_split, config.batch_size, config.seed + epoch, self.replica, skip=state.step),
            total=self.steps_per_epoch,
            initial=state.step,
            desc=f"{run_name(config)} epoch {epoch + 1}/{config.epochs}",
            disable=not (self.job.progress and self.replica.is_main),
            leave=False,
        )
        for global_rows, batch in bar:
            loss = self.step(global_rows, _to(batch, self.device))
            state.running_loss = 0.98 * state.running_loss + 0.02 * loss if state.step else loss
            if state.step % 20 == 0:
                bar.set_postfix(loss=f"{state.running_loss:.4f}")
            state.step += 1
            state.global_step += 1
            state.seen += global_rows
            if self.checkpointing and every and state.global_step % every == 0 and state.step < self.steps_per_epoch:
                state.train_seconds += time.perf_counter() - started
                self.save()  # not in train_seconds
                started = time.perf_counter()
        state.train_seconds += time.perf_counter() - started
        state.epoch, state.step = epoch + 1, 0

    def validate(self, epoch: int, run: Any) -> None:
        split = self.valid_split
        auc, logloss = evaluate(self.model, split, self.config.eval_batch_size, self.device) if len(split) else (float("nan"),) * 2
        self.state.valid.append({"epoch": epoch + 1, "auc": auc, "logloss": logloss})
        if run is not None:
            tracking.log_metrics({"valid_auc": auc, "valid_logloss": logloss, "train_loss": self.state.running_loss}, step=epoch + 1)

    def save(self) -> None:
        started = time.perf_counter()
        identity = {**_run_identity(self.config, self.job.prepared_dir), "workers": self.job.workers}
        save_checkpoint(checkpoint_dir(self.job.run_dir), self.model, self.collection, self.optimizer, self.state, identity,
                        keep=self.job.keep_checkpoints)
        self.result.checkpoint_seconds += time.perf_counter() - started

    def check_replicas(self) -> None:
        """Every rank hashes its whole state; a difference would be a bug in the replication."""
        self.result.replica_sha256 = replica_digests(state_digest(model_state(self.model, self.optimizer)))
        if len(set(self.result.replica_sha256)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged: state sha256 per rank {self.result.replica_sha256}")

    def _served_dtype(self) -> str:
        if self.config.plan is None:
            return "float32"
        from .plan import read_plan

        return read_plan(self.config.plan).dtype

    def finish(self, run: Any, wall_start: float) -> RunResult:
        """Rank 0: test metrics, the exported collection and dense weights, MLflow."""
        from safetensors.torch import save_file

        result, state, run_dir = self.result, self.state, self.job.run_dir
        result.valid = list(state.valid)
        test = CriteoSplit(self.job.prepared_dir, "test")
        result.test_auc, result.test_logloss = evaluate(self.model, test, self.config.eval_batch_size, self.device)
        result.train_seconds = state.train_seconds
        result.examples_per_second = state.seen / state.train_seconds if state.train_seconds else 0.0
        artifact = self.collection.export(run_dir / "embeddings")
        dense = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items() if not k.startswith("embeddings.")}
        save_file(dense, str(run_dir / "dense.safetensors"))
        served_dtype = self._served_dtype()
        if served_dtype != "float32":
            # The plan's bytes are quantized bytes: judge the model that would be served.
            from tablezip.embeddings.quantized import quantize

            served = quantize(self.collection, served_dtype)
            result.test_auc_fp32 = result.test_auc
            self.model.embeddings = served
            try:
                result.test_auc, result.test_logloss = evaluate(self.model, test, self.config.eval_batch_size, self.device)
            finally:
                self.model.embeddings = self.collection
            result.dtype, result.embedding_bytes = served_dtype, served.memory_bytes()
            artifact = served.export(run_dir / f"embeddings-{served_dtype}")
        result.artifact_dir = str(artifact)
        result.model = self.model
        result.wall_seconds = time.perf_counter() - wall_start
        if run is not None:
            import mlflow

            tracking.log_metrics({k: getattr(result, k) for k in (
                "test_auc", "test_logloss", "examples_per_second", "train_seconds", "wall_seconds", "checkpoint_seconds",
                "embedding_bytes")})
            # Only the exports: the run folder also holds checkpoints, which stay local.
            mlflow.log_artifacts(str(artifact), artifact_path="model/embeddings")
            mlflow.log_artifact(str(run_dir / "dense.safetensors"), artifact_path="model")
            result.run_id = run.info.run_id
        return result


StepFn = Callable[[int, Batch], float]


def _local_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> StepFn:
    """One process: the mean loss of the batch; the TBE updates its rows inside backward."""
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(global_rows: int, batch: Batch) -> float:
        logits = model(batch.dense, batch.sparse)
        loss = loss_fn(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the TBE updates its rows here (fused optimizer)
        optimizer.step()
        return loss.item()

    return step


def _replicated_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, dense_params: list[torch.nn.Parameter], replica: Replica
) -> StepFn:
    """One data-parallel worker (see distributed.py): this worker's share of the global-batch
    mean loss; the collection runs on the global batch through ``ReplicatedTables``; the dense
    gradients outside the collection are summed by one allreduce that also sums the loss."""
    collection = model.embeddings
    tables = ReplicatedTables(collection, replica)
    inside = {id(p) for p in collection.parameters()}
    # Parameters inside the collection (method projections, thresholds) already get the
    # global-batch gradient on every worker, through the gathered pooled gradients.
    synced = [p for p in dense_params if id(p) not in inside]
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")

    def step(global_rows: int, batch: Batch) -> float:
        tables.expect(len(batch))
        if len(batch):
            loss = loss_fn(model(batch.dense, batch.sparse), batch.labels) / global_rows
        else:  # an empty shard still joins the id and gradient all-gathers of the global batch
            loss = collection(batch.sparse).values().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        total = allreduce_grads(synced, extra=loss)
        optimizer.step()
        return float(total.item())

    return step


@contextlib.contextmanager
def _mlflow_run(job: _Job, name: str, run_id: str | None, enabled: bool) -> Iterator[tuple[Any, bool]]:
    """(run, reopened): a resumed run continues its MLflow run when the store still has it;
    no run when MLflow is off or on ranks other than 0."""
    if not job.tracking_uri or not enabled:
        yield None, False
        return
    if run_id is not None:
        import mlflow

        mlflow.set_tracking_uri(job.tracking_uri)
        try:
            mlflow.MlflowClient(tracking_uri=job.tracking_uri).get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run_id = None
        if run_id is not None:
            with mlflow.start_run(run_id=run_id) as run:
                mlflow.set_tag("tablezip.resumed_from", str(job.resume_from))
                yield run, True
            return
    with tracking.mlflow_run(job.tracking_uri, job.experiment, name) as run:
        yield run, False


# ----------------------------------------------------------------------------- Ray Train


def _train_on_ray(job: _Job, address: str | None, use_gpu: bool) -> RunResult:
    """Run ``_run`` on ``job.workers`` Ray Train workers; rank 0's RunResult comes back as the
    trainer's return value and the model is rebuilt here from the exported run folder."""
    wall_start = time.perf_counter()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise RuntimeError("tablezip's --workers needs Ray Train V2 (unset RAY_TRAIN_V2_ENABLED or set it to 1)")
    # Workers run in another cwd: every path and a relative sqlite store resolved here.
    job = _Job(
        **{
            **{f.name: getattr(job, f.name) for f in fields(job)},
            "prepared_dir": str(Path(job.prepared_dir).resolve()),
            "out_dir": str(Path(job.out_dir).resolve()),
            "tracking_uri": _absolute_uri(job.tracking_uri) if job.tracking_uri else None,
            "resume_from": str(Path(job.resume_from).resolve()) if job.resume_from else None,
        }
    )
    job.run_dir.mkdir(parents=True, exist_ok=True)
    storage = Path(tempfile.mkdtemp(prefix=".ray-", dir=job.run_dir))  # Ray Train's own bookkeeping
    try:
        with ray_session(address, job.workers):
            trainer = TorchTrainer(
                _ray_worker,
                train_loop_config={"job": job},
                scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=use_gpu),
                run_config=RunConfig(name="train", storage_path=str(storage), failure_config=FailureConfig(max_failures=0)),
            )
            value = trainer.fit().return_value
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    result = RunResult.from_dict(value)
    result.model = load_model(job.run_dir, job.config)
    result.wall_seconds = time.perf_counter() - wall_start  # Ray's start-up included
    return result


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int = 1) -> Iterator[None]:
    """Ray for ``workers`` Ray Train workers: reuses an initialised Ray, else joins
    ``address`` or starts a local one with at least a CPU per worker (and shuts down what it
    started). Wrap several ``train(workers=N)`` calls in one to start Ray once."""
    if workers == 0:  # the in-process path never imports Ray
        yield
        return
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


def _ray_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """A Ray Train worker: its rank from the train context, the device Ray assigned it."""
    import ray.train
    import ray.train.torch

    # fbgemm logs each TBE's arguments at INFO through the root logger, which Ray leaves at
    # INFO in its workers; the CLI runs at WARNING, so the workers do too.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    context = ray.train.get_context()
    replica = Replica(context.get_world_rank(), context.get_world_size())
    device = ray.train.torch.get_device()
    result = _run(loop_config["job"], replica, device if device.type != "cpu" else None)
    return result.to_dict() if result is not None else None


def _absolute_uri(uri: str) -> str:
    """A relative sqlite store resolved against the driver's cwd."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri
