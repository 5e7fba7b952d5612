"""Row pruning: keep only the rows that matter, after training or learned during it.

Two methods share one serving format:

* ``Pruned`` stores ``keep`` compact rows and an int32 ``remap`` (id -> compact row or -1).
  ``prune_collection`` turns a trained ``Full`` (or ``LearnedThreshold``) collection into one,
  keeping rows by L2 norm or by training frequency, for given keep counts or a byte budget.
* ``LearnedThreshold`` trains a ``Full`` table together with one learnable norm threshold per
  feature (OptEmbed, Lyu et al. 2022, "OptEmbed: Learning Optimal Embedding Table for
  Click-through Rate Prediction"): rows whose norm does not exceed the threshold contribute
  zero, so the model learns which rows it can live without; ``prune_collection`` then drops
  exactly those rows.

Serving: the ``remap`` buffer IS the index remapping of the served model; pruned ids (-1) are
dropped by the collection before its single TBE call (fbgemm's training TBE rejects -1): on a CPU
compacted out, on CUDA kept as row 0 with a per-sample weight of 0, which needs no host sync and
is exact (``EmbeddingBagLookup.drop_by_weight``). On CUDA the transform itself runs as one Triton
kernel (``fused_ids``).
fbgemm_gpu 1.8 has a CPU index-remapping op, ``torch.ops.fbgemm.pruned_array_lookup(indices,
offsets, remappings, remapping_offsets)`` (what ``IntNBitTableBatchedEmbeddingBagsCodegen``
uses for ``index_remapping``). Measured here it gives the same rows but is not faster than one
gather (4096 ids: ~16 us vs ~15 us; 65536 ids: ~205 us vs ~173 us, 1 thread), because it needs
indices of the remap's dtype (int32: a conversion of the int64 ids; with int64 indices and an
int32 remap it silently returns garbage) and it does no bounds check (an index past the array
reads foreign memory), so the OOV mapping has to be done first anyway. The transform therefore
keeps ``remap[ids.clamp(-1, n)]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Mapping, Sequence, cast

import numpy as np
import torch
from torch import nn

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from . import fused_ids
from .search import largest_fitting
from .full import Full, FullLayout, batch_oov_rows

if TYPE_CHECKING:
    from tablezip.embeddings.collection import CompressedEmbeddingBagCollection

MISSING = ("zero", "default")
BY = ("norm", "frequency")
REMAP_BYTES_PER_ID = 4  # int32


# -- index maths -------------------------------------------------------------------------
def pruned_rows(ids: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Compact row (int64) of every id, -1 for a pruned id.

    ``remap`` has ``n + 1`` entries: ids ``[0, n)`` and the OOV id ``n``. Every id outside
    ``[0, n)`` reads the OOV entry: clamping to ``[-1, n]`` sends large ids to ``n`` and negative
    ids to ``-1``, which indexing wraps to the last entry, ``n`` (one op instead of Full's four).
    """
    return remap[ids.clamp(-1, remap.numel() - 1)].to(torch.int64)


def prefix_remap(num_embeddings: int, keep: int) -> torch.Tensor:
    """The remap a freshly built ``Pruned`` layout starts with: ids ``[0, keep)`` keep their rows.

    Why a prefix: prepared data numbers ids by descending training count, so the prefix is the
    ``keep`` most frequent ids; ``prune_collection`` overwrites it with the rows it chose.
    """
    remap = torch.full((num_embeddings + 1,), -1, dtype=torch.int32)
    remap[:keep] = torch.arange(keep, dtype=torch.int32)
    return remap


