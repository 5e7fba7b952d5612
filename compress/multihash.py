"""Multi-probe hashing: each id reads ``probes`` rows of one hashed table and sums them.

Hash embeddings (Svenstrup et al., NeurIPS 2017) and Bloom embeddings (Serra & Karatzoglou,
RecSys 2017) both rest on one observation: with a single hash, two ids that collide are
identical forever; with ``k`` independent hashes into the same ``rows``, two ids share their
whole vector only if all ``k`` probes collide (probability ``rows**-k`` instead of
``rows**-1``), so a table can be much smaller than the id space and still tell ids apart. The
importance weights of hash embeddings are left out: the plain sum is the Bloom-filter variant,
and it keeps the combiner linear, so TBE pools each probe's rows inside the kernel.

The table is stored once (one shared ``TableSpec`` key per feature read by ``probes`` slots):
the memory is that of ``Hash(rows)``, only the lookups multiply. The probes are folded
(``FeatureLayout.folds_slots``): TBE sees one slot per feature whose bag of L ids holds all
``probes * L`` rows, so it pools the sum itself and writes one vector per bag. For bags of one id
that is exactly the per-probe sum (the same additions in the same order); for longer bags the
rows are added in another order (allclose, not bit-equal; see tests/compress/test_multihash.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence, cast

import torch

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import FeatureLayout, IdBatch, MethodConfig, TableSpec, register

from . import fused_ids
from .full import Full
from .hashing import MIX, Hash, hash_ids, hash_methods_for_budget, hash_rows, seed_mix

MAX_PROBES = 16
# Per-probe seeds are ``seed * MAX_PROBES + probe``: distinct (seed, probe) pairs never share a
# hash, and the seed must stay below this bound for the product to fit hash_ids' [0, 2**63).
SEED_LIMIT = 2**63 // MAX_PROBES


@dataclass(frozen=True)
class MultiHash(MethodConfig):
    """``probes`` salted hashes of every id into one ``rows`` x D table; the vector is the sum.

    Every int64 id is valid: ids outside the declared id space are hashed like the others (no
    OOV row), exactly as ``Hash`` does. Probe ``p`` hashes with seed ``seed * 16 + p`` (see
    ``probe_seed``), so ``MultiHash(rows, probes=1)`` reads the rows of ``Hash(rows)``.
    """

    kind = "multihash"
    rows: int
    probes: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.rows) or self.rows < 1:
            raise ValueError(f"MultiHash.rows must be an integer >= 1, got {self.rows!r}")
        if not _is_int(self.probes) or not 1 <= self.probes <= MAX_PROBES:
            raise ValueError(f"MultiHash.probes must be an integer in [1, {MAX_PROBES}], got {self.probes!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"MultiHash.seed must be an integer in [0, 2**63 // {MAX_PROBES}), got {self.seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def probe_seed(seed: int, probe: int) -> int:
    """The hash seed of one probe; a fixed formula, since exported models depend on it."""
    return seed * MAX_PROBES + probe


def multihash_rows(ids: torch.Tensor, rows: int, probes: int, seed: int) -> list[torch.Tensor]:
    """Row of every id under each probe, all in ``[0, rows)``."""
    return [hash_ids(ids, rows, probe_seed(seed, p)) for p in range(probes)]


class MultiHashLayout(FeatureLayout):
    folds_slots = True  # every probe reads the one table and combine is their sum

    def __init__(self, feature: FeatureSpec, dim: int, config: MultiHash) -> None:
        super().__init__(feature, dim, config)
        self.rows = config.rows
        self.probes = config.probes
        self.seed = config.seed

    def tables(self) -> list[TableSpec]:
        # One key per feature: every probe slot reads the same stored table.
        return [TableSpec(self.rows, self.dim, shared=f"multihash:{self.feature.name}")] * self.probes

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return multihash_rows(ids, self.rows, self.probes, self.seed)

    @property
    def batch_group(self) -> Hashable:
        return (type(self), self.probes)

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        """One splitmix64 per probe over the ids of every feature with that many probes (the fused
        Hash kernel where it runs). The probes' rows come back as the columns of one [N, probes]
        block, so the collection's fold (every probe row of an id side by side in its bag,
        ``registry.interleaved``) is a view, not a copy."""
        multi = cast(Sequence[MultiHashLayout], layouts)
        seeds = [[seed_mix(probe_seed(l.seed, p)) for l in multi] for p in range(multi[0].probes)]
        per_probe = []
        for probe_seeds in seeds:
            fused = fused_ids.rows(batch, fused_ids.HASH, a=[l.rows for l in multi], b=probe_seeds, mix=MIX)
            if fused is None:
                fused = hash_rows(batch.ids, batch.constant([l.rows for l in multi]), batch.constant(probe_seeds))
            per_probe.append(fused)
        if len(per_probe) == 1:
            return batch.split_slots(per_probe)
        block = torch.stack(per_probe, dim=1)
        return batch.split_slots([block[:, p] for p in range(len(per_probe))])

    def combine(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        out = pooled[0]
        for part in pooled[1:]:
            out = out + part
        return out

    def init_tables(self, tables: list[torch.Tensor], generator: torch.Generator) -> None:
        """Scale by ``1/sqrt(probes)`` so a sum of ``probes`` independent rows starts with the
        variance of one row, i.e. the same initial vector scale as ``Hash(rows)``."""
        if self.probes > 1:
            with torch.no_grad():
                tables[0].mul_(1.0 / math.sqrt(self.probes))  # every slot is this one table


register(MultiHash, MultiHashLayout)


def multihash_methods_for_budget(
    features: Sequence[FeatureSpec], dim: int, budget_bytes: int, probes: int = 2, seed: int = 0
) -> Mapping[str, Full | MultiHash]:
    """Water-fill one row cap over the features, exactly like ``hash_methods_for_budget``.

    A multi-probe table costs what a single-hash table of the same rows costs (the probes share
    it), so the byte-optimal split is the same; only the hashed features change method. Small
    features keep Full: probing them would only add collisions at the same bytes.
    """
    single = hash_methods_for_budget(features, dim, budget_bytes, seed=0)
    return {
        name: MultiHash(rows=m.rows_for(dim), probes=probes, seed=seed) if isinstance(m, Hash) else m
        for name, m in single.items()
    }
