"""Batched id transforms (issue 6): per-feature ``transform`` vs one ``transform_batch`` per group.

Same workload as methods_speed.py (26 Criteo-sample features, B=4096, D=16, one Zipf id per
bag, each method at 10x fewer bytes through its budget fitter). For every method, one collection
is timed with ``batch_transforms`` False (every feature runs its own ``transform``, the code before
issue 6) and True, interleaved repeat by repeat so that load drift on this shared machine hits both
alike, along with Full. Three timings each: the id transforms alone (``transform_ids``), forward,
and a training step (forward + backward with the fused table update).

    .venv/bin/python benchmarks/batched_transform.py [--methods hash,...] [--repeats 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CRITEO_CARDINALITIES, Workload, env_info, time_fn, write_results  # noqa: E402
from methods_speed import features_with_counts, step  # noqa: E402

from tablezip.compress.budget import FITTERS, full_bytes, methods_for_budget  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection  # noqa: E402

warnings.filterwarnings("ignore")


def toggled(coll: CompressedEmbeddingBagCollection, batched: bool, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        coll.batch_transforms = batched
        fn()
    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(m for m in sorted(FITTERS)))
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--name", default="batched_transform")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = Workload(features=CRITEO_CARDINALITIES, dim=args.dim, batch=args.batch, zipf=1.05)
    ids = workload.sample_ids()
    names = [n for n, _ in workload.features]
    kjt = KeyedJaggedTensor(keys=names, values=torch.cat([ids[n] for n in names]), lengths=torch.ones(len(names) * args.batch, dtype=torch.long))
    per_feature = [ids[n] for n in names]
    features = features_with_counts(workload, ids)
    budget = int(full_bytes(features, args.dim) / args.ratio)
    records: list[dict[str, Any]] = []
    for method in [m for m in args.methods.split(",") if m]:
        try:
            methods = methods_for_budget(method, features, args.dim, budget)
        except ValueError:  # md cannot reach 10x at D=16: time it at 2x, as methods_speed.py does
            methods = methods_for_budget(method, features, args.dim, int(full_bytes(features, args.dim) / 2))
        coll = CompressedEmbeddingBagCollection(features, args.dim, methods)
        with torch.no_grad():
            coll.batch_transforms = False
            reference = coll(kjt).values()
            coll.batch_transforms = True
            assert torch.equal(reference, coll(kjt).values()), method
        cases: dict[str, Callable[[], object]] = {}
        for batched, label in ((False, "per-feature"), (True, "batched")):
            cases[f"transform {label}"] = toggled(coll, batched, lambda: coll.transform_ids(per_feature))
            cases[f"forward {label}"] = toggled(coll, batched, torch.no_grad()(lambda: coll(kjt)))
            cases[f"step {label}"] = toggled(coll, batched, step(coll, kjt))
        timings: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for key, fn in cases.items():
                timings[key].append(time_fn(fn, warmup=2, repeats=1, min_seconds=0.15)["median_ms"])
        med = {k: float(np.median(v)) for k, v in timings.items()}
        groups = len(coll._groups)
        rec = {"method": method, "groups": groups, "median_ms": med, "per_repeat_ms": timings,
               "workload": workload.to_dict(), "env": env_info()}
        records.append(rec)
        print(f"{method:>10} ({groups} groups): transform {med['transform per-feature']:.3f} -> {med['transform batched']:.3f} ms, "
              f"forward {med['forward per-feature']:.2f} -> {med['forward batched']:.2f} ms, "
              f"step {med['step per-feature']:.2f} -> {med['step batched']:.2f} ms", flush=True)
    env = env_info()
    lines = [
        f"# Per-feature vs batched id transforms at {args.ratio:g}x (CPU, B={args.batch}, D={args.dim}, 26 Criteo features, Zipf 1.05)",
        "",
        f"`{env['command']}` at commit {env['git_commit'][:10]}, {env['cpu_count']} CPUs, {env['torch_threads']} threads; "
        f"median of {args.repeats} interleaved repeats (both paths on the same collection and ids).",
        "",
        "| method | batch groups | transforms ms (per-feature -> batched) | forward ms | fwd+bwd step ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in records:
        m = r["median_ms"]
        lines.append(
            f"| {r['method']} | {r['groups']} | {m['transform per-feature']:.3f} -> {m['transform batched']:.3f} "
            f"| {m['forward per-feature']:.2f} -> {m['forward batched']:.2f} | {m['step per-feature']:.2f} -> {m['step batched']:.2f} |"
        )
    write_results(args.name, records, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
