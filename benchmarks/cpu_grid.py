"""CPU lookup-speed grid: every method against Full, torchrec's EBC and its own dlrm-style build.

For every B in {512, 4096, 32768}, D in {16, 64} and uniform / Zipf(1.05) ids (26 features with
the Criteo-sample cardinalities, one id per bag), times forward (autograd on) and
forward + backward + table update of
  * Full in tablezip's collection (one fbgemm TBE, rowwise Adagrad fused into backward),
  * Full in torchrec's ``EmbeddingBagCollection`` (dense torch Adagrad) and Full dlrm-style
    (one sparse ``nn.EmbeddingBag`` per feature, sparse torch Adagrad): collection_speed.py,
  * every method at 10x fewer bytes (its budget fitter; a method whose fitter cannot reach
    10x runs at 2x, and the table says so), in tablezip's collection and in its dlrm-style
    build: methods_speed.py.
Every implementation is checked to compute the same output as its tablezip twin before timing.
All cases of one workload are timed together, repeat by repeat (``harness.time_interleaved``),
so each ratio compares cases that ran under the same machine load.

    flock /tmp/tablezip-bench.lock .venv/bin/python benchmarks/cpu_grid.py          # whole grid
    .venv/bin/python benchmarks/cpu_grid.py --quick    # B=512, D=16, short repeats (*_quick)
    .venv/bin/python benchmarks/cpu_grid.py --batches 4096 --dims 16 --dists zipf --methods hash,qr

Writes results/cpu_grid.{json,md,png} (``--name`` to change).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collection_speed import FWD, IMPLS, TRAIN, build_cases, build_kjt  # noqa: E402
from harness import CRITEO_CARDINALITIES, RESULTS_DIR, Workload, env_info, time_interleaved, write_results  # noqa: E402
from methods_speed import features_with_counts, method_cases  # noqa: E402

from tablezip.compress.budget import FITTERS  # noqa: E402

warnings.filterwarnings("ignore")

TZ, EBC, DLRM = "tablezip", "torchrec EBC", "dlrm-style"
IMPL_LABEL = {IMPLS[0]: TZ, IMPLS[1]: EBC, IMPLS[2]: DLRM}
MODES = (FWD, TRAIN)
# The bars: minimum Full time / method time (methods not listed have none) ...
SPEED_BARS = {"hash": 0.9, "unified": 0.9, "pruned": 0.9, "qr": 0.6, "md": 0.6}
# ... and minimum dlrm-style time / tablezip time, for every method.
DLRM_BAR = 2.0
DEFAULT_METHODS = tuple(m for m in sorted(FITTERS) if m != "full")


def workload_label(w: Workload | dict[str, Any]) -> str:
    d = w.to_dict() if isinstance(w, Workload) else w
    return f"B={d['batch']} D={d['dim']} {d['distribution']}"


def run_workload(workload: Workload, methods: Sequence[str], args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Build every case of ``workload``, time them interleaved, return one record per case and mode."""
    started = time.perf_counter()
    ids = workload.sample_ids()
    kjt = build_kjt(workload, ids)
    features = features_with_counts(workload, ids)  # frequency-aware methods count the timed ids
    cases = build_cases("full", workload, kjt)
    errors = []
    for method in methods:
        try:
            cases += method_cases(method, features, workload.dim, args.ratio, kjt)
        except Exception as err:  # one broken method is a result too; the others are still timed
            errors.append({"workload": workload.to_dict(), "env": env, "method": method, "error": f"{type(err).__name__}: {err}"})
            print(f"  {method}: FAILED {errors[-1]['error']}", flush=True)
    fns = {(c.variant, IMPL_LABEL[c.impl], mode): fn for c in cases for mode, fn in ((FWD, c.forward), (TRAIN, c.train_step))}
    print(f"  {len(fns)} cases built and checked in {time.perf_counter() - started:.0f} s; timing {args.repeats} interleaved repeats", flush=True)

    def progress(r: int) -> None:
        print(f"  repeat {r + 1}/{args.repeats} done, {time.perf_counter() - started:.0f} s into this workload", flush=True)

    timings = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds, on_repeat=progress)
    full_bytes = next(c.table_bytes for c in cases if c.variant == "full")
    records = []
    for c in cases:
        for mode in MODES:
            t = timings[(c.variant, IMPL_LABEL[c.impl], mode)]
            records.append({
                "workload": workload.to_dict(), "env": env, "method": c.variant, "impl": IMPL_LABEL[c.impl], "mode": mode,
                "optimizer": c.optimizer, "bytes": c.table_bytes, "full_bytes": full_bytes, "ratio": full_bytes / c.table_bytes,
                "tables": c.tables or len(workload.features), "optimizer_state_bytes": c.optimizer_state_bytes(),
                **t, "rows_per_s": workload.batch * 1e3 / t["median_ms"],
            })  # fmt: skip
    add_ratios(records)
    broken = {e["method"] for e in errors}
    for method in ["full", *(m for m in methods if m not in broken)]:
        line = []
        for mode in MODES:
            r = find(records, workload_label(workload), method, TZ, mode)
            vs = f"{r['speed_vs_full']:.2f}x of Full, " if method != "full" else f"{r['speedup_vs_ebc']:.2f}x over EBC, "
            line.append(f"{mode} {r['median_ms']:7.2f} ms ({vs}{r['speedup_vs_dlrm_style']:.2f}x over dlrm-style)")
        print(f"  {method:>10}: " + "; ".join(line), flush=True)
    return records + errors


