"""Tensor ops per forward, per-feature vs batched id transforms: a device-free proxy for kernel
launches on a GPU (every aten op below is one or more CUDA kernels there, each costing a few
microseconds of launch latency however few ids it touches).

The GPU benchmark's shapes (benchmarks/gpu_collection.py: 26 features of equal size, one id per
bag, each method at 10x through its fitter) with small tables so it runs anywhere; op counts do
not depend on the table sizes.

    .venv/bin/python benchmarks/transform_ops.py [--tables 26] [--rows 100000] [--batch 512]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import env_info, write_results  # noqa: E402

from tablezip.compress import full_bytes, hash_methods_for_budget, hybrid_methods_for_budget, pruned_methods_for_budget  # noqa: E402
from tablezip.compress import multihash_methods_for_budget, unified_methods_for_budget  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec  # noqa: E402

warnings.filterwarnings("ignore")

FITTERS = {
    "full": None,
    "hash-10x": hash_methods_for_budget,
    "hybrid-10x": hybrid_methods_for_budget,
    "pruned-10x": pruned_methods_for_budget,
    "multihash-10x": multihash_methods_for_budget,
    "unified-10x": unified_methods_for_budget,
}


# Ops that only make a new view of existing memory: no kernel on any device.
VIEWS = {"view", "as_strided", "select", "slice", "split", "split_with_sizes", "unbind", "unsqueeze", "squeeze",
         "expand", "alias", "detach", "t", "transpose", "permute", "_reshape_alias", "narrow", "reshape"}


def kernels(ops: Counter[str]) -> int:
    return sum(n for op, n in ops.items() if op.removeprefix("aten.") not in VIEWS and op != "mask index")


def syncs(ops: Counter[str]) -> int:
    """Host syncs a CUDA forward would make: item() and boolean-mask indexing. A ``tolist()`` of
    a tensor is one more on CUDA but no dispatched op on a CPU; the batched drop makes one per
    group of pruned features (see NOTES.md)."""
    return ops["aten._local_scalar_dense"] + ops["aten.nonzero"] + ops["mask index"]


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops[str(func.overloadpacket)] += 1
        if func.overloadpacket is torch.ops.aten.index and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]
        ):  # a boolean mask: CUDA must count the kept elements (nonzero) before it can allocate
            self.ops["mask index"] += 1
        return func(*args, **(kwargs or {}))


def count(coll: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor, batched: bool) -> Counter[str]:
    coll.batch_transforms = batched
    with torch.no_grad():
        coll(kjt)  # warm the per-id constant cache, as every step after the first finds it
        with CountOps() as counter:
            coll(kjt)
    coll.batch_transforms = True
    return counter.ops


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args(argv)
    features = [FeatureSpec(f"f{i}", args.rows) for i in range(args.tables)]
    names = [f.name for f in features]
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, args.rows, (args.tables * args.batch,), generator=g)
    kjt = KeyedJaggedTensor(keys=names, values=values, lengths=torch.ones(args.tables * args.batch, dtype=torch.long))
    records: list[dict[str, Any]] = []
    for variant, fitter in FITTERS.items():
        methods = fitter(features, args.dim, full_bytes(features, args.dim) // 10) if fitter else None
        coll = CompressedEmbeddingBagCollection(features, args.dim, methods)
        before, after = count(coll, kjt, False), count(coll, kjt, True)
        records.append({"variant": variant, "groups": len(coll._groups),
                        "kernel_ops_per_feature_transforms": kernels(before), "kernel_ops_batched": kernels(after),
                        "host_syncs_per_feature_transforms": syncs(before), "host_syncs_batched": syncs(after),
                        "by_op_per_feature": dict(before), "by_op_batched": dict(after)})
        print(f"{variant:>14}: {kernels(before)} -> {kernels(after)} kernel ops per forward", flush=True)
    env = env_info()
    lines = [
        f"# Tensor ops per forward ({args.tables} features x {args.rows} ids, one id per bag, B={args.batch}, D={args.dim})",
        "",
        f"`{env['command']}` at commit {env['git_commit'][:10]}. Kernel ops: aten/fbgemm ops other than views, each at "
        "least one kernel launch on a GPU. Host syncs: item(), nonzero and boolean-mask indexing (on a GPU each waits for the queue to drain); "
        "the batched drop of pruned ids adds one tolist() per group, not seen on a CPU.",
        "",
        "| variant | batch groups | kernel ops, per-feature transforms | kernel ops, batched | host syncs, per-feature | host syncs, batched |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['variant']} | {r['groups']} | {r['kernel_ops_per_feature_transforms']} | {r['kernel_ops_batched']} | "
              f"{r['host_syncs_per_feature_transforms']} | {r['host_syncs_batched']} |" for r in records]
    write_results("transform_ops", records, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
