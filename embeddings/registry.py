"""The method interface: a config dataclass per method and the layout it builds.

A method turns one logical feature into physical tables (what fbgemm stores), a pure id
transform (logical ids -> row ids of each table) and a combiner (pooled rows -> the feature's
vector). Keeping these three apart is what lets every method share one TBE call.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Hashable, Sequence, TypeVar

import torch
from torch import nn

from .features import FeatureSpec


@dataclass(frozen=True)
class TableSpec:
    """One physical table: ``rows`` x ``dim`` fp32 parameters inside the shared TBE.

    Tables with the same ``shared`` key are stored once and read by every feature that names
    them (feature multiplexing); their specs must agree.
    """

    rows: int
    dim: int
    shared: str | None = None

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * 4


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config; subclasses are frozen dataclasses validated on construction."""

    kind: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **self.params()}


class FeatureLayout(nn.Module):
    """A method applied to one feature. Subclasses own any parameters beyond the TBE rows.

    The default combiner is the identity over one table, pooled inside TBE; methods with several
    tables or projections override ``combine``.

    ``pooled_in_tbe``: True when ``combine`` is linear, so TBE may sum the rows of a bag before
    combining (one vector per bag and table reaches ``combine``). False for non-linear combiners
    (an elementwise product): ``combine`` then sees one row per id and the collection pools after.

    ``may_drop``: ``transform`` may return -1 for ids that have no row (pruned); they add nothing
    to their bag. Only for ``pooled_in_tbe`` layouts.

    ``transform_batch``: the collection transforms all features of one ``batch_group`` with one
    call, so a method can run its maths once over the concatenated ids of many features instead
    of a few small ops per feature (on a GPU, hundreds of tiny kernel launches). ``transform``
    stays the reference: a batched path must return exactly its rows.
    """

    pooled_in_tbe: ClassVar[bool] = True
    may_drop: ClassVar[bool] = False
    # ``folds_slots``: every slot reads ONE table and ``combine`` is their plain sum (MultiHash's
    # probes). The sum is linear, so the collection gives such a layout a single TBE slot whose bag
    # holds every slot's rows of the bag's ids (a bag of L ids becomes one of k * L rows): TBE
    # pools the sum itself and writes one vector per bag instead of k. Only for ``pooled_in_tbe``
    # layouts that do not ``may_drop``; the per-feature path (``batch_transforms = False``)
    # still pools each slot apart and calls ``combine`` (the reference).
    folds_slots: ClassVar[bool] = False

    def __init__(self, feature: FeatureSpec, dim: int, config: MethodConfig) -> None:
        super().__init__()
        self.feature = feature
        self.dim = dim
        self.config = config

    def tables(self) -> list[TableSpec]:
        raise NotImplementedError

    def transform(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Logical ids (int64, any values) -> row ids in each of ``tables()``, all in range."""
        raise NotImplementedError

    @property
    def batch_group(self) -> Hashable:
        """Layouts with equal keys are transformed by one ``transform_batch`` call of their class.

        The class by default; a class whose batched maths differs between configs (a stored
        remap or not, the number of slots) adds what tells them apart."""
        return type(self)

    @classmethod
    def transform_batch(cls, layouts: Sequence["FeatureLayout"], batch: "IdBatch") -> list[list[torch.Tensor]]:
        """``[layout.transform(ids) for each feature]`` for the layouts of one ``batch_group``,
        ``batch`` holding their ids. Override to run the maths once over ``batch.ids`` (see
        ``IdBatch``); this default, one ``transform`` per feature, keeps every method working."""
        return [layout.transform(ids) for layout, ids in zip(layouts, batch.per_feature_ids)]

    def combine(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        (only,) = pooled
        return only

    def combine_form(self) -> "CombineForm | None":
        """``combine`` as one of the forms the collection computes itself, straight into its
        output and gradient (``CombineForm``, embeddings/assemble.py), or None: then the whole
        collection calls ``combine`` per feature. The default: the identity, for one table of
        width D whose pooled rows already are the vector."""
        tables = self.tables()
        identity = type(self).combine is FeatureLayout.combine or self.is_passthrough
        if identity and len(tables) == 1 and tables[0].dim == self.dim:
            return CombineForm("identity")
        return None

    def projection_weights(self) -> list[torch.Tensor]:
        """The weights of ``combine_form()`` (none for most forms), read by the fused assemble on
        every forward; a layout with weights may answer faster than building its form."""
        form = self.combine_form()
        return [] if form is None else [w for w in form.weights if w is not None]

    @property
    def is_passthrough(self) -> bool:
        """True when the TBE output for this feature already is its vector (fast path)."""
        return (
            type(self).combine is FeatureLayout.combine
            and len(self.tables()) == 1
            and self.pooled_in_tbe
            and not self.may_drop
        )

    def init_tables(self, tables: list[torch.Tensor], generator: torch.Generator) -> None:
        """Re-initialise this feature's tables (views into the TBE, in ``tables()`` order) when
        torchrec's default U(-sqrt(1/rows), sqrt(1/rows)) is wrong for the combiner, e.g. a
        product of rows. Runs once, after the default init; the default keeps it."""

    def extra_bytes(self) -> int:
        """Bytes this layout stores outside the TBE (projections, remap arrays, ...)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


@dataclass(frozen=True, eq=False)
class CombineForm:
    """A ``combine`` the collection can compute without calling it (``FeatureLayout.combine_form``).

    ``kind``: "identity" (one slot; its rows are the vector), "mult" / "add" (the slots multiplied
    / added left to right, all D wide), "concat" (the slots side by side), "project" (MixedDim:
    the D-wide slots added in slot order, then ``slot @ weights[i]`` added for every slot ``i``
    whose weight is not None, in slot order; ``weights`` holds one entry per slot). The
    collection's fused assemble must give what ``combine`` gives: exactly for every kind but
    "project", whose matrix products may round differently (tested with a tolerance)."""

    kind: str
    weights: tuple[torch.Tensor | None, ...] = ()

    KINDS: ClassVar[tuple[str, ...]] = ("identity", "mult", "add", "concat", "project")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"CombineForm.kind must be one of {self.KINDS}, got {self.kind!r}")


class BatchCache:
    """What one batch group of a collection keeps between forwards for ``IdBatch``.

    Per-feature constants (rows, seeds, ...) derive from frozen configs, so their small device
    tensors are kept for good. Their per-id expansions depend on how many ids each feature has;
    only the latest counts are kept, so a training loop with a fixed batch shape (one id per bag)
    builds them once, and a loop with varying bags pays one small gather per constant and step.
    """

    def __init__(self) -> None:
        self.small: dict[tuple, torch.Tensor] = {}
        # (counts, device) -> {key: per-id tensor}; replaced as a whole, never mutated in place
        # by another counts, so a reader always sees one consistent pair.
        self.expanded: tuple[tuple, dict[Any, torch.Tensor]] = ((), {})

    def per_id(self, counts: tuple[int, ...], device: torch.device) -> dict[Any, torch.Tensor]:
        key = (counts, device)
        if self.expanded[0] != key:
            self.expanded = (key, {})
        return self.expanded[1]


class IdBatch:
    """The ids of the features of one batch group, and the tools to transform them at once.

    ``ids`` is the int64 concatenation of the features' ids (a view, without a copy, when they
    already lie back to back, as the per-key slices of one ``KeyedJaggedTensor`` do). A batched
    transform computes one flat row tensor per slot from ``ids`` and per-id parameters from
    ``constant``, then ``split_slots`` hands each feature its part.
    """

    def __init__(self, ids_per_feature: Sequence[torch.Tensor], cache: BatchCache | None = None) -> None:
        self.per_feature_ids = list(ids_per_feature)
        self.counts = tuple(int(t.numel()) for t in self.per_feature_ids)
        self._cache = cache if cache is not None else BatchCache()
        self._ids: torch.Tensor | None = None

    @property
    def ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = joined(self.per_feature_ids).to(torch.int64)
        return self._ids

    @property
    def device(self) -> torch.device:
        return self.per_feature_ids[0].device

    def _per_id(self) -> dict[Any, torch.Tensor]:
        return self._cache.per_id(self.counts, self.device)

    def feature_index(self) -> torch.Tensor:
        """[N]: position (in the group) of the feature each id belongs to."""
        table = self._per_id()
        index = table.get("feature")
        if index is None:
            features = torch.arange(len(self.counts), device=self.device)
            if len(set(self.counts)) <= 1:
                index = features.repeat_interleave(self.counts[0] if self.counts else 0)
            else:
                counts = torch.tensor(self.counts, dtype=torch.int64, device=self.device)
                index = torch.repeat_interleave(features, counts, output_size=sum(self.counts))
            table["feature"] = index
        return index

    def constant(self, values: Sequence[int]) -> int | torch.Tensor:
        """One integer per feature, as an operand for maths over ``ids``: the plain int when all
        features agree (a scalar operand, nothing to build), else an int64 tensor holding each
        id's feature value. Cached (see ``BatchCache``)."""
        key = tuple(int(v) for v in values)
        if len(set(key)) == 1:
            return key[0]
        table = self._per_id()
        per_id = table.get(key)
        if per_id is None:
            per_id = table[key] = self.per_feature(key)[self.feature_index()]
        return per_id

    def per_feature(self, values: Sequence[int]) -> torch.Tensor:
        """Integers (one per feature, or any short list) as a small int64 tensor on the ids'
        device, built once per distinct values and kept (``BatchCache``): a fused kernel looks
        its feature's value up itself instead of reading a per-id tensor."""
        key = (tuple(int(v) for v in values), self.device)
        small = self._cache.small.get(key)
        if small is None:
            small = self._cache.small[key] = torch.tensor(key[0], dtype=torch.int64, device=self.device)
        return small

    def feature_starts(self) -> torch.Tensor:
        """[F + 1] int64 on the ids' device: where each feature's ids start in ``ids``, then the
        total. Cached for the latest id counts, like the per-id constants."""
        table = self._per_id()
        starts = table.get("starts")
        if starts is None:
            bounds = [0]
            for c in self.counts:
                bounds.append(bounds[-1] + c)
            starts = table["starts"] = torch.tensor(bounds, dtype=torch.int64, device=self.device)
        return starts

    def gather(self, arrays: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """``arrays[f][index]`` for the ids of each feature ``f`` (an in-range ``index`` per id),
        written into one tensor: one gather per feature, because each feature keeps its own
        array (a remap); concatenating them would keep a second copy of every array."""
        out = torch.empty(index.shape, dtype=arrays[0].dtype, device=index.device)
        if any(a.dtype != out.dtype for a in arrays):
            return torch.cat([a[i] for a, i in zip(arrays, torch.split(index, self.counts))])
        for array, part, target in zip(arrays, torch.split(index, self.counts), torch.split(out, self.counts)):
            torch.index_select(array, 0, part, out=target)
        return out

    def split_slots(self, slots: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per feature, its rows in each slot: ``slots`` are flat [N] row tensors, one per slot
        (every layout of the group has the same slots); the parts are views."""
        per_slot = [torch.split(rows, self.counts) for rows in slots]
        return [[parts[f] for parts in per_slot] for f in range(len(self.counts))]


def interleaved(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(parts, dim=1).view(-1)`` of k equally long 1-D tensors (the k values of
    position i side by side: the rows of one id in every slot of a folded layout, see
    ``FeatureLayout.folds_slots``), but a view without a copy when the parts are the columns of
    one row-major [n, k] block, as ``MultiHashLayout.transform_batch`` returns them."""
    if len(parts) == 1:
        return parts[0]
    first, k = parts[0], len(parts)
    n, size = int(first.numel()), first.element_size()
    if n and all(
        p.dim() == 1 and p.dtype == first.dtype and p.device == first.device and p.numel() == n
        and (n == 1 or p.stride(0) == k) and p.data_ptr() == first.data_ptr() + i * size
        for i, p in enumerate(parts)
    ) and (first.storage_offset() + n * k) * size <= first.untyped_storage().nbytes():
        return first.as_strided((n * k,), (1,), first.storage_offset())
    return torch.stack(list(parts), dim=1).view(-1)


def joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` of 1-D tensors, but a view without a copy when the parts lie back to
    back in the memory of the first one's storage (the slices that ``torch.split`` made)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    total = sum(int(p.numel()) for p in parts)
    if total == 0 or any(p.dim() != 1 or p.dtype != first.dtype or p.device != first.device for p in parts):
        return torch.cat(parts)
    size = first.element_size()
    pointer = first.data_ptr()
    for p in parts:
        if p.numel() > 1 and p.stride(0) != 1:
            return torch.cat(parts)
        if p.numel() and p.data_ptr() != pointer:
            return torch.cat(parts)
        pointer += p.numel() * size
    offset = first.storage_offset()
    if (offset + total) * size > first.untyped_storage().nbytes():
        return torch.cat(parts)
    return first.as_strided((total,), (1,), offset)


C = TypeVar("C", bound=MethodConfig)
_LAYOUTS: dict[type[MethodConfig], type[FeatureLayout]] = {}
_KINDS: dict[str, type[MethodConfig]] = {}


def register(config_type: type[C], layout_type: type[FeatureLayout]) -> None:
    """Make ``config_type`` buildable; one layout class per config class, one kind name each."""
    if not config_type.kind:
        raise ValueError(f"{config_type.__name__}.kind must be a non-empty name")
    other = _KINDS.get(config_type.kind)
    if other is not None and other is not config_type:
        raise ValueError(f"method kind {config_type.kind!r} is already registered by {other.__name__}")
    _LAYOUTS[config_type] = layout_type
    _KINDS[config_type.kind] = config_type


def registered() -> dict[str, type[MethodConfig]]:
    _ensure_methods_loaded()
    return dict(_KINDS)


def build_layout(feature: FeatureSpec, dim: int, config: MethodConfig) -> FeatureLayout:
    _ensure_methods_loaded()
    try:
        layout_type = _LAYOUTS[type(config)]
    except KeyError:
        raise TypeError(
            f"no method registered for {type(config).__name__}; known: {sorted(_KINDS)}"
        ) from None
    return layout_type(feature, dim, config)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    _ensure_methods_loaded()
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown method type {kind!r}; known: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"method {kind!r} has no parameter(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _ensure_methods_loaded() -> None:
    # Methods live in tablezip.compress and register themselves on import.
    import tablezip.compress  # noqa: F401