def failure(records: Sequence[dict[str, Any]], label: str, method: str) -> str | None:
    """The error of ``method`` (or of the whole workload) in ``label``, if it failed there."""
    for r in records:
        if "error" in r and workload_label(r["workload"]) == label and r["method"] in (method, None):
            return r["error"]
    return None


def find(records: Sequence[dict[str, Any]], label: str, method: str, impl: str, mode: str) -> dict[str, Any]:
    (match,) = [r for r in records if "error" not in r and workload_label(r["workload"]) == label
                and (r["method"], r["impl"], r["mode"]) == (method, impl, mode)]
    return match


def add_ratios(records: Sequence[dict[str, Any]]) -> None:
    """On each tablezip record: Full time / its time, dlrm-style time / its time, and for Full
    EBC time / its time; all from medians of the same interleaved run."""
    for r in records:
        if "error" in r or r["impl"] != TZ or "speed_vs_full" in r:
            continue
        label = workload_label(r["workload"])
        r["speed_vs_full"] = find(records, label, "full", TZ, r["mode"])["median_ms"] / r["median_ms"]
        r["speedup_vs_dlrm_style"] = find(records, label, r["method"], DLRM, r["mode"])["median_ms"] / r["median_ms"]
        if r["method"] == "full":
            r["speedup_vs_ebc"] = find(records, label, "full", EBC, r["mode"])["median_ms"] / r["median_ms"]


def off_target(records: Sequence[dict[str, Any]], ratio: float) -> str:
    """Which methods ran at another ratio than asked (a fitter that cannot reach it falls back,
    see methods_speed.fit_methods): said in the table, not assumed."""
    off = sorted({(r["method"], r["workload"]["dim"], round(r["ratio"])) for r in records
                  if "error" not in r and r["impl"] == TZ and r["method"] != "full" and abs(r["ratio"] / ratio - 1) > 0.15})
    if not off:
        return f"Every method ran within 15% of {ratio:g}x fewer bytes (exact ratios in the times table)."
    return ("Not near the asked ratio (its fitter cannot reach it): " + ", ".join(f"{m} at D={d}: {x}x" for m, d, x in off)
            + " (exact ratios in the times table).")


def meets(r: dict[str, Any]) -> tuple[bool | None, bool]:
    """(Full bar met, or None where the method has none; dlrm-style bar met)."""
    bar = SPEED_BARS.get(r["method"])
    return (None if bar is None else r["speed_vs_full"] >= bar), r["speedup_vs_dlrm_style"] >= DLRM_BAR


