"""Kernel-only check and timing of the fused QR/KWay lookup (compress/fused_lookup.py) on a GPU.

Needs no fbgemm or torchrec: it builds plain CUDA weight tensors (every feature's partition
tables back to back in one fp32 buffer, as fbgemm's ``weights_dev`` holds them) and loads the
module by file path. For each case (Full as one partition, QR mult/add/concat, 3-way mult) it
compares the kernel with a torch reference: the TBE path's maths (OOV map, mixed-radix digits,
row gathers, left-to-right product, per-bag ``index_add_``), bit for bit for one id per bag and
allclose for bags of 0-8 ids. It times the kernel against that reference and against its own
one-partition (Full) case, and sweeps the block size for QR mult.

    python benchmarks/gpu_fused_lookup.py --out DIR [--rows 1000000] [--batch 65536]
    TRITON_INTERPRET=1 python benchmarks/gpu_fused_lookup.py --out DIR --device cpu --rows 5000 --batch 64 --tables 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fused_lookup", ROOT / "compress" / "fused_lookup.py")
fl = importlib.util.module_from_spec(_spec)
sys.modules["fused_lookup"] = fl  # dataclasses look their module up
_spec.loader.exec_module(fl)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 15, iterations: int = 10) -> float:
    """Median ms per call (CUDA events around ``iterations`` calls; wall clock on a CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iterations)
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def build_case(name: str, tables: int, rows: int, dim: int, device: torch.device, g: torch.Generator):
    """(weights, [FeatureLookup], per-feature table views) for one method at ~10x."""
    collisions = 11
    quotient = -(-(rows + 1) // collisions)
    op, partitions, width = {
        "full": ("add", (rows + 1,), dim),
        "qr-mult": ("mult", (quotient, collisions), dim),
        "qr-add": ("add", (quotient, collisions), dim),
        "qr-concat": ("concat", (quotient, collisions), dim // 2),
        "kway3-mult": ("mult", (-(-(rows + 1) // 1024), 32, 32), dim),
    }[name]
    per_feature = sum(partitions) * width
    weights = torch.empty(tables * per_feature, dtype=torch.float32, device=device)
    weights.uniform_(-0.5, 0.5, generator=g)
    features, views = [], []
    for f in range(tables):
        offsets, tabs, at = [], [], f * per_feature
        for p in partitions:
            offsets.append(at)
            tabs.append(weights[at : at + p * width].view(p, width))
            at += p * width
        mean = f % 5 == 4  # some mean-pooled features
        features.append(fl.FeatureLookup(f, rows, op, partitions, tuple(offsets), width, mean))
        views.append(tabs)
    return weights, features, views


def reference(values: torch.Tensor, offsets: torch.Tensor, batch: int, dim: int, features, views) -> torch.Tensor:
    """The TBE path's maths with torch ops: per feature, gather each partition's rows of every id,
    combine left to right, pool with ``index_add_`` (the collection's unpooled branch)."""
    out = []
    for f, tabs in zip(features, views):
        start, end = int(offsets[f.feature * batch]), int(offsets[(f.feature + 1) * batch])
        ids = values[start:end]
        ids = torch.where((ids >= 0) & (ids < f.num_embeddings), ids, torch.full_like(ids, f.num_embeddings))
        parts = []
        for j, (stride, size) in enumerate(zip(f.strides(), f.partitions)):
            digit = ids // stride if stride != 1 else ids
            if j > 0:
                digit = digit % size
            parts.append(tabs[j][digit])
        if f.op == "concat":
            per_id = torch.cat(parts, dim=1)
        else:
            per_id = parts[0]
            for p in parts[1:]:
                per_id = per_id * p if f.op == "mult" else per_id + p
        lengths = offsets[f.feature * batch + 1 : (f.feature + 1) * batch + 1] - offsets[f.feature * batch : (f.feature + 1) * batch]
        bag = torch.repeat_interleave(torch.arange(batch, device=ids.device), lengths)
        pooled = per_id.new_zeros(batch, dim).index_add_(0, bag, per_id)
        if f.mean:
            pooled = pooled / lengths.clamp(min=1).to(pooled.dtype).unsqueeze(1)
        out.append(pooled)
    return torch.cat(out, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    T, B, D = args.tables, args.batch, args.dim
    # one id per bag (with negative and past-the-end ids) and bags of 0-8 ids
    one = torch.randint(-3, args.rows + 3, (T * B,), device=device, generator=g)
    one_offsets = torch.arange(T * B + 1, device=device)
    short_b = max(1, B // 4)
    lengths = torch.randint(0, 9, (T * short_b,), device=device, generator=g)
    many_offsets = torch.zeros(T * short_b + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=many_offsets[1:])
    many = torch.randint(-3, args.rows + 3, (int(many_offsets[-1]),), device=device, generator=g)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "cases": {}}
    with fl.mode("on"), torch.no_grad():
        for name in ("full", "qr-mult", "qr-add", "qr-concat", "kway3-mult"):
            weights, features, views = build_case(name, T, args.rows, D, device, g)
            fused = fl.pooled_lookup(one, one_offsets, B, T, D, weights, features)
            ref = reference(one, one_offsets, B, D, features, views)
            fused_many = fl.pooled_lookup(many, many_offsets, short_b, T, D, weights, features)
            ref_many = reference(many, many_offsets, short_b, D, features, views)
            case = {
                "one_id_equal": bool(torch.equal(fused, ref)),
                "one_id_max_abs_diff": float((fused - ref).abs().max()),
                "bags_0_8_allclose": bool(torch.allclose(fused_many, ref_many, rtol=1e-5, atol=1e-6)),
                "bags_0_8_max_abs_diff": float((fused_many - ref_many).abs().max()),
                "fused_ms": timed(lambda: fl.pooled_lookup(one, one_offsets, B, T, D, weights, features), device),
                "bags_0_8_fused_ms": timed(lambda: fl.pooled_lookup(many, many_offsets, short_b, T, D, weights, features), device),
            }
            if name in ("full", "qr-mult"):
                case["torch_reference_ms"] = timed(lambda: reference(one, one_offsets, B, D, features, views), device, repeats=5, iterations=3)
            if name == "qr-mult" and device.type == "cuda":
                sweep = {}
                for block in (16, 32, 64, 128):
                    for warps in (2, 4, 8):
                        fl.BLOCK_BAGS, fl.NUM_WARPS = block, warps
                        sweep[f"{block}x{warps}"] = timed(lambda: fl.pooled_lookup(one, one_offsets, B, T, D, weights, features), device, repeats=7)
                fl.BLOCK_BAGS, fl.NUM_WARPS = 32, 4
                case["block_sweep_ms"] = sweep
            moved = T * B * D * 4 * (1 + (len(features[0].partitions) if name != "qr-concat" else 1))
            case["GBps_rows_plus_out"] = moved / (case["fused_ms"] / 1e3) / 1e9
            result["cases"][name] = case
            print(name, json.dumps(case), flush=True)
            del weights, views
            if device.type == "cuda":
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_fused_lookup.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
