"""The byte-budget planner: a method and its parameters per feature, for one collection budget.

Why per feature: features differ by orders of magnitude in cardinality, skew and how much they
say about the label. One method with one water-filled cap spends bytes on every big feature
alike; the planner spends them where held-out evidence says they buy the most.

The search, in three parts:

1. **Candidates.** Each feature gets a grid of single-table configs (``Full``, ``Hash(R)``,
   frequency-prefix ``Pruned(keep)``, ``Hybrid(hot, cold)``) over a geometric range of sizes;
   bytes are exact (``FeatureLayout.tables()`` + ``extra_bytes()``, at the plan's dtype).
2. **Value of a candidate: a held-out proxy.** Each candidate maps ids to rows; the proxy asks
   how well "the row alone" predicts the label: per-row click rates estimated on train
   (smoothed towards the global rate), scored by log loss on the valid split. The gain is the
   drop in valid log loss against the constant predictor, times the number of valid rows.
   Collisions (hashing) mix rates and lose gain; pruning keeps the gain of frequent ids and
   loses the rare ones, which are also the ones the smoothing discounts. It ignores
   interactions between features, so gains are added across features (an approximation the
   measurement in the README checks against real training).
3. **Choice: a multiple-choice knapsack.** Maximise the summed gain under the budget. Per
   feature only the upper concave hull of (bytes, gain) matters; the increments of all hulls,
   taken greedily by gain per byte, are the Lagrangian optimum (exact up to the last partly
   fitting step), and a final pass spends what is left on any single upgrade that fits.

Each allowed dtype gets its own plan (quantized rows are cheaper, so more rows fit); the plan
with the largest proxy gain wins. Quantization noise is invisible to the proxy, which is why
``int4`` is not among the default dtypes (its measured AUC cost is not free).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import MethodConfig, TableSpec, build_layout, config_from_dict

from .full import Full
from .hashing import Hash
from .hybrid import Hybrid
from .pruned import Pruned

PLAN_FORMAT = "tablezip-plan"
PLAN_VERSION = 1
DTYPES = ("float32", "float16", "int8", "int4")


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one stored row at ``dtype``: the quantized collection's own rule (int rows carry
    their fp16 scale and bias inline), so a plan's bytes are what serving stores."""
    if dtype == "float32":
        return dim * 4
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    from tablezip.embeddings.quantized import QuantDtype, check_table_dim

    quant = QuantDtype.parse(dtype)
    check_table_dim(dim, quant, "every planned table")
    return quant.row_bytes(dim)


def table_bytes(spec: TableSpec, dtype: str) -> int:
    return spec.rows * row_bytes(spec.dim, dtype)


def config_bytes(feature: FeatureSpec, dim: int, config: MethodConfig, dtype: str = "float32") -> int:
    """Exact bytes of one feature stored by ``config`` (its own tables + what it keeps outside
    TBE); shared tables are not supported by the planner, so nothing is split between features."""
    layout = build_layout(feature, dim, config)
    if any(t.shared is not None for t in layout.tables()):
        raise ValueError(f"{config.kind} shares tables between features; the planner plans per feature")
    return sum(table_bytes(t, dtype) for t in layout.tables()) + layout.extra_bytes()


