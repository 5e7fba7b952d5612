"""Training-step speed of CompressedEmbeddingBagCollection against the usual CPU baselines.

For the Criteo feature set, times forward and forward+backward(+optimizer step) of
  * tablezip TBE: the collection (one fbgemm TBE; rowwise Adagrad fused into backward),
  * torchrec EBC: torchrec's EmbeddingBagCollection, one table per feature, dense Adagrad,
  * nn.EmbeddingBag loop: one sparse nn.EmbeddingBag per feature (dlrm-style), sparse Adagrad,
for the Full tables and for Hash at 10x fewer bytes. Every implementation gets the same KJT,
applies the same id transform (OOV mapping / hashing) inside the timed region, reads tables of
the same shapes and, before any timing, is checked to compute the same output.

    .venv/bin/python benchmarks/collection_speed.py            # full run (a few minutes)
    .venv/bin/python benchmarks/collection_speed.py --quick    # smoke test, small sizes
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CRITEO_CARDINALITIES, RESULTS_DIR, Workload, env_info, time_fn, write_results  # noqa: E402

from tablezip.compress import Full, Hash, full_bytes, hash_ids, hash_methods_for_budget  # noqa: E402
from tablezip.compress.full import oov_rows  # noqa: E402
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, MethodConfig, TableOptimizer  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch Adagrad's sparse path

COMPRESSION = 10
VARIANTS = ("full", f"hash-{COMPRESSION}x")
IMPLS = ("tablezip TBE", "torchrec EBC", "nn.EmbeddingBag loop")
FWD, TRAIN = "fwd", "fwd+bwd+step"

RowTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Case:
    """One implementation of one variant, ready to time: ``forward`` returns the [B, F*D]
    pooled output, ``train_step`` runs forward, backward and the optimizer update."""

    variant: str
    impl: str
    optimizer: str
    forward: Callable[[], torch.Tensor]
    train_step: Callable[[], None]
    table_bytes: int
    optimizer_state_bytes: Callable[[], int]
    tables: int | None = None  # physical tables (None: one per feature)


def methods_for(variant: str, features: Sequence[FeatureSpec], dim: int) -> Mapping[str, MethodConfig]:
    if variant == "full":
        return {f.name: Full() for f in features}
    return hash_methods_for_budget(features, dim, full_bytes(features, dim) // COMPRESSION)


def row_transform(feature: FeatureSpec, config: MethodConfig, dim: int) -> RowTransform:
    """The same pure id -> row function the collection's layout applies, for the baselines."""
    if isinstance(config, Full):
        return partial(oov_rows, num_embeddings=feature.num_embeddings)
    if isinstance(config, Hash):
        return partial(hash_ids, rows=config.rows_for(dim), seed=config.seed)
    raise TypeError(f"no baseline transform for {type(config).__name__}")


def build_kjt(workload: Workload, ids: Mapping[str, torch.Tensor] | None = None) -> KeyedJaggedTensor:
    """The workload's ids as one KJT; pass ``ids`` when the caller already sampled them."""
    ids = workload.sample_ids() if ids is None else ids
    names = [name for name, _ in workload.features]
    lengths = torch.full((len(names) * workload.batch,), workload.bag_len, dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=names, values=torch.cat([ids[n] for n in names]), lengths=lengths)


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adagrad_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes([v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)])


