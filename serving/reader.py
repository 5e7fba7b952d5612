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

One-table Full features also read through numpy (``read_numpy``: one ``take`` on a numpy view
of the table, checked against ``lookup`` on the same probe ids). In the server a request arrives
at a cold core (idle, or just running the client or grpc), and there each torch op's dispatch
costs several times what it does in a loop: the torch chain took ~115 us of CPU per 512-id
request in the server against ~15 us in a loop, the numpy gather ~21 us (benchmarks/NOTES.md,
"Serving"). ``NumpyBagPooler`` does the same for LookupBags over such features: one ``take``
over all requested features and one ``np.add.reduceat`` instead of the model's whole forward,
checked bit for bit against that forward on probe bags when the model loads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress.full import FullLayout
from tablezip.embeddings import CompressedEmbeddingBagCollection, Pooling

from .validation import BagLayout

log = logging.getLogger(__name__)

Reader = Callable[[torch.Tensor], torch.Tensor]


class TableRowReader:
    """``ids [N] -> vectors [N, D]`` for one feature of a float32 collection, without TBE."""

    def __init__(self, collection: CompressedEmbeddingBagCollection, name: str) -> None:
        self.layout = collection.layouts[name]
        weights = collection.table_weights()  # views into the TBE: no copy of the tables
        self.tables = [weights[t] for t in collection.feature_tables(name)]
        self.pooling = next(f.pooling for f in collection.features if f.name == name)
        # Served tables never change, so the "+ 0.0" fix is only paid by tables that need it.
        self.zero_add = [_needs_zero_add(t) for t in self.tables]
        # One-table Full features (the common case) also get a numpy path: one gather on a
        # numpy view of the table instead of a chain of torch ops (see ``read_numpy``).
        self.numpy_table: np.ndarray | None = None
        self.num_embeddings = next(f.num_embeddings for f in collection.features if f.name == name)
        # Mean pooling of a bag of one id divides by 1, which changes no bits.
        if type(self.layout) is FullLayout and len(self.tables) == 1:
            table = self.tables[0].detach()
            if table.dtype == torch.float32 and table.is_contiguous() and table.device.type == "cpu":
                self.numpy_table = table.numpy()
        # ``take(mode="clip")`` sends every id >= the last row to the last row: Full's OOV rule
        # exactly when that row is the OOV row (row num_embeddings) and ids are not negative.
        self.clip_is_oov = self.numpy_table is not None and self.numpy_table.shape[0] == self.num_embeddings + 1

    def read_numpy(self, ids: np.ndarray, nonnegative: bool = False) -> np.ndarray:
        """``ids`` (int64 numpy) -> [N, D] float32 numpy, the same bits as ``self(ids)``; only
        where ``numpy_table`` is set. Full's OOV rule in one op: viewed as uint64, a negative id
        is >= 2**63, so ``min(id, num_embeddings)`` sends it and every id >= num_embeddings to
        the OOV row. With ``nonnegative`` (the caller has refused negative ids) and the OOV row
        last in the table (Full's layout), the rule is ``take(mode="clip")`` itself: one numpy
        call instead of three."""
        assert self.numpy_table is not None
        if nonnegative and self.clip_is_oov:
            out = self.numpy_table.take(ids, axis=0, mode="clip")
        else:
            rows = np.minimum(ids.view(np.uint64), self.num_embeddings).view(np.int64)
            out = self.numpy_table.take(rows, axis=0)
        if self.zero_add[0]:
            with np.errstate(invalid="ignore"):  # a signaling NaN raises "invalid": expected here
                out += 0.0  # TBE sums into zeros: -0.0 -> +0.0, signaling NaN -> quiet
        return out

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # server threads run with grad off: no context per request
            with torch.no_grad():
                return self._read(ids)
        return self._read(ids)

    def _read(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.layout.transform(ids)
        parts = []
        for table, r, zero_add in zip(self.tables, rows, self.zero_add):
            if self.layout.may_drop:
                dropped = (r < 0).unsqueeze(1)
                part = table.index_select(0, r.clamp(min=0)).masked_fill_(dropped, 0.0)
            else:
                part = table.index_select(0, r)
            parts.append(part.add_(0.0) if zero_add else part)  # TBE sums into zeros (see _needs_zero_add)
        vectors = self.layout.combine(parts)
        if not self.layout.pooled_in_tbe:
            vectors = vectors + 0.0  # lookup's pooling after combine sums into zeros
        if self.pooling is Pooling.SUM:
            return vectors
        return self.pooling.finish(vectors, torch.ones(ids.numel(), dtype=torch.int64))


class NumpyBagPooler:
    """Pooled bags ``[B, F_req, D]`` of features read by ``TableRowReader.read_numpy``, in numpy.

    Why: LookupBags through ``module(kjt)`` builds a KeyedJaggedTensor, transforms every
    feature's ids and calls TBE for all features, requested or not: dozens of torch ops per
    request, each costing several times its loop cost on a cold core, and the handler holds the
    GIL for most of it, so concurrent requests queue (benchmarks/NOTES.md, "Serving"). For Full
    features the same answer is a row gather and a per-bag sum. TBE sums a bag as ``0.0 + r0 +
    r1 + ...`` in float32, in id order; ``_bag_sums`` adds in that same order, so the bits
    agree; a bag of one id is its row (plus ``+ 0.0`` for tables where that changes bits, see
    ``_needs_zero_add``). Mean pooling divides by ``max(length, 1)`` in float32 as
    ``Pooling.finish`` does. ``build_bag_pooler`` checks all of this bit for bit against the
    model's forward on probe bags before the server uses it.

    All features' tables are views into TBE's one weight buffer, so one [R, D] numpy view over
    that buffer serves every covered feature with a single ``take`` (``row_start`` places each
    feature's rows in it)."""

    def __init__(self, table: np.ndarray, covered: np.ndarray, row_start: np.ndarray, num_embeddings: np.ndarray,
                 mean: np.ndarray, zero_add: np.ndarray) -> None:
        self.table = table  # [R, D] float32 view of the TBE weights
        self.covered = covered  # [F_model] bool: the feature can be pooled here
        self.row_start = row_start  # [F_model] int64: the feature's row 0 in ``table``
        self.limit = num_embeddings.astype(np.uint64)  # [F_model]: the feature's OOV row, relative
        self.mean = mean  # [F_model] bool
        self.zero_add = zero_add  # [F_model] bool
        self._plans: dict[tuple[int, ...], _Plan] = {}

    def covers(self, positions: Sequence[int]) -> bool:
        return self._plan(positions).covered

    def _plan(self, positions: Sequence[int]) -> "_Plan":
        """Per-feature constants of a request's features, computed once per feature list: clients
        repeat the same list, and each numpy call saved is several microseconds on a cold core."""
        key = tuple(positions)
        plan = self._plans.get(key)
        if plan is None:
            pos = np.asarray(key, dtype=np.int64)
            plan = _Plan(self.limit[pos], self.row_start[pos], bool(self.zero_add[pos].any()),
                         [int(i) for i in np.flatnonzero(self.mean[pos])], bool(self.covered[pos].all()))  # fmt: skip
            if len(self._plans) >= 1024:  # bounded: feature lists come from clients
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def pool(self, positions: Sequence[int], lengths: np.ndarray, ids: np.ndarray, layout: BagLayout | None = None) -> np.ndarray:
        """``lengths`` [F_req, B] (bag sizes of the model features ``positions``), ``ids`` their
        ids feature-major (validated: none negative) -> [B, F_req, D] float32. ``layout``: the
        request's cached shape (its ``lengths`` are ``lengths``), whose per-shape work is kept on it."""
        unit = None if layout is None else self._unit_layout(positions, layout)
        if unit is not None and not unit.float_ops:
            return unit.pool(self.table, ids)  # integer work, a gather and zeros: no float errors
        # Overflow to inf, inf - inf and signaling NaNs are answered as TBE answers them, silently.
        with np.errstate(all="ignore"):
            if unit is not None:
                return unit.pool(self.table, ids)
            return self._pool(positions, lengths, ids)

    def _unit_layout(self, positions: Sequence[int], layout: BagLayout) -> "_UnitLayout | None":
        """The per-shape constants of a layout of bags of at most one id (None for longer bags),
        made once and kept on the layout (tagged with this pooler)."""
        kept = layout.pool_plan
        if kept is not None and kept[0] is self:
            return kept[1]
        unit = _UnitLayout.build(self._plan(positions), layout.lengths) if layout.lengths.size else None
        layout.pool_plan = (self, unit)
        return unit

    def _pool(self, positions: Sequence[int], lengths: np.ndarray, ids: np.ndarray) -> np.ndarray:
        num, batch = lengths.shape
        dim = self.table.shape[1]
        if lengths.size == 0:
            return np.zeros((batch, num, dim), dtype=np.float32)
        plan = self._plan(positions)
        unit = _UnitLayout.build(plan, lengths)
        if unit is not None:  # bags of at most one id (Criteo's layout): see _UnitLayout
            return unit.pool(self.table, ids)
        # Each feature's ids are one run: repeat its constants over the run.
        flat = lengths.reshape(-1)
        counts = lengths.sum(axis=1, dtype=np.int64)
        rows = np.minimum(ids.view(np.uint64), np.repeat(plan.limit, counts)).view(np.int64)  # as in read_numpy
        rows += np.repeat(plan.row_start, counts)
        out = _bag_sums(self.table, rows, flat).reshape(num, batch, dim).transpose(1, 0, 2)
        for i in plan.mean:
            out[:, i] /= np.maximum(lengths[i], 1).astype(np.float32)[:, None]
        return out


@dataclass(frozen=True)
class _UnitLayout:
    """A request shape whose bags hold at most one id, with what every request of that shape
    shares: each answer slot's id index (``gather``; empty slots read id 0 and are zeroed after
    the gather), its feature's OOV limit and first row, flattened to [B*F] in answer order. With no
    empty bag the [F, B] ids viewed as [B, F] give the rows in answer order by broadcasting the
    per-feature constants, and one ``take`` returns [B, F, D] (no transposing copy). Built once per
    cached layout (``LayoutCache``), or per request where there is none (``NumpyBagPooler._pool``).

    Why: per request this leaves a gather of the ids, ``minimum``, ``+=``, the row ``take`` and
    the zeroing of the empty slots (4-5 numpy calls), where ``NumpyBagPooler._pool`` derives the
    empty bags' places and the slot order again (9-10 calls; each costs several times its loop
    time on a cold core in the server). Same rows as TBE reads: the pooler's load check and the
    tests compare the bits with the model's forward."""

    batch: int
    num: int
    gather: np.ndarray | None  # [B*F] ids index of each answer slot; None: no empty bag ([F, B] ids transposed)
    limit: np.ndarray  # uint64, [F] (broadcast over [B, F]) or [B*F]
    start: np.ndarray  # int64, as limit
    empty: np.ndarray | None  # answer slots (b * F + f) of the empty bags
    zero_add: bool
    mean: list[int]
    mean_scale: list[np.ndarray]  # [B, 1] float32 max(length, 1) of each mean-pooled feature

    @property
    def float_ops(self) -> bool:
        """Whether pooling does float arithmetic (which needs numpy's float errors silenced)."""
        return self.zero_add or bool(self.mean)

    @staticmethod
    def build(plan: "_Plan", lengths: np.ndarray) -> "_UnitLayout | None":
        num, batch = lengths.shape
        if lengths.max() > 1:
            return None
        scales = [np.maximum(lengths[i], 1).astype(np.float32)[:, None] for i in plan.mean]
        if lengths.min() == 1:
            return _UnitLayout(batch, num, None, plan.limit, plan.row_start, None, plan.zero_add, plan.mean, scales)
        has = lengths.T.reshape(-1) == 1  # answer order
        id_index = np.cumsum(lengths.reshape(-1), dtype=np.int64) - 1  # feature-major: each bag's id, if any
        gather = np.zeros(num * batch, dtype=np.int64)
        gather[has] = id_index.reshape(num, batch).T.reshape(-1)[has]
        limit = np.broadcast_to(plan.limit, (batch, num)).reshape(-1)
        start = np.broadcast_to(plan.row_start, (batch, num)).reshape(-1)
        return _UnitLayout(batch, num, gather, limit, start, np.flatnonzero(~has), plan.zero_add, plan.mean, scales)

    def pool(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        dim = table.shape[1]
        if self.gather is None:
            rows = np.minimum(ids.view(np.uint64).reshape(self.num, self.batch).T, self.limit).view(np.int64)
            rows += self.start
            out = table.take(rows, axis=0)
        elif ids.size == 0:
            out = np.zeros((self.batch, self.num, dim), dtype=np.float32)
        else:
            slots = ids.view(np.uint64).take(self.gather)
            np.minimum(slots, self.limit, out=slots)  # Full's OOV rule, as read_numpy
            rows = slots.view(np.int64)
            rows += self.start
            flat = table.take(rows, axis=0)
            flat[self.empty] = 0.0
            out = flat.reshape(self.batch, self.num, dim)
        if self.zero_add:
            out += 0.0  # TBE's 0.0 + row
        for i, scale in zip(self.mean, self.mean_scale):
            out[:, i] /= scale
        return out


@dataclass(frozen=True)
class _Plan:
    """``NumpyBagPooler``'s constants for one list of requested features, in request order."""

    limit: np.ndarray  # uint64 OOV row of each feature, relative to its first row
    row_start: np.ndarray  # int64 first row of each feature in the pooler's table view
    zero_add: bool  # some feature's table needs TBE's "0.0 + row" (see _needs_zero_add)
    mean: list[int]  # request indices of the mean-pooled features
    covered: bool  # every requested feature can be pooled here


def _bag_sums(table: np.ndarray, rows: np.ndarray, lengths: np.ndarray, max_steps: int = 64) -> np.ndarray:
    """[bags, D] sums of ``table[rows]`` over consecutive bags of ``lengths``, in TBE's order:
    ``0.0 + r0 + r1 + ...`` in float32 (not ``np.add.reduceat``, which adds pairwise and so
    rounds differently from the third row on).

    Bags padded to the longest one (padding rows zeroed) and summed one position at a time:
    ``longest`` vector adds, each exact elementwise float32; used while the padding costs at
    most ~4x the real rows. Otherwise ``np.add.at``, which adds row after row in id order."""
    bags, count, dim = lengths.size, rows.size, table.shape[1]
    out = np.zeros((bags, dim), dtype=np.float32)
    if count == 0:
        return out
    longest = int(lengths.max())
    if longest <= max_steps and bags * longest <= 4 * count + 64:
        starts = np.cumsum(lengths, dtype=np.int64) - lengths
        step = np.arange(longest)
        padded = table.take(rows[np.minimum(starts[:, None] + step, count - 1)], axis=0)  # [bags, longest, D]
        # Padding adds +0.0, which changes no partial sum: one that starts at 0.0 is never -0.0
        # or a signaling NaN, the only values + 0.0 changes.
        padded[step >= lengths[:, None]] = 0.0
        for j in range(longest):
            out += padded[:, j]
        return out
    np.add.at(out, np.repeat(np.arange(bags), lengths), table.take(rows, axis=0))
    return out


def _one_view(tables: Sequence[torch.Tensor]) -> tuple[np.ndarray, list[int]] | None:
    """A numpy [R, D] view spanning ``tables`` and each one's first row in it, when they are
    row-major [*, D] float32 views into one CPU storage at offsets that are whole rows (TBE keeps
    every table in one buffer); else None."""
    first = tables[0].detach()
    dim = first.shape[1]
    ptr = first.untyped_storage().data_ptr()
    for t in tables:
        if (t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.shape[1] != dim
                or t.stride() != (dim, 1) or t.storage_offset() % dim or t.untyped_storage().data_ptr() != ptr):
            return None
    low = min(t.storage_offset() for t in tables)
    high = max(t.storage_offset() + t.numel() for t in tables)
    view = torch.as_strided(first, ((high - low) // dim, dim), (dim, 1), low)
    return view.numpy(), [(t.storage_offset() - low) // dim for t in tables]


def build_bag_pooler(module: torch.nn.Module, readers: Mapping[str, Reader]) -> NumpyBagPooler | None:
    """The numpy pooler for the features with a numpy row reader, if any, and only if it gives the
    bits of ``module(kjt)`` on probe bags (every covered feature, the bag shapes of ``_PROBE_BAGS``,
    known, OOV and huge ids); else None, and LookupBags runs the model's forward."""
    names = list(module.feature_names)
    covered_readers = {n: r for n, r in readers.items() if isinstance(r, TableRowReader) and r.numpy_table is not None}
    if not covered_readers:
        return None
    index = {n: i for i, n in enumerate(names)}
    positions = sorted(index[n] for n in covered_readers)
    view = _one_view([covered_readers[names[p]].tables[0] for p in positions])
    if view is None:
        log.info("the numpy bag pooler needs the tables in one buffer; LookupBags runs the model's forward")
        return None
    table, starts = view
    num = len(names)
    row_start, limit = np.zeros(num, np.int64), np.zeros(num, np.int64)
    covered, mean, zero_add = np.zeros(num, bool), np.zeros(num, bool), np.zeros(num, bool)
    for p, start in zip(positions, starts):
        reader = covered_readers[names[p]]
        covered[p], row_start[p], limit[p] = True, start, reader.num_embeddings
        mean[p], zero_add[p] = reader.pooling is Pooling.MEAN, reader.zero_add[0]
    pooler = NumpyBagPooler(table, covered, row_start, limit, mean, zero_add)
    sizes = [covered_readers[names[p]].num_embeddings for p in positions]
    for pattern in _PROBE_BAGS:
        lengths, values = _probe_bags(sizes, pattern)
        full_lengths = np.zeros((num, lengths.shape[1]), dtype=np.int64)
        full_lengths[positions] = lengths
        kjt = KeyedJaggedTensor(keys=names, values=torch.from_numpy(values), lengths=torch.from_numpy(full_lengths.reshape(-1)))
        with torch.no_grad():
            expected = module(kjt).values().view(lengths.shape[1], num, -1)[:, positions]
        got = torch.from_numpy(np.ascontiguousarray(pooler.pool(positions, lengths, values)))
        if got.shape != expected.shape or not torch.equal(_bits(got), _bits(expected.contiguous())):
            log.warning("the numpy bag pooler differs from the model's forward (bags %s); LookupBags runs the forward", pattern)
            return None
    return pooler


# Bag lengths that reach each way NumpyBagPooler sums: at most one id per bag, short bags
# (padded, up to 40 ids: the summation order), and one long bag among empty ones (np.add.at).
_PROBE_BAGS = ((0, 1, 1, 0, 1, 1, 1, 0), (0, 1, 2, 3, 40, 1, 0, 5), (0, 1, 0, 0, 0, 0, 0, 100))


def _probe_bags(sizes: Sequence[int], pattern: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[F, len(pattern)] bag lengths (``pattern`` rotated per feature) and feature-major ids for
    features of id-space ``sizes``, among them boundary, OOV and huge ids."""
    rng = np.random.default_rng(1)
    lengths = np.stack([np.roll(np.asarray(pattern, dtype=np.int64), f) for f in range(len(sizes))])
    values = []
    for f, size in enumerate(sizes):
        count = int(lengths[f].sum())
        ids = rng.integers(0, size, count)
        edge = np.array([0, size - 1, size, size + 1, 2**40 + 3, 2**62], dtype=np.int64)
        ids[rng.choice(count, min(count, edge.size), replace=False)] = edge[: min(count, edge.size)]
        values.append(ids)
    return lengths, np.concatenate(values).astype(np.int64)


def _needs_zero_add(table: torch.Tensor, block_rows: int = 1 << 18) -> bool:
    """Whether a copied row can differ from TBE's ``0.0 + row``: the table holds a -0.0 (bits
    0x80000000; TBE gives +0.0) or a NaN (TBE quiets a signaling NaN). Scanned in row blocks so
    the temporary masks stay small next to a multi-GB table."""
    with torch.no_grad():
        values = table.detach()
        bits = values.view(torch.int32)
        return any(
            bool((bits[i : i + block_rows] == -(2**31)).any()) or bool(torch.isnan(values[i : i + block_rows]).any())
            for i in range(0, bits.shape[0], block_rows)
        )


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
            if fast.numpy_table is not None and not all(
                torch.equal(_bits(torch.from_numpy(fast.read_numpy(probe.numpy(), nonnegative=clip))), _bits(expected))
                for clip in (False, True)  # the probe ids are non-negative: both OOV rules apply
            ):
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
