"""Mixed-dimension embeddings (Ginart et al., "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems", ISIT 2021, arXiv:1909.11810).

Popular ids are queried often, so their vectors are well estimated and worth many dimensions;
rare ids see few gradients and a short vector loses little. The ids of a feature are ranked by
training frequency and cut into blocks; block ``i`` stores ``d_i``-dim rows and a projection
``P_i`` (``d_i -> D``), so the vector of an id is ``P_i @ row``. Because that map is linear, a
bag is pooled inside TBE per block and projected once per bag: one TBE slot per block, each id
present in exactly one slot (``-1`` in the others).

Block dimensions follow the paper's popularity-based dimension sizing (its Algorithm 1): with
``p_i`` the block's mean per-id query probability,

    lambda = d_bar * ||p||_inf^(-alpha),   d = lambda * p^alpha          (component-wise)

so the most popular block gets the baseline ``d_bar`` and a block ``k`` times less popular per id
gets ``k^alpha`` times fewer dimensions. Given a memory budget ``B`` instead of ``d_bar``, the
paper fixes ``lambda`` from ``sum_i n_i d_i = B``; here ``lambda`` is the largest value whose
rounded, clamped dims keep the feature's exact bytes (tables + projections + remap) within the
budget, since rounding and the skipped full-width projections make bytes step-wise in lambda.

Two departures, both forced by the storage: dims are rounded to multiples of 4 (fbgemm's TBE only
accepts such row widths) instead of to integers, and clamped to ``[min_dim, cap]``.

Budgets below one ``min_dim``-wide row per id (about ``D / 4`` times less than Full) are reached
by letting the rule's width round down to 0 for the rarest ids: they keep no row and read a zero
vector (``MixedDim.keep``; ``mixed_dim_methods_for_budget(drop_rare=True)`` picks it with one
scale for the whole collection, and only where a row per id cannot fit).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence, cast

import numpy as np
import torch
from torch import nn

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import CombineForm, FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from . import fused_ids
from .full import Full, batch_oov_rows, oov_rows
from .search import largest_fitting

ALIGN = 4  # fbgemm TBE rows must be a multiple of 4 floats wide
DEFAULT_BLOCKS = 4
FLOAT_BYTES = 4
REMAP_DTYPE = torch.int32  # ranks of < 2**31 ids; half the bytes of int64
REMAP_ITEM_BYTES = 4


@dataclass(frozen=True)
class MixedDim(MethodConfig):
    """Frequency-ranked blocks of ids with their own row width, projected to ``D``.

    Choose the block dims in one of three ways: the paper's alpha rule (default: the most popular
    block gets ``base_dim`` or ``D``), ``budget_bytes`` for the whole feature (the alpha rule's
    scale is solved to fit), or explicit ``dims``. Block sizes are geometric in frequency rank
    (see ``block_sizes``) unless ``sizes`` (ids per block, summing to ``num_embeddings``) is given.
    Adjacent blocks of one width are merged (``merge_equal_dims``); ``blocks=1`` is the paper's
    table-level sizing (one width per feature, no ranking needed).

    Ranking: by ``FeatureSpec.counts`` (descending, ties by id). Without counts, ids are ranked
    by their value: prepared data numbers ids by descending training count, so id order *is*
    frequency order; the alpha rule then assumes Zipf(1) popularity, ``p(rank r) ~ 1 / (r + 1)``.
    When the counts are not already sorted, an id -> rank ``remap`` (int32, ``num_embeddings + 1``
    entries) is stored and counted in the bytes; for sorted counts block membership is arithmetic
    on the block boundaries and nothing is stored. ``remap`` = None decides this from the counts.
    The built layout records its decisions (``layout.config`` is the resolved config with explicit
    ``sizes``, ``dims`` and ``remap``), so an exported artifact rebuilds identical tables without
    the counts; a remap built without counts starts as the identity and is filled by loading.

    Ids outside ``[0, num_embeddings)`` (negative or too large) share one OOV row: the extra,
    last row of the LAST (rarest) block, because values unseen in training are the rarest of all.

    ``keep`` (None, or an integer in ``[1, num_embeddings]``): only the ``keep`` most frequent
    ids have a row; rarer ids, and ids outside ``[0, num_embeddings)``, read none (a zero vector,
    as if their width were 0). Blocks that start at rank ``keep`` or later disappear, the last
    remaining block stores rows for ranks below ``keep`` only, and there is no OOV row. Why
    dropping and not hashing the tail into fewer rows: dim 0 is where the paper's rule
    ``d = lambda * p^alpha`` goes for the rarest ids, a hashed row would give unrelated ids one
    vector instead, which is not "less capacity" but wrong capacity, and Hybrid already covers
    exact-head-plus-hashed-tail; on the bundled Criteo sample zero vectors for the rarest ids
    (Pruned) also scored slightly above a hashed tail (Hybrid) at 10x, 100x and 1000x
    (``benchmarks/results/quality.md``). And the id maths stay the block test, so the batched
    transform is unchanged. None (default) keeps a row for every id, as before.
    """

    kind = "mixed_dim"
    alpha: float = 0.3
    blocks: int | None = None
    base_dim: int | None = None
    min_dim: int = ALIGN
    dims: tuple[int, ...] | None = None
    sizes: tuple[int, ...] | None = None
    budget_bytes: int | None = None
    remap: bool | None = None
    keep: int | None = None

    def __post_init__(self) -> None:
        self._check_scalars()
        self._check_blocks()
        if self.keep is not None:
            if not _is_int(self.keep) or self.keep < 1:
                raise ValueError(
                    f"MixedDim.keep must be None or an integer in [1, num_embeddings], got {self.keep!r}"
                )
            object.__setattr__(self, "keep", int(self.keep))  # numpy ints are not JSON
        if self.budget_bytes is not None:
            if not _is_int(self.budget_bytes) or self.budget_bytes < 1:
                raise ValueError(f"MixedDim.budget_bytes must be an integer >= 1, got {self.budget_bytes!r}")
            if self.dims is not None:
                raise ValueError("MixedDim.dims and MixedDim.budget_bytes are exclusive: give one of them")
        if self.remap is not None and not isinstance(self.remap, bool):
            raise ValueError(f"MixedDim.remap must be None, True or False, got {self.remap!r}")

    def _check_scalars(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha <= 1:
            raise ValueError(f"MixedDim.alpha must be a number in (0, 1], got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.blocks is not None and (not _is_int(self.blocks) or self.blocks < 1):
            raise ValueError(f"MixedDim.blocks must be an integer >= 1, got {self.blocks!r}")
        if not _is_aligned_dim(self.min_dim):
            raise ValueError(f"MixedDim.min_dim must be a multiple of {ALIGN} and >= {ALIGN}, got {self.min_dim!r}")
        if self.base_dim is not None and (not _is_aligned_dim(self.base_dim) or self.base_dim < self.min_dim):
            raise ValueError(
                f"MixedDim.base_dim must be a multiple of {ALIGN} in [min_dim={self.min_dim}, D], got {self.base_dim!r}"
            )

    def _check_blocks(self) -> None:
        for name in ("dims", "sizes"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (tuple, list)) or not value:
                raise ValueError(f"MixedDim.{name} must be a non-empty tuple of integers, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) if _is_int(v) else v for v in value))
        if self.dims is not None and not all(_is_aligned_dim(d) for d in self.dims):
            raise ValueError(f"MixedDim.dims must be multiples of {ALIGN} in [{ALIGN}, D], got {self.dims!r}")
        if self.sizes is not None and not all(_is_int(s) and s >= 1 for s in self.sizes):
            raise ValueError(f"MixedDim.sizes must be integers >= 1 (ids per block), got {self.sizes!r}")
        if self.dims is not None and self.sizes is not None and len(self.dims) != len(self.sizes):
            raise ValueError(f"MixedDim.dims has {len(self.dims)} blocks but sizes has {len(self.sizes)}")
        given = self.dims or self.sizes
        if given is not None and self.blocks is not None and self.blocks != len(given):
            raise ValueError(f"MixedDim.blocks={self.blocks} disagrees with the {len(given)} blocks of dims/sizes")

    @property
    def block_count(self) -> int:
        given = self.dims or self.sizes
        return len(given) if given is not None else (self.blocks or DEFAULT_BLOCKS)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_aligned_dim(value: object) -> bool:
    return _is_int(value) and value >= ALIGN and value % ALIGN == 0


# -- pure maths: ranking, blocks, dims, bytes --------------------------------------------------
def needs_remap(counts: np.ndarray | None) -> bool:
    """True when id order is not frequency order, i.e. counts are not non-increasing."""
    return counts is not None and bool(np.any(np.diff(np.asarray(counts, dtype=np.float64)) > 0))


def frequency_rank(counts: np.ndarray) -> np.ndarray:
    """Rank of every id (0 = most frequent); ties keep id order so ranking is deterministic."""
    order = np.argsort(-np.asarray(counts, dtype=np.float64), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


def zipf_counts(num_embeddings: int) -> np.ndarray:
    """Popularity assumed when no counts are known: Zipf(1) over id order (ids sorted by count)."""
    return 1.0 / np.arange(1, num_embeddings + 1, dtype=np.float64)


def block_sizes(num_embeddings: int, blocks: int) -> list[int]:
    """Ids per block, geometric in frequency rank: block ``i`` covers ranks
    ``[n^(i/k), n^((i+1)/k))`` (block 0 starts at rank 0).

    Why geometric: the paper only requires blocks of the frequency-sorted ids. Under a Zipf(1)
    law, which Criteo-like features roughly follow, log-spaced ranks carry equal query mass, so
    this is the equal-mass split without depending on noisy tail counts, and it is defined when
    no counts exist. Every block holds at least one id; a feature with fewer ids than blocks
    gets one block per id.
    """
    n = int(num_embeddings)
    k = min(int(blocks), n)
    bounds = [0]
    for i in range(1, k):
        ideal = int(round(n ** (i / k)))
        bounds.append(min(max(ideal, bounds[-1] + 1), n - (k - i)))
    bounds.append(n)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def block_popularity(ranked_counts: np.ndarray, sizes: Sequence[int], total: float | None = None) -> np.ndarray:
    """``p_i``: mean per-id query probability of each block (counts given in rank order).

    ``total`` is the feature's whole count when ``ranked_counts`` is only its kept prefix (the
    blocks of a layout with ``keep``), so ``p_i`` stays a probability per query of the feature."""
    ranked = np.asarray(ranked_counts, dtype=np.float64)
    total = ranked.sum() if total is None else total
    edges = np.concatenate([[0], np.cumsum(sizes)])
    mass = np.add.reduceat(ranked, edges[:-1]) if len(ranked) else np.zeros(len(sizes))
    return mass / total / np.asarray(sizes, dtype=np.float64)


def truncate_blocks(sizes: Sequence[int], keep: int | None) -> list[int]:
    """Ids per block once ranks ``>= keep`` lose their rows: blocks that start at ``keep`` or
    later are merged into the last block that starts before it (their ids read no row anyway,
    so one block holds every dropped id). The sizes still sum to ``num_embeddings``."""
    sizes = [int(s) for s in sizes]
    if keep is None:
        return sizes
    starts = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)
    last = int(np.searchsorted(starts, keep, side="left")) - 1  # last block starting below keep
    return sizes[:last] + [sum(sizes[last:])]


def table_rows(sizes: Sequence[int], keep: int | None) -> list[int]:
    """Rows of each block's table: its ids, plus the shared OOV row in the last block; with
    ``keep`` (blocks already ``truncate_blocks``-ed) the last block only stores ranks below
    ``keep`` and there is no OOV row."""
    rows = [int(s) for s in sizes]
    rows[-1] = rows[-1] + 1 if keep is None else keep - sum(rows[:-1])
    return rows


def alpha_dims(popularity: np.ndarray, alpha: float, scale: float | np.ndarray, min_dim: int, cap: int) -> np.ndarray:
    """``d = scale * p^alpha`` (paper, Alg. 1), rounded half-up to a multiple of ``ALIGN`` and
    clamped to ``[min_dim, cap]``. ``scale`` may be an array of candidate scales (one row each)."""
    raw = np.multiply.outer(np.asarray(scale, dtype=np.float64), np.power(popularity, alpha))
    dims = np.floor(raw / ALIGN + 0.5) * ALIGN
    return np.clip(dims, min_dim, cap).astype(np.int64)


def merge_equal_dims(sizes: Sequence[int], dims: Sequence[int]) -> list[tuple[int, int]]:
    """Adjacent blocks of one width become one block: one table and one projection instead of
    several. Exact for D-wide blocks (no projection either way); for narrower ones the merged
    block shares a projection, which the rule's equal widths (equal popularity) make natural, and
    every block costs a TBE slot, so fewer blocks are faster too."""
    merged: list[list[int]] = []
    for size, d in zip(sizes, dims):
        if merged and merged[-1][1] == d:
            merged[-1][0] += int(size)
        else:
            merged.append([int(size), int(d)])
    return [(s, d) for s, d in merged]


def mixed_dim_bytes(
    sizes: Sequence[int], dims: Sequence[int], dim: int, remap: bool, keep: int | None = None
) -> int:
    """Exact bytes of a layout: block tables (``table_rows``: the last one holds the OOV row
    too, or only ranks below ``keep``), one ``d x D`` projection per run of adjacent blocks of
    one width ``d < D`` (they are merged), and the int32 remap when one is asked for and ranks
    decide something: more than one block to choose between, or which ids keep a row (a single
    block without ``keep`` holds every id in id order, so ranking it would buy nothing).
    ``sizes`` with ``keep`` are the ``truncate_blocks`` ones, summing to ``num_embeddings``."""
    return int(_bytes_for_candidates(sizes, np.asarray([dims], dtype=np.int64), dim, remap, keep)[0])


def _bytes_for_candidates(
    sizes: Sequence[int], dims: np.ndarray, dim: int, remap: bool, keep: int | None = None
) -> np.ndarray:
    """``mixed_dim_bytes`` for every row of ``dims`` ([candidates, blocks]) at once."""
    rows = np.asarray(table_rows(sizes, keep), dtype=np.int64)
    tables = dims @ rows
    starts_run = np.ones_like(dims, dtype=bool)
    starts_run[:, 1:] = dims[:, 1:] != dims[:, :-1]
    projections = np.where((dims < dim) & starts_run, dims, 0).sum(axis=1) * dim
    ranked = starts_run[:, 1:].any(axis=1) | (keep is not None)
    remap_bytes = np.where(ranked, (int(sum(sizes)) + 1) * REMAP_ITEM_BYTES, 0) if remap else 0
    return (tables + projections) * FLOAT_BYTES + remap_bytes


def _candidate_scales(popularity: np.ndarray, alpha: float, cap: int) -> np.ndarray:
    """Every scale at which some block's rounded dim steps up, plus 0 (all blocks at min_dim).

    Bytes are constant between these points, so the best fitting scale is one of them.
    """
    weight = np.power(popularity, alpha)
    weight = weight[weight > 0]
    thresholds = np.arange(ALIGN // 2, cap, ALIGN, dtype=np.float64)  # d jumps when scale*w crosses 4m+2
    # A hair above each threshold, so float rounding cannot leave the jump just out of reach.
    steps = np.divide.outer(thresholds, weight).ravel() * (1 + 1e-9)
    return np.unique(np.concatenate([[0.0], steps]))


def _ranked_counts(counts: np.ndarray | None, num_embeddings: int) -> np.ndarray:
    if counts is None:
        return zipf_counts(num_embeddings)
    counts = np.asarray(counts, dtype=np.float64)
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("FeatureSpec.counts must be finite and >= 0 for MixedDim")
    if counts.sum() <= 0:  # nothing observed: fall back to the id-order prior
        return zipf_counts(num_embeddings)
    return -np.sort(-counts, kind="stable")


def solve_mixed_dims(
    counts: np.ndarray | None,
    dim: int,
    alpha: float,
    blocks: int,
    budget_bytes: int | None = None,
    *,
    base_dim: int | None = None,
    min_dim: int = ALIGN,
    sizes: Sequence[int] | None = None,
    num_embeddings: int | None = None,
    remap: bool | None = None,
    keep: int | None = None,
) -> list[tuple[int, int]]:
    """``(ids, dim)`` per block, most popular block first; ids per block exclude the OOV row, and
    adjacent blocks that the rule gives one width are merged (``merge_equal_dims``).

    ``counts`` in id order (None: ids already sorted, Zipf prior; then ``num_embeddings`` is
    required). Without a budget the most popular block gets ``cap = base_dim or dim``; with one,
    the largest alpha-rule scale whose exact bytes (``mixed_dim_bytes``; ``remap`` None charges a
    remap when the counts are unsorted) fit ``budget_bytes``. ValueError naming ``budget_bytes``
    when no scale fits.

    ``keep``: only ranks below it get rows (see ``MixedDim.keep``); the blocks are
    ``truncate_blocks``-ed and each block's popularity is that of its kept ids.
    """
    n = len(counts) if counts is not None else num_embeddings
    if n is None or n < 1:
        raise ValueError("solve_mixed_dims needs counts or num_embeddings >= 1")
    cap = base_dim or dim
    if not (_is_aligned_dim(dim) and min_dim <= cap <= dim):
        raise ValueError(
            f"MixedDim needs min_dim ({min_dim}) <= base_dim ({cap}) <= D ({dim}), D a multiple of {ALIGN}"
        )
    sizes = list(sizes) if sizes is not None else block_sizes(n, blocks)
    if sum(sizes) != n or min(sizes) < 1:
        raise ValueError(f"MixedDim.sizes must be >= 1 each and sum to {n} ids, got {sizes}")
    if keep is not None and not 1 <= keep <= n:
        raise ValueError(f"MixedDim.keep must be in [1, num_embeddings={n}], got {keep}")
    sizes = truncate_blocks(sizes, keep)
    ranked = _ranked_counts(counts, n)
    if keep is None:
        popularity = block_popularity(ranked, sizes)
    else:
        kept = sizes[:-1] + [keep - sum(sizes[:-1])]
        popularity = block_popularity(ranked[:keep], kept, total=float(ranked.sum()))
    if budget_bytes is None:
        scale = cap / np.power(popularity.max(), alpha)
        dims = alpha_dims(popularity, alpha, scale, min_dim, cap)
    else:
        remap = needs_remap(counts) if remap is None else remap
        candidates = _candidate_scales(popularity, alpha, cap)
        all_dims = alpha_dims(popularity, alpha, candidates, min_dim, cap)
        candidate_bytes = _bytes_for_candidates(sizes, all_dims, dim, remap, keep)
        fits = np.nonzero(candidate_bytes <= budget_bytes)[0]
        if len(fits) == 0:
            least = int(candidate_bytes.min())
            raise ValueError(
                f"MixedDim.budget_bytes={budget_bytes} cannot hold one {min_dim}-wide row per "
                f"{'id' if keep is None else f'kept id (keep={keep})'} in "
                f"{len(sizes)} blocks plus their projections{' and remap' if remap else ''} "
                f"(needs >= {least} bytes)"
            )
        dims = all_dims[fits[-1]]
    return merge_equal_dims(sizes, dims)


# -- index maths -------------------------------------------------------------------------------
def id_ranks(ids: torch.Tensor, num_embeddings: int, remap: torch.Tensor | None = None) -> torch.Tensor:
    """Frequency rank of every id; out-of-range ids get rank ``num_embeddings`` (the OOV row,
    the very last rank). ``remap`` holds ``num_embeddings + 1`` ranks (the OOV entry last)."""
    rank = oov_rows(ids, num_embeddings)
    return rank if remap is None else remap[rank].to(torch.int64)


def block_rows(ranks: torch.Tensor, starts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[blocks, N]: row of each rank within each block's table, -1 where it is not that block's.

    ``starts[i]`` is the first rank of block ``i`` and ``rows[i]`` its row count (the last block
    counting the OOV row), so the blocks tile ranks ``[0, num_embeddings]`` exactly.
    """
    local = ranks.unsqueeze(0) - starts.unsqueeze(1)
    inside = (local >= 0) & (local < rows.unsqueeze(1))
    return torch.where(inside, local, torch.full_like(local, -1))


