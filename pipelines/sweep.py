"""A grid of (method, ratio, model, seed) trials run as Ray tasks, each an MLflow child run.

One parent MLflow run per sweep (named ``sweep-<key>``, ``key`` a hash of the trial grid); each
trial is a child run tagged ``tablezip.trial=<method>/<ratio>/<model>/<seed>`` and
``tablezip.sweep=<key>``. Re-running the same sweep skips trials whose child run FINISHED (their
records are read back from MLflow) and retries the others. A failing trial is a result too: its
child run is FAILED with an ``error`` tag and the sweep goes on.

The summary/plot helpers (``summarise``, ``markdown``, ``plot_pareto``) take plain record dicts
and also accept the older ``auc``/``bytes``/``logloss`` keys of ``benchmarks/quality.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import tracking

SWEEP_TAG = "tablezip.sweep"
TRIAL_TAG = "tablezip.trial"
ROLE_TAG = "tablezip.role"
ARTIFACT_TAG = "tablezip.artifact_dir"
DEFAULT_SWEEP_EXPERIMENT = "tablezip-sweep"


@dataclass(frozen=True, order=True)
class Trial:
    method: str
    ratio: float
    model: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}/{self.ratio:g}/{self.model}/{self.seed}"

    @property
    def slug(self) -> str:
        return self.key.replace("/", "_").replace(":", "-")


def make_trials(methods: Sequence[str], ratios: Sequence[float], models: Sequence[str], seeds: Sequence[int]) -> list[Trial]:
    """The grid: Full only at ratio 1 (once per model and seed), every other method at every ratio."""
    trials: list[Trial] = []
    for model in models:
        for method in dict.fromkeys(methods):
            for ratio in ([1.0] if method == "full" else dict.fromkeys(float(r) for r in ratios)):
                for seed in dict.fromkeys(int(s) for s in seeds):
                    trials.append(Trial(method, float(ratio), model, seed))
    return trials


def plan_trials(prepared_dir: str | Path, plans: Sequence[str | Path]) -> dict[str, tuple[str, float]]:
    """``plan:<stem>`` -> (absolute plan path, its budget as a ratio of Full's bytes, 2 decimals);
    each plan is checked against the data's features here, before any trial starts."""
    from .plan import checked_plan_ratio
    from .train import feature_specs

    out: dict[str, tuple[str, float]] = {}
    if not plans:
        return out
    features = feature_specs(prepared_dir)
    for path in plans:
        name = f"plan:{Path(path).stem}"
        if name in out:
            raise ValueError(f"two plans are named {Path(path).stem!r}; plan files need distinct names")
        out[name] = (str(Path(path).resolve()), checked_plan_ratio(prepared_dir, path, features))
    return out

def sweep_key(trials: Iterable[Trial], max_train_rows: int | None = None) -> str:
    """A stable hash of the grid (and the training budget): the same sweep resumes under it."""
    payload = json.dumps({"trials": sorted(t.key for t in trials), "max_train_rows": max_train_rows})
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _absolute_uri(uri: str) -> str:
    """Relative sqlite paths resolved in the driver, so Ray workers (other cwd) hit the same store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


# ----------------------------------------------------------------------------- one trial


def run_trial(
    prepared_dir: str,
    trial: Trial,
    out_dir: str,
    tracking_uri: str,
    experiment: str,
    parent_run_id: str,
    key: str,
    max_train_rows: int | None,
    plan_path: str | None = None,
) -> dict[str, Any]:
    """Train one trial inside its own MLflow child run; never raises (errors become records).
    A ``plan:<name>`` trial trains the per-feature methods of ``plan_path``."""
    import torch

    from .train import TrainConfig, train

    torch.set_num_threads(1)
    record: dict[str, Any] = {"trial": trial.key, "method": trial.method, "ratio_target": trial.ratio,
                              "model": trial.model, "seed": trial.seed}
    tags = {"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial.key, SWEEP_TAG: key, ROLE_TAG: "trial"}
    try:
        with tracking.mlflow_run(tracking_uri, experiment, trial.key, tags=tags) as run:
            record["run_id"] = run.info.run_id
            tracking.log_params({"method": trial.method, "ratio_target": trial.ratio, "model": trial.model,
                                 "seed": trial.seed, "max_train_rows": max_train_rows, "trial": trial.key})
            try:
                config = TrainConfig(method="plan" if plan_path else trial.method, plan=plan_path, model=trial.model,
                                     ratio=trial.ratio, seed=trial.seed, max_train_rows=max_train_rows)
                result = train(prepared_dir, config, Path(out_dir) / "trials" / trial.slug, tracking_uri=None, progress=False)
            except Exception as err:
                import mlflow

                record["error"] = f"{type(err).__name__}: {err}"
                mlflow.set_tag("error", record["error"][:5000])
                mlflow.set_tag("error_traceback", traceback.format_exc()[-5000:])
                raise  # leaving the run with an exception marks it FAILED
            record.update({
                "embedding_bytes": result.embedding_bytes,
                "full_bytes": result.full_bytes,
                "ratio": result.ratio,
                "test_auc": result.test_auc,
                "test_logloss": result.test_logloss,
                "examples_per_second": result.examples_per_second,
                "train_seconds": result.train_seconds,
                "wall_seconds": result.wall_seconds,
                "artifact_dir": result.artifact_dir,
            })
            tracking.log_params({"embedding_bytes": result.embedding_bytes, "full_bytes": result.full_bytes})
            tracking.log_metrics({k: record[k] for k in _METRICS})
            import mlflow

            mlflow.set_tag(ARTIFACT_TAG, str(result.artifact_dir))
            tracking.log_artifact_dir(Path(result.artifact_dir).parent, "model")
    except Exception as err:  # noqa: BLE001 - a failing trial is recorded, the sweep goes on
        record.setdefault("error", f"{type(err).__name__}: {err}")
    return record


_METRICS = ("embedding_bytes", "ratio", "test_auc", "test_logloss", "examples_per_second", "train_seconds", "wall_seconds")


def _record_from_run(run: Any) -> dict[str, Any]:
    p, m = run.data.params, run.data.metrics
    return {
        "trial": run.data.tags[TRIAL_TAG],
        "method": p["method"],
        "ratio_target": float(p["ratio_target"]),
        "model": p["model"],
        "seed": int(p["seed"]),
        "run_id": run.info.run_id,
        "full_bytes": int(p["full_bytes"]) if "full_bytes" in p else None,
        **{k: m.get(k, float("nan")) for k in _METRICS},
        "embedding_bytes": int(m.get("embedding_bytes", 0)),
        "artifact_dir": run.data.tags.get(ARTIFACT_TAG),
        "resumed": True,
    }


def finished_trials(tracking_uri: str, experiment: str, key: str) -> dict[str, dict[str, Any]]:
    """Records of this sweep's FINISHED child runs, by trial key (latest run wins)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=50_000,
    )
    return {r.data.tags[TRIAL_TAG]: _record_from_run(r) for r in runs}