def build_cases(variant: str, workload: Workload, kjt: KeyedJaggedTensor) -> list[Case]:
    """The three implementations of ``variant``, all reading copies of the same table values."""
    features = [FeatureSpec(name, n) for name, n in workload.features]
    dim, batch = workload.dim, workload.batch
    methods = methods_for(variant, features, dim)
    opt_cfg = TableOptimizer()
    coll = CompressedEmbeddingBagCollection(features, dim, methods, optimizer=opt_cfg, seed=workload.seed)
    specs = coll.table_specs()
    if len(specs) != len(features) or coll.dense_parameters():
        raise RuntimeError("baselines assume one table per feature and no dense parameters")
    initial = [w.detach().clone() for w in coll.table_weights()]
    transforms = [row_transform(f, methods[f.name], dim) for f in features]
    keys = kjt.keys()
    length_per_key, offset_per_key = kjt.length_per_key(), kjt.offset_per_key()

    def transformed_values() -> torch.Tensor:
        per_feature = torch.split(kjt.values(), length_per_key)
        return torch.cat([t(v) for t, v in zip(transforms, per_feature)])

    # tablezip: the id transform happens inside forward, the table update inside backward.
    def tz_forward() -> torch.Tensor:
        return coll(kjt).values()

    def tz_step() -> None:
        tz_forward().sum().backward()

    # torchrec EBC: dense weight gradients, so a dense Adagrad over every row of every table.
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=dim, num_embeddings=s.rows, feature_names=[f.name])
            for f, s in zip(features, specs)
        ]
    )
    with torch.no_grad():
        for f, w in zip(features, initial):
            ebc.embedding_bags[f"t_{f.name}"].weight.copy_(w)
    ebc_opt = torch.optim.Adagrad(ebc.parameters(), lr=opt_cfg.lr, eps=opt_cfg.eps)

    def ebc_forward() -> torch.Tensor:
        rows = KeyedJaggedTensor(
            keys=keys, values=transformed_values(), lengths=kjt.lengths(), offsets=kjt.offsets(),
            stride=batch, length_per_key=length_per_key, offset_per_key=offset_per_key,
        )  # fmt: skip
        return ebc(rows).values()

    def ebc_step() -> None:
        ebc_forward().sum().backward()
        ebc_opt.step()
        ebc_opt.zero_grad(set_to_none=True)

    # dlrm-style: a Python loop over sparse nn.EmbeddingBag tables, sparse Adagrad.
    bags = nn.ModuleList(nn.EmbeddingBag(s.rows, dim, mode="sum", sparse=True) for s in specs)
    with torch.no_grad():
        for bag, w in zip(bags, initial):
            bag.weight.copy_(w)
    loop_opt = torch.optim.Adagrad(bags.parameters(), lr=opt_cfg.lr, eps=opt_cfg.eps)

    def loop_forward() -> torch.Tensor:
        offsets = kjt.offsets()
        per_feature = torch.split(kjt.values(), length_per_key)
        outs = []
        for i, (bag, transform, ids) in enumerate(zip(bags, transforms, per_feature)):
            bag_offsets = offsets[i * batch : (i + 1) * batch] - offsets[i * batch]
            outs.append(bag(transform(ids), bag_offsets))
        return torch.cat(outs, dim=1)

    def loop_step() -> None:
        loop_forward().sum().backward()
        loop_opt.step()
        loop_opt.zero_grad(set_to_none=True)

    # Guard: never time two different computations.
    with torch.no_grad():
        expected = tz_forward()
        torch.testing.assert_close(ebc_forward(), expected, msg=lambda m: f"{variant}: torchrec EBC differs\n{m}")
        torch.testing.assert_close(loop_forward(), expected, msg=lambda m: f"{variant}: EmbeddingBag loop differs\n{m}")

    table_bytes = coll.memory_bytes()
    if tensor_bytes(list(ebc.parameters())) != table_bytes or tensor_bytes(list(bags.parameters())) != table_bytes:
        raise RuntimeError(f"{variant}: baseline tables differ in size from the collection's")
    tbe_states = lambda: tensor_bytes([s for states in coll.tbe.split_optimizer_states() for s in states])  # noqa: E731
    return [
        Case(variant, IMPLS[0], "fbgemm fused rowwise Adagrad (in backward)", tz_forward, tz_step, table_bytes, tbe_states),
        Case(variant, IMPLS[1], "torch.optim.Adagrad, dense grads", ebc_forward, ebc_step, table_bytes, partial(adagrad_state_bytes, ebc_opt)),
        Case(variant, IMPLS[2], "torch.optim.Adagrad, sparse grads", loop_forward, loop_step, table_bytes, partial(adagrad_state_bytes, loop_opt)),
    ]  # fmt: skip


