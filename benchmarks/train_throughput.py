"""Training throughput of DLRM per method: examples/s on the bundled Criteo sample, vs Full.

Trains ``tablezip.pipelines.train.train`` (the code behind ``tablezip train`` and
benchmarks/quality.py: DLRM, D=16, batch 256, one epoch over the 79,200 train rows of the demo's
ordered split, fused rowwise Adagrad on the tables, Adam on the dense layers) once per method
per round, Full and every method at 10x fewer bytes (a method whose fitter cannot reach 10x
trains at 2x, and the table says so).
Throughput is the pipeline's own ``examples_per_second``: rows trained / seconds in the training
loop (batch assembly from the prepared parquet included; evaluation and export excluded).
Rounds run every variant once, in an order rotated per round, so load drift on a shared
machine hits all variants alike; the ratio vs Full is taken within each round, then the median.

    flock /tmp/tablezip-bench.lock .venv/bin/python benchmarks/train_throughput.py [--runs 5]
    .venv/bin/python benchmarks/train_throughput.py --quick    # full,hash on 20k rows (*_quick)

Writes results/train_throughput.{json,md,png}.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO_ROOT, RESULTS_DIR, env_info, write_results  # noqa: E402

from tablezip.compress.budget import FITTERS, full_bytes, methods_for_budget  # noqa: E402
from tablezip.pipelines.train import TrainConfig, feature_specs, train  # noqa: E402

SAMPLE = REPO_ROOT / "data" / "criteo_sample_110k.tsv.gz"
FALLBACK_RATIO = 2.0  # as in methods_speed.py: where a method's fitter cannot reach the ratio


def prepare_sample(out: Path) -> Path:
    """The demo's split of the bundled sample (Makefile `demo`): file order, 72/8/20."""
    from tablezip.pipelines.criteo import PrepareConfig, prepare_criteo

    prepare_criteo([SAMPLE], out, PrepareConfig(split="ordered", fractions=(0.72, 0.08, 0.2)), progress=False)
    return out


def variant_ratios(data: Path, methods: Sequence[str], ratio: float, dim: int) -> dict[str, float]:
    """The ratio each method trains at: ``ratio``, or FALLBACK_RATIO where its fitter cannot
    reach it (checked once here, not discovered as a failed run in every round)."""
    features = feature_specs(data)
    out = {"full": 1.0}
    for m in methods:
        if m == "full":
            continue
        try:
            methods_for_budget(m, features, dim, int(full_bytes(features, dim) / ratio))
            out[m] = ratio
        except ValueError as err:
            print(f"{m}: {err}; training it at {FALLBACK_RATIO:g}x instead", flush=True)
            out[m] = FALLBACK_RATIO
    return out


def run(data: Path, ratios: dict[str, float], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    variants = list(ratios)
    records = []
    for rnd in range(args.runs):
        shift = rnd % len(variants)
        for method in variants[shift:] + variants[:shift]:
            config = TrainConfig(method=method, ratio=ratios[method], seed=args.seed, max_train_rows=args.max_train_rows)
            started = time.perf_counter()
            try:
                result = train(data, config, work / f"round{rnd}", tracking_uri=None, progress=False)
            except Exception as err:  # one failing method is a result; the others go on
                records.append({"method": method, "round": rnd, "ratio_target": ratios[method], "error": f"{type(err).__name__}: {err}"})
                print(f"  round {rnd + 1}/{args.runs} {method:>10}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            records.append({
                "method": method, "round": rnd, "ratio_target": ratios[method], "ratio": result.ratio,
                "bytes": result.embedding_bytes, "full_bytes": result.full_bytes,
                "examples_per_s": result.examples_per_second, "train_seconds": result.train_seconds,
                "examples": round(result.examples_per_second * result.train_seconds), "test_auc": result.test_auc,
                "wall_seconds": time.perf_counter() - started,
            })  # fmt: skip
            print(f"  round {rnd + 1}/{args.runs} {method:>10}: {result.examples_per_second:9,.0f} examples/s "
                  f"({result.train_seconds:.1f} s training, {time.perf_counter() - started:.1f} s with eval and export)", flush=True)
    return records