# -- the proxy ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureData:
    """One feature's ids and labels on train and valid: what the proxy needs."""

    train_ids: np.ndarray
    train_labels: np.ndarray
    valid_ids: np.ndarray
    valid_labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.train_ids) != len(self.train_labels) or len(self.valid_ids) != len(self.valid_labels):
            raise ValueError("ids and labels must have the same length on each split")
        if len(self.train_ids) == 0 or len(self.valid_ids) == 0:
            raise ValueError("the planner needs at least one train and one valid row")


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def proxy_gain(
    feature: FeatureSpec, dim: int, config: MethodConfig, data: FeatureData, smoothing: float = 10.0
) -> float:
    """Valid log-loss reduction (x valid rows) of predicting by the row an id reads.

    Ids that read no row (pruned, ``missing="zero"``) all share one "row": the zero vector."""
    layout = build_layout(feature, dim, config)
    rows_train, rows_valid = (
        layout.transform(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
        for ids in (data.train_ids, data.valid_ids)
    )
    if len(rows_train) != 1:
        raise ValueError(f"{config.kind} reads {len(rows_train)} tables per id; the proxy needs one")
    groups = sum(t.rows for t in layout.tables()) + 1
    train_rows = np.where(rows_train[0].numpy() < 0, groups - 1, rows_train[0].numpy())
    valid_rows = np.where(rows_valid[0].numpy() < 0, groups - 1, rows_valid[0].numpy())
    base = float(np.mean(data.train_labels))
    clicks = np.bincount(train_rows, weights=data.train_labels, minlength=groups)
    shows = np.bincount(train_rows, minlength=groups)
    rate = (clicks + smoothing * base) / (shows + smoothing)
    constant = _log_loss(data.valid_labels, np.full(len(data.valid_labels), base))
    return (constant - _log_loss(data.valid_labels, rate[valid_rows])) * len(data.valid_labels)


# -- candidates -----------------------------------------------------------------------------
def _sizes(low: int, high: int, step: float = math.sqrt(2)) -> list[int]:
    out, x = [], float(low)
    while x < high:
        out.append(int(x))
        x *= step
    return sorted(set(out))


def candidates(feature: FeatureSpec, keep_full_below: int, min_rows: int = 8) -> list[MethodConfig]:
    """The configs the planner considers for one feature (Full always among them)."""
    full_rows = feature.num_embeddings + 1
    if feature.num_embeddings < keep_full_below or full_rows <= min_rows:
        return [Full()]
    out: list[MethodConfig] = [Full()]
    for rows in _sizes(min_rows, full_rows * 0.8):
        out.append(Hash(rows=rows))
        out.append(Pruned(keep=rows, remap=False))
        for hot_share in (0.5, 0.8):
            hot = int(rows * hot_share)
            if 1 <= hot < rows and hot < feature.num_embeddings:
                out.append(Hybrid(hot=hot, cold_rows=rows - hot, remap=False))
    return out


# -- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Per-feature methods for one dim, dtype and byte budget; what ``tablezip plan`` writes and
    ``tablezip train --plan`` / ``tablezip sweep --plan`` read."""

    dim: int
    dtype: str
    budget_bytes: int
    methods: Mapping[str, MethodConfig]
    bytes: int
    features: Mapping[str, int]  # name -> num_embeddings the plan was made for
    proxy_gain: float = float("nan")
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Plan.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if set(self.methods) != set(self.features):
            raise ValueError("Plan.methods and Plan.features must name the same features")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_VERSION,
            "dim": self.dim,
            "dtype": self.dtype,
            "budget_bytes": self.budget_bytes,
            "bytes": self.bytes,
            "proxy_gain": self.proxy_gain,
            "features": [
                {"name": n, "num_embeddings": self.features[n], "method": self.methods[n].to_dict()} for n in self.features
            ],
            "notes": dict(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a tablezip plan: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        if data.get("format_version") != PLAN_VERSION:
            raise ValueError(f"plan format_version {data.get('format_version')!r} is not supported (reads {PLAN_VERSION})")
        try:
            entries = list(data["features"])
            methods = {e["name"]: config_from_dict(e["method"]) for e in entries}
            features = {e["name"]: int(e["num_embeddings"]) for e in entries}
            return cls(
                dim=int(data["dim"]),
                dtype=data["dtype"],
                budget_bytes=int(data["budget_bytes"]),
                methods=methods,
                bytes=int(data["bytes"]),
                features=features,
                proxy_gain=float(data.get("proxy_gain", float("nan"))),
                notes=dict(data.get("notes", {})),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"plan is missing or has a malformed field: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"plan is not valid JSON ({err})") from None
        return cls.from_dict(data)

    def methods_for(self, features: Sequence[FeatureSpec], dim: int) -> dict[str, MethodConfig]:
        """The plan's methods for a model's features, refusing a plan made for other data."""
        names = [f.name for f in features]
        unknown = sorted(set(self.features) - set(names))
        if unknown:
            raise ValueError(f"plan names unknown features {unknown}; the data has {names}")
        missing = [n for n in names if n not in self.features]
        if missing:
            raise ValueError(f"plan has no method for features {missing}")
        changed = [f.name for f in features if f.num_embeddings != self.features[f.name]]
        if changed:
            raise ValueError(f"plan was made for other vocabularies: num_embeddings differ for {changed}")
        if dim != self.dim:
            raise ValueError(f"plan was made for dim {self.dim}, the model uses dim {dim}")
        return {n: self.methods[n] for n in names}


@dataclass(frozen=True)
class _Option:
    config: MethodConfig
    bytes: int
    gain: float


def _hull(options: list[_Option]) -> list[_Option]:
    """Upper concave hull of (bytes, gain) from the cheapest option: the only options a
    gain-per-byte greedy ever moves through."""
    by_bytes: dict[int, _Option] = {}
    for o in options:
        if o.bytes not in by_bytes or o.gain > by_bytes[o.bytes].gain:
            by_bytes[o.bytes] = o
    pts = [by_bytes[b] for b in sorted(by_bytes)]
    frontier: list[_Option] = []
    for o in pts:  # keep only options that gain over every cheaper one
        if not frontier or o.gain > frontier[-1].gain:
            frontier.append(o)
    hull: list[_Option] = []
    for o in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is under the chord a->o: drop it
            if (b.gain - a.gain) * (o.bytes - a.bytes) <= (o.gain - a.gain) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def choose(options: Mapping[str, list[_Option]], budget: int) -> dict[str, _Option] | None:
    """Multiple-choice knapsack by greedy hull increments; None when even the cheapest option of
    every feature does not fit."""
    chosen = {n: min(opts, key=lambda o: (o.bytes, -o.gain)) for n, opts in options.items()}
    spent = sum(o.bytes for o in chosen.values())
    if spent > budget:
        return None
    steps: list[tuple[float, str, int]] = []
    hulls = {n: _hull(opts) for n, opts in options.items()}
    for n, hull in hulls.items():
        if hull[0] is not chosen[n] and hull[0].bytes == chosen[n].bytes:
            chosen[n] = hull[0]
        for i in range(1, len(hull)):
            steps.append(((hull[i].gain - hull[i - 1].gain) / (hull[i].bytes - hull[i - 1].bytes), n, i))
    steps.sort(key=lambda s: -s[0])
    position = {n: 0 for n in options}
    blocked: set[str] = set()
    for _, n, i in steps:
        if n in blocked or position[n] != i - 1:
            continue
        extra = hulls[n][i].bytes - hulls[n][i - 1].bytes
        if spent + extra > budget:
            blocked.add(n)
            continue
        spent += extra
        position[n] = i
        chosen[n] = hulls[n][i]
    # spend the rest on the best single upgrade per feature that still fits (off-hull too)
    improved = True
    while improved:
        improved = False
        best: tuple[float, str, _Option] | None = None
        for n, opts in options.items():
            for o in opts:
                delta = o.bytes - chosen[n].bytes
                if o.gain > chosen[n].gain and spent + delta <= budget:
                    if best is None or o.gain - chosen[n].gain > best[0]:
                        best = (o.gain - chosen[n].gain, n, o)
        if best is not None:
            _, n, o = best
            spent += o.bytes - chosen[n].bytes
            chosen[n] = o
            improved = True
    return chosen


def plan_budget(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    data: Mapping[str, FeatureData],
    dtypes: Sequence[str] = ("float32", "int8"),
    keep_full_below: int = 100,
    progress: Callable[[Iterable], Iterable] = lambda x: x,
) -> Plan:
    """The plan with the largest proxy gain whose exact bytes fit ``budget_bytes``."""
    if budget_bytes < 1:
        raise ValueError(f"budget_bytes must be >= 1, got {budget_bytes}")
    for d in dtypes:
        row_bytes(dim, d)  # validates the dtype name
    missing = [f.name for f in features if f.name not in data]
    if missing:
        raise ValueError(f"no planning data for features {missing}")
    per_feature = {f.name: candidates(f, keep_full_below) for f in features}
    gains: dict[tuple[str, str], float] = {}
    for f in progress(features):
        for c in per_feature[f.name]:
            gains[(f.name, json.dumps(c.to_dict(), sort_keys=True))] = proxy_gain(f, dim, c, data[f.name])
    best: Plan | None = None
    smallest = math.inf
    for dtype in dtypes:
        options = {
            f.name: [
                _Option(c, config_bytes(f, dim, c, dtype), gains[(f.name, json.dumps(c.to_dict(), sort_keys=True))])
                for c in per_feature[f.name]
            ]
            for f in features
        }
        smallest = min(smallest, sum(min(o.bytes for o in opts) for opts in options.values()))
        chosen = choose(options, budget_bytes)
        if chosen is None:
            continue
        plan = Plan(
            dim=dim,
            dtype=dtype,
            budget_bytes=budget_bytes,
            methods={f.name: chosen[f.name].config for f in features},
            bytes=sum(o.bytes for o in chosen.values()),
            features={f.name: f.num_embeddings for f in features},
            proxy_gain=sum(o.gain for o in chosen.values()),
            notes={"keep_full_below": keep_full_below, "dtypes_considered": list(dtypes)},
        )
        if best is None or plan.proxy_gain > best.proxy_gain:
            best = plan
    if best is None:
        raise ValueError(
            f"budget_bytes={budget_bytes} is below the smallest plan ({int(smallest)} bytes: features under "
            f"keep_full_below={keep_full_below} ids stay Full, every other feature at its smallest size)"
        )
    return best