def remap_for(kept: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Remap that gives the i-th kept id (ascending) compact row i and every other id -1."""
    remap = torch.full((num_embeddings + 1,), -1, dtype=torch.int32)
    remap[kept.cpu()] = torch.arange(kept.numel(), dtype=torch.int32)
    return remap


def pruned_bytes(num_embeddings: int, keep: int, dim: int, missing: str = "zero", remap: bool = True) -> int:
    """Bytes of one ``Pruned`` feature: kept rows, the default row if any, and the remap."""
    rows = keep + (1 if missing == "default" else 0)
    return rows * dim * 4 + ((num_embeddings + 1) * REMAP_BYTES_PER_ID if remap else 0)


def prefix_rows(ids: torch.Tensor, num_embeddings: int, keep: int) -> torch.Tensor:
    """Row of every id when the kept ids are ``[0, keep)``, -1 for the rest; no remap array.

    Out-of-range ids become the OOV id ``num_embeddings`` first, which is kept only when
    ``keep == num_embeddings + 1``."""
    rows = torch.where((ids >= 0) & (ids < num_embeddings), ids, num_embeddings)
    return torch.where(rows < keep, rows, -1)


def long_tail_step_grad(x: torch.Tensor) -> torch.Tensor:
    """Surrogate derivative of the unit step used by OptEmbed (Lyu et al. 2022, Sec. 3.2).

    OptEmbed takes the long-tailed higher-order estimator of Dynamic Sparse Training (Liu et al.
    2020): 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond. Unlike the identity
    straight-through estimator it vanishes far from the threshold, so only rows near the
    decision boundary move the threshold, and it is continuous at |x| = 0.4 (where 2 - 4|x| meets
    0.4, hence the clamp).
    """
    a = x.abs()
    return torch.where(a <= 1.0, (2.0 - 4.0 * a).clamp(min=0.4), torch.zeros_like(a))


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm per row; the one definition the mask, the pruning and the tests share."""
    return torch.linalg.vector_norm(rows, dim=1)


class _ThresholdMask(torch.autograd.Function):
    """``rows * 1[||rows||_2 > t]`` with OptEmbed's straight-through gradient.

    One function instead of autograd through norm, step and product: the backward is a handful of
    [N]-sized ops, which matters because it runs once per feature per step. With x = ||e|| - t,
    m = 1[x > 0], g the output gradient and s = <g, e>:
    d/de = g * m + h(x) * s * e / ||e||,   d/dt = -sum h(x) * s,   h = ``long_tail_step_grad``.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        norms = row_norms(rows)
        x = norms - threshold
        keep = (x > 0).unsqueeze(1).to(rows.dtype)
        ctx.save_for_backward(rows, norms, x, keep)
        return rows * keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        rows, norms, x, keep = ctx.saved_tensors
        hs = long_tail_step_grad(x) * (grad * rows).sum(1)
        # A zero row has hs = 0 and adds nothing; the clamp only keeps 0 / 0 out.
        per_norm = hs / norms.clamp(min=torch.finfo(norms.dtype).tiny)
        grad_rows = (grad * keep).addcmul_(per_norm.unsqueeze(1), rows)
        return grad_rows, -hs.sum().reshape(1)


def masked_rows(rows: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """OptEmbed's masked rows e * 1[||e||_2 > t] (``threshold`` of shape [1])."""
    return _ThresholdMask.apply(rows, threshold)


# -- Pruned ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pruned(MethodConfig):
    """``keep`` rows of a Full table, found through an int32 remap (id -> compact row or -1).

    Ids outside ``[0, num_embeddings)`` are first mapped to the OOV id ``num_embeddings`` (as in
    Full) and then follow the remap like any id. ``missing`` says what a pruned id reads:
    ``"zero"`` contributes nothing to its bag (MEAN pooling still counts it, as a zero vector);
    ``"default"`` reads one extra shared, trainable row (index ``keep``).

    Bytes are the kept rows (+ the default row) plus the remap, 4 bytes per id: the remap is real
    memory, so pruning pays only when rows are much wider than 4 bytes and ``keep << n``; at
    dim 16 the remap alone is 1/16 of the Full table, so no keep count reaches 16x compression.
    A freshly built layout keeps ids ``[0, keep)`` (see ``prefix_remap``); ``prune_collection``
    sets the remap of a pruned trained model, and export/load carries it in the state_dict.

    ``remap=False`` stores no remap: the kept ids are the prefix ``[0, keep)``, which in prepared
    data (ids numbered by descending train count) are the most frequent ones. That is frequency
    pruning decided before training, and the only form that reaches 16x and beyond at dim 16.
    """

    kind = "pruned"
    keep: int
    missing: str = "zero"
    remap: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"Pruned.keep must be an integer in [1, num_embeddings + 1], got {self.keep!r}")
        if self.missing not in MISSING:
            raise ValueError(f"Pruned.missing must be one of {list(MISSING)}, got {self.missing!r}")
        if not isinstance(self.remap, bool):
            raise ValueError(f"Pruned.remap must be True or False, got {self.remap!r}")


