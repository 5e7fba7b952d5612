"""Hybrid hot/cold embedding: exact rows for the frequent ids, a hashed table for the rest.

After CAFE (Zhang et al., "CAFE: Towards Compact, Adaptive, and Fast Embedding for Large-scale
Recommendation Models", SIGMOD 2024). Id frequencies are heavily skewed, so a few hot ids carry
most of the training signal and most lookups: giving them collision-free rows is where memory
buys the most quality, while the long tail shares a small hashed table. CAFE finds hot ids
online with a sketch; here the layout takes them from training counts (``FeatureSpec.counts``),
and ``HotIdTracker`` is the streaming building block for the online variant.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence, cast

import numpy as np
import torch

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from .full import Full
from . import fused_ids
from .hashing import MIX, hash_ids, hash_methods_for_budget, hash_rows, seed_mix

_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class Hybrid(MethodConfig):
    """``hot`` exact rows for the most frequent ids plus ``cold_rows`` hashed rows, stored as
    one table of ``hot + cold_rows`` rows (hot rows first).

    Which ids are hot: the ``hot`` ids with the largest ``FeatureSpec.counts`` (ties to the
    smaller id), or ids ``[0, hot)`` when the feature has no counts, which is the same set for
    prepared data (ids sorted by descending train count). ``hot = 0`` is pure hashing.

    ``remap`` says how a hot id finds its row. False: ids ``[0, hot)`` are hot (whatever the
    counts say) and id i reads row i; nothing is stored. True: a stored int32 array maps every
    known id to its hot row (its rank by count) or -1; 4 bytes per id, counted in the
    collection's bytes. None (default) picks False when the hot ids by counts are ``[0, hot)``
    and True otherwise; the built layout's config records the choice, so an exported artifact
    (which keeps no counts) rebuilds the same structure and loads the stored array.

    Id contract: hot ids read their hot row; every other int64 id, including ids outside
    ``[0, num_embeddings)``, is hashed (``seed``) into the cold rows.
    """

    kind = "hybrid"
    hot: int
    cold_rows: int
    seed: int = 0
    remap: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hot, int) or isinstance(self.hot, bool) or self.hot < 0:
            raise ValueError(f"Hybrid.hot must be an integer in [0, num_embeddings], got {self.hot!r}")
        if not isinstance(self.cold_rows, int) or isinstance(self.cold_rows, bool) or self.cold_rows < 1:
            raise ValueError(f"Hybrid.cold_rows must be an integer >= 1, got {self.cold_rows!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < _SEED_LIMIT:
            raise ValueError(f"Hybrid.seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.remap not in (None, True, False):
            raise ValueError(f"Hybrid.remap must be None, True or False, got {self.remap!r}")


# -- index maths --------------------------------------------------------------------------
def hot_ids_by_count(counts: np.ndarray, hot: int) -> np.ndarray:
    """The ``hot`` most frequent ids, most frequent first; equal counts keep the smaller id
    first, so data already sorted by descending count gives exactly ``[0, hot)``."""
    order = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
    return order[:hot].astype(np.int64)


def is_prefix(hot_ids: np.ndarray) -> bool:
    """True when the hot set is ``[0, hot)``, so ``id < hot`` identifies it without storage."""
    return bool(hot_ids.size == 0 or (hot_ids.max() == hot_ids.size - 1 and np.unique(hot_ids).size == hot_ids.size))


def build_remap(hot_ids: np.ndarray, num_embeddings: int) -> torch.Tensor:
    """id -> hot row (its rank in ``hot_ids``) or -1; int32 because a hot row never needs more
    and the array counts against the byte budget."""
    remap = torch.full((num_embeddings,), -1, dtype=torch.int32)
    remap[torch.as_tensor(hot_ids, dtype=torch.int64)] = torch.arange(len(hot_ids), dtype=torch.int32)
    return remap


def prefix_hot_rows(ids: torch.Tensor, hot: int) -> torch.Tensor:
    """Hot row of ids in ``[0, hot)`` (the id itself), -1 for every other id."""
    return torch.where((ids >= 0) & (ids < hot), ids, torch.full_like(ids, -1))


def remapped_hot_rows(ids: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Hot row through the stored remap; ids outside its range are never hot."""
    known = (ids >= 0) & (ids < remap.numel())
    rows = remap[ids.clamp(0, remap.numel() - 1)].to(torch.int64)
    return torch.where(known, rows, torch.full_like(rows, -1))


def hybrid_rows(ids: torch.Tensor, hot_rows: torch.Tensor, hot: int, cold_rows: int, seed: int) -> torch.Tensor:
    """Row of every id in the one physical table: rows ``[0, hot)`` are the exact hot rows,
    rows ``[hot, hot + cold_rows)`` the hashed cold table."""
    return torch.where(hot_rows >= 0, hot_rows, hash_ids(ids, cold_rows, seed) + hot)


