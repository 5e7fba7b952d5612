"""The fused lookup and training step on a CPU, in C: the plans of ``fused_lookup`` /
``fused_train`` (Full, QR / KWay, MultiHash, MixedDim, Pruned), extended by Hash and Unified as
hashed partitions (``_extra``), run by ``tz_fused_forward`` / ``tz_fused_backward``
(embeddings/native.c) instead of Triton kernels, for inference and training alike; Hybrid too
(``fused_lookup.HybridRows``: hot row or hashed cold row). The one layout no plan covers is Pruned
with ``missing="default"`` and no remap: a collection with such a feature keeps the TBE path.

Why: on a CPU the TBE path of QR / KWay has fbgemm write every partition's pooled rows, a
[B, 39 x D] fp32 output for 26 features, which the assemble reads back and multiplies. At B=4096,
D=64 that output is 41 MB: glibc serves it with fresh pages each call (~10k page faults), and
QR's forward took 28.6 ms against Full's 6.8 ms (benchmarks/NOTES.md, "Fused CPU lookup").
Here each bag's partition rows are read from the TBE's tables in place, combined and pooled in
registers and written once into the [B, F x D] output, and the backward forms every touched
row's gradient from the same rows (mult: the gradient times the other parts) and applies the
TBE's optimizer to each row once, in place, with fbgemm's formulas (as ``tz_tbe_backward`` and the
GPU's ``update_kernel``). MixedDim's projections are applied once per bag and block to the block's
pooled rows (as the TBE path does), and their gradients go back to autograd, so the user's dense
optimizer steps them as on the TBE path.

When (``mode``): "auto" (default) runs it for CPU tensors where the ``fused_lookup`` /
``fused_train`` switch is "auto" (their "on" means Triton, through its interpreter on a CPU; "off"
the TBE path) and the collection's plan has an op in ``AUTO_OPS``; "on" for every plan it can run;
"off" never. The compiled kernels must be available (``embeddings/native.py``); anything the plans
do not cover keeps the TBE path, which stays the reference the tests compare with.

Exactness: bags of one id give the TBE path's output bit for bit for Full, mult, add, concat,
MultiHash, Hash and Unified (the same products and sums in the same order), and MixedDim's one-id
lookups equal torch's matrix products bit for bit (products then sums, no fused multiply-add: the
server's row reader relies on it, tests/serving/test_parity.py); longer bags are allclose (other
summation orders). Tables after a step are allclose to the TBE path's (another order for each
row's gradient sum). Threads split the bags only in the forward (bit for bit the same output).

Measured (benchmarks/NOTES.md, "Fused CPU lookup and step in C"; 26 Criteo-sample features at 10x,
one thread, C time over the TBE path's): QR's forward at B=4096 D=64 0.20x (5.6-6.5 against 28.6
ms), QR/KWay steps 0.63-0.79x everywhere, Hash/Unified forward 0.26-0.28x at B=32768 D=64.

Memory, per collection, kept between steps: an int32 per row of every table (-1 between steps)
and, grown as needed, an accumulator of the widest row's floats plus two int64s per touched row
(at most the fewer of the step's ids times partitions and all tables' rows).
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch

from tablezip.compress import fused_lookup
from tablezip.compress.kernel_switch import KernelSwitch
from tablezip.embeddings import native
from tablezip.embeddings.spare import SpareOutput
from tablezip.embeddings.tbe import check_offsets

# Plans whose ops take the C path in mode "auto" (Full features, the one-partition "add", ride
# along with any of them). Measured against the TBE path on the CPU grid (benchmarks/NOTES.md).
AUTO_OPS = frozenset({"mult", "add", "concat", "multihash", "hashcat", "mixed", "hybrid"})
MAX_PARTITIONS = 16  # partitions (probes) per feature the C step takes
MAX_BLOCKS = 32  # MixedDim blocks per feature the C kernels take
# Outputs of at least this many bytes are written with streaming stores (embeddings/native.c,
# FU_CAN_STREAM): past about half of a server's last-level cache (32 MB on the EPYC measured), an
# output is not found in cache by its consumer anyway, and the kernel skips reading every line
# before writing it. -1: never.
STREAM_BYTES = 16 << 20
# ... and from this size where each bag's D floats are one whole 64-byte line (D = 16, the output
# 64-byte aligned). There each ordinary store first reads its own line, a line per bag and feature,
# and a streamed line is written whole at once. Measured on the EPYC (1 MB L2 per core; Hash,
# B=1024-4096, benchmarks/NOTES.md "One-line rows streamed from 2 MB"): the forward took 0.84-0.90x the time
# and forward plus a consumer that reads the output 0.89-0.98x, from 1.7 MB up. Wider rows (D=32, 64)
# lost below about 10 MB (up to 1.27x with the consumer), half lines (D=8) at every size (1.15-1.26x).
LINE_STREAM_BYTES = 2 << 20
LINE_BYTES = 64  # a cache line (x86-64)
STREAMED = 256  # the flag tz_fused_forward adds to its threads when it streamed the output

_switch = KernelSwitch(default="auto")
mode = _switch.mode
set_mode = _switch.set


def current_mode() -> str:
    return _switch.value


def wanted(ids: torch.Tensor, triton_mode: str) -> bool:
    """Whether the C kernels may run for ``ids``: CPU tensors, the caller's Triton switch at
    "auto" (its "on" asks for Triton, its "off" for the TBE path), this switch not "off", and the
    compiled kernels built."""
    return (
        _switch.value != "off"
        and triton_mode == "auto"
        and ids.device.type == "cpu"
        and native.library() is not None
    )


# The C kernels' op codes: fused_lookup's, and "hashcat" (HashedParts: concatenated hashed rows).
OPS = {**fused_lookup.OPS, "hashcat": 4}


def _extra(layout: Any) -> "fused_lookup.DenseBlocks | fused_lookup.HashedParts | None":
    """How the C kernels read a layout fused_lookup does not know: Pruned as D-wide blocks (the
    training step's), Hash as one hashed partition, Unified as its salted chunks (one: a hashed
    partition; more: their concatenation, each chunk a row of the shared table), Hybrid as its
    rows (hot or hashed cold)."""
    from tablezip.compress import fused_train
    from tablezip.compress.hashing import HashLayout, seed_mix
    from tablezip.compress.hybrid import HybridLayout
    from tablezip.compress.unified import UnifiedLayout

    if type(layout) is HashLayout:
        return fused_lookup.HashedParts(layout.rows, (seed_mix(layout.seed),), "multihash", layout.dim)
    if type(layout) is HybridLayout:
        remap = layout.remap if layout.uses_remap else None
        return fused_lookup.HybridRows(layout.hot, layout.cold_rows, seed_mix(layout.seed), remap)
    if type(layout) is UnifiedLayout:
        seeds = tuple(seed_mix(s) for s in layout.salts)
        op = "multihash" if layout.chunks == 1 else "hashcat"
        return fused_lookup.HashedParts(layout.rows, seeds, op, layout.dim // layout.chunks)
    return fused_train._pruned_blocks(layout)


_PLANS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def plan_for(collection: Any) -> Any:
    """The C kernels' plan of ``collection`` (``weights`` None: not covered): fused_lookup's
    builder with ``_extra``; rebuilt when the storage, a projection or a remap moved."""
    from tablezip.compress.hybrid import HybridLayout
    from tablezip.compress.pruned import PrunedLayout

    return fused_lookup.cached_plan(_PLANS, collection, (PrunedLayout, HybridLayout), _extra)


def plan_ops(plan: Any) -> frozenset[str]:
    ops = plan.params.get("c_ops")  # (a plan never changes: rebuilt, not edited, when its key moves)
    if ops is None:
        ops = {f.op for f in plan.features if len(f.partitions) > 1 or f.op != "add"}
        ops = plan.params["c_ops"] = frozenset(ops | ({"mixed"} if plan.mixed else set()) | ({"hybrid"} if plan.hybrid else set()))
    return ops


def takes(plan: Any) -> bool:
    """Whether this module runs ``plan`` under the current mode (and can: partitions and blocks
    within the kernels' limits)."""
    if plan.weights is None or plan.weights.device.type != "cpu":
        return False
    if any(len(f.partitions) > MAX_PARTITIONS for f in plan.features) or any(len(m.starts) > MAX_BLOCKS for m in plan.mixed):
        return False
    return _switch.value == "on" or bool(plan_ops(plan) & AUTO_OPS)


def _program(
    features: Sequence[Any], mixed: Sequence[Any], hybrid: Sequence[Any], extra: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The records of embeddings/native.c's fused kernels, and where each starts. ``extra``: the
    training state's per-feature (first linear row, table index[, projection-gradient offset])."""
    records: list[list[int]] = []
    for f in features:
        more = extra[f.feature] if extra is not None else [0, 0] * len(f.partitions)
        rec = [0, f.feature, f.num_embeddings, int(f.mean), OPS[f.op], len(f.partitions), f.width]
        for j, (stride, radix, at) in enumerate(zip(f.strides(), f.partitions, f.table_offsets)):
            rec += [stride, radix, at, more[2 * j], more[2 * j + 1]]
        records.append(rec)
    for m in mixed:
        more = extra[("mixed", m.feature)] if extra is not None else [0, 0, 0] * len(m.starts)
        remap = -1 if m.remap_offset is None else m.remap_offset
        rec = [1, m.feature, m.num_embeddings, int(m.mean), remap, len(m.starts)]
        for b in range(len(m.starts)):
            projection = m.projection_offsets[b]
            rec += [m.starts[b], m.rows[b], m.table_offsets[b], m.widths[b], int(projection is not None), projection or 0]
            rec += more[3 * b : 3 * b + 3]
        records.append(rec)
    for h in hybrid:
        more = extra[("hybrid", h.feature)] if extra is not None else [0, 0]
        remap = -1 if h.remap_offset is None else h.remap_offset
        records.append([2, h.feature, 0, int(h.mean), remap, h.remap_size, h.hot, h.cold_rows, h.seed, h.table_offset] + more)
    starts, at = [], 0
    for rec in records:
        starts.append(at)
        at += len(rec)
    # (MultiHash's mixed seeds are int64 already: hashing.seed_mix gives the bit patterns.)
    flat = [x for rec in records for x in rec]
    return torch.tensor(flat, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)


def stream_bytes(dim: int, out: torch.Tensor) -> int:
    """The output size from which ``out`` is streamed (``STREAM_BYTES``, or ``LINE_STREAM_BYTES``
    for one-line rows); -1 (never) where ``STREAM_BYTES`` is."""
    if STREAM_BYTES < 0:
        return -1
    row, stride = dim * out.element_size(), out.stride(0) * out.element_size()
    if row == LINE_BYTES and out.data_ptr() % LINE_BYTES == 0 and stride % LINE_BYTES == 0:
        return min(STREAM_BYTES, LINE_STREAM_BYTES)
    return STREAM_BYTES


def _max_width(plan: Any, dim: int) -> int:
    width = plan.params.get(("c_max_width", dim))
    if width is None:
        widths = [f.width for f in plan.features] + [w for m in plan.mixed for w in m.widths]
        width = plan.params[("c_max_width", dim)] = max(widths + ([dim] if plan.hybrid else []) + [1])  # (Hybrid's rows are D wide)
    return width


def forward(
    plan: Any, ids: torch.Tensor, offsets: torch.Tensor, batch: int, num_features: int, dim: int,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """[batch, num_features * dim] pooled vectors of the plan's features (the plan must cover all).
    The offsets are checked first (``tbe.check_offsets``: from 0 to ``ids.numel()``, never
    decreasing; ValueError otherwise), as the TBE path checks them: the kernels read every bag's ids
    through them. The backward reads the same, checked, offsets. ``ranks`` (int32, one per id):
    where the MixedDim / Pruned ids' ranks go (for ``backward_step``); None: a scratch one where the
    plan has such features."""
    if offsets.numel() != num_features * batch + 1:
        raise ValueError(f"expected {num_features * batch + 1} offsets ({num_features} features x {batch} bags + 1), got {offsets.numel()}")
    check_offsets(ids, offsets)
    if batch == 0:
        return torch.empty(0, num_features * dim, dtype=torch.float32)
    # The previous output's memory once nobody holds it (embeddings/spare.py: no page faults).
    spare = plan.params.get("c_spare")
    if spare is None:
        spare = plan.params["c_spare"] = SpareOutput()
    out = spare.new(plan.weights, batch, num_features * dim)
    program = plan.params.get("c_forward")
    if program is None:
        program = plan.params["c_forward"] = _program(plan.features, plan.mixed, plan.hybrid, None)
    prog, starts = program
    if ranks is None and plan.mixed:
        ranks = torch.empty(ids.numel(), dtype=torch.int32)
    lib = native.library()
    used = lib.tz_fused_forward(
        ids.data_ptr(), offsets.data_ptr(), batch, out.data_ptr(), out.stride(0), dim, plan.weights.data_ptr(),
        native.ptr(plan.remaps), native.ptr(ranks), prog.data_ptr(), starts.data_ptr(), len(starts), _max_width(plan, dim),
        fused_lookup._MIX[0], fused_lookup._MIX[1], native.threads(batch, num_features * dim), stream_bytes(dim, out),
    )  # fmt: skip
    if used == -2:
        raise RuntimeError("tablezip: a remap value is out of bounds (a corrupted MixedDim, Pruned or Hybrid remap)")
    if used < 0:
        raise MemoryError("tablezip: the fused CPU lookup ran out of memory")
    plan.params["c_streamed"] = bool(used & STREAMED)  # (tests and benchmarks read it)
    return out


_STATES: "weakref.WeakKeyDictionary[Any, tuple[tuple, Any]]" = weakref.WeakKeyDictionary()


def state_for(collection: Any, plan: Any = None) -> Any:
    """The collection's C training state (fused_train's ``_TrainState`` built ``native``), or None
    where training keeps the TBE path; rebuilt when the tables, optimizer state, a projection or a
    remap moved. ``plan``: ``plan_for(collection)`` where the caller has it already (each training
    step does: its key reads every layout)."""
    from tablezip.compress import fused_train

    plan = plan_for(collection) if plan is None else plan
    key = plan.key + fused_train._state_key(collection.tbe)
    cached = _STATES.get(collection)
    if cached is None or cached[0] != key:
        cached = _STATES[collection] = (key, fused_train._build_state(collection, plan, key, native=True))
    return cached[1]


def keeps_ranks(plan: Any) -> bool:
    """Whether the training forward keeps the MixedDim / Pruned ids' ranks for the backward (a
    remap gather per id into tables of up to millions of int32s, mostly cache misses, that the
    backward would repeat: MixedDim's step at B=4096, D=16 took 1.21x the TBE path's time with the
    gathers repeated, 1.06x without; benchmarks/NOTES.md)."""
    return bool(plan.mixed)


def backward_step(
    state: Any, tbe: Any, ids: torch.Tensor, offsets: torch.Tensor, grad_out: torch.Tensor, batch: int, dim: int,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The C backward and optimizer step (see the module docstring); returns the projections'
    gradients (flat, at ``state.projection_at``), None without projections. ``ranks``: the
    forward's (``keeps_ranks``), else None."""
    plan = state.plan
    program = state.params.get("c_train")
    if program is None:
        program = state.params["c_train"] = _program(plan.features, plan.mixed, plan.hybrid, state.params["extra"])
    prog, starts = program
    # Accumulators: one per touched row, at most one per id and partition (and per row).
    cap = min(state.total_rows, ids.numel() * max(state.max_partitions, 1))
    width = _max_width(plan, dim)
    buffers = state.params.get("c_buffers")
    if buffers is None or buffers[0].numel() < 2 * cap:
        buffers = state.params["c_buffers"] = (
            torch.empty(2 * max(cap, 1), dtype=torch.int64),
            torch.empty(max(cap, 1) * width, dtype=torch.float32),
        )
    touched, acc = buffers
    projection_grad = None
    if state.projection_elements:
        projection_grad = torch.zeros(state.projection_elements, dtype=torch.float32)
    if grad_out.dtype != torch.float32:
        grad_out = grad_out.float()
    lib = native.library()
    updated = lib.tz_fused_backward(
        ids.data_ptr(), offsets.data_ptr(), batch, grad_out.data_ptr(), grad_out.stride(0), grad_out.stride(1), dim,
        plan.weights.data_ptr(), state.state.data_ptr(), native.ptr(plan.remaps), native.ptr(ranks), prog.data_ptr(),
        starts.data_ptr(),
        len(starts), state.tables.data_ptr(), state.flags.data_ptr(), touched.data_ptr(), acc.data_ptr(), cap, width,
        native.ptr(projection_grad), state.optimizer, float(tbe.learning_rate_tensor), float(tbe.optimizer_args.eps),
        fused_lookup._MIX[0], fused_lookup._MIX[1],
    )  # fmt: skip
    if updated == -1:
        raise MemoryError("tablezip: the fused CPU training step ran out of memory")
    if updated < 0:
        raise RuntimeError("tablezip: the fused CPU training step found a row out of bounds (nothing was updated)")
    return projection_grad
