"""Unpooled per-id vectors of one feature, read straight from its table rows.

Why not ``collection.lookup``: it builds a KeyedJaggedTensor with a bag per id for EVERY
feature (F*N bags, F-1 of them empty) and runs the whole forward, so its cost grows with the
number of features: 0.63 ms for 512 ids of one of 26 Full features, 1.15 ms with Hash, where
the rows themselves take ~20 us. A bag of one id is that id's row(s) in each of the feature's
tables, combined by the method; so the reader applies the method's own ``transform`` and
``combine`` to ``index_select``-ed rows. Three details keep it bit-identical to ``lookup``: TBE sums a bag
into zeros, which turns a stored -0.0 into +0.0 (``+ 0.0`` does the same); an id a pruned
method drops (row -1) leaves its bag empty, i.e. zeros; and methods that pool after combining
(not ``pooled_in_tbe``) are pooled by ``lookup`` into zeros too (a -0.0 from a masked row
becomes +0.0 there, so again ``+ 0.0``).

Nothing here is trusted blindly: ``build_readers`` compares every reader with
``module.lookup`` bit for bit on probe ids (known, boundary, out-of-vocabulary, huge) when a
model loads, and a feature whose reader disagrees, or a model that is not a float32
``CompressedEmbeddingBagCollection`` (e.g. quantized tables), is served by ``module.lookup``.

One-table Full features with sum pooling also read through numpy (``read_numpy``: one
``take`` on a numpy view of the table, checked against ``lookup`` on the same probe ids). In
the server a request arrives at a cold core (idle, or just running the client or grpc), and there
each torch op's dispatch costs several times what it does in a loop: the torch chain took
~115 us of CPU per 512-id request in the server against ~15 us in a loop, the numpy gather ~21 us
(benchmarks/NOTES.md, "Serving").
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from tablezip.compress.full import FullLayout
from tablezip.embeddings import CompressedEmbeddingBagCollection, Pooling

log = logging.getLogger(__name__)

Reader = Callable[[torch.Tensor], torch.Tensor]


class TableRowReader:
    """``ids [N] -> vectors [N, D]`` for one feature of a float32 collection, without TBE."""

    def __init__(self, collection: CompressedEmbeddingBagCollection, name: str) -> None:
        self.layout = collection.layouts[name]
        weights = collection.table_weights()  # views into the TBE: no copy of the tables
        self.tables = [weights[t] for t in collection.feature_tables(name)]
        self.pooling = next(f.pooling for f in collection.features if f.name == name)
        # Served tables never change, so the -0.0 fix is only paid by tables that hold one.
        self.negative_zero = [_has_negative_zero(t) for t in self.tables]
        # One-table Full features (the common case) also get a numpy path: one gather on a
        # numpy view of the table instead of a chain of torch ops (see ``read_numpy``).
        self.numpy_table: np.ndarray | None = None
        self.num_embeddings = next(f.num_embeddings for f in collection.features if f.name == name)
        if type(self.layout) is FullLayout and len(self.tables) == 1 and self.pooling is Pooling.SUM:
            table = self.tables[0].detach()
            if table.dtype == torch.float32 and table.is_contiguous() and table.device.type == "cpu":
                self.numpy_table = table.numpy()

    def read_numpy(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` (int64 numpy) -> [N, D] float32 numpy, the same bits as ``self(ids)``; only
        where ``numpy_table`` is set. Full's OOV rule in one op: viewed as uint64, a negative id
        is >= 2**63, so ``min(id, num_embeddings)`` sends it and every id >= num_embeddings to
        the OOV row."""
        assert self.numpy_table is not None
        rows = np.minimum(ids.view(np.uint64), self.num_embeddings).view(np.int64)
        out = self.numpy_table.take(rows, axis=0)
        if self.negative_zero[0]:
            out += 0.0  # TBE sums into zeros: -0.0 -> +0.0
        return out

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # server threads run with grad off: no context per request
            with torch.no_grad():
                return self._read(ids)
        return self._read(ids)

    def _read(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.layout.transform(ids)
        parts = []
        for table, r, negative_zero in zip(self.tables, rows, self.negative_zero):
            if self.layout.may_drop:
                dropped = (r < 0).unsqueeze(1)
                part = table.index_select(0, r.clamp(min=0)).masked_fill_(dropped, 0.0)
            else:
                part = table.index_select(0, r)
            parts.append(part.add_(0.0) if negative_zero else part)  # TBE sums into zeros: -0.0 -> +0.0
        vectors = self.layout.combine(parts)
        if not self.layout.pooled_in_tbe:
            vectors = vectors + 0.0  # lookup's pooling after combine sums into zeros
        if self.pooling is Pooling.SUM:
            return vectors
        return self.pooling.finish(vectors, torch.ones(ids.numel(), dtype=torch.int64))


def _has_negative_zero(table: torch.Tensor, block_rows: int = 1 << 18) -> bool:
    """Whether any value is -0.0 (bits 0x80000000), scanned in row blocks so the temporary mask
    stays small next to a multi-GB table."""
    with torch.no_grad():
        bits = table.detach().view(torch.int32)
        return any(bool((bits[i : i + block_rows] == -(2**31)).any()) for i in range(0, bits.shape[0], block_rows))


def _probe_ids(num_embeddings: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    edge = [0, 1, num_embeddings - 1, num_embeddings, num_embeddings + 1, num_embeddings + 7, 2**31, 2**40 + 3, 2**62]
    return torch.from_numpy(np.concatenate([np.array(edge, dtype=np.int64), rng.integers(0, num_embeddings, 61)]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def build_readers(module: torch.nn.Module, table_dtype: str) -> dict[str, Reader]:
    """A reader per feature: the table-row fast path where it matches ``module.lookup`` bit for
    bit on probe ids, else ``module.lookup`` itself."""
    fallback = {name: _module_lookup(module, name) for name in module.feature_names}
    if not isinstance(module, CompressedEmbeddingBagCollection) or table_dtype != "float32":
        return fallback
    readers: dict[str, Reader] = {}
    for feature in module.features:
        fast = TableRowReader(module, feature.name)
        probe = _probe_ids(feature.num_embeddings)
        expected = module.lookup(feature.name, probe)
        got = fast(probe)
        if got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(_bits(got), _bits(expected)):
            if fast.numpy_table is not None and not torch.equal(_bits(torch.from_numpy(fast.read_numpy(probe.numpy()))), _bits(expected)):
                log.warning("feature %r: the numpy row reader differs from module.lookup; using the torch one", feature.name)
                fast.numpy_table = None
            readers[feature.name] = fast
        else:
            log.warning("feature %r: the table-row reader differs from module.lookup; serving it through lookup", feature.name)
            readers[feature.name] = fallback[feature.name]
    return readers


def _module_lookup(module: torch.nn.Module, name: str) -> Reader:
    def read(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module.lookup(name, ids)

    return read
