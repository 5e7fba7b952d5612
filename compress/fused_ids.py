"""Fused GPU id transforms: Hash, Hybrid and Pruned rows in one Triton kernel per batch group.

Why: the torch path of a batched transform is a chain of elementwise int64 ops over all ids of a
group (splitmix64 alone is ~14; Hybrid adds a hot test, an add and a select; Pruned an OOV map and
a select). On a GPU each op is a kernel launch and a full pass over memory (1.7M ids: ~27 MB read
and written per op). One kernel reads each id once, does all of the maths in registers and writes
each row once.

Exactness: the kernel computes exactly the torch path's rows (int64, ``torch.equal``; tested).
splitmix64 runs on uint64 (wrapping multiplies, logical shifts), which is what the torch path's
wrapping int64 maths with masked arithmetic shifts computes. The per-feature values (rows, seeds,
hot counts, ...) come from a small [4, F] table indexed by the feature of each id, which the
kernel finds from the features' start offsets, so no per-id constant tensor is built or read.

When: for ids on CUDA with Triton importable (``mode("auto")``); on a CPU in "auto" the same
maths runs in C (``tz_rows`` in embeddings/native.c, one pass over the ids; ``NATIVE_CPU``), where
the compiled kernels could be built. The torch path stays the reference and the fallback. ``mode("off")`` forces the torch path (A/B benchmarks);
``mode("on")`` uses the kernel on any device, which on a CPU needs Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first kernel is built): that is how the CPU tests check
the kernel against the torch path. Importing this module never imports Triton: the kernels are
built on first use.

``zero_weight_drops`` is the one-pass form of the sync-free drop of ids without a row (-1 rows,
``FeatureLayout.may_drop``): rows clamped to 0 and a per-sample weight of 0 or 1.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from tablezip.compress.kernel_switch import MODES, KernelSwitch, triton_available  # noqa: F401

from tablezip.embeddings.registry import IdBatch

HASH, HYBRID, PRUNED = 0, 1, 2
_BLOCK = 1024


_switch = KernelSwitch()
mode = _switch.mode
# True: on a CPU in mode "auto", ``rows`` runs the C pass (embeddings/native.c ``tz_rows``) instead
# of the torch ops: ~10 passes over every id (splitmix64 alone is 7) become one. False: the torch
# path (the "before" in benchmarks/NOTES.md). "on" on a CPU still runs the Triton kernel (under the
# interpreter: how the CPU tests check it), "off" the torch path.
NATIVE_CPU = True


def current_mode() -> str:
    return _switch.value


def enabled_for(ids: torch.Tensor) -> bool:
    """Whether the fused kernels run for ``ids`` under the current ``mode``."""
    return _switch.wants_kernel(ids)


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any]:
    """Build the two Triton kernels (once per process; ``TRITON_INTERPRET`` is read here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_kernel(
        ids_ptr, out_ptr, n, starts_ptr, num_features, consts_ptr, remap_ptr, remap_offsets_ptr,
        MODE: tl.constexpr, REMAP: tl.constexpr, DEFAULT: tl.constexpr,
        MIX1: tl.constexpr, MIX2: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # int64 positions: a group may hold more than 2**31 ids.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        ids = tl.load(ids_ptr + offs, mask=inside, other=0)
        # The feature of each id: how many feature starts (after the first) lie at or before it.
        # F - 1 scalar loads and compares per block; with one feature (or shared values) none.
        # tl.full, not tl.zeros: tl.zeros is a @jit library function, which the CPU interpreter
        # only runs when Triton itself was imported with TRITON_INTERPRET set (tests).
        feature = tl.full([BLOCK], 0, tl.int32)
        for f in range(1, num_features):
            feature += (offs >= tl.load(starts_ptr + f)).to(tl.int32)
        # Per-feature values, a [4, F] table: HASH (rows, mixed seed, -, -), HYBRID (cold rows,
        # mixed seed, hot, remap size), PRUNED (-, -, keep, num_embeddings).
        a = tl.load(consts_ptr + feature)
        b = tl.load(consts_ptr + num_features + feature)
        c = tl.load(consts_ptr + 2 * num_features + feature)
        d = tl.load(consts_ptr + 3 * num_features + feature)
        if MODE == 2:  # PRUNED: OOV map to [0, n], then the remap or the kept prefix
            oov = tl.where((ids >= 0) & (ids < d), ids, d)
            if REMAP:
                remap_at = tl.load(remap_offsets_ptr + feature)
                rows = tl.load(remap_ptr + remap_at + oov, mask=inside, other=-1).to(tl.int64)
                if DEFAULT:
                    rows = tl.where(rows < 0, c, rows)
            else:
                if DEFAULT:
                    rows = tl.where(oov < c, oov, c)
                else:
                    rows = tl.where(oov < c, oov, -1)
        else:
            # splitmix64's finaliser of id ^ mixed seed on uint64: wrapping multiplies and
            # logical shifts (hashing.hash_rows does the same on int64 with masked shifts).
            z = (ids ^ b).to(tl.uint64, bitcast=True)
            z = (z ^ (z >> 30)) * MIX1
            z = (z ^ (z >> 27)) * MIX2
            z = z ^ (z >> 31)
            # The top 63 bits modulo the row count: both non-negative, so unsigned = torch's %.
            hashed = ((z >> 1) % a.to(tl.uint64, bitcast=True)).to(tl.int64, bitcast=True)
            if MODE == 0:  # HASH
                rows = hashed
            else:  # HYBRID: hot ids read their exact row, the others hot + hash
                cold = hashed + c
                if REMAP:
                    known = (ids >= 0) & (ids < d)
                    remap_at = tl.load(remap_offsets_ptr + feature)
                    hot_rows = tl.load(remap_ptr + remap_at + ids, mask=inside & known, other=-1).to(tl.int64)
                    rows = tl.where(hot_rows >= 0, hot_rows, cold)
                else:
                    rows = tl.where((ids >= 0) & (ids < c), ids, cold)
        tl.store(out_ptr + offs, rows, mask=inside)

    @triton.jit
    def drops_kernel(rows_ptr, out_rows_ptr, weights_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        rows = tl.load(rows_ptr + offs, mask=inside, other=0)
        kept = rows >= 0
        tl.store(out_rows_ptr + offs, tl.where(kept, rows, 0), mask=inside)
        tl.store(weights_ptr + offs, kept.to(tl.float32), mask=inside)

    return rows_kernel, drops_kernel


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // _BLOCK)),)


def rows(
    batch: IdBatch,
    method: int,
    a: Sequence[int] | None = None,
    b: Sequence[int] | None = None,
    c: Sequence[int] | None = None,
    d: Sequence[int] | None = None,
    remaps: Sequence[torch.Tensor] | None = None,
    default: bool = False,
    mix: tuple[int, int] = (0, 0),
) -> torch.Tensor | None:
    """The group's rows (int64 [N]) from one kernel, or None where the torch path must run
    (not enabled for these ids, or remaps the kernel cannot read: not int32, not contiguous, on
    another device). ``a``..``d`` are the per-feature values of ``method`` (see the kernel);
    ``mix`` is splitmix64's two multipliers as unsigned ints (hashing's constants)."""
    if _native_wanted(batch):
        return _c_rows(batch, method, (a, b, c, d), remaps, default, mix)
    ids = batch.ids
    if not enabled_for(ids) or ids.dim() != 1:
        return None
    count = len(batch.counts)
    values = [list(v) if v is not None else [0] * count for v in (a, b, c, d)]
    device = ids.device
    out = torch.empty(ids.shape, dtype=torch.int64, device=device)
    n = ids.numel()
    if n == 0:
        return out
    if not ids.is_contiguous():
        ids = ids.contiguous()
    if remaps is not None:
        if any(r.dtype != torch.int32 or r.device != device or not r.is_contiguous() for r in remaps):
            return None
        base = remaps[0]
        # Each remap as an element offset from the first one's address: one pointer argument
        # for any number of arrays, none of them copied (see NOTES, "one concatenated remap").
        offsets = batch.per_feature([(r.data_ptr() - base.data_ptr()) // 4 for r in remaps])
        features = count
    else:
        base = out  # unused by the kernel without REMAP
        offsets = None
        # Shared values: one column and no feature search in the kernel.
        features = 1 if all(len(set(v)) == 1 for v in values) else count
    consts = batch.per_feature([x for v in values for x in v[:features]])
    starts = batch.feature_starts() if features > 1 else consts
    rows_kernel, _ = _kernels()
    rows_kernel[_grid(n)](
        ids, out, n, starts, features, consts, base, offsets if offsets is not None else consts,
        MODE=method, REMAP=remaps is not None, DEFAULT=default, MIX1=mix[0], MIX2=mix[1], BLOCK=_BLOCK,
    )  # fmt: skip
    return out


def _native_wanted(batch: IdBatch) -> bool:
    """Whether ``rows`` takes the C pass: switched on, mode "auto", 1-D int64 ids on a CPU, and the
    compiled kernels available. Reads the features' own id tensors: ``batch.ids`` would join them
    (a copy) where the C pass reads them in place."""
    if not NATIVE_CPU or _switch.value != "auto" or batch.device.type != "cpu":
        return False
    if any(t.dtype != torch.int64 or t.dim() != 1 for t in batch.per_feature_ids):
        return False
    from tablezip.embeddings import native

    return native.library() is not None


def _id_pointers(batch: IdBatch) -> tuple[Any, Any, Any]:
    """(a C array of each feature's first id, a C array of the counts, what keeps the memory
    alive): the features' own tensors where each is contiguous (no join), else pointers into
    ``batch.ids``."""
    import ctypes

    parts = batch.per_feature_ids
    counts = batch.counts
    size = max(1, len(parts))
    count_array = (ctypes.c_int64 * size)(*counts)
    if all(n <= 1 or t.stride(0) == 1 for t, n in zip(parts, counts)):
        return (ctypes.c_void_p * size)(*[t.data_ptr() for t in parts]), count_array, parts
    ids = batch.ids.contiguous()
    starts, at = [], ids.data_ptr()
    for n in counts:
        starts.append(at)
        at += 8 * n
    return (ctypes.c_void_p * size)(*starts), count_array, ids


# The C pass's per-group arguments (constant table, its width, remap base address and offsets),
# keyed by everything they are built from (the remaps by address), so a step does not rebuild them:
# at B=512 that Python work (~0.1 ms for 24 MixedDim features) cost more than the pass itself.
_PREPARED: dict[tuple, tuple[torch.Tensor, int, int | None, torch.Tensor | None]] = {}
_PREPARED_MAX = 256  # distinct groups kept (cleared when full: a cache, rebuilt on the next call)


def _prepared(
    method: int, count: int, values: tuple, remaps: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, int, int | None, torch.Tensor | None] | None:
    key = (method, count, values, None if remaps is None else tuple(r.data_ptr() for r in remaps))
    hit = _PREPARED.get(key)
    if hit is not None:
        return hit
    base = offsets = None
    if remaps is not None:
        if any(r.dtype != torch.int32 or r.device.type != "cpu" or not r.is_contiguous() for r in remaps):
            return None
        base = remaps[0].data_ptr()
        offsets = torch.tensor([(r.data_ptr() - base) // 4 for r in remaps], dtype=torch.int64)
    columns = [list(v) if v is not None else [0] * count for v in values]
    if method != PRUNED and any(rows <= 0 for rows in columns[0]):
        return None  # a modulo by 0 would kill the process in C; torch raises a clear error instead
    width = 1 if all(len(set(v)) == 1 for v in columns) else count
    consts = torch.tensor([x for v in columns for x in v[:width]], dtype=torch.int64)
    if len(_PREPARED) >= _PREPARED_MAX:
        _PREPARED.clear()
    _PREPARED[key] = (consts, width, base, offsets)
    return _PREPARED[key]


def native_rows(
    batch: IdBatch,
    method: int,
    a: Sequence[int] | None = None,
    b: Sequence[int] | None = None,
    c: Sequence[int] | None = None,
    d: Sequence[int] | None = None,
    remaps: Sequence[torch.Tensor] | None = None,
    default: bool = False,
    mix: tuple[int, int] = (0, 0),
) -> torch.Tensor | None:
    """``rows`` by the C pass (the kernel's maths, feature by feature) for CPU ids; None where the
    torch path must run (not wanted: see ``_native_wanted``; remaps the C pass cannot read: not
    int32 CPU contiguous). Full's OOV map is PRUNED with ``c = d = num_embeddings`` and the
    default row (ids in range keep their row, the others read row ``num_embeddings``)."""
    return _c_rows(batch, method, (a, b, c, d), remaps, default, mix) if _native_wanted(batch) else None


def _c_rows(
    batch: IdBatch,
    method: int,
    per_feature: tuple[Sequence[int] | None, ...],
    remaps: Sequence[torch.Tensor] | None,
    default: bool,
    mix: tuple[int, int],
) -> torch.Tensor | None:
    """The C pass of ``rows`` / ``native_rows`` (``per_feature``: their ``a``..``d``), once the
    caller has checked that it is wanted (``_native_wanted``)."""
    from tablezip.embeddings import native

    lib = native.library()
    assert lib is not None
    count = len(batch.counts)
    values = tuple(None if v is None else tuple(v) for v in per_feature)
    prepared = _prepared(method, count, values, remaps)
    if prepared is None:
        return None
    consts, width, base, offsets = prepared
    pointers, counts, _keep = _id_pointers(batch)
    total = sum(batch.counts)
    out = torch.empty(total, dtype=torch.int64)
    if total:
        lib.tz_rows(
            pointers, out.data_ptr(), counts, count, consts.data_ptr(), width, base, native.ptr(offsets), method,
            int(remaps is not None), int(default), mix[0], mix[1],
        )  # fmt: skip
    return out


def native_digits(batch: IdBatch, sizes: Sequence[int], partitions: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """QR / KWay's partition rows of CPU ids by the C pass (``tz_digits``): [k, N] int64, row j the
    j-th mixed-radix digit of every OOV-mapped id (``sizes``: each feature's num_embeddings;
    ``partitions``: each feature's k radices), the integers of compositional's torch path. None
    where the torch path must run (see ``_native_wanted``)."""
    from tablezip.embeddings import native

    if not _native_wanted(batch) or len(batch.counts) != len(sizes):
        return None
    if any(p <= 0 for parts in partitions for p in parts):
        return None  # a division by 0 would kill the process in C; the torch path raises instead
    lib = native.library()
    assert lib is not None
    pointers, counts, _keep = _id_pointers(batch)
    k = len(partitions[0])
    radices = batch.per_feature([int(p) for parts in partitions for p in parts])
    limits = batch.per_feature([int(s) for s in sizes])
    n = sum(batch.counts)
    out = torch.empty(k, n, dtype=torch.int64)
    if n:
        lib.tz_digits(
            pointers, out.data_ptr(), n, counts, len(batch.counts), limits.data_ptr(), radices.data_ptr(), k
        )  # fmt: skip
    return out


def zero_weight_drops(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows with every -1 replaced by row 0, fp32 weights: 1 where the row is kept, 0 where
    it was -1)``: a weighted TBE call then sums exactly the kept rows, and the backward gives
    row 0 a zero gradient for each dropped id (see ``EmbeddingBagLookup.drop_by_weight``).
    One Triton pass where the kernels run, else two torch ops."""
    if enabled_for(rows) and rows.dim() == 1 and rows.dtype == torch.int64 and rows.numel() > 0:
        rows = rows.contiguous()
        out = torch.empty_like(rows)
        weights = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        _, drops_kernel = _kernels()
        drops_kernel[_grid(rows.numel())](rows, out, weights, rows.numel(), BLOCK=_BLOCK)
        return out, weights
    kept = rows >= 0
    return rows.clamp(min=0), kept.to(torch.float32)