# -- layout -------------------------------------------------------------------------------
class HybridLayout(FeatureLayout):
    """Hot and cold rows live in ONE physical table (hot rows first, then the cold rows).

    Why not two tables: every id reads exactly one row, so two slots would need -1 drops and
    a combiner adding the two pooled parts, which costs a lookup slot, a mask and a sum per
    feature for the same result and the same bytes. One table keeps the TBE fast path.
    """

    def __init__(self, feature: FeatureSpec, dim: int, config: Hybrid) -> None:
        if config.hot > feature.num_embeddings:
            raise ValueError(
                f"Hybrid.hot={config.hot} must be <= num_embeddings={feature.num_embeddings} "
                f"of feature {feature.name!r}"
            )
        hot_ids = (
            hot_ids_by_count(feature.counts, config.hot)
            if feature.counts is not None
            else np.arange(config.hot, dtype=np.int64)
        )
        remap = config.remap if config.remap is not None else not is_prefix(hot_ids)
        remap = bool(remap) and config.hot > 0
        super().__init__(feature, dim, dataclasses.replace(config, remap=remap))
        self.hot = config.hot
        self.cold_rows = config.cold_rows
        self.seed = config.seed
        self.uses_remap = remap
        if remap:
            self.register_buffer("remap", build_remap(hot_ids, feature.num_embeddings))

    def tables(self) -> list[TableSpec]:
        return [TableSpec(self.hot + self.cold_rows, self.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        if self.uses_remap:
            hot_rows = remapped_hot_rows(ids, self.remap)
        else:
            hot_rows = prefix_hot_rows(ids, self.hot)
        return [hybrid_rows(ids, hot_rows, self.hot, self.cold_rows, self.seed)]

    @property
    def batch_group(self) -> Hashable:
        return (type(self), self.uses_remap)

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """One hot test and one splitmix64 over the ids of every hybrid feature of the group.

        Prefix features: an id is hot iff it lies in ``[0, hot)``. Remapped features: each one's
        own remap is gathered (one gather per feature, no copy of the arrays), the rest is batched.
        Cold ids land at ``hot + hash``, as in ``hybrid_rows``."""
        hybrid = cast(Sequence[HybridLayout], layouts)
        fused = fused_ids.rows(
            batch, fused_ids.HYBRID,
            a=[l.cold_rows for l in hybrid], b=[seed_mix(l.seed) for l in hybrid], c=[l.hot for l in hybrid],
            d=[l.remap.numel() for l in hybrid] if hybrid[0].uses_remap else None,
            remaps=[l.remap for l in hybrid] if hybrid[0].uses_remap else None, mix=MIX,
        )  # fmt: skip
        if fused is not None:  # CUDA: hot test, hash and select in one kernel
            return batch.split_slots([fused])
        ids = batch.ids
        hot = batch.constant([l.hot for l in hybrid])
        cold = hash_rows(ids, batch.constant([l.cold_rows for l in hybrid]), batch.constant([seed_mix(l.seed) for l in hybrid]))
        if hybrid[0].uses_remap:
            n = batch.constant([l.remap.numel() for l in hybrid])
            known = (ids >= 0) & (ids < n)
            hot_rows = batch.gather([l.remap for l in hybrid], torch.where(known, ids, 0)).to(torch.int64)
            hot_rows = torch.where(known, hot_rows, -1)
            rows = torch.where(hot_rows >= 0, hot_rows, cold + hot)
        else:
            rows = torch.where((ids >= 0) & (ids < hot), ids, cold + hot)
        return batch.split_slots([rows])


register(Hybrid, HybridLayout)


# -- budget -------------------------------------------------------------------------------
def hybrid_methods_for_budget(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    hot_fraction: float = 0.5,
    seed: int = 0,
) -> Mapping[str, Full | Hybrid]:
    """Give each feature its water-filled share of the budget, split hot / cold.

    The shares are those of ``hash_methods_for_budget`` (small features stay Full, the rest get
    one common row cap), so hybrid and hashing compare at equal bytes per feature. Within a
    share of ``cap`` rows, ``floor(hot_fraction * cap)`` rows are hot, at least one row stays
    cold for the tail. When a feature's counts put its most frequent ids outside ``[0, hot)``,
    two choices fit the share: the true top ids through a remap array (4 bytes per id, paid
    from the share, so fewer rows), or ids ``[0, hot)`` with no array. The fitter keeps the one
    whose exact rows serve more training lookups (the larger count mass).
    """
    if not (isinstance(hot_fraction, (int, float)) and 0 <= hot_fraction <= 1):
        raise ValueError(f"hot_fraction must be in [0, 1], got {hot_fraction!r}")
    shares = hash_methods_for_budget(features, dim, budget_bytes)  # raises below one row each
    methods: dict[str, Full | Hybrid] = {}
    for feature in features:
        share = shares[feature.name]
        if isinstance(share, Full):
            methods[feature.name] = Full()
        else:
            methods[feature.name] = _split_share(feature, share.rows_for(dim), dim * 4, hot_fraction, seed)
    return methods


def _split_share(feature: FeatureSpec, cap: int, row_bytes: int, hot_fraction: float, seed: int) -> Hybrid:
    """Hot / cold rows of one feature holding at most ``cap`` rows' bytes (cap < Full rows)."""
    hot = _hot_rows(cap, hot_fraction)
    prefix = Hybrid(hot=hot, cold_rows=cap - hot, seed=seed, remap=False)
    if hot == 0 or feature.counts is None:
        return prefix
    counts = np.asarray(feature.counts, dtype=np.float64)
    rows = cap - -(-feature.num_embeddings * 4 // row_bytes)  # rows left beside the remap array
    remapped_hot = _hot_rows(rows, hot_fraction) if rows >= 1 else 0
    top = hot_ids_by_count(counts, remapped_hot)
    if remapped_hot == 0 or is_prefix(top) or counts[top].sum() <= counts[:hot].sum():
        return prefix
    return Hybrid(hot=remapped_hot, cold_rows=rows - remapped_hot, seed=seed, remap=True)


def _hot_rows(rows: int, hot_fraction: float) -> int:
    return min(int(hot_fraction * rows), rows - 1)


# -- streaming hot ids --------------------------------------------------------------------
class HotIdTracker:
    """Approximate top-k ids of a stream, in bounded memory (Space-Saving, batched).

    Why: CAFE's online variant must find hot ids while training, without a counts pass over
    the data. Space-Saving keeps ``capacity`` (id, count) pairs; an id it does not monitor is
    assumed to have occurred as often as the least counted monitored id, so estimates only
    over-count, and any id seen more than ``total / capacity`` times is always monitored.

    A batch is folded in at once, as the merge of two summaries (Agarwal et al., "Mergeable
    Summaries", PODS 2012): the batch's exact counts are added to the monitored ones, ids new to
    the summary start from its minimum count (when it is full), and the ``capacity`` largest
    survive. All of it is vectorised tensor maths, so a batch costs a few sorts, not a loop.
    """

    def __init__(self, k: int, capacity: int | None = None) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"HotIdTracker.k must be an integer >= 1, got {k!r}")
        capacity = 8 * k if capacity is None else capacity
        if not isinstance(capacity, int) or capacity < k:
            raise ValueError(f"HotIdTracker.capacity must be an integer >= k={k}, got {capacity!r}")
        self.k = k
        self.capacity = capacity
        self.ids = torch.empty(0, dtype=torch.int64)
        self.counts = torch.empty(0, dtype=torch.int64)
        self.total = 0

    def update(self, ids: torch.Tensor) -> None:
        batch_ids, batch_counts = torch.unique(ids.reshape(-1).to(torch.int64).cpu(), return_counts=True)
        self.total += int(ids.numel())
        floor = int(self.counts.min()) if self.ids.numel() == self.capacity else 0
        merged, inverse = torch.unique(torch.cat([self.ids, batch_ids]), return_inverse=True)
        counts = torch.zeros(merged.numel(), dtype=torch.int64)
        counts.index_add_(0, inverse, torch.cat([self.counts, batch_counts]))
        monitored = torch.zeros(merged.numel(), dtype=torch.bool)
        monitored[inverse[: self.ids.numel()]] = True
        counts += torch.where(monitored, 0, floor)
        if merged.numel() > self.capacity:
            keep = _largest(counts, merged, self.capacity)
            merged, counts = merged[keep], counts[keep]
        self.ids, self.counts = merged, counts

    def top(self, k: int | None = None) -> torch.Tensor:
        """The ``k`` (default: the tracker's k) ids with the largest estimated counts, most
        frequent first; ties to the smaller id."""
        k = self.k if k is None else k
        return self.ids[_largest(self.counts, self.ids, min(k, self.ids.numel()))]


def _largest(counts: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest counts, descending, ties to the smaller id (deterministic,
    unlike ``torch.topk``): sort by id, then a stable sort by count keeps id order in ties."""
    order = torch.sort(ids, stable=True).indices
    by_count = torch.sort(counts[order], descending=True, stable=True).indices
    return order[by_count[:n]]
