"""DIN-style target attention for data without behaviour sequences (Criteo).

What this is: DIN's local activation unit (``AttentionUnit``: MLP over ``[k, q, k - q, k * q]``
with Dice, unnormalised weights) applied INSIDE one sample. The query is the mean of the
pooled vectors of a configurable group of "ad-side" fields; the keys are the other fields'
pooled vectors. Each key gets a weight that depends on the query, and the weighted sum of the
keys ("the context as seen by this ad") joins the MLP input next to the query, every field
vector and the dense tower.

What it is not: DIN. DIN attends over a user's HISTORY (many past items per sample) to pick the
interest relevant to the candidate ad; Criteo has no user id and no history, and its 26 fields
are anonymised, so which fields describe the ad is a guess. Here attention can only re-weight
the ~20 context fields per ad, a learned, query-dependent field importance (closer to
FiBiNET/AutoInt's feature weighting than to interest modelling). Expect it to be on par with
DLRM/DCN on Criteo, not a leap; use ``models.DIN`` with ``pipelines.behaviour`` when real
histories exist.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .blocks import Activation, AttentionUnit, dice, mlp


def default_query_fields(features: Sequence, count: int = 4) -> list[str]:
    """The ``count`` highest-cardinality fields: on anonymised Criteo the fields with the most
    distinct values are the likeliest to identify the ad/item itself (a heuristic, documented
    as such; pass ``query_fields`` explicitly when the schema is known)."""
    if count < 1 or count >= len(features):
        raise ValueError(f"query field count must be in [1, {len(features) - 1}], got {count}")
    ranked = sorted(features, key=lambda f: (-f.num_embeddings, f.name))
    chosen = {f.name for f in ranked[:count]}
    return [f.name for f in features if f.name in chosen]


class FieldAttention(nn.Module):
    """Target attention of a query field group over the other fields, then a Dice MLP.

    The collection's tables are trained by its fused TBE optimizer: keep
    ``model.embeddings.fused_parameters()`` out of the dense optimizer.
    """

    def __init__(
        self,
        embeddings: nn.Module,
        num_dense: int,
        query_fields: Sequence[str],
        attention: Sequence[int] = (36,),
        hidden: Sequence[int] = (200, 80),
        bottom: Sequence[int] = (64,),
        activation: Activation = dice,
    ) -> None:
        super().__init__()
        names = list(embeddings.feature_names)
        query_fields = list(query_fields)
        unknown = [q for q in query_fields if q not in names]
        if not query_fields or unknown:
            raise ValueError(f"query_fields must name 1..{len(names) - 1} features of the collection {names}; unknown {unknown}")
        if len(set(query_fields)) != len(query_fields) or len(query_fields) >= len(names):
            raise ValueError(f"query_fields must be distinct and leave at least one key field, got {query_fields}")
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        self.embeddings = embeddings
        self.dim = dim = embeddings.dim
        self.query_fields = query_fields
        self.key_fields = [n for n in names if n not in query_fields]
        self.register_buffer("_query_index", torch.tensor([names.index(q) for q in query_fields]), persistent=False)
        self.register_buffer("_key_index", torch.tensor([names.index(k) for k in self.key_fields]), persistent=False)
        self.attention = AttentionUnit(dim, attention, activation=activation)
        self.bottom = mlp(num_dense, (*bottom, dim)) if num_dense else None
        head_in = (dim if num_dense else 0) + len(names) * dim + 2 * dim
        self.head = mlp(head_in, (*hidden, 1), final_activation=False, activation=activation)

    def attend(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query [B, D], key weights [B, K] and the attended context [B, D] from pooled [B, F, D]."""
        query = pooled.index_select(1, self._query_index).mean(1)
        keys = pooled.index_select(1, self._key_index)
        mask = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)
        weights = self.attention(keys, query, mask)
        return query, weights, torch.einsum("bk,bkd->bd", weights, keys)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Logits [B]."""
        batch = dense.shape[0]
        pooled = self.embeddings(sparse).values().view(batch, -1, self.dim)  # [B, F, D]
        query, _, context = self.attend(pooled)
        parts = [pooled.reshape(batch, -1), query, context]
        if self.bottom is not None:
            parts.insert(0, self.bottom(dense))
        return self.head(torch.cat(parts, dim=1)).squeeze(1)