class PrunedLayout(FeatureLayout):
    remap: torch.Tensor

    def __init__(self, feature: FeatureSpec, dim: int, config: Pruned) -> None:
        super().__init__(feature, dim, config)
        n = feature.num_embeddings
        if config.keep > n + 1:
            raise ValueError(
                f"Pruned.keep={config.keep} for feature {feature.name!r} must be in [1, {n + 1}] "
                f"(num_embeddings + 1, the OOV row included)"
            )
        self.keep = config.keep
        self.default = config.missing == "default"
        self.uses_remap = config.remap
        if config.remap:
            self.register_buffer("remap", prefix_remap(n, config.keep))

    @property
    def may_drop(self) -> bool:  # type: ignore[override]
        return not self.default

    def tables(self) -> list[TableSpec]:
        return [TableSpec(self.keep + int(self.default), self.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        if self.uses_remap:
            rows = pruned_rows(ids, self.remap)
        else:
            rows = prefix_rows(ids, self.feature.num_embeddings, self.keep)
        if self.default:
            rows = rows.masked_fill(rows < 0, self.keep)
        return [rows]

    @property
    def batch_group(self) -> Hashable:
        return (type(self), self.uses_remap, self.default)

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """The OOV mapping of every id at once, then one compare (prefix) or one gather per
        feature from its own remap (no copy of the arrays); the default row fill at once."""
        pruned = cast(Sequence[PrunedLayout], layouts)
        fused = fused_ids.rows(
            batch, fused_ids.PRUNED, c=[l.keep for l in pruned], d=[l.feature.num_embeddings for l in pruned],
            remaps=[l.remap for l in pruned] if pruned[0].uses_remap else None, default=pruned[0].default,
        )  # fmt: skip
        if fused is not None:  # CUDA: OOV map, remap or prefix test and default fill in one kernel
            return batch.split_slots([fused])
        ids = batch_oov_rows(layouts, batch)  # [0, n]: the index pruned_rows' clamp reads too
        keep = batch.constant([l.keep for l in pruned])
        if pruned[0].uses_remap:
            rows = batch.gather([l.remap for l in pruned], ids).to(torch.int64)
            if pruned[0].default:
                rows = torch.where(rows < 0, keep, rows)
        else:
            rows = torch.where(ids < keep, ids, keep if pruned[0].default else -1)
        return batch.split_slots([rows])


register(Pruned, PrunedLayout)


# -- LearnedThreshold --------------------------------------------------------------------
@dataclass(frozen=True)
class LearnedThreshold(MethodConfig):
    """A Full table (same id contract: out-of-range ids read the OOV row) whose rows are masked
    by a learnable per-feature threshold t (OptEmbed's field-level threshold): an id contributes
    ``e * 1[||e||_2 > t]``. The mask is a unit step, trained through OptEmbed's surrogate
    gradient (``long_tail_step_grad``); add ``alpha * threshold_penalty(collection)`` to the loss
    (OptEmbed's sum of exp(-t)) to push t up and prune more. OptEmbed's code supports L1 or L2
    row norms; this method uses L2. Stores the table plus t (4 bytes): pruning happens only when
    ``prune_collection`` turns it into ``Pruned``.
    """

    kind = "learned_threshold"
    init: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.init, bool) or not isinstance(self.init, (int, float)) or not math.isfinite(self.init):
            raise ValueError(f"LearnedThreshold.init must be a finite number, got {self.init!r}")


class LearnedThresholdLayout(FullLayout):
    # The step is not linear in the rows, so the mask needs each id's row before pooling.
    pooled_in_tbe = False

    def __init__(self, feature: FeatureSpec, dim: int, config: LearnedThreshold) -> None:
        super().__init__(feature, dim, config)
        # Shape [1], not a 0-d scalar: artifacts checksum tensors through a byte view.
        self.threshold = nn.Parameter(torch.full((1,), float(config.init), dtype=torch.float32))

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        (rows,) = parts
        return masked_rows(rows, self.threshold)


register(LearnedThreshold, LearnedThresholdLayout)


def threshold_penalty(collection: "CompressedEmbeddingBagCollection") -> torch.Tensor:
    """OptEmbed's threshold regulariser, sum of exp(-t) over LearnedThreshold features: it
    rewards larger thresholds (smaller tables) with a pull that fades as t grows."""
    terms = [torch.exp(-l.threshold) for l in collection.layouts.values() if isinstance(l, LearnedThresholdLayout)]
    return torch.cat(terms).sum() if terms else torch.zeros((), device=collection.device)


def rows_below_threshold(collection: "CompressedEmbeddingBagCollection", name: str) -> torch.Tensor:
    """Row ids (ascending, int64, the OOV row ``n`` included) whose norm is <= the feature's
    learned threshold: the rows its forward masks to zero and pruning removes."""
    layout = _layout_of(collection, name, LearnedThresholdLayout)
    weights = collection.table_weights()[collection.feature_tables(name)[0]].detach()
    return torch.nonzero(row_norms(weights) <= layout.threshold.detach()).flatten()


# -- choosing rows -----------------------------------------------------------------------
def _scores(weights: torch.Tensor, by: str, counts: np.ndarray | None) -> torch.Tensor:
    """Importance per row (float64, larger is kept first)."""
    if by not in BY:
        raise ValueError(f"by must be one of {list(BY)}, got {by!r}")
    if by == "norm":
        return torch.linalg.vector_norm(weights.detach().to(torch.float64), dim=1)
    if counts is None:
        raise ValueError('by="frequency" needs counts (one training count per row)')
    counts = np.asarray(counts)
    if counts.shape != (weights.shape[0],):
        raise ValueError(f"counts must have shape ({weights.shape[0]},) (one per row), got {counts.shape}")
    return torch.as_tensor(counts.astype(np.float64), device=weights.device)


def _ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; a stable sort breaks ties by lower index."""
    return torch.sort(scores, descending=True, stable=True).indices


def choose_rows(
    weights: torch.Tensor, keep: int, by: str = "norm", counts: np.ndarray | None = None
) -> torch.Tensor:
    """The ``keep`` row ids (ascending, int64) with the largest L2 norm (``by="norm"``) or the
    highest training count (``by="frequency"``, ``counts`` one per row); ties go to lower ids.

    Why ascending: the compact table then keeps the id order, so a kept prefix stays a prefix.
    """
    rows = weights.shape[0]
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= rows:
        raise ValueError(f"keep must be an integer in [1, {rows}] (the table's rows), got {keep!r}")
    return torch.sort(_ranking(_scores(weights, by, counts))[: int(keep)]).values


def _row_counts(feature: FeatureSpec) -> np.ndarray:
    """Training counts per Full row; the OOV row has no count of its own and gets 0."""
    if feature.counts is None:
        raise ValueError(f'by="frequency" needs FeatureSpec.counts for feature {feature.name!r}')
    return np.append(np.asarray(feature.counts, dtype=np.float64), 0.0)


# -- prune_collection --------------------------------------------------------------------
def prune_collection(
    collection: "CompressedEmbeddingBagCollection",
    keep: Mapping[str, int] | None = None,
    budget_bytes: int | None = None,
    by: str = "norm",
    missing: str = "zero",
) -> "CompressedEmbeddingBagCollection":
    """A new collection where the trained ``Full`` features named in ``keep`` (with
    ``budget_bytes``: every Full feature whose share of the budget is below its Full size) and
    every ``LearnedThreshold`` feature become ``Pruned``; every other feature, the dim, seed and
    optimizer config are copied unchanged.

    Kept rows are bit-identical copies, so a kept id's vector does not change. LearnedThreshold
    features keep exactly the rows with norm > t, reproducing their trained outputs (pruned ids
    were already zero); their default row (``missing="default"``) starts at zero for the same
    reason. A pruned Full feature's default row starts at the mean of its pruned rows: the one
    vector closest (in squared error) to the rows it replaces. Optimizer state is not carried
    over: fine-tuning the pruned model restarts rowwise Adagrad's accumulators.

    With ``budget_bytes`` the keep counts come from one global ranking of every Full row of every
    feature (by norm or by count), cut at the largest prefix whose collection fits; a feature
    whose share would not save bytes over Full (remap included) stays Full. Why global: one
    frequency cut prunes the same rarity everywhere, which is what a min-count vocabulary does;
    by norm it assumes the features' norms are comparable, prefer ``"frequency"`` when counts
    exist. Ties go to the earlier feature, then the lower id.
    """
    if keep is not None and budget_bytes is not None:
        raise ValueError("give keep or budget_bytes, not both")
    if by not in BY:
        raise ValueError(f"by must be one of {list(BY)}, got {by!r}")
    Pruned(keep=1, missing=missing)  # validates missing
    features = {f.name: f for f in collection.features}
    weights = collection.table_weights()

    def table_of(name: str) -> torch.Tensor:
        return weights[collection.feature_tables(name)[0]]

    def counts_of(name: str) -> np.ndarray | None:
        return _row_counts(features[name]) if by == "frequency" else None

    plan: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (kept ids, default row)
    for name, layout in collection.layouts.items():
        if isinstance(layout, LearnedThresholdLayout):
            norms = row_norms(table_of(name).detach())
            kept = torch.nonzero(norms > layout.threshold.detach()).flatten()
            plan[name] = (kept, torch.zeros(collection.dim, device=kept.device))

    if keep is not None:
        keep_counts = _checked_keep(collection, keep)
    elif budget_bytes is not None:
        keep_counts = _keep_for_budget(collection, plan, budget_bytes, by, missing, table_of, counts_of)
    else:
        keep_counts = {}
    for name, count in keep_counts.items():
        table = table_of(name)
        kept = choose_rows(table, count, by, counts_of(name))
        plan[name] = (kept, _mean_of_others(table.detach(), kept))
    return _rebuild(collection, plan, missing)


def _layout_of(collection, name: str, kind: type[FeatureLayout]) -> FeatureLayout:
    if name not in collection.layouts:
        raise ValueError(f"unknown feature {name!r}; features: {collection.feature_names}")
    layout = collection.layouts[name]
    if not isinstance(layout, kind):
        raise ValueError(f"feature {name!r} uses {layout.config.kind!r}, not {kind.__name__.removesuffix('Layout')}")
    return layout


def _checked_keep(collection, keep: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, count in keep.items():
        layout = _layout_of(collection, name, FeatureLayout)
        if not isinstance(layout.config, Full):
            raise ValueError(
                f"keep names feature {name!r}, which uses {layout.config.kind!r}: only Full features take a "
                f"keep count (LearnedThreshold features are pruned by their threshold)"
            )
        n = layout.feature.num_embeddings
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 1 <= count <= n + 1:
            raise ValueError(f"keep[{name!r}] must be an integer in [1, {n + 1}], got {count!r}")
        out[name] = int(count)
    return out


def _mean_of_others(table: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    others = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
    others[kept] = False
    return table[others].mean(0) if others.any() else table.new_zeros(table.shape[1])


def _feature_bytes(collection, name: str) -> int:
    specs = collection.table_specs()
    return sum(specs[i].bytes for i in collection.feature_tables(name)) + collection.layouts[name].extra_bytes()


def _keep_for_budget(collection, plan, budget_bytes: int, by: str, missing: str, table_of, counts_of) -> dict[str, int]:
    """Keep counts for Full features from one global ranking (see ``prune_collection``)."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes must be an integer >= 1, got {budget_bytes!r}")
    dim = collection.dim
    names = [n for n, l in collection.layouts.items() if isinstance(l.config, Full)]
    changing = names + list(plan)
    fixed = collection.memory_bytes() - sum(_feature_bytes(collection, n) for n in changing)
    fixed += sum(
        pruned_bytes(collection.layouts[n].feature.num_embeddings, max(1, kept.numel()), dim, missing)
        for n, (kept, _) in plan.items()
    )
    sizes = torch.tensor([collection.layouts[n].feature.num_embeddings + 1 for n in names], dtype=torch.int64)
    if names:
        scores = torch.cat([_scores(table_of(n), by, counts_of(n)).cpu() for n in names])
        owner = torch.repeat_interleave(torch.arange(len(names)), sizes)[_ranking(scores)]
    else:
        owner = torch.zeros(0, dtype=torch.int64)
    full = sizes * dim * 4
    remap = sizes * REMAP_BYTES_PER_ID + (dim * 4 if missing == "default" else 0)

    def counts_at(prefix: int) -> torch.Tensor:
        return torch.bincount(owner[:prefix], minlength=len(names)).clamp(min=1)

    def total(prefix: int) -> int:
        pruned = counts_at(prefix) * dim * 4 + remap
        return fixed + int(torch.minimum(pruned, full).sum())

    if total(0) > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} is below the smallest pruned collection ({total(0)} bytes: one row "
            f"per pruned feature plus its remap at {REMAP_BYTES_PER_ID} bytes per id, and the other features)"
        )
    lo = largest_fitting(0, owner.numel(), lambda prefix: total(prefix) <= budget_bytes)
    counts = counts_at(lo)
    pruned = counts * dim * 4 + remap
    return {n: int(c) for n, c, p, f in zip(names, counts, pruned, full) if p < f}


