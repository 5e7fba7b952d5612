"""Data-parallel table replication on 2 GPUs over nccl, without Ray (the GPU machines have no Ray).

`tablezip train --workers N --gpu` runs ``pipelines.distributed`` inside Ray Train workers with
nccl; Ray only starts the processes and the process group. This script starts them itself
(``torch.multiprocessing``, one process per GPU, ``init_process_group("nccl")``) and runs the same
pieces the training loop uses (``ReplicatedTables``, ``allreduce_grads``, ``state_digest``,
``replica_digests``) on a small model: a compressed collection plus a dense head, on synthetic
Zipf ids with planted labels. It checks what the CPU test checks with gloo:
  * after training, every rank's state (TBE tables, Adagrad state, dense weights, Adam state) is
    bit-identical (sha256 digests gathered over nccl);
  * the replicas match one process that trained on the whole global batches (max abs difference
    of the tables and the dense weights);
and reports the step time of 2 GPUs against 1.

    python benchmarks/distributed_gpu.py --out DIR                # 2 GPUs, nccl
    .venv/bin/python benchmarks/distributed_gpu.py --out DIR --device cpu --rows 1000 --batch 256   # gloo smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import hash_methods_for_budget, full_bytes
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec
from tablezip.pipelines.distributed import (
    Replica, ReplicatedTables, allreduce_grads, model_state, replica_digests, shard_bounds, state_digest,
)


class Model(nn.Module):
    """A collection and a dense head on its pooled output: the shape of DLRM's sparse side."""

    def __init__(self, features: list[FeatureSpec], dim: int, device: torch.device) -> None:
        super().__init__()
        torch.manual_seed(0)
        methods = hash_methods_for_budget(features, dim, full_bytes(features, dim) // 10)
        self.embeddings = CompressedEmbeddingBagCollection(features, dim, methods, device=device)
        self.head = nn.Sequential(nn.Linear(len(features) * dim, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.embeddings(kjt).values()).squeeze(1)


def batches(features: list[FeatureSpec], batch: int, steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches: per feature Zipf-like ids [F, B] and labels planted on feature 0's id parity."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        u = torch.rand(len(features), batch, generator=g)
        ids = torch.stack([(f.num_embeddings * u[i] ** 3).long().clamp_max(f.num_embeddings - 1) for i, f in enumerate(features)])
        labels = (ids[0] % 2).float()
        out.append((ids.to(device), labels.to(device)))
    return out


def kjt_of(names: list[str], ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=names, values=ids.reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.long, device=ids.device))


def train(model: Model, data, names: list[str], replica: Replica) -> tuple[list[float], list[float], torch.optim.Optimizer]:
    """The training loop's replicated step (pipelines/train.py ``_replicated_step``) or, with one
    replica, the plain full-batch step; returns the per-step wall times, the global-batch losses and
    the dense optimizer (its state is part of the digest)."""
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    tables = ReplicatedTables(model.embeddings, replica) if replica.distributed else None
    times, losses = [], []
    for ids, labels in data:
        start, stop = shard_bounds(ids.shape[1], replica.rank, replica.world_size)
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if tables is not None:
            tables.expect(stop - start)
        loss = loss_fn(model(kjt_of(names, ids[:, start:stop])), labels[start:stop]) / ids.shape[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        total = allreduce_grads(list(model.head.parameters()), extra=loss) if replica.distributed else loss.detach()
        optimizer.step()
        losses.append(float(total.sum()))
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, losses, optimizer


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    features = [FeatureSpec(f"f{i}", args.rows) for i in range(args.tables)]
    names = [f.name for f in features]
    model = Model(features, args.dim, device)
    start = replica_digests(state_digest(model_state(model)))
    times, losses, optimizer = train(model, batches(features, args.batch, args.steps, device), names, Replica(rank, world))
    digests = replica_digests(state_digest(model_state(model, optimizer)))
    if rank == 0:
        state = {k: v.detach().cpu().numpy() for k, v in model_state(model, optimizer)}
        np.savez(out / "replica_state.npz", **state)  # scratch file inside --out (no pickle), read back below
        (out / "replica.json").write_text(json.dumps({"start_digests": start, "end_digests": digests, "step_s": times, "losses": losses}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=65536, help="global batch")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
    mp.spawn(worker, args=(args.world, args, free_port(), args.out), nprocs=args.world, join=True)
    replica = json.loads((args.out / "replica.json").read_text())
    with np.load(args.out / "replica_state.npz", allow_pickle=False) as saved:
        replica_state = {k: torch.from_numpy(saved[k]) for k in saved.files}
    (args.out / "replica_state.npz").unlink()

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    features = [FeatureSpec(f"f{i}", args.rows) for i in range(args.tables)]
    model = Model(features, args.dim, device)
    single_times, single_losses, single_optimizer = train(model, batches(features, args.batch, args.steps, device), [f.name for f in features], Replica())
    single = {k: v.detach().cpu() for k, v in model_state(model, single_optimizer)}
    diffs = {k: float((single[k].float() - replica_state[k].float()).abs().max()) for k in single if single[k].numel()}
    table_keys = [k for k in diffs if k.startswith("embeddings.")]
    # Rowwise Adagrad divides a row's gradient by its own RMS, so a row whose gradient is ~0 moves
    # by ~lr whatever its rounding: where the GPU sums in another order (cuBLAS on half batches),
    # such rows can differ by up to 2 * lr. The share of entries that differ says more.
    entries = [(single[k].float() - replica_state[k].float()).abs().reshape(-1) for k in table_keys]
    flat = torch.cat(entries)
    result = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "world": args.world, "tables": args.tables, "rows": args.rows, "dim": args.dim, "global_batch": args.batch, "steps": args.steps,
        "replicas_identical_at_start": len(set(replica["start_digests"])) == 1,
        "replicas_identical_at_end": len(set(replica["end_digests"])) == 1,
        "end_digests": replica["end_digests"],
        "max_abs_diff_tables_vs_one_process": max(diffs[k] for k in table_keys),
        "max_abs_diff_all_vs_one_process": max(diffs.values()),
        "share_of_table_entries_diff_over_1e-4": float((flat > 1e-4).float().mean()),
        "mean_abs_diff_tables": float(flat.mean()),
        "losses_replicated": replica["losses"], "losses_one_process": single_losses,
        "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in zip(replica["losses"], single_losses)),
        "step_ms_replicated": 1e3 * statistics.median(replica["step_s"][min(3, args.steps - 1):]),
        "step_ms_one_process": 1e3 * statistics.median(single_times[min(3, args.steps - 1):]),
        "command": " ".join(sys.orig_argv),
    }
    (args.out / "distributed_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Data-parallel tables over {result['backend']}, {args.world} x {result['device']}", "",
             f"`{result['command']}`: {args.tables} tables x {args.rows:,} rows (hash 10x), D={args.dim}, global batch {args.batch:,}, {args.steps} steps.", "",
             "| check | result |", "|---|---|",
             f"| replicas bit-identical at start / end (sha256 of tables, Adagrad state, dense, Adam) | {result['replicas_identical_at_start']} / {result['replicas_identical_at_end']} |",
             f"| max abs diff vs one process on the global batches: tables / everything | {result['max_abs_diff_tables_vs_one_process']:.3g} / {result['max_abs_diff_all_vs_one_process']:.3g} |",
             f"| table entries differing by more than 1e-4 / mean abs diff | {100 * result['share_of_table_entries_diff_over_1e-4']:.4f}% / {result['mean_abs_diff_tables']:.3g} |",
             f"| global-batch loss, largest relative difference over the {args.steps} steps | {result['max_rel_loss_diff']:.3g} |",
             f"| step ms: {args.world} replicas (each its shard, tables on the global batch) / one process | {result['step_ms_replicated']:.2f} / {result['step_ms_one_process']:.2f} |"]
    (args.out / "distributed_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not (result["replicas_identical_at_start"] and result["replicas_identical_at_end"]):
        sys.exit("replicas differ")


if __name__ == "__main__":
    main()