def _row_table_rows(layouts: Sequence["MixedDimLayout"], batch: IdBatch) -> torch.Tensor:
    """The rows (int64, -1 where an id has none) of every id of a group of single-block layouts
    with a remap, read from one int32 table that lists, per feature, the row of the OOV rank, the
    rows of ids ``0 .. n - 1`` and the OOV row again (``n + 2`` entries; a row is the id's rank,
    or -1 at ranks ``>= keep``). Clamping an id to ``[-1, n]`` and adding the feature's start + 1
    points out-of-range ids (negative, or ``>= n``) at the OOV entries, so an id's row is one
    gather: exactly ``block_rows(id_ranks(...))`` of ``transform``.

    The table is derived from the remaps, not state: it is kept on the first layout, and rebuilt
    when any remap is replaced or written in place (``load_state_dict``: its version changes)."""
    remaps = [l.remap for l in layouts]
    # The cache pins the remaps it was built from, so their ids cannot be reused while it lives.
    key = tuple((id(r), r._version, r.data_ptr()) for r in remaps)
    cache = layouts[0].__dict__.get("_row_table_cache")
    if cache is None or cache[0] != key:
        parts, starts = [], []
        start = 0
        for layout in layouts:
            assert layout.remap is not None
            n = layout.feature.num_embeddings
            ranks = layout.remap.to(torch.int64)
            rows = torch.where(ranks < layout._rows[0], ranks, -1)  # one block: its rows are the ranks
            parts.append(torch.cat([rows[n:], rows[:n], rows[n:]]))
            starts.append(start + 1)
            start += n + 2
        table = torch.cat(parts).to(torch.int32)
        # Each feature's entries from its id 0's, as Pruned's remap of n + 1 entries (the OOV one
        # last): what the C pass reads (fused_ids.native_rows, PRUNED with these remaps).
        views = [table[s : s + l.feature.num_embeddings + 1] for s, l in zip(starts, layouts)]
        cache = (key, table, starts, remaps, views)
        layouts[0].__dict__["_row_table_cache"] = cache  # a cache, not module state
    _, table, starts, _, views = cache
    sizes = [l.feature.num_embeddings for l in layouts]
    # On a CPU: one C pass (ids outside [0, n) read the last entry, the OOV one, as the clamp below
    # points them at it) instead of a clamp, an add, a gather and a widening copy.
    rows = fused_ids.native_rows(batch, fused_ids.PRUNED, d=sizes, remaps=views)
    if rows is not None:
        return rows
    n = batch.constant(sizes)
    ids = batch.ids
    if isinstance(n, int):
        index = ids.clamp(-1, n)
    else:
        index = torch.clamp(ids, min=batch.per_feature([-1])[0], max=n)
    index += batch.constant(starts)
    return table.index_select(0, index).to(torch.int64)