def _rebuild(collection, plan: Mapping[str, tuple[torch.Tensor, torch.Tensor]], missing: str):
    """Build the pruned collection and copy every table and layout state into it."""
    from tablezip.embeddings.collection import CompressedEmbeddingBagCollection

    methods = dict(collection.methods)
    for name, (kept, _) in plan.items():
        methods[name] = Pruned(keep=max(1, kept.numel()), missing=missing)
    new = CompressedEmbeddingBagCollection(
        collection.features, collection.dim, methods,
        optimizer=collection.optimizer_config, device=collection.device, seed=collection.seed,
    )  # fmt: skip
    old_w, new_w = collection.table_weights(), new.table_weights()
    with torch.no_grad():
        for name in collection.feature_names:
            old_t, new_t = collection.feature_tables(name), new.feature_tables(name)
            if name not in plan:
                for i, j in zip(old_t, new_t):
                    new_w[j].copy_(old_w[i])
                new.layouts[name].load_state_dict(collection.layouts[name].state_dict())
                continue
            kept, default = plan[name]
            source, target = old_w[old_t[0]], new_w[new_t[0]]
            target.zero_()
            target[: kept.numel()] = source[kept]
            if missing == "default":
                target[-1] = default
            layout = new.layouts[name]
            layout.remap.copy_(remap_for(kept, layout.feature.num_embeddings))
    return new


