"""Kernel-only check and timing of the fused QR/KWay lookup (compress/fused_lookup.py) on a GPU.

Needs no fbgemm or torchrec: it builds plain CUDA weight tensors (every feature's partition
tables back to back in one fp32 buffer, as fbgemm's ``weights_dev`` holds them) and imports
the module without ``tablezip.embeddings``' torchrec imports (``harness.import_without_fbgemm``).
For each case (Full as one partition, QR mult/add/concat, 3-way mult) it
compares the kernel with a torch reference: the TBE path's maths (OOV map, mixed-radix digits,
row gathers, left-to-right product, per-bag ``index_add_``), bit for bit for one id per bag and
allclose for bags of 0-8 ids. It times the kernel against that reference and against its own
one-partition (Full) case, and sweeps the block size for QR mult.

MultiHash (2 salted probes of one 10x table, op "multihash") is checked the same way against
the torch hash (``hashing.mix64``'s maths, restated here so no tablezip import is needed).
MixedDim (the mixed kernel) is checked against the TBE path's order, pool per block then
project (``MixedDimLayout.combine``), allclose: the kernel projects per id and sums the
products column by column, so the float sums differ in order. Cases: md-10x (what
``methods_for_budget("md", ...)`` gives at 10x here: one 4-wide block and its 4 x 64
projection), md-4blocks (64/32/16/8-wide frequency blocks) and md-keep-remap (a permuted
id -> rank remap, 32/8-wide blocks, only the top half of ranks kept: the rest read zero).

    python benchmarks/gpu_fused_lookup.py --out DIR [--rows 1000000] [--batch 65536] [--cases full,multihash2,md-10x]
    TRITON_INTERPRET=1 python benchmarks/gpu_fused_lookup.py --out DIR --device cpu --rows 5000 --batch 64 --tables 3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_gpu_workload_args, import_without_fbgemm, time_cuda_fn, time_fn  # noqa: E402

import_without_fbgemm()
from tablezip.compress import fused_lookup as fl  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 15, iterations: int = 10) -> float:
    """Median ms per call: the harness's CUDA-event timer on a GPU, one wall-clock call per repeat
    on a CPU (the interpreter smoke test)."""
    if device.type == "cuda":
        return time_cuda_fn(fn, warmup=3, repeats=repeats, iterations=iterations)["median_ms"]
    return time_fn(fn, warmup=3, repeats=repeats, min_seconds=0)["median_ms"]


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


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MD_CASES = ("md-10x", "md-4blocks", "md-keep-remap")


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash_rows(ids: torch.Tensor, rows: int, mixed_seed: int) -> torch.Tensor:
    """``hashing.hash_ids`` with the seed already mixed: splitmix64 on wrapping int64 maths."""
    z = ids ^ mixed_seed
    z = (z ^ _shr(z, 30)) * _signed64(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed64(_MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 1) % rows


def build_multihash(tables: int, rows: int, dim: int, device: torch.device, g: torch.Generator, probes: int = 2):
    """One ``rows // 10`` x D table per feature (MultiHash at 10x), read by every probe; probe p's
    mixed seed is ``seed_mix(probe_seed(0, p))`` = ``p * golden``."""
    hashed = max(1, rows // 10)
    weights = torch.empty(tables * hashed * dim, dtype=torch.float32, device=device).uniform_(-0.5, 0.5, generator=g)
    seeds = tuple(_signed64(p * _GOLDEN) for p in range(probes))
    features, views = [], []
    for f in range(tables):
        at = f * hashed * dim
        features.append(fl.FeatureLookup(f, rows, "multihash", (hashed,) * probes, (at,) * probes, dim, f % 5 == 4, seeds))
        views.append([weights[at : at + hashed * dim].view(hashed, dim)] * probes)
    return weights, features, views


def build_mixed(name: str, tables: int, rows: int, dim: int, device: torch.device, g: torch.Generator):
    """(weights, [MixedLookup], per-feature (blocks, projections, remap), remap base, projection
    buffer) for one MixedDim case; projections live in their own allocation, as nn.Parameters do."""
    keep = None
    if name == "md-10x":
        sizes, dims, remapped = [rows], [4], False
    elif name == "md-4blocks":
        cuts = [int(round(rows ** (i / 4))) for i in range(1, 4)]
        sizes, dims, remapped = [b - a for a, b in zip([0] + cuts, cuts + [rows])], [dim, 32, 16, 8], False
    else:
        sizes, dims, remapped, keep = [1000, rows - 1000], [32, 8], True, rows // 2
    table_rows = list(sizes)
    table_rows[-1] = table_rows[-1] + 1 if keep is None else keep - sum(sizes[:-1])
    per_feature = sum(r * d for r, d in zip(table_rows, dims))
    weights = torch.empty(tables * per_feature, dtype=torch.float32, device=device).uniform_(-0.5, 0.5, generator=g)
    projections = torch.empty(tables, sum(d * dim for d in dims if d < dim), dtype=torch.float32, device=device)
    projections.uniform_(-0.3, 0.3, generator=g)
    remaps = torch.stack([torch.randperm(rows, device=device, generator=g) for _ in range(tables)]) if remapped else None
    if remaps is not None:  # the OOV id rank num_embeddings closes each remap
        remaps = torch.cat([remaps, torch.full((tables, 1), rows, device=device)], 1).to(torch.int32).contiguous()
    starts = tuple(int(x) for x in torch.tensor([0] + sizes[:-1]).cumsum(0))
    features, views = [], []
    for f in range(tables):
        at, tabs, offsets, projs, poffs, pat = f * per_feature, [], [], [], [], 0
        for r, d in zip(table_rows, dims):
            offsets.append(at)
            tabs.append(weights[at : at + r * d].view(r, d))
            at += r * d
            if d < dim:
                p = projections[f, pat : pat + d * dim].view(d, dim)
                pat += d * dim
                projs.append(p)
                poffs.append((p.data_ptr() - weights.data_ptr()) // 4)
            else:
                projs.append(None)
                poffs.append(None)
        remap_at = None if remaps is None else f * (rows + 1)
        features.append(
            fl.MixedLookup(f, rows, starts, tuple(table_rows), tuple(offsets), tuple(dims), tuple(poffs), remap_at, f % 5 == 4)
        )
        views.append((tabs, projs, None if remaps is None else remaps[f]))
    return weights, features, views, remaps, projections


def mixed_reference(values: torch.Tensor, offsets: torch.Tensor, batch: int, dim: int, features, views) -> torch.Tensor:
    """The TBE path's maths: ranks (OOV map, remap), per block the rows of its ids pooled per bag
    (``index_add_``), then ``sum_i pooled_i @ P_i^T`` (D-wide blocks added as they are)."""
    out = []
    for f, (tabs, projs, remap) in zip(features, views):
        start, end = int(offsets[f.feature * batch]), int(offsets[(f.feature + 1) * batch])
        ids = values[start:end]
        ranks = torch.where((ids >= 0) & (ids < f.num_embeddings), ids, torch.full_like(ids, f.num_embeddings))
        if remap is not None:
            ranks = remap[ranks].to(torch.int64)
        lengths = offsets[f.feature * batch + 1 : (f.feature + 1) * batch + 1] - offsets[f.feature * batch : (f.feature + 1) * batch]
        bag = torch.repeat_interleave(torch.arange(batch, device=ids.device), lengths)
        total = None
        for first, count, tab, proj in zip(f.starts, f.rows, tabs, projs):
            local = ranks - first
            hit = (local >= 0) & (local < count)
            pooled = tab.new_zeros(batch, tab.shape[1]).index_add_(0, bag[hit], tab[local[hit]])
            part = pooled if proj is None else pooled @ proj
            total = part if total is None else total + part
        if f.mean:
            total = total / lengths.clamp(min=1).to(total.dtype).unsqueeze(1)
        out.append(total)
    return torch.cat(out, dim=1)


def reference(values: torch.Tensor, offsets: torch.Tensor, batch: int, dim: int, features, views) -> torch.Tensor:
    """The TBE path's maths with torch ops: per feature, gather each partition's rows of every id,
    combine left to right, pool with ``index_add_`` (the collection's unpooled branch)."""
    out = []
    for f, tabs in zip(features, views):
        start, end = int(offsets[f.feature * batch]), int(offsets[(f.feature + 1) * batch])
        ids = values[start:end]
        ids = torch.where((ids >= 0) & (ids < f.num_embeddings), ids, torch.full_like(ids, f.num_embeddings))
        parts = []
        if f.op == "multihash":  # every int64 id is hashed: no OOV map
            raw = values[start:end]
            parts = [tabs[j][hash_rows(raw, size, seed)] for j, (size, seed) in enumerate(zip(f.partitions, f.seeds))]
        else:
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
    add_gpu_workload_args(parser)
    parser.add_argument("--cases", default="full,qr-mult,qr-add,qr-concat,kway3-mult,multihash2," + ",".join(MD_CASES))
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the QR block-size sweep")
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
        for name in args.cases.split(","):
            mixed, remaps = (), None
            if name in MD_CASES:
                weights, mixed, views, remaps, projections = build_mixed(name, T, args.rows, D, device, g)
                features: list = []
                ref_fn = mixed_reference
            else:
                weights, features, views = build_multihash(T, args.rows, D, device, g) if name == "multihash2" else build_case(name, T, args.rows, D, device, g)
                ref_fn = reference
            lookup = lambda ids, offs, b: fl.pooled_lookup(ids, offs, b, T, D, weights, features, None, mixed, remaps)  # noqa: E731
            fused = lookup(one, one_offsets, B)
            ref = ref_fn(one, one_offsets, B, D, mixed or features, views)
            fused_many = lookup(many, many_offsets, short_b)
            ref_many = ref_fn(many, many_offsets, short_b, D, mixed or features, views)
            case = {
                "one_id_equal": bool(torch.equal(fused, ref)),
                "one_id_max_abs_diff": float((fused - ref).abs().max()),
                "one_id_allclose": bool(torch.allclose(fused, ref, rtol=1e-5, atol=1e-6)),
                "bags_0_8_allclose": bool(torch.allclose(fused_many, ref_many, rtol=1e-5, atol=1e-6)),
                "bags_0_8_max_abs_diff": float((fused_many - ref_many).abs().max()),
                "fused_ms": timed(lambda: lookup(one, one_offsets, B), device),
                "bags_0_8_fused_ms": timed(lambda: lookup(many, many_offsets, short_b), device),
            }
            if name in ("full", "qr-mult", "multihash2") or name in MD_CASES:
                case["torch_reference_ms"] = timed(lambda: ref_fn(one, one_offsets, B, D, mixed or features, views), device, repeats=5, iterations=3)
            if name == "qr-mult" and device.type == "cuda" and args.sweep:
                sweep = {}
                for block in (16, 32, 64, 128):
                    for warps in (2, 4, 8):
                        fl.BLOCK_BAGS, fl.NUM_WARPS = block, warps
                        sweep[f"{block}x{warps}"] = timed(lambda: lookup(one, one_offsets, B), device, repeats=7)
                fl.BLOCK_BAGS, fl.NUM_WARPS = 32, 4
                case["block_sweep_ms"] = sweep
            if name in MD_CASES:  # row bytes of each id's block (uniform ids over ranks) + output
                m = mixed[0]
                row_bytes = sum(r * w for r, w in zip(m.rows, m.widths)) / args.rows * 4
                moved = T * B * (row_bytes + D * 4)
            elif name == "qr-concat":
                moved = T * B * D * 4 * 2
            else:
                moved = T * B * D * 4 * (1 + len(features[0].partitions))
            case["GBps_rows_plus_out"] = moved / (case["fused_ms"] / 1e3) / 1e9
            result["cases"][name] = case
            print(name, json.dumps(case), flush=True)
            del weights, views, remaps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_fused_lookup.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
