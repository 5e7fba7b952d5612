"""Full: one row per known id plus one shared out-of-vocabulary row (the uncompressed baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tablezip.compress import fused_ids
from tablezip.embeddings.registry import FeatureLayout, IdBatch, MethodConfig, TableSpec, register


@dataclass(frozen=True)
class Full(MethodConfig):
    """Ids in ``[0, num_embeddings)`` get their own row; every other id (negative, too large)
    maps to the OOV row ``num_embeddings``, so unseen values at serving time are not errors."""

    kind = "full"


def oov_rows(ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Known ids unchanged, everything else -> ``num_embeddings``."""
    known = (ids >= 0) & (ids < num_embeddings)
    return torch.where(known, ids, torch.full_like(ids, num_embeddings))


def batch_oov_rows(layouts: Sequence[FeatureLayout], batch: IdBatch) -> torch.Tensor:
    """``oov_rows`` of every id of the batch, each against its own feature's ``num_embeddings``:
    one compare-and-select over the ids of all features."""
    sizes = [layout.feature.num_embeddings for layout in layouts]
    # On a CPU: one C pass (fused_ids.native_rows: PRUNED's maths with keep = n and the default
    # row is exactly this map) instead of two compares, an and and a select over every id.
    rows = fused_ids.native_rows(batch, fused_ids.PRUNED, c=sizes, d=sizes, default=True)
    if rows is not None:
        return rows
    n = batch.constant(sizes)
    ids = batch.ids
    return torch.where((ids >= 0) & (ids < n), ids, n)


class FullLayout(FeatureLayout):
    def tables(self) -> list[TableSpec]:
        return [TableSpec(self.feature.num_embeddings + 1, self.dim)]

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [oov_rows(ids, self.feature.num_embeddings)]

    @classmethod
    def transform_batch(cls, layouts: Sequence[FeatureLayout], batch: IdBatch) -> list[list[torch.Tensor]]:
        return batch.split_slots([batch_oov_rows(layouts, batch)])


register(Full, FullLayout)
