"""The hashing trick: ids hashed into a fixed number of rows.

The hash is splitmix64's finaliser on int64 tensors, written so that it is platform-stable:
the same id, seed and row count give the same row on any machine, in training and in serving.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, cast

import torch

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from . import fused_ids
from .search import largest_fitting
from .full import Full

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
MIX = (_MIX1, _MIX2)  # splitmix64's multipliers, as unsigned ints for the fused kernel


def _signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit constant as the int64 torch stores."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor, seed: int) -> torch.Tensor:
    """splitmix64 finaliser of ``x xor seed*golden``; wrapping int64 maths equals uint64 maths."""
    z = x ^ _signed64(seed * _GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed64(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed64(_MIX2)
    return z ^ _shr(z, 31)


def hash_ids(ids: torch.Tensor, rows: int, seed: int = 0) -> torch.Tensor:
    """Row in ``[0, rows)`` for every int64 id; the top 63 bits of the mix, modulo ``rows``."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return _shr(mix64(ids.to(torch.int64), seed), 1) % rows


def seed_mix(seed: int) -> int:
    """The int64 that ``mix64`` xors into every id for ``seed``."""
    return _signed64(seed * _GOLDEN)


def hash_rows(ids: torch.Tensor, rows: int | torch.Tensor, mixed_seed: int | torch.Tensor) -> torch.Tensor:
    """``hash_ids`` of int64 ``ids`` with the seed already mixed (``seed_mix``), either operand
    given per id (an int64 tensor shaped like ``ids``) or shared (an int): one call hashes the
    ids of many features, each with its own rows and seed, to exactly ``hash_ids``' rows.

    The same wrapping int64 maths as ``mix64``, in place on two buffers: on a CPU the hash of a
    large batch is bound by memory traffic, and every out-of-place step would allocate (and
    fault in) a fresh tensor. ``hash_ids`` stays the plain reference it is tested against."""
    z = ids ^ mixed_seed
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, _signed64(_MIX1)), (27, _signed64(_MIX2)), (31, None)):
        torch.bitwise_right_shift(z, bits, out=shifted).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(multiplier)
    torch.bitwise_right_shift(z, 1, out=shifted).bitwise_and_((1 << 63) - 1)
    return shifted.remainder_(rows)


@dataclass(frozen=True)
class Hash(MethodConfig):
    """Hashing trick. Give ``rows`` directly, or ``budget_bytes`` for the table (rows = budget //
    (dim * 4)). Every int64 id is valid: ids outside the declared id space are hashed too."""

    kind = "hash"
    rows: int | None = None
    budget_bytes: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.budget_bytes is None):
            raise ValueError("Hash needs exactly one of rows (>= 1) or budget_bytes (>= 4 * dim)")
        if self.rows is not None and (not isinstance(self.rows, int) or self.rows < 1):
            raise ValueError(f"Hash.rows must be an integer >= 1, got {self.rows!r}")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, int) or self.budget_bytes < 4):
            raise ValueError(f"Hash.budget_bytes must be an integer >= 4 * dim, got {self.budget_bytes!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"Hash.seed must be an integer in [0, 2**63), got {self.seed!r}")

    def rows_for(self, dim: int) -> int:
        if self.rows is not None:
            return self.rows
        assert self.budget_bytes is not None
        rows = self.budget_bytes // (dim * 4)
        if rows < 1:
            raise ValueError(
                f"Hash.budget_bytes={self.budget_bytes} cannot hold one row of dim {dim} "
                f"(needs >= {dim * 4})"
            )
        return rows


class HashLayout(FeatureLayout):
    def __init__(self, feature: FeatureSpec, dim: int, config: Hash) -> None:
        super().__init__(feature, dim, config)
        self.rows = config.rows_for(dim)
        self.seed = config.seed

    def tables(self) -> list[TableSpec]:
        return [TableSpec(self.rows, self.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [hash_ids(ids, self.rows, self.seed)]

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """One splitmix64 over the ids of every hashed feature (each its own rows and seed)."""
        hashed = cast(Sequence[HashLayout], layouts)
        fused = fused_ids.rows(batch, fused_ids.HASH, a=[l.rows for l in hashed], b=[seed_mix(l.seed) for l in hashed], mix=MIX)
        if fused is not None:  # CUDA: the same rows from one kernel
            return batch.split_slots([fused])
        rows = batch.constant([l.rows for l in hashed])
        seeds = batch.constant([seed_mix(l.seed) for l in hashed])
        return batch.split_slots([hash_rows(batch.ids, rows, seeds)])


register(Hash, HashLayout)


def hash_methods_for_budget(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, seed: int = 0
) -> Mapping[str, Full | Hash]:
    """Spend a collection-wide byte budget on hashed tables by water-filling.

    Every feature gets ``min(full rows, cap)`` rows with one cap chosen as large as the budget
    allows: small features keep Full (hashing them would only add collisions at the same bytes),
    large ones are hashed down to the cap. Why a common cap: with no frequency information, an
    equal row count for the big features is the least-assumption split.
    """
    row_bytes = dim * 4
    full_rows = {f.name: f.num_embeddings + 1 for f in features}
    if budget_bytes < len(features) * row_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes} is below one row per feature "
            f"({len(features)} x {row_bytes} = {len(features) * row_bytes} bytes)"
        )
    budget_rows = budget_bytes // row_bytes
    if sum(full_rows.values()) <= budget_rows:
        return {f.name: Full() for f in features}
    cap = largest_fitting(1, max(full_rows.values()), lambda c: sum(min(r, c) for r in full_rows.values()) <= budget_rows)
    return {
        name: Full() if rows <= cap else Hash(rows=cap, seed=seed)
        for name, rows in full_rows.items()
    }