def markdown(records: Sequence[dict[str, Any]], labels: Sequence[str], methods: Sequence[str], args: argparse.Namespace,
             env: dict[str, Any], seconds: float) -> str:
    """Bars first (one table per mode: workloads x methods), then every median time."""
    fwd_bars = ", ".join(f"{m} >= {b:g}x" for m, b in SPEED_BARS.items())
    lines = [
        f"# CPU lookup speed: every method at {args.ratio:g}x fewer bytes vs Full, torchrec EBC and its dlrm-style build",
        "",
        f"`{env['command']}` at commit {env['git_commit'][:10]}; {env['cpu_count']} CPUs, torch {env['torch']} "
        f"({env['torch_threads']} threads), fbgemm-gpu {env['fbgemm_gpu']}, torchrec {env['torchrec']}; load average at start "
        f"{env['loadavg_1_5_15']}; the grid took {seconds / 60:.1f} min.",
        "",
        f"26 Criteo-sample features, one id per bag. All cases of a workload ran interleaved; median of {args.repeats} repeats, "
        f"each at least {args.min_seconds:g} s. fwd: forward with autograd on. fwd+bwd: forward + backward + table update "
        "(tablezip: rowwise Adagrad fused into the TBE backward; torchrec EBC: dense torch Adagrad; dlrm-style: one sparse "
        "nn.EmbeddingBag per physical table, same transforms and combiners, sparse torch Adagrad). "
        "speed vs Full = Full time / method time, both in tablezip; speedup = dlrm-style (or EBC) time / tablezip time. "
        + off_target(records, args.ratio),
        "",
        f"## Bars: {fwd_bars} Full; every method >= {DLRM_BAR:g}x its dlrm-style build",
        "",
        "A cell is *speed vs Full / speedup vs dlrm-style*; ✗ marks a missed bar. Full's cell is "
        "*speedup vs torchrec EBC / speedup vs its dlrm-style build (nn.EmbeddingBag loop)*.",
    ]
    for mode in (TRAIN, FWD):
        lines += ["", f"### {mode}", "", "| workload | full | " + " | ".join(methods) + " |", "|---|" + "---:|" * (len(methods) + 1)]
        met = {m: [0, 0, 0] for m in methods}  # Full bar met, dlrm bar met, workloads
        for label in labels:
            if failure(records, label, "full"):
                lines.append(f"| {label} | failed |" + " |" * len(methods))
                continue
            f = find(records, label, "full", TZ, mode)
            cells = [f"{f['speedup_vs_ebc']:.2f}x / {f['speedup_vs_dlrm_style']:.2f}x"]
            for m in methods:
                if failure(records, label, m):
                    cells.append("failed")
                    met[m][2] += 1
                    continue
                r = find(records, label, m, TZ, mode)
                full_ok, dlrm_ok = meets(r)
                met[m][0] += bool(full_ok)
                met[m][1] += dlrm_ok
                met[m][2] += 1
                cells.append(f"{r['speed_vs_full']:.2f}{'' if full_ok is not False else ' ✗'} / "
                             f"{r['speedup_vs_dlrm_style']:.2f}{'' if dlrm_ok else ' ✗'}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("| **bars met** | | " + " | ".join(
            f"{'-' if m not in SPEED_BARS else f'{met[m][0]}/{met[m][2]}'} / {met[m][1]}/{met[m][2]}" for m in methods) + " |")
    lines += [
        "",
        "## Median times (ms)",
        "",
        "| workload | method | bytes (ratio) | tables | tablezip fwd | tablezip fwd+bwd | dlrm-style fwd | dlrm-style fwd+bwd | torchrec EBC fwd | torchrec EBC fwd+bwd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        for m in ["full", *methods]:
            if failure(records, label, m):
                lines.append(f"| {label} | {m} | failed | | | | | | | |")
                continue
            t = {(impl, mode): find(records, label, m, impl, mode) for impl in (TZ, DLRM) for mode in MODES}
            ebc = [f"{find(records, label, m, EBC, mode)['median_ms']:.2f}" if m == "full" else "" for mode in MODES]
            r = t[(TZ, FWD)]
            lines.append(f"| {label} | {m} | {r['bytes']:,} ({r['ratio']:.0f}x) | {r['tables']} | "
                         + " | ".join(f"{t[(impl, mode)]['median_ms']:.2f}" for impl in (TZ, DLRM) for mode in MODES)
                         + " | " + " | ".join(ebc) + " |")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "## Failures", ""] + [f"- {workload_label(e['workload'])} {e['method'] or '(whole workload)'}: {e['error']}" for e in errors]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], labels: Sequence[str], methods: Sequence[str]) -> plt.Figure:
    """Heatmaps of the two ratios per mode, workloads x methods, on a log colour scale centred
    at 1; '*' marks a missed bar."""
    fig, axes = plt.subplots(2, 2, figsize=(2.2 + 1.1 * len(methods), 3.0 + 0.9 * len(labels)), squeeze=False)
    norm = LogNorm(vmin=0.25, vmax=4.0)
    for col, mode in enumerate((TRAIN, FWD)):
        for row, (key, title) in enumerate((("speed_vs_full", "speed vs Full"), ("speedup_vs_dlrm_style", "speedup vs dlrm-style"))):
            ax = axes[row][col]
            grid = np.array([[np.nan if failure(records, lb, m) else find(records, lb, m, TZ, mode)[key] for m in methods]
                             for lb in labels])
            ax.imshow(np.clip(grid, 0.25, 4.0), cmap="RdYlGn", norm=norm, aspect="auto")
            for i, lb in enumerate(labels):
                for j, m in enumerate(methods):
                    if np.isnan(grid[i, j]):
                        ax.text(j, i, "failed", ha="center", va="center", fontsize=8)
                        continue
                    full_ok, dlrm_ok = meets(find(records, lb, m, TZ, mode))
                    miss = (full_ok is False) if row == 0 else not dlrm_ok
                    ax.text(j, i, f"{grid[i, j]:.2f}{'*' if miss else ''}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(methods)), methods, rotation=30)
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(f"{title}, {mode}")
    fig.suptitle("tablezip on CPU: ratios of median times (>1: tablezip faster; * = bar missed)")
    fig.tight_layout()
    return fig


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--ratio", type=float, default=10.0, help="Full bytes / method bytes")
    p.add_argument("--batches", type=ints, default=[512, 4096, 32768])
    p.add_argument("--dims", type=ints, default=[16, 64])
    p.add_argument("--dists", default="uniform,zipf", help="uniform and/or zipf")
    p.add_argument("--zipf", type=float, default=1.05, help="exponent of the zipf distribution")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=0.15, help="shortest timed block of one case in one repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default). 1 by default: on a small shared machine two "
                        "threads stall each other whenever another process holds a core (10-100x outliers), one "
                        "thread only slows down evenly")
    p.add_argument("--quick", action="store_true", help="B=512, D=16, 2 short repeats (results named *_quick)")
    p.add_argument("--name", default=None, help="results name (default cpu_grid, or cpu_grid_quick)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.dims, args.repeats, args.warmup, args.min_seconds = [512], [16], 2, 1, 0.02
    args.name = args.name or ("cpu_grid_quick" if args.quick else "cpu_grid")
    unknown = set(args.dists.split(",")) - {"uniform", "zipf"}
    if unknown:
        p.error(f"--dists: unknown {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    workloads = [
        Workload(features=CRITEO_CARDINALITIES, dim=d, batch=b, zipf=args.zipf if dist == "zipf" else None, seed=args.seed)
        for b in args.batches for d in args.dims for dist in args.dists.split(",")
    ]  # fmt: skip
    env = env_info()
    print(f"{len(workloads)} workloads x {2 * len(methods) + 3} implementations x 2 modes; "
          f"{env['cpu_count']} CPUs, {env['torch_threads']} threads, load {env['loadavg_1_5_15']}", flush=True)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for i, w in enumerate(workloads):
        print(f"[{i + 1}/{len(workloads)}] {workload_label(w)} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        try:
            records += run_workload(w, methods, args, env)
        except Exception as err:  # e.g. Full itself broke: record it, go on with the next workload
            records.append({"workload": w.to_dict(), "env": env, "method": None, "error": f"{type(err).__name__}: {err}"})
            print(f"  workload FAILED: {records[-1]['error']}", flush=True)
    seconds = time.perf_counter() - started
    labels = [workload_label(w) for w in workloads]
    table = markdown(records, labels, methods, args, env, seconds)
    paths = write_results(args.name, records, table, plot(records, labels, methods), out_dir=args.out_dir)
    print()
    print(table)
    print(f"\ngrid took {seconds:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    if any("error" in r for r in records):
        sys.exit(1)  # the tables are written; the exit status still tells the suite something broke


if __name__ == "__main__":
    main()
