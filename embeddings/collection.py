"""CompressedEmbeddingBagCollection: a drop-in for torchrec's EmbeddingBagCollection."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .features import FeatureSpec, Pooling
from .registry import FeatureLayout, MethodConfig, TableSpec, build_layout
from .tbe import TableOptimizer, build_tbe, init_uniform_


class EmbeddingBagLookup(nn.Module):
    """The lookup machinery every collection shares, whatever its tables are stored in.

    Features, their method layouts, the plan of physical tables into TBE slots, and the forward
    that turns a ``KeyedJaggedTensor`` into pooled vectors through ONE TBE call. Subclasses own
    ``self.tbe``: any fbgemm TBE called as ``tbe(indices, offsets)`` that returns fp32 pooled
    rows [bags, sum of slot dims] (the fp32 training TBE, or the int8/int4/fp16 inference TBE of
    ``QuantizedEmbeddingBagCollection``). Why a base class: the method transforms, dropped ids,
    unpooled slots, combiners and mean pooling must be the same code in training and serving,
    or quantized lookups could drift from the trained model for reasons other than precision.
    """

    features: list[FeatureSpec]
    dim: int
    layouts: nn.ModuleDict
    device: torch.device
    tbe: nn.Module

    def _plan(self, features: Sequence[FeatureSpec], dim: int, layouts: nn.ModuleDict) -> None:
        """Set the features, layouts and the slot plan; ``self.tbe`` is the subclass's to build."""
        self.features = list(features)
        self.dim = dim
        self.layouts = layouts
        self._tables, self._slot_table, self._feature_slots = _plan_tables(list(self.layouts.values()))
        # fbgemm's CPU row-wise Adagrad backward fails ("num of rows processed by adagrad") when
        # the slots reading one table are not adjacent, as with a table shared by features that
        # others sit between; so TBE sees the slots grouped by table (stable: identity without
        # shared tables) and _general permutes rows in and pooled parts back.
        self._tbe_order = sorted(range(len(self._slot_table)), key=self._slot_table.__getitem__)
        self._passthrough = (
            len(self._slot_table) == len(features)
            and self._tbe_order == list(range(len(features)))
            and all(
                l.is_passthrough and self._tables[self._slot_table[i]].dim == dim
                for i, l in enumerate(self.layouts.values())
            )
        )
        self._any_mean = any(f.pooling is Pooling.MEAN for f in features)

    def tbe_feature_table_map(self) -> list[int]:
        """Table read by each TBE slot, in the order TBE sees the slots (see ``_plan``)."""
        return [self._slot_table[s] for s in self._tbe_order]

    # -- introspection -------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def methods(self) -> dict[str, MethodConfig]:
        return {name: layout.config for name, layout in self.layouts.items()}

    def table_specs(self) -> list[TableSpec]:
        """The distinct physical tables (a shared table appears once)."""
        return list(self._tables)

    def feature_tables(self, name: str) -> list[int]:
        """Indices into ``table_specs()`` / ``table_weights()`` of the tables a feature reads, in
        the order its ``transform`` returns row ids."""
        return [self._slot_table[s] for s in self._feature_slots[self.feature_names.index(name)]]

    def full_bytes(self) -> int:
        """Bytes of the uncompressed baseline (Full) for the same features and dim."""
        from tablezip.compress import full_bytes

        return full_bytes(self.features, self.dim)

    # -- forward -------------------------------------------------------------------------
    def _ordered(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        if keys == self.feature_names:
            return kjt
        missing = [n for n in self.feature_names if n not in keys]
        if missing:
            raise KeyError(f"KeyedJaggedTensor lacks feature(s) {missing}; it has {keys}")
        return kjt.permute([keys.index(n) for n in self.feature_names])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.weights_or_none() is not None:
            raise ValueError("weighted KeyedJaggedTensors are not supported yet")
        kjt = self._ordered(features)
        values = kjt.values().to(torch.int64)
        per_feature = torch.split(values, kjt.length_per_key())
        batch = kjt.stride()
        lengths = kjt.lengths().view(len(self.features), batch)
        layouts = list(self.layouts.values())
        if self._passthrough:
            indices = torch.cat([l.transform(v)[0] for l, v in zip(layouts, per_feature)])
            pooled = self.tbe(indices, kjt.offsets().to(torch.int64))
            if self._any_mean:
                pooled = self._finish_mean(pooled.view(batch, len(layouts), self.dim), lengths).view(batch, -1)
        else:
            pooled = self._general(layouts, per_feature, lengths)
        return KeyedTensor(keys=self.feature_names, length_per_key=[self.dim] * len(layouts), values=pooled)

    def _general(self, layouts: list[FeatureLayout], per_feature, lengths: torch.Tensor) -> torch.Tensor:
        """Any mix of methods in one TBE call.

        Pooled slots read B bags. Slots of non-linear layouts read one bag per id (a bag of one
        row is that row), so their ids are looked up unpooled by the same call. TBE needs one bag
        count for all slots, so shorter slots get trailing empty bags.
        """
        batch = lengths.shape[1]
        rows_per_slot: list[torch.Tensor] = []
        lengths_per_slot: list[torch.Tensor] = []
        for layout, ids, feature_lengths in zip(layouts, per_feature, lengths):
            all_rows = layout.transform(ids)
            if layout.pooled_in_tbe and layout.may_drop:
                # One cumsum for all of the feature's slots instead of one per slot.
                keep = torch.stack(all_rows) >= 0
                for rows, kept, kept_lengths in zip(all_rows, keep, _kept_lengths(keep, feature_lengths)):
                    rows_per_slot.append(rows[kept])
                    lengths_per_slot.append(kept_lengths)
                continue
            for rows in all_rows:
                if not layout.pooled_in_tbe:
                    lengths_per_slot.append(torch.ones_like(rows))
                else:
                    lengths_per_slot.append(feature_lengths.to(torch.int64))
                rows_per_slot.append(rows)
        order = self._tbe_order
        bags = max([batch] + [l.numel() for l in lengths_per_slot])
        padded = torch.zeros(len(lengths_per_slot), bags, dtype=torch.int64, device=lengths.device)
        for i, s in enumerate(order):
            padded[i, : lengths_per_slot[s].numel()] = lengths_per_slot[s]
        offsets = torch.zeros(padded.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(padded.view(-1), 0, out=offsets[1:])
        out = self.tbe(torch.cat([rows_per_slot[s] for s in order]), offsets)
        by_tbe_slot = torch.split(out, [self._tables[self._slot_table[s]].dim for s in order], dim=1)
        parts: list[torch.Tensor] = [by_tbe_slot[0]] * len(order)
        for i, s in enumerate(order):
            parts[s] = by_tbe_slot[i]
        # One check for the whole batch (a host sync), only when some feature pools after TBE.
        single_id_bags = not all(l.pooled_in_tbe for l in layouts) and bool((lengths == 1).all())
        vectors = []
        for layout, slots, feature, ids, feature_lengths in zip(layouts, self._feature_slots, self.features, per_feature, lengths):
            if layout.pooled_in_tbe:
                # Slice only when TBE had to pad: even a no-op slice costs a zero-fill and copy in backward.
                vec = layout.combine([parts[s] if bags == batch else parts[s][:batch] for s in slots])
            else:
                per_id = layout.combine([parts[s][: ids.numel()] for s in slots])
                if single_id_bags:  # one id per bag (Criteo): the per-id vectors are the bags
                    vec = per_id
                else:
                    bag_of_id = torch.repeat_interleave(torch.arange(batch, device=ids.device), feature_lengths.to(torch.int64))
                    vec = per_id.new_zeros(batch, per_id.shape[1]).index_add_(0, bag_of_id, per_id)
            vectors.append(feature.pooling.finish(vec, feature_lengths))
        return torch.cat(vectors, dim=1)

    @torch.no_grad()
    def lookup(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Unpooled vectors [N, D] of one feature's ids: each id is a bag of one, so the result
        is exactly what the trained model sees for that id (method combine included)."""
        if name not in self.layouts:
            raise KeyError(f"unknown feature {name!r}; features: {self.feature_names}")
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device).reshape(-1)
        n = ids.numel()
        index = self.feature_names.index(name)
        lengths = torch.zeros(len(self.features), n, dtype=torch.int64, device=self.device)
        lengths[index] = 1
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=ids, lengths=lengths.view(-1))
        pooled = self.forward(kjt).values()
        return pooled[:, index * self.dim : (index + 1) * self.dim]

    def _finish_mean(self, pooled: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = [f.pooling.finish(pooled[:, i], lengths[i]) for i, f in enumerate(self.features)]
        return torch.stack(out, dim=1)


class CompressedEmbeddingBagCollection(EmbeddingBagLookup):
    """Pooled embeddings of many features, each stored by its own compression method.

    ``KeyedJaggedTensor`` in, ``KeyedTensor`` [B, F*D] out, like torchrec's
    ``EmbeddingBagCollection``. The physical tables of all features live in ONE fbgemm TBE,
    trained by its fused optimizer inside backward: keep ``fused_parameters()`` out of the dense
    optimizer.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        dim: int,
        methods: Mapping[str, MethodConfig] | MethodConfig | None = None,
        optimizer: TableOptimizer = TableOptimizer(),
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from tablezip.compress import Full  # registered methods live in compress/

        if not features:
            raise ValueError("features must name at least one FeatureSpec")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if methods is None or isinstance(methods, MethodConfig):
            default = methods or Full()
            methods = {n: default for n in names}
        unknown = set(methods) - set(names)
        if unknown:
            raise ValueError(f"methods name unknown features {sorted(unknown)}; features: {names}")

        self.optimizer_config = optimizer
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        layouts = nn.ModuleDict({f.name: build_layout(f, dim, methods.get(f.name, Full())) for f in features})
        self._plan(features, dim, layouts)
        self.tbe = build_tbe(self._tables, self.tbe_feature_table_map(), optimizer, self.device)
        generator = torch.Generator().manual_seed(seed)
        init_uniform_(self.tbe, generator)
        weights = self.table_weights()
        for name, layout in self.layouts.items():
            layout.init_tables([weights[t] for t in self.feature_tables(name)], generator)
        self.layouts.to(self.device)

    # -- introspection -------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """Precision of the stored tables as artifacts name it; the quantized twin says
        "float16", "int8" or "int4" (see embeddings/quantized.py)."""
        return "float32"

    def table_weights(self) -> list[torch.Tensor]:
        """Views of the physical tables inside the TBE (writing to them changes the model)."""
        return list(self.tbe.split_embedding_weights())

    def fused_parameters(self) -> list[nn.Parameter]:
        """Parameters the TBE updates itself; a dense optimizer must not see them."""
        return list(self.tbe.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.layouts.parameters())

    def memory_bytes(self) -> int:
        """Bytes the trained collection stores for inference: every table row plus what each
        method keeps outside TBE. Optimizer state is training-only and not counted."""
        return sum(t.bytes for t in self._tables) + sum(l.extra_bytes() for l in self.layouts.values())

    # -- artifacts -----------------------------------------------------------------------
    def export(self, directory: str | Path, dtype: str = "float32") -> Path:
        """Write ``tables.safetensors`` + ``manifest.json`` (see embeddings/artifact.py).

        ``dtype`` "float32" writes the trainable artifact (``load`` rebuilds this collection);
        "float16", "int8" or "int4" writes row-wise quantized tables for serving, which
        ``load_inference`` turns into a ``QuantizedEmbeddingBagCollection``."""
        from .artifact import export_collection

        if dtype == "float32":
            return export_collection(self, directory)
        from .quantized import quantize

        return quantize(self, dtype).export(directory)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: torch.device | str | None = None,
        optimizer: TableOptimizer | None = None,
    ) -> "CompressedEmbeddingBagCollection":
        """Rebuild a collection from an exported artifact, verifying every checksum."""
        from .artifact import load_collection

        return load_collection(directory, device=device, optimizer=optimizer)


def _plan_tables(layouts: list[FeatureLayout]) -> tuple[list[TableSpec], list[int], list[list[int]]]:
    """Distinct tables, the table each TBE slot reads, and each feature's slots."""
    tables: list[TableSpec] = []
    shared: dict[str, int] = {}
    slot_table: list[int] = []
    feature_slots: list[list[int]] = []
    for layout in layouts:
        slots = []
        for spec in layout.tables():
            if spec.shared is not None and spec.shared in shared:
                index = shared[spec.shared]
                if tables[index] != spec:
                    raise ValueError(
                        f"feature {layout.feature.name!r} declares shared table {spec.shared!r} as "
                        f"{spec.rows}x{spec.dim}, another feature as {tables[index].rows}x{tables[index].dim}"
                    )
            else:
                index = len(tables)
                tables.append(spec)
                if spec.shared is not None:
                    shared[spec.shared] = index
            slots.append(len(slot_table))
            slot_table.append(index)
        feature_slots.append(slots)
    return tables, slot_table, feature_slots


def _kept_lengths(keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[S, B] bag lengths of S slots that read one feature's bags, once the ids without a row
    (``keep`` False, [S, N]) are removed."""
    kept_before = torch.zeros(keep.shape[0], keep.shape[1] + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep.to(torch.int64), 1, out=kept_before[:, 1:])
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(lengths.to(torch.int64), 0, out=offsets[1:])
    return kept_before[:, offsets[1:]] - kept_before[:, offsets[:-1]]