def _parent_run_id(tracking_uri: str, experiment: str, key: str) -> str | None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'parent'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


# ----------------------------------------------------------------------------- the sweep


def run_sweep(
    prepared_dir: str | Path,
    methods: Sequence[str],
    ratios: Sequence[float],
    models: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    tracking_uri: str,
    experiment: str = DEFAULT_SWEEP_EXPERIMENT,
    address: str | None = None,
    max_train_rows: int | None = None,
    progress: bool = True,
    plans: Sequence[str | Path] = (),
) -> list[dict[str, Any]]:
    """Run the grid on Ray (``address`` a cluster, else all local cores; an initialised Ray is
    reused), one MLflow child run per trial under one parent; write sweep.{json,md} and
    pareto.png to ``out_dir`` and attach them to the parent. Returns one record per trial.

    With ``address``, ``prepared_dir``, ``out_dir`` and the tracking store must be reachable at
    the same paths from every node. Each of ``plans`` (``tablezip plan`` JSON files) adds a
    method ``plan:<file stem>`` at the plan's own budget ratio, for every model and seed."""
    import mlflow
    import ray
    from tqdm.auto import tqdm

    trials = make_trials(methods, ratios, models, seeds)
    plan_paths = plan_trials(prepared_dir, plans)
    for name, (path, ratio) in plan_paths.items():
        trials += [Trial(name, ratio, m, int(s)) for m in models for s in dict.fromkeys(seeds)]
        ratios = [*ratios, ratio] if ratio not in ratios else ratios
    if not trials:
        raise ValueError("empty sweep: give at least one method, ratio, model and seed")
    key = sweep_key(trials, max_train_rows)
    prepared_dir = str(Path(prepared_dir).resolve())
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = _absolute_uri(tracking_uri)

    started_ray = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        started_ray = True

    parent_id = _parent_run_id(tracking_uri, experiment, key)
    done = finished_trials(tracking_uri, experiment, key)
    todo = [t for t in trials if t.key not in done]
    records: dict[str, dict[str, Any]] = {t.key: done[t.key] for t in trials if t.key in done}
    wall_start = time.perf_counter()
    try:
        if parent_id is None:
            ctx = tracking.mlflow_run(tracking_uri, experiment, f"sweep-{key}", tags={SWEEP_TAG: key, ROLE_TAG: "parent"})
        else:  # resume: the same parent, so all children of the sweep stay together
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment(experiment)
            ctx = mlflow.start_run(run_id=parent_id)
        with ctx as parent:
            if parent_id is None:
                tracking.log_params({"methods": ",".join(dict.fromkeys(methods)), "ratios": ",".join(f"{float(r):g}" for r in ratios),
                                     "models": ",".join(models), "seeds": ",".join(str(s) for s in seeds),
                                     "max_train_rows": max_train_rows, "data": prepared_dir, "trials": len(trials)})
            remote = ray.remote(num_cpus=1)(run_trial)
            pending = {
                remote.remote(prepared_dir, t, str(out_dir), tracking_uri, experiment, parent.info.run_id, key,
                              max_train_rows, plan_paths[t.method][0] if t.method in plan_paths else None): t
                for t in todo
            }
            bar = tqdm(total=len(trials), initial=len(trials) - len(todo), desc=f"sweep {key}", disable=not progress)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    trial = pending.pop(ref)
                    try:
                        rec = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - the worker itself died
                        rec = {"trial": trial.key, "method": trial.method, "ratio_target": trial.ratio,
                               "model": trial.model, "seed": trial.seed, "error": f"{type(err).__name__}: {err}"}
                    records[trial.key] = rec
                    bar.update(1)
                    if "error" in rec:
                        bar.write(f"{trial.key}: FAILED {rec['error']}")
                    else:
                        bar.set_postfix_str(f"{trial.key} AUC {rec['test_auc']:.4f}")
            bar.close()
            ordered = [records[t.key] for t in trials]
            ok = [r for r in ordered if "error" not in r]
            tracking.log_metrics({"trials_run": len(todo), "trials_failed": len(ordered) - len(ok),
                                  "sweep_wall_seconds": time.perf_counter() - wall_start,
                                  "best_test_auc": max((r["test_auc"] for r in ok), default=float("nan"))})
            write_outputs(ordered, ratios, out_dir, title=f"Sweep {key}")
            for name in ("sweep.json", "sweep.md", "pareto.png"):
                mlflow.log_artifact(str(out_dir / name))
    finally:
        if started_ray:
            ray.shutdown()
    return ordered