def summarise(records: Sequence[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: median examples/s over rounds, min and max, and the median over rounds of
    (its examples/s / Full's examples/s in the same round)."""
    ok = [r for r in records if "error" not in r]
    full_by_round = {r["round"]: r["examples_per_s"] for r in ok if r["method"] == "full"}
    rows = []
    for v in variants:
        rs = [r for r in ok if r["method"] == v]
        if not rs:
            rows.append({"method": v, "runs": 0})
            continue
        eps = [r["examples_per_s"] for r in rs]
        rel = [r["examples_per_s"] / full_by_round[r["round"]] for r in rs if r["round"] in full_by_round]
        rows.append({
            "method": v, "runs": len(rs), "ratio": statistics.median(r["ratio"] for r in rs), "bytes": rs[0]["bytes"],
            "examples_per_s": statistics.median(eps), "min": min(eps), "max": max(eps),
            "vs_full": statistics.median(rel) if rel else float("nan"), "test_auc": statistics.median(r["test_auc"] for r in rs),
        })  # fmt: skip
    return rows


def markdown(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], args: argparse.Namespace,
             env: dict[str, Any], seconds: float) -> str:
    rows_note = f"the first {args.max_train_rows:,} train rows" if args.max_train_rows else "the 79,200 train rows"
    lines = [
        f"# DLRM training throughput per method ({args.ratio:g}x fewer bytes than Full), Criteo sample, CPU",
        "",
        f"`{env['command']}` at commit {env['git_commit'][:10]}; {env['cpu_count']} CPUs, torch {env['torch']} "
        f"({env['torch_threads']} threads); load average at start {env['loadavg_1_5_15']}; took {seconds / 60:.1f} min.",
        "",
        f"One epoch over {rows_note} (D=16, batch 256, rowwise Adagrad fused into the TBE, Adam on the dense layers), "
        f"{args.runs} rounds, each training every variant once in a rotated order. examples/s is the pipeline's own "
        "(rows / seconds in the training loop, batch assembly included, evaluation and export not). "
        "vs Full = median over rounds of (method / Full in the same round)."
        + "".join(f" {r['method']} cannot reach {args.ratio:g}x and trained at {r['ratio']:.0f}x." for r in rows
                  if r["runs"] and r["method"] != "full" and abs(r["ratio"] / args.ratio - 1) > 0.15),
        "",
        "| method | bytes (ratio) | examples/s (median) | min - max | vs Full | test AUC (one epoch) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["runs"]:
            lines.append(f"| {r['method']} | failed | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['bytes']:,} ({r['ratio']:.0f}x) | {r['examples_per_s']:,.0f} | "
                     f"{r['min']:,.0f} - {r['max']:,.0f} | {r['vs_full']:.2f}x | {r['test_auc']:.4f} |")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {e['method']} round {e['round']}: {e['error']}" for e in errors]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> plt.Figure:
    done = [r for r in rows if r["runs"]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(done), 4))
    x = range(len(done))
    med = [r["examples_per_s"] for r in done]
    ax.bar(x, med, color=["black" if r["method"] == "full" else "tab:blue" for r in done],
           yerr=[[m - r["min"] for m, r in zip(med, done)], [r["max"] - m for m, r in zip(med, done)]], capsize=3)
    for i, r in enumerate(done):
        ax.text(i, med[i], f"{r['vs_full']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [r["method"] for r in done], rotation=20)
    ax.set_ylabel("examples / s (median; whiskers: min-max)")
    ax.set_title(f"DLRM training throughput, {args.ratio:g}x fewer bytes; labels: vs Full")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(sorted(FITTERS)), help="variants; full is always included")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=5, help="rounds; medians over them (>= 3 for a reported number)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train-rows", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); 1 for the same reason as cpu_grid.py")
    p.add_argument("--data", type=Path, default=None, help="a prepared dir (default: prepare the bundled sample)")
    p.add_argument("--quick", action="store_true", help="full,hash, 20,000 rows, 3 rounds (results named *_quick)")
    p.add_argument("--name", default=None)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.max_train_rows, args.runs = "full,hash", args.max_train_rows or 20_000, min(args.runs, 3)
    args.name = args.name or ("train_throughput_quick" if args.quick else "train_throughput")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = env_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.data is None:
            print(f"preparing {SAMPLE.name} ...", flush=True)
            data = prepare_sample(work / "prepared")
        else:
            data = args.data
        ratios = variant_ratios(data, ["full"] + [m for m in args.methods.split(",") if m and m != "full"], args.ratio, 16)
        print(f"{len(ratios)} variants x {args.runs} rounds, {env['torch_threads']} threads, load {env['loadavg_1_5_15']}", flush=True)
        records = run(data, ratios, args, work)
    seconds = time.perf_counter() - started
    for r in records:
        r["env"] = env
    rows = summarise(records, list(ratios))
    table = markdown(rows, records, args, env, seconds)
    paths = write_results(args.name, records, table, plot(rows, args), out_dir=args.out_dir)
    print()
    print(table)
    print(f"\ntook {seconds:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    if any("error" in r for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