# -- layout ------------------------------------------------------------------------------------
class MixedDimLayout(FeatureLayout):
    pooled_in_tbe = True  # sum_i P_i(pooled_i) is linear in the rows
    # True: ``transform_batch`` of single-block layouts tests only ``rank < rows`` (ranks are never
    # negative); False: the general per-block test (``local >= 0 & local < rows``), the "before" of
    # that change in benchmarks/NOTES.md (issue 3). Same rows either way.
    single_block_test: bool = True
    # True: ``transform_batch`` of single-block layouts with a remap reads every id's row from one
    # derived int32 table of the whole group (see ``_row_table_rows``): a clamp, an add and one
    # gather instead of the OOV test, a gather per feature and the block test. False: those steps
    # (the "before" of that change in benchmarks/NOTES.md, issue 3). Same rows either way.
    row_table: bool = True

    def __init__(self, feature: FeatureSpec, dim: int, config: MixedDim) -> None:
        resolved = resolve(feature, dim, config)
        super().__init__(feature, dim, resolved)
        assert resolved.sizes is not None and resolved.dims is not None
        self.sizes = list(resolved.sizes)
        self.dims = list(resolved.dims)
        self.keep = resolved.keep
        # The OOV row closes the last block; with keep, the last block ends at rank keep - 1 and
        # every rarer rank (the OOV rank included) falls past it: -1 in every slot, dropped.
        self._rows = table_rows(self.sizes, self.keep)
        starts = [0] + np.cumsum(self.sizes[:-1]).tolist()
        # Derived from the config, so not part of the state (and not of the bytes).
        self.register_buffer("starts", torch.tensor(starts, dtype=torch.int64), persistent=False)
        self.register_buffer("row_counts", torch.tensor(self._rows, dtype=torch.int64), persistent=False)
        if resolved.remap:
            counts = feature.counts
            rank = frequency_rank(counts) if counts is not None else np.arange(feature.num_embeddings)
            remap = np.append(rank, feature.num_embeddings)
            self.register_buffer("remap", torch.as_tensor(remap).to(REMAP_DTYPE))
        else:
            self.register_buffer("remap", None)
        # One P_i^T ([d_i, D]) per block narrower than D, keyed by block index; D-wide blocks
        # are used as they are (a projection there would only add bytes).
        self.projections = nn.ParameterDict(
            {str(i): nn.Parameter(init) for i, init in self._init_projections(feature.name).items()}
        )
        self._identity = [i for i, d in enumerate(self.dims) if d == dim]

    def _init_projections(self, name: str) -> dict[int, torch.Tensor]:
        """U(-1/sqrt(d_i), 1/sqrt(d_i)) per block, from a generator seeded by the feature name so a
        collection is reproducible without touching the global RNG."""
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return {
            i: torch.empty(d, self.dim).uniform_(-1, 1, generator=g) / math.sqrt(d)
            for i, d in enumerate(self.dims)
            if d < self.dim
        }

    @property
    def may_drop(self) -> bool:  # type: ignore[override]
        """Every id lives in exactly one block's slot (-1 in the others); a single block (the
        paper's table-level sizing) holds every id, so nothing is dropped and no drop is paid,
        unless ``keep`` leaves the rarest ids without a row."""
        return len(self.dims) > 1 or self.keep is not None

    def tables(self) -> list[TableSpec]:
        return [TableSpec(r, d) for r, d in zip(self._rows, self.dims)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        ranks = id_ranks(ids, self.feature.num_embeddings, self.remap)
        return list(block_rows(ranks, self.starts, self.row_counts).unbind(0))

    @property
    def batch_group(self) -> Hashable:
        return (type(self), len(self.dims), self.remap is not None)

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """Ranks of every id at once (one gather per feature where ranks need a remap), then one
        in-block test per block over all features' ids, as ``block_rows`` does per feature."""
        mixed = cast(Sequence[MixedDimLayout], layouts)
        if mixed[0].remap is not None and len(mixed[0].dims) == 1 and all(l.row_table for l in mixed):
            return batch.split_slots([_row_table_rows(mixed, batch)])
        ranks = batch_oov_rows(layouts, batch)
        if mixed[0].remap is not None:
            ranks = batch.gather([l.remap for l in mixed], ranks).to(torch.int64)
        if len(mixed[0].dims) == 1 and all(l.single_block_test for l in mixed):
            # One block (the fitters' table-level sizing): its rows are the ranks themselves, which
            # are >= 0 (OOV ranks are num_embeddings), so the block test is one compare against the
            # rows, and none without ``keep`` (the block then holds every rank, OOV included).
            if all(l.keep is None for l in mixed):
                return batch.split_slots([ranks])
            return batch.split_slots([torch.where(ranks < batch.constant([l._rows[0] for l in mixed]), ranks, -1)])
        slots = []
        for block in range(len(mixed[0].dims)):
            local = ranks - batch.constant([sum(l.sizes[:block]) for l in mixed])
            inside = (local >= 0) & (local < batch.constant([l._rows[block] for l in mixed]))
            slots.append(torch.where(inside, local, -1))
        return batch.split_slots(slots)

    def combine(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """``sum_i P_i(pooled_i)``. The pooled blocks are strided views of the TBE output; the
        projections accumulate in place (addmm_) once a fresh sum exists, which saves a pass."""
        out: torch.Tensor | None = None
        fresh = False  # out is our own tensor, not a view of the TBE output
        for i in self._identity:
            if out is None:
                out = pooled[i]
            else:
                out, fresh = out + pooled[i], True
        for key, weight in self.projections.items():
            part = pooled[int(key)]
            if fresh:
                out.addmm_(part, weight)  # type: ignore[union-attr]
            else:
                out, fresh = (part @ weight if out is None else torch.addmm(out, part, weight)), True
        assert out is not None
        return out

    def combine_form(self) -> CombineForm:
        """``combine`` as the collection's fused assemble computes it (D-wide blocks added, then
        one product per projected block), with the current projections."""
        # Read on every fused forward: one dict lookup per block (``projection_of`` goes through
        # ParameterDict's ``__getitem__`` and ``getattr``, ~0.1 ms per step over 24 features).
        params = self.projections._parameters
        return CombineForm(
            "project",
            tuple(
                None if d == self.dim else (params.get(str(i)) if str(i) in params else self.projection_of(i))
                for i, d in enumerate(self.dims)
            ),
        )

    def projection_weights(self) -> list[torch.Tensor]:
        """``combine_form().weights`` without the None of D-wide blocks, without building the
        form: the fused assemble reads them on every forward (24 MixedDim features: ~0.1 ms per
        step through ``combine_form``, which matters at small batches)."""
        params = self.projections._parameters
        out = []
        for i, d in enumerate(self.dims):
            if d != self.dim:
                w = params.get(str(i)) if str(i) in params else self.projection_of(i)
                if w is not None:
                    out.append(w)
        return out

    def projection_of(self, block: int) -> torch.Tensor | None:
        """``P_i^T`` ([d_i, D]) of a block, None when the block is already ``D`` wide."""
        return self.projections[str(block)] if str(block) in self.projections else None


def resolve(feature: FeatureSpec, dim: int, config: MixedDim) -> MixedDim:
    """The config with explicit sizes, dims and remap for this feature: what the layout builds and
    what an artifact records, so loading needs neither the counts nor the solver."""
    n = feature.num_embeddings
    for name in ("min_dim", "base_dim"):
        value = getattr(config, name)
        if value is not None and value > dim:
            raise ValueError(f"MixedDim.{name}={value} must be <= D={dim}")
    if config.dims is not None and max(config.dims) > dim:
        raise ValueError(f"MixedDim.dims must be multiples of {ALIGN} in [{ALIGN}, D={dim}], got {config.dims}")
    if config.sizes is not None and sum(config.sizes) != n:
        raise ValueError(f"MixedDim.sizes must sum to num_embeddings={n} of {feature.name!r}, got {sum(config.sizes)}")
    if config.dims is not None and config.sizes is None and len(config.dims) > n:
        raise ValueError(f"MixedDim.dims has {len(config.dims)} blocks, more than the {n} ids of {feature.name!r}")
    if config.keep is not None and config.keep > n:
        raise ValueError(f"MixedDim.keep must be in [1, num_embeddings={n}] for {feature.name!r}, got {config.keep}")
    unsorted = needs_remap(feature.counts)
    wanted = unsorted if config.remap is None else config.remap
    sizes = config.sizes or tuple(block_sizes(n, config.block_count))
    if config.dims is not None:
        truncated = truncate_blocks(sizes, config.keep)
        blocks = merge_equal_dims(truncated, config.dims[: len(truncated)])
    else:
        blocks = solve_mixed_dims(
            feature.counts, dim, config.alpha, len(sizes), config.budget_bytes,
            base_dim=config.base_dim, min_dim=config.min_dim, sizes=sizes, num_embeddings=n, remap=wanted,
            keep=config.keep,
        )  # fmt: skip
    ranked = len(blocks) > 1 or config.keep is not None  # ranks decide a block or a row
    if unsorted and not wanted and ranked:
        raise ValueError(
            f"MixedDim.remap=False but the counts of {feature.name!r} are not sorted descending, so "
            f"ids cannot be put in frequency blocks (or kept by frequency) without one; use remap=None or True"
        )
    return MixedDim(
        alpha=config.alpha, blocks=len(blocks), base_dim=config.base_dim, min_dim=config.min_dim,
        dims=tuple(d for _, d in blocks), sizes=tuple(s for s, _ in blocks), remap=wanted and ranked,
        keep=config.keep,
    )  # fmt: skip


register(MixedDim, MixedDimLayout)


# -- budget fitting ----------------------------------------------------------------------------
def mixed_dim_methods_for_budget(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    alpha: float = 0.3,
    blocks: int = 1,
    min_dim: int = ALIGN,
    drop_rare: bool = False,
) -> Mapping[str, Full | MixedDim]:
    """Spend a collection-wide byte budget with ONE alpha-rule scale for every block of every
    feature.

    Why one scale: the paper sizes whole tables with the same rule (p_i = mean per-id query
    probability, each feature queried once per sample), so an id's width depends only on how
    often it is queried, whichever feature it belongs to. Small features are popular per id and
    reach ``D`` in every block first; they, and any feature whose Full table is no larger than
    its mixed layout, stay ``Full()``. The scale is the largest whose exact total fits.

    Why ``blocks=1`` by default: it is the paper's Criteo setting (one width per table, so
    ``d ~ num_embeddings^-alpha``), and every further block is one more TBE slot that the
    collection filters per batch: on 26 Criteo features (B=4096, D=16, 2x and 3x budgets, 2 CPU
    threads) fwd+bwd ran at about 0.7x of Full with 1 block, 0.57x with 2 and 0.5x with 4, with
    test AUC on the bundled sample equal within seed noise. Pass ``blocks=4`` for frequency
    blocks inside each feature.

    ``drop_rare``: when even one ``min_dim``-wide row per id (Full where smaller) exceeds the
    budget, let the rule's width of the rarest ids round down to 0 (``MixedDim.keep``) instead
    of raising; see ``_fit_dropping_rare``. Off by default. It only changes budgets that cannot
    be met with a row for every id: any budget that fits without it gives the same configs.
    """
    MixedDim(alpha=alpha, blocks=blocks, min_dim=min_dim)  # validates the shared fields
    if not _is_aligned_dim(dim) or min_dim > dim:
        raise ValueError(f"dim must be a multiple of {ALIGN} and >= min_dim={min_dim}, got {dim!r}")
    if sum((f.num_embeddings + 1) * dim * FLOAT_BYTES for f in features) <= budget_bytes:
        return {f.name: Full() for f in features}
    plans = [_FeaturePlan(f, dim, alpha, blocks) for f in features]
    candidates = _candidate_scales(np.concatenate([p.popularity for p in plans]), alpha, dim)
    per_feature = [p.bytes_at(candidates, min_dim) for p in plans]  # (bytes [C], dims [C, k]) each
    total = np.sum([np.minimum(b, p.full) for p, (b, _) in zip(plans, per_feature)], axis=0)
    fits = np.nonzero(total <= budget_bytes)[0]
    if len(fits) == 0 and drop_rare:
        return _fit_dropping_rare(plans, budget_bytes, min_dim)
    if len(fits) == 0:
        least = int(total.min())
        raise ValueError(
            f"budget_bytes={budget_bytes} is below the smallest mixed-dim collection "
            f"({least} bytes: one {min_dim}-wide row per id, or Full where that is smaller)"
        )
    best = fits[-1]
    methods: dict[str, Full | MixedDim] = {}
    for plan, (nbytes, dims) in zip(plans, per_feature):
        if plan.full <= nbytes[best]:
            methods[plan.feature.name] = Full()
        else:
            blocks_ = merge_equal_dims(plan.sizes, dims[best])
            methods[plan.feature.name] = MixedDim(
                alpha=alpha, blocks=len(blocks_), min_dim=min_dim, remap=plan.remap and len(blocks_) > 1,
                dims=tuple(d for _, d in blocks_), sizes=tuple(s for s, _ in blocks_),
            )  # fmt: skip
    return methods


def _fit_dropping_rare(plans: Sequence["_FeaturePlan"], budget_bytes: int, min_dim: int) -> dict[str, Full | MixedDim]:
    """The one-scale rule with widths allowed to round down to 0, for budgets below a row per id.

    The paper's ``d = scale * p^alpha`` (``p``: the id's own query probability) rounds to the
    nearest multiple of ``ALIGN``; where that is 0, i.e. ``scale * p^alpha < ALIGN / 2``, the id
    gets no row (``MixedDim.keep``). So one scale decides, in every feature at once, which ids
    keep a row (every id at least as popular as some ``p*``: the rarest ones go first, whatever
    their feature) and how wide the kept blocks are (the rule over each block's kept ids,
    clamped to ``[min_dim, D]``). Every kept row costs the same, so keeping the most queried ids
    of the whole collection is also what serves the most lookups per byte.

    The scale is parameterised by the last kept id: the pairs (feature, rank) in
    ``popularity_order``, a prefix of ``L`` of them kept, scale ``(ALIGN / 2) / p_L^alpha`` (the
    smallest at which the ``L``-th id's width rounds up to ``ALIGN``). Ties are broken by rank,
    so the budget is met id by id even inside the large groups of equally rare ids (ids seen
    once). Each feature keeps at least one row (a table needs one), or stays Full where that is
    smaller. Bytes grow with ``L`` except where a block's width steps down as rarer ids lower its
    mean popularity, so the binary search returns an ``L`` that fits while ``L + 1`` does not.
    """
    features, ranks = popularity_order([plan.probability for plan in plans])
    positions = [np.flatnonzero(features == i) for i in range(len(plans))]  # rank order within each
    alpha = plans[0].alpha

    def layouts(prefix: int) -> list[tuple[int, list[int], np.ndarray, int]]:
        last = plans[int(features[prefix - 1])].probability[int(ranks[prefix - 1])]
        scale = (ALIGN / 2) / last**alpha
        out = []
        for plan, pos in zip(plans, positions):
            keep = max(1, int(np.searchsorted(pos, prefix)))
            out.append((keep, *plan.layout_keeping(keep, scale, min_dim)))
        return out

    def total(prefix: int) -> int:
        return sum(min(nbytes, plan.full) for plan, (_, _, _, nbytes) in zip(plans, layouts(prefix)))

    least = total(1)
    if least > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} is below the smallest mixed-dim collection that drops rare ids "
            f"({least} bytes: one {min_dim}-wide row and its projection per feature, plus the int32 "
            f"id -> rank array of features whose counts are not sorted, or Full where that is smaller)"
        )
    prefix = largest_fitting(1, len(features), lambda L: total(L) <= budget_bytes)
    methods: dict[str, Full | MixedDim] = {}
    for plan, (keep, sizes, dims, nbytes) in zip(plans, layouts(prefix)):
        if plan.full <= nbytes:
            methods[plan.feature.name] = Full()
            continue
        blocks_ = merge_equal_dims(sizes, dims)
        methods[plan.feature.name] = MixedDim(
            alpha=alpha, blocks=len(blocks_), min_dim=min_dim, remap=plan.remap, keep=keep,
            dims=tuple(d for _, d in blocks_), sizes=tuple(s for s, _ in blocks_),
        )  # fmt: skip
    return methods


