"""What torch's huge-page switch (``THP_MEM_ALLOC_ENABLE=1``) buys a CPU training step.

Every step allocates fresh output, gradient and assembled tensors; at B=32768, D=64 the pooled
output alone is 218 MB, and on 4 KiB pages each such tensor page-faults in again (~53,000 faults
per 218 MB). The switch is read once, before torch's first allocation, so each setting runs in its
own subprocess; the two settings alternate round by round (off, on, off, on, ...) so machine load
hits both alike, and the table shows medians over rounds. Inside a process, Full, the listed
methods (10x) and their dlrm-style builds (one ``nn.EmbeddingBag`` per physical table, sparse
Adagrad) are timed interleaved, forward (autograd on) and forward + backward + update, one thread.

    flock /tmp/tablezip-bench.lock .venv/bin/python benchmarks/huge_pages.py
    .venv/bin/python benchmarks/huge_pages.py --quick      # B=4096 D=16, 2 rounds (*_quick)

Writes results/huge_pages.{json,md} (``--name`` to change). This process holds one model per case;
in a process holding many (the CPU grid) the switch made some steps 2-3x slower, so tablezip
does not set it (benchmarks/NOTES.md, "Huge pages"): measure your own training process first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ENV = "THP_MEM_ALLOC_ENABLE"


def child(batch: int, dim: int, methods: list[str], repeats: int) -> dict[str, Any]:
    """One process, one setting: ms per call of every case, medians of ``repeats`` interleaved rounds."""
    import resource
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from collection_speed import build_cases, build_kjt
    from harness import CRITEO_CARDINALITIES, Workload
    from methods_speed import features_with_counts, method_cases

    torch.set_num_threads(1)
    workload = Workload(features=CRITEO_CARDINALITIES, batch=batch, dim=dim, zipf=1.05)
    ids = workload.sample_ids()
    kjt = build_kjt(workload, ids)
    cases = {"full": build_cases("full", workload, kjt)[0]}
    features = features_with_counts(workload, ids)
    for method in methods:
        tablezip, dlrm = method_cases(method, features, dim, 10.0, kjt)  # checks equal outputs first
        cases[method], cases[f"{method} dlrm-style"] = tablezip, dlrm
    times: dict[str, dict[str, list[float]]] = {k: {"fwd": [], "train": []} for k in cases}
    faults: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            for mode, fn in (("fwd", case.forward), ("train", case.train_step)):
                fn()
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                calls = 0
                while calls < 2 or time.perf_counter() - start < 0.3:
                    fn()
                    calls += 1
                times[name][mode].append((time.perf_counter() - start) * 1e3 / calls)
                if mode == "train":
                    faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls)
    return {name: {"fwd_ms": statistics.median(t["fwd"]), "train_ms": statistics.median(t["train"]),
                   "train_faults": statistics.median(faults[name])} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="32768x64,4096x16", help="BxD pairs, comma-separated")
    parser.add_argument("--methods", default="hash,unified,qr")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per setting, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats inside a subprocess")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if args.child:
        batch, dim = (int(x) for x in args.child.split("x"))
        print(json.dumps(child(batch, dim, methods, args.repeats)))
        return
    if args.quick:
        args.workloads, args.rounds, args.repeats = "4096x16", 2, 2
    name = args.name or ("huge_pages_quick" if args.quick else "huge_pages")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import env_info, write_results

    records: list[dict[str, Any]] = []
    for workload in args.workloads.split(","):
        runs: dict[str, list[dict[str, Any]]] = {"0": [], "1": []}
        for r in range(args.rounds):
            for setting in ("0", "1"):
                env = {**os.environ, ENV: setting}
                out = subprocess.run([sys.executable, __file__, "--child", workload, "--methods", ",".join(methods),
                                      "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
                runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{workload} round {r + 1}/{args.rounds} {ENV}={setting} done", flush=True)
        for case in runs["0"][0]:
            rec: dict[str, Any] = {"workload": workload, "case": case}
            for setting, label in (("0", "off"), ("1", "on")):
                for key in ("fwd_ms", "train_ms", "train_faults"):
                    rec[f"{key}_{label}"] = statistics.median(run[case][key] for run in runs[setting])
            records.append(rec)
    env = env_info()
    lines = ["# Huge pages for torch's CPU tensors (`THP_MEM_ALLOC_ENABLE`)", "",
             f"`{env['command']}` at commit {str(env['git_commit'])[:10]}; {env['cpu_count']} CPUs, torch {env['torch']}, "
             f"1 thread; load at end {env['loadavg_1_5_15']}. Medians of {args.rounds} alternating subprocesses per setting, "
             f"each the median of {args.repeats} interleaved repeats. Criteo-sample cardinalities, Zipf(1.05) ids, one id per bag; "
             "methods at 10x. faults = minor page faults per training step.", "",
             "| B x D | case | fwd ms off -> on | speedup | fwd+bwd ms off -> on | speedup | faults/step off -> on |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['workload']} | {r['case']} | {r['fwd_ms_off']:.1f} -> {r['fwd_ms_on']:.1f} | {r['fwd_ms_off'] / r['fwd_ms_on']:.2f}x | "
                     f"{r['train_ms_off']:.1f} -> {r['train_ms_on']:.1f} | {r['train_ms_off'] / r['train_ms_on']:.2f}x | "
                     f"{r['train_faults_off']:,.0f} -> {r['train_faults_on']:,.0f} |")
    lines += ["", "Ratios within each setting (tablezip vs Full, vs its dlrm-style build), fwd+bwd:", "",
              "| B x D | method | vs Full off / on | vs dlrm-style off / on |", "|---|---|---:|---:|"]
    for workload in args.workloads.split(","):
        by = {r["case"]: r for r in records if r["workload"] == workload}
        for m in methods:
            t, f, d = by[m], by["full"], by[f"{m} dlrm-style"]
            lines.append(f"| {workload} | {m} | {f['train_ms_off'] / t['train_ms_off']:.2f}x / {f['train_ms_on'] / t['train_ms_on']:.2f}x | "
                         f"{d['train_ms_off'] / t['train_ms_off']:.2f}x / {d['train_ms_on'] / t['train_ms_on']:.2f}x |")
    for r in records:
        r["env"] = env
    for path in write_results(name, records, "\n".join(lines)):
        print("wrote", path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
