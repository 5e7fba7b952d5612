"""The planner's plan vs the best single method at the same bytes (DLRM, bundled Criteo sample).

For each budget (default 10x and 100x smaller than Full fp32) it trains, on the demo split and
for several seeds, through the real sweep (Ray tasks, MLflow in a temp store):
- ``plan:planNx``: ``tablezip plan`` with its default dtypes (float32 or int8, one per plan);
- ``plan:planNx-fp32``: the planner restricted to float32 rows (the method choice alone);
- every single method at the budget (fp32 rows, the way the quality benchmark fits them);
- ``plan:<method>Nx-int8``: hash / hybrid / pruned fitted to the same bytes as int8 rows
  (3.2x more rows at D=16), so the dtype lever is given to single methods too.
Writes results/planner.{json,md,png}.

    .venv/bin/python benchmarks/planner.py [--ratios 10,100] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import env_info, write_results  # noqa: E402
from quality import prepared_sample  # noqa: E402

from tablezip.compress import full_bytes, methods_for_budget  # noqa: E402
from tablezip.compress.planner import Plan, config_bytes, row_bytes  # noqa: E402
from tablezip.pipelines.plan import make_plan  # noqa: E402
from tablezip.pipelines.sweep import run_sweep  # noqa: E402
from tablezip.pipelines.train import feature_specs  # noqa: E402

SINGLE = ("hash", "multihash", "unified", "hybrid", "pruned")
SINGLE_INT8 = ("hash", "hybrid", "pruned")


def single_int8_plan(data: Path, method: str, budget: int, dim: int) -> Plan:
    """A single method fitted so that its int8 rows take ``budget`` bytes, as a plan file."""
    features = feature_specs(data)
    fp32_budget = budget * row_bytes(dim, "float32") // row_bytes(dim, "int8")
    methods = dict(methods_for_budget(method, features, dim, fp32_budget))
    used = sum(config_bytes(f, dim, methods[f.name], "int8") for f in features)
    if used > budget:
        raise RuntimeError(f"{method} int8 fit uses {used} bytes > {budget}")
    return Plan(dim=dim, dtype="int8", budget_bytes=budget, methods=methods, bytes=used,
                features={f.name: f.num_embeddings for f in features}, notes={"single_method": method})


def run(ratios: Sequence[float], seeds: Sequence[int], work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    data = prepared_sample(work)
    features = feature_specs(data)
    full = full_bytes(features, 16)
    plan_files: list[Path] = []
    plans_info: dict[str, Any] = {}
    for ratio in ratios:
        budget = int(full / ratio)
        for suffix, dtypes in (("", ("float32", "int8")), ("-fp32", ("float32",))):
            plan = make_plan(data, budget, dtypes=dtypes, progress=False)
            path = work / f"plan{ratio:g}x{suffix}.json"
            path.write_text(plan.to_json())
            plan_files.append(path)
            plans_info[path.stem] = {"dtype": plan.dtype, "bytes": plan.bytes, "budget": budget,
                                     "methods": {k: sum(m.kind == k for m in plan.methods.values())
                                                 for k in sorted({m.kind for m in plan.methods.values()})}}
        for method in SINGLE_INT8:
            path = work / f"{method}{ratio:g}x-int8.json"
            path.write_text(single_int8_plan(data, method, budget, 16).to_json())
            plan_files.append(path)
    records = run_sweep(data, ["full", *SINGLE], ratios, ["dlrm"], seeds, work / "sweep",
                        tracking_uri=f"sqlite:///{work / 'mlruns.db'}", experiment="planner-bench", plans=plan_files)
    return records, plans_info


def _group(r: dict[str, Any]) -> tuple[str, float]:
    return r["method"], round(float(r["ratio_target"]))


def summarise(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float], dict[str, float]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault(_group(r), []).append(r)
    return {
        k: {"auc": statistics.mean(r["test_auc"] for r in rs),
            "std": statistics.stdev([r["test_auc"] for r in rs]) if len(rs) > 1 else 0.0,
            "bytes": statistics.mean(r["embedding_bytes"] for r in rs), "n": len(rs)}
        for k, rs in groups.items()
    }


def markdown(records: Sequence[dict[str, Any]], ratios: Sequence[float], plans: dict[str, Any], env: dict[str, Any]) -> str:
    s = summarise(records)
    lines = ["# Planner vs the best single method at the same bytes (DLRM, Criteo sample)", "",
             f"`{env['command']}` at commit {env['git_commit'][:10]}; test AUC mean +- std over seeds "
             f"(n per row in brackets); bytes are what is served (int8 rows include their scale/bias).", ""]
    if ("full", 1) in s:
        lines += [f"Full fp32: AUC {s[('full', 1)]['auc']:.4f} +- {s[('full', 1)]['std']:.4f}, {s[('full', 1)]['bytes']:,.0f} bytes", ""]
    lines += ["| budget | method | bytes | AUC | vs best single fp32 | vs best single int8 |", "|---|---|---:|---:|---:|---:|"]
    verdict = []
    for ratio in ratios:
        r = round(ratio)
        singles = {m: s[(m, r)] for m in SINGLE if (m, r) in s}
        singles8 = {m: s[(f"plan:{m}{ratio:g}x-int8", r)] for m in SINGLE_INT8 if (f"plan:{m}{ratio:g}x-int8", r) in s}
        best = max(singles.items(), key=lambda kv: kv[1]["auc"]) if singles else None
        best8 = max(singles8.items(), key=lambda kv: kv[1]["auc"]) if singles8 else None
        rows = [(f"plan (auto dtype: {plans.get(f'plan{ratio:g}x', {}).get('dtype', '?')})", s.get((f"plan:plan{ratio:g}x", r))),
                ("plan (fp32 only)", s.get((f"plan:plan{ratio:g}x-fp32", r)))]
        rows += [(m, v) for m, v in sorted(singles.items(), key=lambda kv: -kv[1]["auc"])]
        rows += [(f"{m} + int8", v) for m, v in sorted(singles8.items(), key=lambda kv: -kv[1]["auc"])]
        for name, v in rows:
            if v is None:
                lines.append(f"| {ratio:g}x | {name} | | failed | | |")
                continue
            d1 = f"{v['auc'] - best[1]['auc']:+.4f}" if best else ""
            d8 = f"{v['auc'] - best8[1]['auc']:+.4f}" if best8 else ""
            lines.append(f"| {ratio:g}x | {name} | {v['bytes']:,.0f} | {v['auc']:.4f} +- {v['std']:.4f} ({v['n']}) | {d1} | {d8} |")
        plan = s.get((f"plan:plan{ratio:g}x", r))
        if plan and best:
            target = max([best[1]["auc"]] + ([best8[1]["auc"]] if best8 else []))
            verdict.append(f"- {ratio:g}x: plan {plan['auc']:.4f} vs best single {best[0]} {best[1]['auc']:.4f}"
                           + (f" / best single+int8 {best8[0]} {best8[1]['auc']:.4f}" if best8 else "")
                           + f": bar (plan >= best) {'MET' if plan['auc'] >= target else 'MISSED'}")
    lines += ["", "Bar: the plan is at least as good as the best single method at the same bytes.", ""] + verdict
    lines += ["", "Plans (method count per kind):", ""] + [f"- {k}: {v['dtype']}, {v['bytes']:,} of {v['budget']:,} bytes, {v['methods']}" for k, v in plans.items()]
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Failed trials:", ""] + [f"- {e['trial']}: {e['error']}" for e in errors]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]]) -> Any:
    s = summarise(records)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = sorted({m for m, _ in s if m != "full"}, key=lambda m: (not m.startswith("plan:plan"), m))
    for m in names:
        pts = sorted((v["bytes"], v["auc"], v["std"]) for (mm, _), v in s.items() if mm == m)
        style = dict(marker="*", markersize=12, linewidth=2) if m.startswith("plan:plan") else dict(marker="o", alpha=0.7)
        label = m.removeprefix("plan:")
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, label=label, **style)
    if ("full", 1) in s:
        ax.axhline(s[("full", 1)]["auc"], color="black", linewidth=0.8, linestyle=":", label="full fp32")
    ax.set_xscale("log")
    ax.set_xlabel("served embedding bytes (log)")
    ax.set_ylabel("test AUC")
    ax.set_title("Planner vs single methods, DLRM on the Criteo sample")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="10,100")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--name", default="planner")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    env = env_info()
    with tempfile.TemporaryDirectory(prefix="tablezip-planner-") as tmp:
        records, plans = run(ratios, seeds, Path(tmp))
    for r in records:
        r.pop("artifact_dir", None)
    table = markdown(records, ratios, plans, env)
    print(table)
    write_results(args.name, [{"env": env, "plans": plans}, *records], table, plot(records))


if __name__ == "__main__":
    main()