def popularity_order(probabilities: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(feature index, rank) of every id with a non-zero query probability, most popular first.

    ``probabilities[f]`` is feature ``f``'s per-id probability in rank order (non-increasing).
    Ties go to the smaller rank, then to the earlier feature, so each feature's ids appear in
    rank order and any prefix keeps a rank prefix of every feature."""
    p = np.concatenate([np.asarray(q, dtype=np.float64) for q in probabilities])
    features = np.repeat(np.arange(len(probabilities)), [len(q) for q in probabilities])
    ranks = np.concatenate([np.arange(len(q)) for q in probabilities])
    order = np.lexsort((features, ranks, -p))
    order = order[p[order] > 0]  # a zero-probability id's width is 0 at every scale
    return features[order], ranks[order]


class _FeaturePlan:
    """A feature's blocks and their popularity, for evaluating many candidate scales at once."""

    def __init__(self, feature: FeatureSpec, dim: int, alpha: float, blocks: int) -> None:
        self.feature = feature
        self.dim = dim
        self.alpha = alpha
        self.sizes = block_sizes(feature.num_embeddings, blocks)
        self.ranked = _ranked_counts(feature.counts, feature.num_embeddings)
        self.total = float(self.ranked.sum())
        self.probability = self.ranked / self.total
        self.popularity = block_popularity(self.ranked, self.sizes)
        self.remap = needs_remap(feature.counts)
        self.full = (feature.num_embeddings + 1) * dim * FLOAT_BYTES

    def bytes_at(self, scales: np.ndarray, min_dim: int) -> tuple[np.ndarray, np.ndarray]:
        dims = alpha_dims(self.popularity, self.alpha, scales, min_dim, self.dim)
        return _bytes_for_candidates(self.sizes, dims, self.dim, self.remap), dims

    def layout_keeping(self, keep: int, scale: float, min_dim: int) -> tuple[list[int], np.ndarray, int]:
        """(truncated sizes, dims, exact bytes) when only the ``keep`` most popular ids have rows
        and the kept blocks get the rule's widths at ``scale``."""
        sizes = truncate_blocks(self.sizes, keep)
        kept = sizes[:-1] + [keep - sum(sizes[:-1])]
        popularity = block_popularity(self.ranked[:keep], kept, total=self.total)
        dims = alpha_dims(popularity, self.alpha, scale, min_dim, self.dim)
        return sizes, dims, mixed_dim_bytes(sizes, dims, self.dim, self.remap, keep)
