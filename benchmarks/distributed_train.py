"""What data-parallel training and checkpoints cost, on a prepared Criteo dir (CPU).

1. ``train()`` end to end with ``workers`` 0 (in process), 1 and 2 (Ray Train, one CPU and
   torch thread each): train seconds per step and examples/s as rank 0 measures them (eval,
   export and Ray start-up excluded).
2. The pieces of one data-parallel step, timed in a 2-rank gloo group without Ray: the
   all-gather of the ids, the all-gather of the pooled gradients, the dense allreduce, and a
   whole replicated step vs a plain step on the local half batch.
3. One checkpoint's write time and size per method.

    .venv/bin/python benchmarks/distributed_train.py --data build/demo/prepared
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def end_to_end(data: str, methods: list[str], batch_size: int, repeats: int) -> None:
    import ray

    from tablezip.pipelines.dataset import CriteoSplit
    from tablezip.pipelines.train import TrainConfig, train

    steps = -(-len(CriteoSplit(data, "train")) // batch_size)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    print(f"| method | how | step ms (median of {repeats}) | examples/s |")
    print("|---|---|---:|---:|")
    try:
        for method in methods:
            config = TrainConfig(method=method, ratio=1 if method == "full" else 10, batch_size=batch_size)
            # One torch thread everywhere: Ray gives each worker one CPU (OMP_NUM_THREADS=1).
            for label, workers, threads in (("in process", 0, 1), ("Ray, 1 worker", 1, 1), ("Ray, 2 workers", 2, 1)):
                torch.set_num_threads(threads)
                runs = []
                for _ in range(repeats):
                    with tempfile.TemporaryDirectory() as out:
                        runs.append(train(data, config, out, tracking_uri=None, progress=False, workers=workers))
                step_ms = statistics.median(1000 * r.train_seconds / steps for r in runs)
                print(f"| {method} | {label} | {step_ms:.1f} | "
                      f"{statistics.median(r.examples_per_second for r in runs):,.0f} |")
    finally:
        ray.shutdown()


def _components(rank: int, world: int, data: str, method: str, batch_size: int, steps: int, port: int) -> None:
    import torch.distributed as dist

    from tablezip.pipelines.criteo import DENSE
    from tablezip.pipelines.dataset import CriteoSplit
    from tablezip.pipelines.distributed import Replica, _all_gather_varlen, allreduce_grads, gather_kjt
    from tablezip.pipelines.train import TrainConfig, _local_step, _replicated_step, build_model, epoch_batches, feature_specs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    replica = Replica(rank, world)
    config = TrainConfig(method=method, ratio=1 if method == "full" else 10, batch_size=batch_size)
    split = CriteoSplit(data, "train")
    batches = [b for _, (_, b) in zip(range(steps), epoch_batches(split, batch_size, 0, replica))]
    timings: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        dist.barrier()
        for batch in batches:
            started = time.perf_counter()
            fn(batch)
            timings.setdefault(name, []).append(time.perf_counter() - started)

    model = build_model(feature_specs(data), config, len(DENSE))
    collection = model.embeddings
    fused = {id(p) for p in collection.fused_parameters()}
    dense = [p for p in model.parameters() if id(p) not in fused]
    width = len(collection.feature_names) * config.dim
    timed("ids all-gather", lambda b: gather_kjt(b.sparse))
    grad = torch.randn(len(batches[0]), width)
    timed("pooled-grad all-gather", lambda b: _all_gather_varlen(grad.view(-1), [grad.numel()] * world))
    for p in dense:
        p.grad = torch.zeros_like(p)
    inside = {id(p) for p in collection.parameters()}
    synced = [p for p in dense if id(p) not in inside]
    timed("dense allreduce", lambda b: allreduce_grads(synced, extra=torch.zeros(())))
    plain = _local_step(model, torch.optim.Adam(dense, lr=1e-3))
    timed("plain step on the local shard", lambda b: plain(len(b), b))
    replicated = _replicated_step(model, torch.optim.Adam(dense, lr=1e-3), dense, replica)
    timed("replicated step (global batch)", lambda b: replicated(batch_size, b))
    if rank == 0:
        numbers = {"ids": batch_size * len(collection.feature_names) * 8, "grads": batch_size * width * 4,
                   "dense": sum(p.numel() for p in synced) * 4}
        print(f"\n{method}, global batch {batch_size}, {world} ranks, median of {steps} steps "
              f"(ids {numbers['ids'] / 1024:.0f} KiB, pooled grads {numbers['grads'] / 1024:.0f} KiB, "
              f"dense grads {numbers['dense'] / 1024:.0f} KiB per step):")
        for name, values in timings.items():
            print(f"  {name}: {1000 * statistics.median(values):.2f} ms")
    dist.destroy_process_group()


def components(data: str, methods: list[str], batch_size: int, steps: int) -> None:
    import torch.multiprocessing as mp

    for i, method in enumerate(methods):
        mp.spawn(_components, args=(2, data, method, batch_size, steps, 29500 + os.getpid() % 1000 + i), nprocs=2)


def checkpoints(data: str, methods: list[str]) -> None:
    from tablezip.pipelines.checkpoint import list_checkpoints
    from tablezip.pipelines.train import TrainConfig, train

    print("\n| method | checkpoint write | checkpoint size | of which tables + sums |")
    print("|---|---:|---:|---:|")
    for method in methods:
        config = TrainConfig(method=method, ratio=1 if method == "full" else 10, max_train_rows=20_000)
        with tempfile.TemporaryDirectory() as out:
            result = train(data, config, out, tracking_uri=None, progress=False, checkpoint_every=0)
            (ckpt,) = list_checkpoints(Path(result.artifact_dir).parent / "checkpoints")
            size = sum(f.stat().st_size for f in ckpt.iterdir())
            tables = result.embedding_bytes * (1 + 1 / config.dim)  # rows + one Adagrad sum per row
            print(f"| {method} | {1000 * result.checkpoint_seconds:.0f} ms | {size / 2**20:.1f} MiB | {tables / 2**20:.1f} MiB |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", default="full,hash")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--parts", default="train,components,checkpoints")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    parts = args.parts.split(",")
    if "train" in parts:
        end_to_end(args.data, methods, args.batch_size, args.repeats)
    if "components" in parts:
        components(args.data, methods, args.batch_size, args.steps)
    if "checkpoints" in parts:
        checkpoints(args.data, methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
