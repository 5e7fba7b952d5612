"""Quality of every method at fixed byte budgets: DLRM on the bundled Criteo sample.

Same training budget for all (one epoch, same seeds, same hyper-parameters): the only thing that
changes between rows is how the embedding tables are stored. Writes results/quality.{json,md,png}.

    .venv/bin/python benchmarks/quality.py [--methods full,hash,...] [--ratios 2,10,100,1000] [--seeds 0,1,2] [--merge]

``--merge`` re-runs only the given cells (method x ratio, or the ``--cells method:ratio`` list;
Full only when ``full`` is among the methods) and merges them into the existing results: records
of those cells are replaced, every other record is kept, and the table, notes and plot are
rebuilt from the union.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, env_info, write_results  # noqa: E402

from tablezip.compress import KWay, MixedDim, full_bytes, methods_for_budget  # noqa: E402
from tablezip.compress.budget import FITTERS  # noqa: E402
from tablezip.embeddings import FeatureSpec, MethodConfig  # noqa: E402
from tablezip.pipelines.train import TrainConfig, feature_specs, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "criteo_sample_110k.tsv.gz"


def prepared_sample(work: Path) -> Path:
    """The demo's split: rows in file order, the last 22,000 are test (the anchor's test set)."""
    out = work / "prepared"
    subprocess.run(
        [sys.executable, "-m", "tablezip.pipelines.cli", "prepare", str(SAMPLE), "--out", str(out),
         "--split", "ordered", "--fractions", "0.72,0.08,0.2", "--no-progress"],
        check=True,
    )
    return out


def fit_note(methods: Mapping[str, MethodConfig], features: Sequence[FeatureSpec]) -> str:
    """What a budget fit chose beyond the method's plain form (a fallback op, deep partitions,
    dropped rare ids), so the table says which variant a number belongs to; "" for none."""
    notes = []
    ops = sorted({m.op for m in methods.values() if hasattr(m, "op")})
    if ops and ops != ["mult"]:
        notes.append("op=" + "/".join(ops))
    parts = max((len(m.partitions) for m in methods.values() if isinstance(m, KWay)), default=0)
    if parts > 4:
        notes.append(f"up to {parts} partitions")
    kept = [(methods[f.name].keep, f.num_embeddings) for f in features
            if isinstance(methods[f.name], MixedDim) and methods[f.name].keep is not None]  # fmt: skip
    if kept:
        notes.append(f"rarest ids dropped: {sum(k for k, _ in kept):,} of {sum(n for _, n in kept):,} ids of "
                     f"{len(kept)} features keep a row")  # fmt: skip
    return "; ".join(notes)


def run(
    cells: Sequence[tuple[str, float]], seeds: Sequence[int], work: Path, with_full: bool = True
) -> list[dict[str, Any]]:
    data = prepared_sample(work)
    features = feature_specs(data)
    trials = [("full", 1.0, s) for s in seeds] if with_full else []
    trials += [(m, r, s) for m, r in cells if m != "full" for s in seeds]
    records = []
    for method, ratio, seed in tqdm(trials, desc="quality"):
        config = TrainConfig(method=method, ratio=ratio, seed=seed)
        try:
            # The budget train() computes, so the note describes the very configs it trains.
            budget = int(full_bytes(features, config.dim) / config.ratio)
            note = fit_note(methods_for_budget(method, features, config.dim, budget), features)
            result = train(data, config, work / "runs", tracking_uri=None, progress=False)
            records.append({"method": method, "ratio_target": ratio, "seed": seed, "bytes": result.embedding_bytes,
                            "full_bytes": result.full_bytes, "ratio": result.ratio, "auc": result.test_auc,
                            "logloss": result.test_logloss, "examples_per_s": result.examples_per_second})
            if note:
                records[-1]["note"] = note
        except Exception as err:  # a failing method is a result too; the others go on
            records.append({"method": method, "ratio_target": ratio, "seed": seed, "error": f"{type(err).__name__}: {err}"})
    return records


def merge_records(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` without the cells (method, target ratio) that ``new`` re-ran, failed trials
    included, then ``new``: a cell's seeds always come from one run."""
    rerun = {(r["method"], r["ratio_target"]) for r in new}
    return [r for r in old if (r["method"], r["ratio_target"]) not in rerun] + list(new)