def write_outputs(records: Sequence[dict[str, Any]], ratios: Sequence[float], out_dir: Path, title: str = "Sweep") -> None:
    import matplotlib.pyplot as plt

    (out_dir / "sweep.json").write_text(json.dumps(list(records), indent=2, default=str) + "\n")
    (out_dir / "sweep.md").write_text(markdown(records, ratios, title=title) + "\n")
    fig = plot_pareto(records, title=f"AUC vs embedding bytes ({title})")
    fig.savefig(out_dir / "pareto.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- summaries (shared)


def _get(r: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in r and r[n] is not None:
            return r[n]
    return float("nan")


def summarise(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, float]]:
    """Mean (and std over seeds) per (model, method, target ratio), failed trials left out."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault((r.get("model", "dlrm"), r["method"], float(r["ratio_target"])), []).append(r)
    out = {}
    for key, rs in groups.items():
        aucs = [float(_get(r, "test_auc", "auc")) for r in rs]
        out[key] = {
            "auc": statistics.mean(aucs),
            "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "logloss": statistics.mean(float(_get(r, "test_logloss", "logloss")) for r in rs),
            "bytes": statistics.mean(float(_get(r, "embedding_bytes", "bytes")) for r in rs),
            "ratio": statistics.mean(float(_get(r, "ratio")) for r in rs),
            "n": len(rs),
        }
    return out


def markdown(records: Sequence[dict[str, Any]], ratios: Sequence[float], title: str = "Sweep") -> str:
    """Per model: Full's line, then test AUC mean +- std over seeds per method x budget."""
    summary = summarise(records)
    ratios = list(dict.fromkeys(float(r) for r in ratios))
    models = list(dict.fromkeys([r.get("model", "dlrm") for r in records]))
    lines = [f"# {title}", "", "Test AUC, mean +- std over seeds (real compression ratio in brackets).", ""]
    for model in models:
        lines += [f"## {model}", ""]
        full = summary.get((model, "full", 1.0))
        if full:
            lines += [f"Full: {full['bytes'] / 2**20:.2f} MiB, AUC {full['auc']:.4f} +- {full['auc_std']:.4f}, "
                      f"logloss {full['logloss']:.4f} ({full['n']} seeds)", ""]
        methods = list(dict.fromkeys(r["method"] for r in records if r.get("model", "dlrm") == model and r["method"] != "full"))
        if methods:
            lines.append("| method | " + " | ".join(f"{r:g}x" for r in ratios) + " |")
            lines.append("|---|" + "---:|" * len(ratios))
            for m in methods:
                cells = []
                for r in ratios:
                    s = summary.get((model, m, r))
                    tried = any(x["method"] == m and float(x["ratio_target"]) == r and x.get("model", "dlrm") == model for x in records)
                    cells.append(f"{s['auc']:.4f} +- {s['auc_std']:.4f} ({s['ratio']:.0f}x)" if s else ("failed" if tried else "-"))
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["Failed trials:", ""] + [
            f"- {e.get('model', 'dlrm')} {e['method']} {float(e['ratio_target']):g}x seed {e['seed']}: {e['error']}" for e in errors
        ]
    return "\n".join(lines).rstrip()


def plot_pareto(records: Sequence[dict[str, Any]], title: str = "AUC vs embedding bytes") -> Any:
    """AUC vs bytes (log x), one line per method, Full a black star; one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(records)
    models = list(dict.fromkeys(m for m, _, _ in summary)) or ["dlrm"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for m in sorted({m for mo, m, _ in summary if mo == model and m != "full"}):
            pts = sorted((s["bytes"], s["auc"], s["auc_std"]) for (mo, mm, _), s in summary.items() if mo == model and mm == m)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=m)
        f = summary.get((model, "full", 1.0))
        if f:
            ax.errorbar([f["bytes"]], [f["auc"]], yerr=[f["auc_std"]], marker="*", markersize=14, color="black",
                        label="full", linestyle="none")
            ax.axhline(f["auc"], color="black", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (log)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{title} - {model}" if len(models) > 1 else title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig
