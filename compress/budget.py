"""Fit a method to a collection-wide byte budget: one entry per method that can be budgeted."""
from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

from tablezip.embeddings.features import FeatureSpec
from tablezip.embeddings.registry import MethodConfig

from .full import Full
from .compositional import kway_methods_for_budget, qr_methods_for_budget
from .hashing import hash_methods_for_budget
from .hybrid import hybrid_methods_for_budget
from .mixed_dim import mixed_dim_methods_for_budget
from .multihash import multihash_methods_for_budget
from .pruned import pruned_methods_for_budget
from .unified import unified_methods_for_budget

BudgetFitter = Callable[[Sequence[FeatureSpec], int, int], Mapping[str, MethodConfig]]

# qr, kway and md fall back to their low-budget variants (QR/KWay with op="concat" and, for
# KWay, more partitions; MixedDim dropping the rarest ids' rows) only where the budget cannot be
# met otherwise, so a budget that fits the plain method gets the same configs as before.
FITTERS: dict[str, BudgetFitter] = {
    "full": lambda features, dim, budget: {f.name: Full() for f in features},
    "hash": hash_methods_for_budget,
    "multihash": multihash_methods_for_budget,
    "qr": partial(qr_methods_for_budget, fallback=True),
    "kway": partial(kway_methods_for_budget, fallback=True),
    "unified": unified_methods_for_budget,
    "hybrid": hybrid_methods_for_budget,
    "pruned": pruned_methods_for_budget,
    "md": partial(mixed_dim_methods_for_budget, drop_rare=True),
}


def methods_for_budget(
    method: str, features: Sequence[FeatureSpec], dim: int, budget_bytes: int
) -> Mapping[str, MethodConfig]:
    """Per-feature configs of ``method`` whose tables fit ``budget_bytes`` (Full ignores it)."""
    try:
        fitter = FITTERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; allowed: {sorted(FITTERS)}") from None
    return fitter(features, dim, budget_bytes)


def full_bytes(features: Sequence[FeatureSpec], dim: int) -> int:
    """Bytes of Full fp32 tables (one row per id plus the OOV row): what ratios are taken of."""
    return sum((f.num_embeddings + 1) * dim * 4 for f in features)
