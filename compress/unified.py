"""Unified embedding (feature multiplexing): many features read ONE shared hashed table.

After Coleman et al., "Unified Embedding: Battle-Tested Feature Representations for Web-Scale
ML Systems" (NeurIPS 2023). Separate hashed tables waste rows: a small feature cannot use its
spare capacity for a big one. One shared table lets every feature's ids compete for all rows,
and giving each feature its own hash salt keeps equal ids of different features apart.

With ``chunks = k > 1`` a feature's vector is the concatenation of k lookups of dimension D/k,
each with its own salt (the paper's multi-probe variant): two ids only share a whole vector if
they collide in all k probes, which makes full collisions far rarer at the same bytes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence, cast

import torch

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from . import fused_ids
from .full import Full
from .hashing import MIX, hash_ids, hash_methods_for_budget, hash_rows, seed_mix

_SEED_LIMIT = 2**63


@dataclass(frozen=True)
class Unified(MethodConfig):
    """Read the shared table named ``table`` (``rows`` x ``D / chunks``) through ``chunks``
    salted hashes. Every feature naming the same ``table`` must give the same ``rows`` and
    ``chunks``; the table is stored (and counted) once.

    Id contract: every int64 id is hashed, including ids outside ``[0, num_embeddings)``; no
    id has a row of its own, so unseen ids need no special case.
    """

    kind = "unified"
    rows: int
    chunks: int = 1
    table: str = "unified"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rows, int) or isinstance(self.rows, bool) or self.rows < 1:
            raise ValueError(f"Unified.rows must be an integer >= 1, got {self.rows!r}")
        if not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 1:
            raise ValueError(f"Unified.chunks must be an integer >= 1 that divides dim, got {self.chunks!r}")
        if not isinstance(self.table, str) or not self.table:
            raise ValueError(f"Unified.table must be a non-empty string, got {self.table!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < _SEED_LIMIT:
            raise ValueError(f"Unified.seed must be an integer in [0, 2**63), got {self.seed!r}")

    def shared_key(self) -> str:
        return f"unified:{self.table}"


def feature_salt(name: str, chunk: int, seed: int) -> int:
    """63-bit hash seed of one (feature, chunk) probe.

    sha256 rather than Python's ``hash()``: string hashing is randomised per process, and the
    salt decides which rows a trained model reads, so it must be the same in every process and
    on every platform. The chunk and seed are appended as fixed-width fields after the name, so
    distinct (name, chunk, seed) triples never encode to the same bytes.
    """
    if not 0 <= chunk < _SEED_LIMIT or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"chunk and seed must be in [0, 2**63), got chunk={chunk}, seed={seed}")
    message = name.encode("utf-8") + chunk.to_bytes(8, "big") + seed.to_bytes(8, "big")
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "big") >> 1


def unified_rows(ids: torch.Tensor, rows: int, salts: Sequence[int]) -> list[torch.Tensor]:
    """Row of every id in the shared table, one tensor per salted probe."""
    return [hash_ids(ids, rows, salt) for salt in salts]


def check_chunks(chunks: int, dim: int) -> None:
    """Each probe reads a table of width D / chunks, and fbgemm stores widths in multiples of 4."""
    if not isinstance(chunks, int) or chunks < 1 or dim % chunks or (dim // chunks) % 4:
        raise ValueError(
            f"Unified.chunks={chunks!r} must divide the embedding dim D={dim} into widths that are "
            f"multiples of 4 (fbgemm's table width unit); allowed: "
            f"{[c for c in range(1, dim + 1) if dim % c == 0 and (dim // c) % 4 == 0]}"
        )


class UnifiedLayout(FeatureLayout):
    def __init__(self, feature: FeatureSpec, dim: int, config: Unified) -> None:
        super().__init__(feature, dim, config)
        check_chunks(config.chunks, dim)
        self.rows = config.rows
        self.chunks = config.chunks
        self.salts = [feature_salt(feature.name, c, config.seed) for c in range(config.chunks)]

    def tables(self) -> list[TableSpec]:
        spec = TableSpec(self.rows, self.dim // self.chunks, shared=self.config.shared_key())
        return [spec] * self.chunks

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return unified_rows(ids, self.rows, self.salts)

    @property
    def batch_group(self) -> Hashable:
        return (type(self), self.chunks)

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """One splitmix64 per chunk over the ids of every feature with that many chunks, each id
        salted by its own feature: the fused Hash kernel where it runs (CUDA; the per-feature salts
        are read from a small table instead of a per-id seed tensor), else the torch ops."""
        unified = cast(Sequence[UnifiedLayout], layouts)
        slots = []
        for c in range(unified[0].chunks):
            salts = [seed_mix(l.salts[c]) for l in unified]
            fused = fused_ids.rows(batch, fused_ids.HASH, a=[l.rows for l in unified], b=salts, mix=MIX)
            slots.append(fused if fused is not None else hash_rows(batch.ids, batch.constant([l.rows for l in unified]), batch.constant(salts)))
        return batch.split_slots(slots)

    def combine(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)

    @property
    def is_passthrough(self) -> bool:
        # One probe at full dim is exactly a hashed table: TBE's output is the vector.
        return self.chunks == 1


register(Unified, UnifiedLayout)


def unified_methods_for_budget(
    features: Sequence[FeatureSpec],
    dim: int,
    budget_bytes: int,
    chunks: int = 1,
    seed: int = 0,
    table: str = "unified",
) -> Mapping[str, Full | Unified]:
    """Spend the budget on one shared table, keeping the smallest features Full.

    Which features stay Full: exactly those the hashing fitter keeps Full at the same budget
    (their Full size is at most the common per-feature row cap), so unified and hashing differ
    only in how the big features share rows. A tiny feature costs a few rows either way, but in
    the shared table each of its few ids, seen by nearly every example, would collide with the
    ids of other features; Full keeps them exact and out of everyone else's rows. Their bytes
    are subtracted first; every other feature shares one table of the remaining bytes.
    """
    check_chunks(chunks, dim)
    row_bytes = dim // chunks * 4
    if budget_bytes < row_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} cannot hold one row of the shared table "
            f"(dim {dim} / chunks {chunks} x 4 = {row_bytes} bytes)"
        )
    try:
        hashed = hash_methods_for_budget(features, dim, budget_bytes)
        small = {name for name, method in hashed.items() if isinstance(method, Full)}
    except ValueError:  # below one full-width row per feature: everything shares
        small = set()
    if len(small) == len(features):
        return {f.name: Full() for f in features}
    full_spent = sum((f.num_embeddings + 1) * dim * 4 for f in features if f.name in small)
    rows = (budget_bytes - full_spent) // row_bytes
    config = Unified(rows=rows, chunks=chunks, table=table, seed=seed)
    return {f.name: Full() if f.name in small else config for f in features}