def run_workload(workload: Workload, args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    kjt = build_kjt(workload)
    records = []
    for variant in VARIANTS:
        for case in build_cases(variant, workload, kjt):
            for mode, fn in ((FWD, case.forward), (TRAIN, case.train_step)):
                timing = time_fn(fn, warmup=args.warmup, repeats=args.repeats, min_seconds=args.min_seconds)
                print(
                    f"  {workload.distribution:>10} {variant:>8} {case.impl:<22} {mode:<13}"
                    f" median {timing['median_ms']:8.3f} ms  p90 {timing['p90_ms']:8.3f} ms"
                    f"  ({timing['iterations']} it/repeat)",
                    flush=True,
                )
                records.append(
                    {
                        "workload": workload.to_dict(),
                        "env": env,
                        "case": {"variant": variant, "impl": case.impl, "mode": mode, "optimizer": case.optimizer},
                        "median_ms": timing["median_ms"],
                        "p90_ms": timing["p90_ms"],
                        "rows_per_s": workload.batch * 1e3 / timing["median_ms"],
                        "bytes": case.table_bytes,
                        "optimizer_state_bytes": case.optimizer_state_bytes(),
                        "per_repeat_ms": timing["per_repeat_ms"],
                        "iterations": timing["iterations"],
                    }
                )
    return records


def _lookup(records: Sequence[dict[str, Any]], dist: str, variant: str, impl: str, mode: str) -> dict[str, Any]:
    (match,) = [
        r
        for r in records
        if r["workload"]["distribution"] == dist
        and (r["case"]["variant"], r["case"]["impl"], r["case"]["mode"]) == (variant, impl, mode)
    ]
    return match


def markdown(records: Sequence[dict[str, Any]], workloads: Sequence[Workload]) -> str:
    """One table per id distribution; speedup = baseline time / tablezip time (same variant)."""
    w0 = workloads[0]
    lines = [
        f"# Collection speed: {len(w0.features)} Criteo features, B={w0.batch}, D={w0.dim}, bag_len={w0.bag_len}",
        "",
        f"`{records[0]['env']['command']}` on {records[0]['env']['cpu_count']} CPUs, "
        f"torch {records[0]['env']['torch']} ({records[0]['env']['torch_threads']} threads), "
        f"fbgemm-gpu {records[0]['env']['fbgemm_gpu']}, torchrec {records[0]['env']['torchrec']}, "
        f"commit {records[0]['env']['git_commit']}, load average at start {records[0]['env']['loadavg_1_5_15']}.",
        "Median over repeats of per-iteration time. fwd: forward with autograd on; "
        "fwd+bwd: forward + backward + optimizer update (tablezip: fused rowwise Adagrad inside backward; "
        "torchrec EBC: dense torch Adagrad; nn.EmbeddingBag loop: sparse torch Adagrad). "
        "speedup = baseline time / tablezip time.",
    ]
    for w in workloads:
        dist = w.distribution
        lines += [
            "",
            f"## ids {dist}",
            "",
            "| variant | impl | fwd ms | fwd+bwd ms | fwd+bwd p90 ms | tablezip speedup fwd | tablezip speedup fwd+bwd | table bytes |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in VARIANTS:
            ref = {m: _lookup(records, dist, variant, IMPLS[0], m)["median_ms"] for m in (FWD, TRAIN)}
            for impl in IMPLS:
                fwd = _lookup(records, dist, variant, impl, FWD)
                train = _lookup(records, dist, variant, impl, TRAIN)
                lines.append(
                    f"| {variant} | {impl} | {fwd['median_ms']:.2f} | {train['median_ms']:.2f} | {train['p90_ms']:.2f}"
                    f" | {fwd['median_ms'] / ref[FWD]:.2f}x | {train['median_ms'] / ref[TRAIN]:.2f}x | {fwd['bytes']:,} |"
                )
        ratio = {
            m: _lookup(records, dist, VARIANTS[1], IMPLS[0], m)["median_ms"]
            / _lookup(records, dist, VARIANTS[0], IMPLS[0], m)["median_ms"]
            for m in (FWD, TRAIN)
        }
        lines += ["", f"Hash-TBE / Full-TBE time: fwd {ratio[FWD]:.2f}, fwd+bwd {ratio[TRAIN]:.2f}."]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], workloads: Sequence[Workload]) -> plt.Figure:
    """fwd+bwd median per impl, grouped by variant; the whisker reaches the p90."""
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), sharey=True, squeeze=False)
    x = np.arange(len(VARIANTS))
    width = 0.8 / len(IMPLS)
    for ax, w in zip(axes[0], workloads):
        for j, impl in enumerate(IMPLS):
            rows = [_lookup(records, w.distribution, v, impl, TRAIN) for v in VARIANTS]
            med = np.array([r["median_ms"] for r in rows])
            p90 = np.array([r["p90_ms"] for r in rows])
            ax.bar(x + (j - (len(IMPLS) - 1) / 2) * width, med, width, label=impl,
                   yerr=[np.zeros_like(med), p90 - med], capsize=3)  # fmt: skip
        ax.set_xticks(x, VARIANTS)
        ax.set_title(f"ids {w.distribution}, B={w.batch}, D={w.dim}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("fwd+bwd+step, ms / iteration (median)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=0.2, help="duration of one timed repeat")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the skewed id workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke test (results named *_quick)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.warmup, args.min_seconds = min(args.batch, 256), 2, 1, 0.02
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    features = CRITEO_CARDINALITIES[:8] if args.quick else CRITEO_CARDINALITIES
    workloads = [
        Workload(features=features, dim=args.dim, batch=args.batch, zipf=zipf, seed=args.seed)
        for zipf in (args.zipf, None)
    ]
    env = env_info()
    print(f"threads={env['torch_threads']} cpus={env['cpu_count']} commit={env['git_commit']}", flush=True)
    records = [r for w in workloads for r in run_workload(w, args, env)]
    table = markdown(records, workloads)
    name = "collection_speed_quick" if args.quick else "collection_speed"
    paths = write_results(name, records, table, plot(records, workloads), out_dir=args.out_dir)
    print()
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
