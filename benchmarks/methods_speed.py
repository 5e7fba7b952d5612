"""Training-step speed of every method against Full and against its own dlrm-style build.

26 features with the Criteo-sample cardinalities, B=4096, D=16, one id per bag, Zipf ids.
For each method at 10x fewer bytes than Full (its budget fitter), time forward + backward (+ the
table update) of
  * the method in tablezip's collection (one TBE, fused rowwise Adagrad in backward),
  * Full in tablezip's collection, same ids,
  * the same method built dlrm-style: one sparse nn.EmbeddingBag per physical table, same
    transforms and combiners (benchmarks/baselines.py), sparse torch Adagrad.
Frequency-aware methods get counts from the timed ids themselves.

    .venv/bin/python benchmarks/methods_speed.py [--methods hash,qr,...] [--ratio 10] [--repeats 7] [--threads 1]

``--threads`` sets torch's intra-op threads for all three builds (default: torch's own, one per
core). It matters: the collections of several tables (md, qr, kway) run many small ops, and each
op of a multi-threaded build pays a fork/join on every call; on a 2-core machine next to another
busy process 2 threads can stall (why ``tablezip train --torch-threads`` defaults to 1). Report
the thread count with any ratio. "paired" is the median over repeats of Full's time / the
method's time in the same repeat: Full's own step is bimodal on some machines (page faults inside
fbgemm), and a ratio of two medians then swings more than the pairs do.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import LoopedCollection  # noqa: E402
from collection_speed import IMPLS, Case, adagrad_state_bytes, tensor_bytes  # noqa: E402
from harness import CRITEO_CARDINALITIES, Workload, env_info, time_fn, write_results  # noqa: E402

from tablezip.compress.budget import FITTERS, full_bytes, methods_for_budget  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, MethodConfig  # noqa: E402

FALLBACK_RATIO = 2.0  # where a method's fitter cannot reach the asked ratio (md at D=16, before its fitter grew)

warnings.filterwarnings("ignore")


def features_with_counts(workload: Workload, ids: dict[str, torch.Tensor]) -> list[FeatureSpec]:
    return [
        FeatureSpec(name, n, counts=np.bincount(ids[name].numpy(), minlength=n).astype(np.int64) + 1)
        for name, n in workload.features
    ]


def fit_methods(method: str, features: Sequence[FeatureSpec], dim: int, ratio: float) -> dict[str, MethodConfig]:
    """``method``'s configs at ``ratio`` fewer bytes than Full, from its budget fitter.

    A fitter may not reach every ratio (md's once could not go below ~4x at D=16): such a
    method is timed at ``FALLBACK_RATIO`` rather than dropped, so every method keeps a row; the
    records carry the real ratio.
    """
    try:
        return methods_for_budget(method, features, dim, int(full_bytes(features, dim) / ratio))
    except ValueError as err:
        print(f"{method}: {err}; timing it at {FALLBACK_RATIO:g}x instead", flush=True)
        return methods_for_budget(method, features, dim, int(full_bytes(features, dim) / FALLBACK_RATIO))


def forward_of(model: torch.nn.Module, kjt: KeyedJaggedTensor) -> Callable[[], torch.Tensor]:
    """Forward with autograd on, as in training; the pooled [B, F*D] tensor either way."""
    def run() -> torch.Tensor:
        out = model(kjt)
        return out if torch.is_tensor(out) else out.values()
    return run


def method_cases(method: str, features: Sequence[FeatureSpec], dim: int, ratio: float, kjt: KeyedJaggedTensor) -> list[Case]:
    """``method`` at ``ratio`` in tablezip's collection and in its dlrm-style build.

    Both start from the same weights and are checked to compute the same output before anything
    is timed, so a speed difference is never a difference in the work done.
    """
    coll = CompressedEmbeddingBagCollection(features, dim, fit_methods(method, features, dim, ratio))
    looped = LoopedCollection(coll)
    with torch.no_grad():
        torch.testing.assert_close(forward_of(coll, kjt)(), looped(kjt), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{method}: dlrm-style build differs\n{m}")
    adagrad = torch.optim.Adagrad(looped.bags.parameters(), lr=0.05)
    tables, table_bytes = len(coll.table_specs()), coll.memory_bytes()
    tbe_states = lambda: tensor_bytes([t for states in coll.tbe.split_optimizer_states() for t in states])  # noqa: E731
    return [
        Case(method, IMPLS[0], "fbgemm fused rowwise Adagrad (in backward)", forward_of(coll, kjt), step(coll, kjt),
             table_bytes, tbe_states, tables),
        Case(method, IMPLS[2], "torch.optim.Adagrad, sparse grads", forward_of(looped, kjt), step(looped, kjt, adagrad),
             table_bytes, lambda: adagrad_state_bytes(adagrad), tables),
    ]  # fmt: skip


def step(model: torch.nn.Module, kjt: KeyedJaggedTensor, optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One training step: forward, backward (tablezip updates its tables inside it), the
    optimizer step for a baseline with separate table parameters, then no gradient kept."""
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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    workload = Workload(features=CRITEO_CARDINALITIES, dim=args.dim, batch=args.batch, zipf=args.zipf or None)
    ids = workload.sample_ids()
    names = [n for n, _ in workload.features]
    kjt = KeyedJaggedTensor(keys=names, values=torch.cat([ids[n] for n in names]), lengths=torch.ones(len(names) * args.batch, dtype=torch.long))
    features = features_with_counts(workload, ids)
    full = CompressedEmbeddingBagCollection(features, args.dim)
    records: list[dict[str, Any]] = []
    for method in [m for m in args.methods.split(",") if m]:
        tz, dlrm = method_cases(method, features, args.dim, args.ratio, kjt)
        # Interleave the three so that drift in machine load hits all of them alike.
        timings = {"tablezip": [], "full": [], "dlrm-style": []}
        for _ in range(args.repeats):
            for key, fn in (("tablezip", tz.train_step), ("full", step(full, kjt)), ("dlrm-style", dlrm.train_step)):
                timings[key].append(time_fn(fn, warmup=2, repeats=1, min_seconds=0.3)["median_ms"])
        med = {k: float(np.median(v)) for k, v in timings.items()}
        rec = {
            "method": method, "ratio": full.memory_bytes() / tz.table_bytes, "bytes": tz.table_bytes, "full_bytes": full.memory_bytes(),
            "tables": tz.tables, "tablezip_ms": med["tablezip"], "full_ms": med["full"],
            "dlrm_style_ms": med["dlrm-style"], "speed_vs_full": med["full"] / med["tablezip"],
            "speedup_vs_dlrm_style": med["dlrm-style"] / med["tablezip"], "per_repeat_ms": timings,
            "speed_vs_full_paired": float(np.median([f / t for f, t in zip(timings["full"], timings["tablezip"])])),
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
        f"median of {args.repeats} interleaved repeats. speed vs Full = Full time / method time (bar >= 0.6); paired = median of "
        "the per-repeat ratios; "
        "speedup vs dlrm-style = dlrm-style time / tablezip time (bar >= 2).",
        "",
        "| method | bytes (ratio) | tables | tablezip ms | Full ms | speed vs Full | paired | dlrm-style ms | speedup vs dlrm-style |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['method']} | {r['bytes']:,} ({r['ratio']:.0f}x) | {r['tables']} | {r['tablezip_ms']:.2f} | {r['full_ms']:.2f} | {r['speed_vs_full']:.2f}x | {r['speed_vs_full_paired']:.2f}x | {r['dlrm_style_ms']:.2f} | {r['speedup_vs_dlrm_style']:.2f}x |")
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