def summarise(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, float]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault((r["method"], r["ratio_target"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        aucs = [r["auc"] for r in rs]
        out[key] = {
            "auc": statistics.mean(aucs),
            "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "logloss": statistics.mean(r["logloss"] for r in rs),
            "bytes": statistics.mean(r["bytes"] for r in rs),
            "ratio": statistics.mean(r["ratio"] for r in rs),
        }
    return out


def markdown(records: Sequence[dict[str, Any]], ratios: Sequence[float], env: dict[str, Any]) -> str:
    summary = summarise(records)
    full = summary.get(("full", 1.0))
    methods = sorted({m for m, _ in summary if m != "full"})
    runs = list(dict.fromkeys((r["env"]["command"], r["env"]["git_commit"][:10]) for r in records if "env" in r))
    runs = runs or [(env["command"], env["git_commit"][:10])]
    lines = [
        "# Quality per method and byte budget (DLRM, Criteo sample, test = last 22,000 rows)",
        "",
        "; ".join(f"`{command}` at commit {commit}" for command, commit in runs)
        + ("" if len(runs) == 1 else " (merged: each cell's seeds come from one run)")
        + "; mean +- std over seeds, AUC on the test split.",
        "",
    ]
    if full:
        lines.append(f"Full: {full['bytes'] / 2**20:.2f} MiB, AUC {full['auc']:.4f} +- {full['auc_std']:.4f}, logloss {full['logloss']:.4f}")
        lines.append("")
    lines.append("| method | " + " | ".join(f"{r:g}x AUC (real ratio)" for r in ratios) + " |")
    lines.append("|---|" + "---:|" * len(ratios))
    for m in methods:
        cells = []
        for r in ratios:
            s = summary.get((m, r))
            cells.append(f"{s['auc']:.4f} +- {s['auc_std']:.4f} ({s['ratio']:.0f}x)" if s else "failed")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    notes = {(r["method"], r["ratio_target"]): r["note"] for r in records if r.get("note")}
    if notes:
        lines += ["", "What the budget fit chose below the plain method's minimum (mean logloss in brackets):", ""]
        for (m, r), note in sorted(notes.items()):
            s = summary.get((m, r))
            logloss = f" (logloss {s['logloss']:.4f})" if s else ""
            lines.append(f"- {m} {r:g}x{logloss}: {note}")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Failed trials:", ""] + [f"- {e['method']} {e['ratio_target']:g}x seed {e['seed']}: {e['error']}" for e in errors]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]]) -> Any:
    summary = summarise(records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({m for m, _ in summary if m != "full"}):
        pts = sorted((s["bytes"], s["auc"], s["auc_std"]) for (mm, _), s in summary.items() if mm == m)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=m)
    if ("full", 1.0) in summary:
        f = summary[("full", 1.0)]
        ax.errorbar([f["bytes"]], [f["auc"]], yerr=[f["auc_std"]], marker="*", markersize=14, color="black", label="full", linestyle="none")
        ax.axhline(f["auc"], color="black", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (log)")
    ax.set_ylabel("test AUC")
    ax.set_title("AUC vs embedding bytes, DLRM on the Criteo sample")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(sorted(FITTERS)))
    parser.add_argument("--ratios", default="2,10,100,1000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--name", default="quality")
    parser.add_argument("--cells", default="",
                        help="method:ratio pairs to run instead of --methods x --ratios, e.g. md:10,qr:100")
    parser.add_argument("--merge", action="store_true",
                        help="merge the re-run cells into the existing results/<name>.json instead of replacing it")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",")]
    cells = [(m, r) for m in methods for r in ratios]
    if args.cells:
        try:
            cells = [(m, float(r)) for m, r in (c.split(":") for c in args.cells.split(",") if c)]
        except ValueError:
            parser.error(f"--cells must be method:ratio pairs separated by commas, got {args.cells!r}")
        methods = list(dict.fromkeys(m for m, _ in cells))
        ratios = sorted({r for _, r in cells})
    unknown = sorted({m for m, _ in cells} - set(FITTERS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; allowed: {sorted(FITTERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    env = env_info()
    previous = RESULTS_DIR / f"{args.name}.json"
    if args.merge and not previous.exists():
        parser.error(f"--merge: no {previous} to merge into")
    with tempfile.TemporaryDirectory() as tmp:
        records = run(cells, seeds, Path(tmp), with_full=not args.merge or "full" in methods)
    for r in records:
        r["env"] = env
    if args.merge:
        records = merge_records(json.loads(previous.read_text()), records)
        ratios = sorted({r["ratio_target"] for r in records if r["method"] != "full"})
    table = markdown(records, ratios, env)
    write_results(args.name, records, table, plot(records))
    print(table)


if __name__ == "__main__":
    main()
