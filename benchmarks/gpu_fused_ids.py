"""Kernel-only GPU check of the fused id transforms (compress/fused_ids.py): no fbgemm, no torchrec.

Why a separate script: the lent GPU image has torch and Triton but not fbgemm-gpu/torchrec, which
take four transfer calls to stage. The kernels need neither, so this runs in a plain call:
``tablezip.embeddings``' package ``__init__`` (it imports the collection, hence torchrec) is
replaced by a bare package when it cannot be imported; registry, features and every method only
need torch.

For the benchmark's shapes (26 features x 65,536 ids, the 10x fitters' configs) and for mixed
configs (per-feature rows and seeds, remaps, default rows; ids at the int64 extremes) it checks
that the kernel's rows equal the torch path's (batched and per-feature) with ``torch.equal``,
then times each group's transform both ways with CUDA events, and the host time per call.

    python benchmarks/gpu_fused_ids.py --out DIR
    TRITON_INTERPRET=1 python benchmarks/gpu_fused_ids.py --out DIR --device cpu --batch 64   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_gpu_workload_args, import_without_fbgemm, time_cuda_fn  # noqa: E402

import_without_fbgemm()
from tablezip.compress import (  # noqa: E402
    Hash,
    Hybrid,
    Pruned,
    full_bytes,
    hash_methods_for_budget,
    hybrid_methods_for_budget,
    pruned_methods_for_budget,
)
from tablezip.compress import fused_ids  # noqa: E402
from tablezip.embeddings.features import FeatureSpec  # noqa: E402
from tablezip.embeddings.registry import BatchCache, IdBatch, build_layout  # noqa: E402

EXTREMES = [-(2**63), -(2**62), -1, 0, 1, 2**31, 2**62, 2**63 - 1]


def random_ids(count: int, high: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """In range, negative, past ``high``, and int64 extremes, shuffled."""
    parts = [
        torch.randint(0, high, (count,), generator=gen, device=device),
        torch.randint(-3 * high, 0, (count // 4 + 1,), generator=gen, device=device),
        torch.randint(high, 4 * high, (count // 4 + 1,), generator=gen, device=device),
        torch.randint(-(2**62), 2**62, (count // 8 + 1,), generator=gen, device=device),
        torch.tensor(EXTREMES, device=device),
    ]
    ids = torch.cat(parts)
    return ids[torch.randperm(ids.numel(), generator=gen, device=device)][:count]


def groups_of(features: list[FeatureSpec], methods: dict, dim: int, device: torch.device):
    layouts = [build_layout(f, dim, methods[f.name]).to(device) for f in features]
    by_key: dict[Any, list[int]] = {}
    for i, layout in enumerate(layouts):
        by_key.setdefault(layout.batch_group, []).append(i)
    return layouts, list(by_key.values())


def check(features, methods, ids: list[torch.Tensor], dim: int, device: torch.device) -> list[dict[str, Any]]:
    """Every Hash/Hybrid/Pruned group: kernel rows == batched torch rows == per-feature rows."""
    layouts, groups = groups_of(features, methods, dim, device)
    out = []
    for group in groups:
        members = [layouts[i] for i in group]
        cls = type(members[0])
        if cls.__name__ not in ("HashLayout", "HybridLayout", "PrunedLayout"):
            continue
        group_ids = [ids[i] for i in group]
        with fused_ids.mode("off"):
            reference = cls.transform_batch(members, IdBatch(group_ids, BatchCache()))
        with fused_ids.mode("on"):
            fused = cls.transform_batch(members, IdBatch(group_ids, BatchCache()))
        per_feature = [layout.transform(x) for layout, x in zip(members, group_ids)]
        same = all(
            b.dtype == torch.int64 and torch.equal(a, b) and torch.equal(c, b)
            for ref, got, old in zip(reference, fused, per_feature)
            for a, b, c in zip(ref, got, old)
        )
        out.append({"group": cls.__name__, "config": repr(members[0].config), "features": len(group),
                    "ids": sum(int(x.numel()) for x in group_ids), "fused_equals_torch": same})  # fmt: skip
    return out


def cuda_ms(fn: Callable[[], object], repeats: int = 30, iterations: int = 20) -> float:
    """Median GPU ms per call (the harness's CUDA-event timer)."""
    return time_cuda_fn(fn, warmup=5, repeats=repeats, iterations=iterations)["median_ms"]


def host_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Host (launch) time per call: ``calls`` calls without waiting, then one sync outside."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return host


def timings(tables: int, rows: int, dim: int, batch: int, device: torch.device) -> list[dict[str, Any]]:
    features = [FeatureSpec(f"f{i}", rows) for i in range(tables)]
    gen = torch.Generator(device=device).manual_seed(0)
    values = torch.randint(0, rows, (tables * batch,), device=device, generator=gen)
    per_feature = list(torch.split(values, batch))
    budget = full_bytes(features, dim) // 10
    out = []
    fitters = {"hash-10x": hash_methods_for_budget, "hybrid-10x": hybrid_methods_for_budget, "pruned-10x": pruned_methods_for_budget}
    for variant, fitter in fitters.items():
        layouts, groups = groups_of(features, fitter(features, dim, budget), dim, device)
        (group,) = groups
        members = [layouts[i] for i in group]
        cls = type(members[0])
        cache = BatchCache()

        def run() -> object:
            return cls.transform_batch(members, IdBatch(per_feature, cache))

        record = {"variant": variant, "ids": int(values.numel())}
        for m in ("off", "on"):
            with fused_ids.mode(m):
                record[f"{m}_host_us"] = host_us(run)
                if device.type == "cuda":
                    record[f"{m}_gpu_ms"] = cuda_ms(run)
        out.append(record)
    rows_with_drops = torch.where(values % 10 == 0, values, -1)
    record = {"variant": "zero_weight_drops", "ids": int(values.numel())}
    for m in ("off", "on"):
        with fused_ids.mode(m):
            record[f"{m}_host_us"] = host_us(lambda: fused_ids.zero_weight_drops(rows_with_drops))
            if device.type == "cuda":
                record[f"{m}_gpu_ms"] = cuda_ms(lambda: fused_ids.zero_weight_drops(rows_with_drops))
    with fused_ids.mode("off"):
        a = fused_ids.zero_weight_drops(rows_with_drops)
    with fused_ids.mode("on"):
        b = fused_ids.zero_weight_drops(rows_with_drops)
    record["fused_equals_torch"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    out.append(record)
    return out


def mixed_case(device: torch.device, batch: int) -> tuple[list[FeatureSpec], dict, list[torch.Tensor]]:
    rng = np.random.default_rng(3)
    unsorted = rng.permutation(np.arange(1, 3001)).astype(np.float64)
    specs = [
        ("h0", 5000, Hash(rows=301, seed=7)), ("h1", 10**6, Hash(rows=2**31 + 11, seed=2**63 - 1)),
        ("h2", 12, Hash(rows=1)), ("y0", 3000, Hybrid(hot=100, cold_rows=50, seed=3)),
        ("y1", 640, Hybrid(hot=0, cold_rows=40)), ("y2", 3000, Hybrid(hot=64, cold_rows=30, seed=5, remap=True)),
        ("y3", 500, Hybrid(hot=20, cold_rows=9, remap=True)), ("p0", 1000, Pruned(keep=120)),
        ("p1", 77, Pruned(keep=78)), ("p2", 1000, Pruned(keep=40, missing="default")),
        ("p3", 300, Pruned(keep=20, remap=False)), ("p4", 900, Pruned(keep=300, missing="default", remap=False)),
        ("p5", 5, Pruned(keep=1, remap=False)),
    ]  # fmt: skip
    features = [FeatureSpec(n, size, counts=unsorted if n == "y2" else None) for n, size, _ in specs]
    methods = {n: m for n, _, m in specs}
    gen = torch.Generator(device=device).manual_seed(1)
    ids = [random_ids(batch if i % 4 else batch // 3, f.num_embeddings, gen, device) for i, f in enumerate(features)]
    ids[2] = ids[2][:0]  # a feature without ids
    return features, methods, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_gpu_workload_args(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    import triton

    result: dict[str, Any] = {
        "torch": torch.__version__, "triton": triton.__version__,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu smoke test)",
    }  # fmt: skip
    features, methods, ids = mixed_case(device, args.batch)
    result["mixed"] = check(features, methods, ids, args.dim, device)
    bench = [FeatureSpec(f"f{i}", args.rows) for i in range(args.tables)]
    gen = torch.Generator(device=device).manual_seed(2)
    bench_ids = [random_ids(args.batch, args.rows, gen, device) for _ in bench]
    for variant, fitter in (("hash", hash_methods_for_budget), ("hybrid", hybrid_methods_for_budget), ("pruned", pruned_methods_for_budget)):
        for record in check(bench, fitter(bench, args.dim, full_bytes(bench, args.dim) // 10), bench_ids, args.dim, device):
            result["mixed"].append({**record, "case": f"{variant}-10x, extreme ids"})
    result["timings"] = timings(args.tables, args.rows, args.dim, args.batch, device)
    result["all_equal"] = all(r["fused_equals_torch"] for r in result["mixed"]) and result["timings"][-1]["fused_equals_torch"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_fused_ids.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