# -- budget fitter -----------------------------------------------------------------------
def pruned_methods_for_budget(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, missing: str = "zero"
) -> dict[str, Full | Pruned]:
    """Untrained ``Pruned`` configs under a collection-wide budget, by water-filling one row cap.

    Each feature keeps ``min(n + 1, cap)`` rows, the largest common cap that fits; a feature
    stays Full where pruning would not save bytes. The kept ids are the prefix ``[0, cap)``, the
    most frequent ids in prepared data, with no remap array (``Pruned(remap=False)``): this is
    frequency pruning before training. To prune a trained model by norm use ``prune_collection``.
    """
    Pruned(keep=1, missing=missing)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    sizes = [f.num_embeddings + 1 for f in features]

    def feature_bytes(rows: int, cap: int) -> tuple[int, bool]:
        full = rows * dim * 4
        pruned = pruned_bytes(rows - 1, min(rows, cap), dim, missing, remap=False)
        return (pruned, True) if pruned < full else (full, False)

    def total(cap: int) -> int:
        return sum(feature_bytes(r, cap)[0] for r in sizes)

    if total(1) > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} is below the smallest pruned collection ({total(1)} bytes: one row "
            f"per feature)"
        )
    lo = largest_fitting(1, max(sizes), lambda cap: total(cap) <= budget_bytes)
    out: dict[str, Full | Pruned] = {}
    for f, rows in zip(features, sizes):
        _, prune = feature_bytes(rows, lo)
        out[f.name] = Pruned(keep=min(rows, lo), missing=missing, remap=False) if prune else Full()
    return out
