"""Training-step speed of every method against Full and against its own dlrm-style build.

26 features with the Criteo-sample cardinalities, B=4096, D=16, one id per bag, Zipf ids.
For each method at 10x fewer bytes than Full (its budget fitter), time forward + backward (+ the
table update) of
  * the method in tablezip's collection (one TBE, fused rowwise Adagrad in backward),
  * Full in tablezip's collection, same ids,
  * the same method built dlrm-style: one sparse nn.EmbeddingBag per physical table, same
    transforms and combiners (benchmarks/baselines.py), sparse torch Adagrad.
Frequency-aware methods get counts from the timed ids themselves.

    .venv/bin/python benchmarks/methods_speed.py [--methods hash,qr,...] [--ratio 10] [--repeats 7]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import LoopedCollection  # noqa: E402
from harness import CRITEO_CARDINALITIES, Workload, env_info, time_fn, write_results  # noqa: E402

from tablezip.compress.budget import FITTERS, full_bytes, methods_for_budget  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec  # noqa: E402

warnings.filterwarnings("ignore")


def features_with_counts(workload: Workload, ids: dict[str, torch.Tensor]) -> list[FeatureSpec]:
    return [
        FeatureSpec(name, n, counts=np.bincount(ids[name].numpy(), minlength=n).astype(np.int64) + 1)
        for name, n in workload.features
    ]


def step(model, kjt: KeyedJaggedTensor, optimizer=None):
    def run() -> None:
        out = model(kjt)
        out = out.values() if hasattr(out, "values") and not torch.is_tensor(out) else out
        out.sum().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(m for m in sorted(FITTERS) if m != "full"))
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids; 0 = uniform")
    parser.add_argument("--name", default="methods_speed")
    args = parser.parse_args(argv)
    workload = Workload(features=CRITEO_CARDINALITIES, dim=args.dim, batch=args.batch, zipf=args.zipf or None)
    ids = workload.sample_ids()
    names = [n for n, _ in workload.features]
    kjt = KeyedJaggedTensor(keys=names, values=torch.cat([ids[n] for n in names]), lengths=torch.ones(len(names) * args.batch, dtype=torch.long))
    features = features_with_counts(workload, ids)
    budget = int(full_bytes(features, args.dim) / args.ratio)
    full = CompressedEmbeddingBagCollection(features, args.dim)
    records: list[dict[str, Any]] = []
    for method in [m for m in args.methods.split(",") if m]:
        try:
            methods = methods_for_budget(method, features, args.dim, budget)
        except ValueError as err:  # some methods cannot reach every ratio (e.g. md at D=16): time them at 2x
            print(f"{method}: {err}; timing it at 2x instead", flush=True)
            methods = methods_for_budget(method, features, args.dim, int(full_bytes(features, args.dim) / 2))
        coll = CompressedEmbeddingBagCollection(features, args.dim, methods)
        looped = LoopedCollection(coll)
        with torch.no_grad():
            torch.testing.assert_close(coll(kjt).values(), looped(kjt), rtol=1e-5, atol=1e-6)
        adagrad = torch.optim.Adagrad(looped.bags.parameters(), lr=0.05)
        # Interleave the three so that drift in machine load hits all of them alike.
        timings = {"tablezip": [], "full": [], "dlrm-style": []}
        for _ in range(args.repeats):
            for key, fn in (("tablezip", step(coll, kjt)), ("full", step(full, kjt)), ("dlrm-style", step(looped, kjt, adagrad))):
                timings[key].append(time_fn(fn, warmup=2, repeats=1, min_seconds=0.3)["median_ms"])
        med = {k: float(np.median(v)) for k, v in timings.items()}
        rec = {
            "method": method, "ratio": full.memory_bytes() / coll.memory_bytes(), "bytes": coll.memory_bytes(), "full_bytes": full.memory_bytes(),
            "tables": len(coll.table_specs()), "tablezip_ms": med["tablezip"], "full_ms": med["full"],
            "dlrm_style_ms": med["dlrm-style"], "speed_vs_full": med["full"] / med["tablezip"],
            "speedup_vs_dlrm_style": med["dlrm-style"] / med["tablezip"], "per_repeat_ms": timings,
            "workload": workload.to_dict(), "env": env_info(),
        }
        records.append(rec)
        print(f"{method:>18}: {med['tablezip']:.2f} ms, Full {med['full']:.2f} ms (speed {rec['speed_vs_full']:.2f}x of Full), "
              f"dlrm-style {med['dlrm-style']:.2f} ms ({rec['speedup_vs_dlrm_style']:.2f}x)", flush=True)
    env = env_info()
    lines = [
        f"# Training-step speed per method at {args.ratio:g}x fewer bytes (CPU, B={args.batch}, D={args.dim}, 26 Criteo features, {workload.distribution} ids)",
        "",
        f"`{env['command']}` at commit {env['git_commit'][:10]}, {env['cpu_count']} CPUs, {env['torch_threads']} threads; "
        f"median of {args.repeats} interleaved repeats. speed vs Full = Full time / method time (bar >= 0.6); "
        "speedup vs dlrm-style = dlrm-style time / tablezip time (bar >= 2).",
        "",
        "| method | bytes (ratio) | tables | tablezip ms | Full ms | speed vs Full | dlrm-style ms | speedup vs dlrm-style |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['method']} | {r['bytes']:,} ({r['ratio']:.0f}x) | {r['tables']} | {r['tablezip_ms']:.2f} | {r['full_ms']:.2f} | {r['speed_vs_full']:.2f}x | {r['dlrm_style_ms']:.2f} | {r['speedup_vs_dlrm_style']:.2f}x |")
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(records))
    for i, (key, label) in enumerate((("tablezip_ms", "tablezip"), ("full_ms", "Full (tablezip)"), ("dlrm_style_ms", "dlrm-style"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in records], 0.27, label=label)
    ax.set_xticks(x, [r["method"] for r in records], rotation=20)
    ax.set_ylabel("ms per training step")
    ax.set_title(f"fwd+bwd+update per method, {args.ratio:g}x fewer bytes")
    ax.legend()
    write_results(args.name, records, "\n".join(lines), fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
