"""`tablezip plan`: read a prepared dir, run the byte-budget planner, write the plan JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from tablezip.compress.planner import FeatureData, Plan, plan_budget

from .criteo import LABEL, SPARSE


def _read_split(prepared_dir: Path, split: str, max_rows: int | None) -> pl.DataFrame:
    files = sorted((prepared_dir / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{prepared_dir / split}: no parquet shards; run `tablezip prepare` first")
    frame = pl.concat([pl.read_parquet(f, columns=[LABEL, *SPARSE]) for f in files])
    return frame.head(max_rows) if max_rows is not None else frame


def planning_data(prepared_dir: str | Path, max_rows: int | None = 2_000_000) -> dict[str, FeatureData]:
    """Ids and labels per feature from the train and valid splits (valid judges the proxy, so a
    prepared dir without a valid split cannot be planned for)."""
    prepared_dir = Path(prepared_dir)
    train, valid = (_read_split(prepared_dir, s, max_rows) for s in ("train", "valid"))
    if valid.height == 0:
        raise ValueError(f"{prepared_dir}: the valid split is empty; the planner scores candidates on it")
    ty, vy = (f[LABEL].to_numpy().astype(np.float64) for f in (train, valid))
    return {
        name: FeatureData(train[name].to_numpy().astype(np.int64), ty, valid[name].to_numpy().astype(np.int64), vy)
        for name in SPARSE
    }


def make_plan(
    prepared_dir: str | Path,
    budget_bytes: int,
    dim: int = 16,
    dtypes: Sequence[str] = ("float32", "int8"),
    keep_full_below: int = 100,
    progress: bool = True,
) -> Plan:
    from .train import feature_specs

    features = feature_specs(prepared_dir)
    data = planning_data(prepared_dir)
    bar = (lambda xs: tqdm(xs, desc="scoring candidates", unit="feature")) if progress else (lambda xs: xs)
    return plan_budget(features, dim, budget_bytes, data, dtypes=dtypes, keep_full_below=keep_full_below, progress=bar)


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        return Plan.from_json(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def checked_plan_ratio(prepared_dir: str | Path, path: str | Path, features: Sequence | None = None) -> float:
    """The plan's budget as a ratio of Full's bytes (2 decimals, at least 1), after checking the
    plan fits the data's features: what a run trained from the plan is named and logged by."""
    from tablezip.compress import full_bytes

    from .train import feature_specs

    features = feature_specs(prepared_dir) if features is None else features
    plan = read_plan(path)
    plan.methods_for(features, plan.dim)
    return max(1.0, round(full_bytes(features, plan.dim) / plan.budget_bytes, 2))
