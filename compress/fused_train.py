"""Fused GPU training step for Full + QR/KWay + MultiHash + MixedDim + Pruned collections: the fused
forward lookup (compress/fused_lookup.py) as an autograd function whose backward accumulates
each touched row's gradient with atomics and applies the TBE's own optimizer to those rows in
place (and returns MixedDim's projection gradients to autograd).

Why: the TBE path of ``op="mult"`` looks every id up unpooled (one bag per id and partition),
multiplies with torch ops and pools with ``index_add_``; its training step adds the product's
gradients (elementwise kernels), a bounds check over twice the rows, and fbgemm's sort-based
backward over them: 2.5-2.7x Full's step on an H100 (26 x 1M rows, D=64, B=65536), MultiHash
1.2-1.3x. Here a step is four launches per (partitions, op, width) group plus two:

1. forward: ``fused_lookup.pooled_lookup`` on the inference plan (the same kernel, bit for bit);
2. backward, ``grad_kernel``: per bag it recomputes each id's partition rows
   (``fused_lookup``'s ``_partition_row``), loads the rows it needs (read BEFORE any update: the
   update is a later launch), forms each partition row's gradient (mult: upstream gradient
   times the product of the other parts; add: the gradient; concat: its slice; multihash: the
   gradient to each probe's row; mean pooling: divided by the bag length first) and adds it into
   a dense fp32 buffer laid out like the TBE's weights (``tl.atomic_add``). The first touch of a
   row in the step (an atomic exchange on a per-row flag) appends the row to a list (one atomic
   add per program on a counter, positions by a prefix sum), so nothing scans whole tables;
   ``mixed_grad_kernel`` does the same for MixedDim (fused_lookup's ``_mixed_ranks`` /
   ``_block_local``: OOV map, int32 remap, the block holding the rank; ranks past ``keep`` hit
   no block and get nothing): a D-wide block's row gets ``g``; a projected block's row gets
   ``g @ P_i`` (the same for every id of the bag, one ``tl.dot`` per bag block), and the
   projection's gradient ``dL/dP_i^T = sum over bags of pooled_i^T @ g`` (``pooled_i``: the bag's
   block-``i`` rows, summed in registers while their gradients are added) is one more
   ``tl.dot`` per bag block, summed over the program's few bag blocks and added once per
   program and element with atomics (every id of the step hits the same P elements: per-id
   atomics would serialise). Both dots in IEEE fp32 (no TF32). The projections are ordinary
   Parameters, inputs of the autograd function, so their gradients reach ``.grad`` and the
   user's dense optimizer steps them, as on the TBE path;
3. ``update_kernel``: over the listed rows only (a grid-stride loop bounded by the counter, read
   on the device: no host sync), fbgemm's update formula for the TBE's optimizer, in place in
   its weights and optimizer state, then the buffer row and the flag are cleared; the counter is
   zeroed by one small fill.

The optimizer formulas are fbgemm's (``fbgemm_gpu/codegen/genscript/optimizers.py``: per row,
``g`` = the sum of the row's gradients in the batch):

- EXACT_ROWWISE_ADAGRAD: ``m += sum(g * g) / D``, ``w = w - lr / (sqrt(m) + eps) * g``
  (``correction`` is 1 without weight decay);
- EXACT_ADAGRAD: per element ``m += g * g``, ``w -= lr * g / (sqrt(m) + eps)``;
- EXACT_SGD: ``w -= lr * g``.

``sqrt`` and the divisions are the IEEE ones (``sqrt_rn``, ``div_rn``), as fbgemm's ``sqrtf`` and
``/`` without fast-math. The learning rate is read from the TBE's ``learning_rate_tensor`` each
step (so ``set_learning_rate`` works), ``eps`` from its ``optimizer_args``; rowwise Adagrad
advances the TBE's ``iter`` as its forward does. Exactness: the gradient sums are atomics (order
not fixed, not deterministic run to run) and TBE's backward sums in sorted order, so tables
match the TBE path allclose, not bit for bit (the tests: rtol 1e-5, atol 1e-6 after 3 steps).

Pruned is expressed as MixedDim's D-wide blocks (``_pruned_blocks``): the OOV map, the remap
(id -> compact row or -1) as the rank, one block of the ``keep`` rows, so a pruned id reads and
trains nothing (a zero vector; mean pooling still counts it), as the TBE path's dropped ids
(compaction, or zero weights on CUDA, whose row-0 gradient is exactly 0). With
``missing="default"`` a second block over the same table holds rank -1 alone at row ``keep``: the
shared default row, read and trained as on the TBE path. Without a remap, a prefix: the block's
``keep`` rows are the ids below ``keep``; ``missing="default"`` without a remap (the default row
of every id past ``keep``) is no block test, so it keeps the TBE path. Inference keeps the TBE
path for Pruned (fused_lookup's own plan does not take it; this module builds one with
``_build_plan(extra=_pruned_blocks)``).

On an H100 (Triton 3.6; 26 x 1M rows, D=64, B=65536, paired with Full's step), fused against
the TBE path: QR and KWay 1.17x against 2.24x, md-10x 1.16x against 2.04x, pruned-10x 0.69x against
1.18x, MultiHash 1.27-1.38x against 1.19x (so "auto" keeps MultiHash on the TBE path); tables within
1.5e-7 of the TBE path's after a step (benchmarks/results/gpu_fused_train_vec_h100.md). Per kernel
(benchmarks/gpu_fused_knobs.py): QR's ``grad_kernel`` took 2.9 ms with scalar fp32 atomics and 64
bags per program; four-float ``red.global.add.v4.f32`` (``add_quads``) made it 2.2 ms and 128 bags
per program (half the per-program row sums of the small remainder tables) 1.04 ms; its update
kernel 0.95 ms at 32 rows per program, ~0.8 ms at 16. Two Triton 3.6 problems the interpreter
cannot show were met and fixed: ``grad_kernel`` did not compile for mult and for groups with a
large table before a small one (TritonGPURemoveLayoutConversions; now small tables first, mult's
other factors loaded without the bag mask; tests/compress/test_triton_compile.py compiles every
kernel for sm_90 without a GPU), and a scalar atomic's result reached the lanes wrong under load
(see ``list_rows``).

On a CPU, mode "auto" runs the same plan through the compiled C step of compress/fused_cpu.py
(``_build_state(native=True)``: compact per-row accumulators instead of the weights-sized buffer;
``fused_cpu.mode`` switches it; ``AUTO_SKIPS`` is the GPU's measurement and does not apply there).

When: mode "auto" (the default; not for ``AUTO_SKIPS``) or "on", grad enabled, CUDA ids and Triton importable (``"on"``: any device,
CPU through Triton's interpreter, as the CPU tests run it; ``"off"``: the TBE path, the
reference), every feature Full / QR / KWay / MultiHash / MixedDim / Pruned (above) on fp32
tables of one fbgemm training TBE (the inference plan's condition; MixedDim projections fp32,
contiguous, on the tables' device), not Full alone (TBE's own step), the TBE's placeholder
requiring grad, its tables not cached (no UVM cache), and one of the three optimizers with
``weight_decay`` 0, no gradient clipping and no ``max_norm``. Anything else keeps the TBE path.

Memory: per collection, allocated once and cached (``_STATES``): a fp32 gradient buffer as large
as the TBE's weights (the compressed tables: 10x smaller than Full at 10x), an int32 flag and an
int64 list slot per row (12 bytes per row, 4.7% of a D=64 fp32 row; 300% of a 4-wide MixedDim
row, whose gradient buffer is 16 bytes), and a counter. Per step with MixedDim, a fp32 buffer of
the projections' gradients (``sum d_i * D`` floats; 26 x 4 x 64 = 26 KB in the benchmark),
fresh each step since autograd hands it to ``.grad``.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from tablezip.compress import fused_lookup
from tablezip.compress.kernel_switch import KernelSwitch

OPTIMIZERS = {"EXACT_ROWWISE_ADAGRAD": 0, "EXACT_ADAGRAD": 1, "EXACT_SGD": 2}
TABLE_BITS = 40  # a listed row is (table << TABLE_BITS) | row: tables of up to 2**40 rows
# Launch shapes. The H100 values come from benchmarks/gpu_fused_knobs.py (26 x 1M rows, D=64,
# B=65536; benchmarks/NOTES.md): 128 bags per gradient program took QR's gradient kernel from
# 2.9 ms (64 bags, scalar atomics) to 1.04 ms with VECTOR_ATOMICS (vector atomics at 64 bags: 2.2 ms; at 256: 1.12);
# MixedDim's kernel, whose programs also hold [bags, width] dot tiles, got 3.2x slower at 128.
BLOCK_ROWS = 16  # rows per program of the update kernel (QR: 32 rows 0.95 ms, 128 rows 1.9 ms)
GRAD_BLOCK_BAGS = 128  # bags per program of the gradient kernel (more bags: fewer atomics on small tables)
MIXED_BLOCK_BAGS = 64  # bags per block of MixedDim's gradient kernel
SMALL_ROWS = 32  # tables of at most this many rows are summed per program before the atomics
MAX_UPDATE_PROGRAMS = 1024  # the update's grid-stride loop: about 8 programs per H100 SM
MIXED_BAG_BLOCKS = 8  # MixedDim's gradient: bag blocks per program (fewer atomics on the projections' gradients)
UPDATE_WARPS = 4  # warps per update program
# True: compiled gradient kernels add rows four floats per instruction (``add_quads``: Hopper's
# ``red.global.add.v4.f32``) where every row of the group is 16-byte aligned; False: one scalar
# atomic per float (``tl.atomic_add``; the interpreter always, which cannot run inline PTX).
# A plain switch so benchmarks/gpu_fused_knobs.py can time both in one process.
VECTOR_ATOMICS = True

# "auto" by default since the H100 runs of 2026-12-07 (benchmarks/NOTES.md): on CUDA the fused
# step trains QR/KWay 1.9x, MixedDim 1.8x and Pruned 1.7x faster than the TBE path, tables allclose
# to it. "auto" still leaves collections with MultiHash features on the TBE path (``AUTO_SKIPS``);
# "on" forces the fused step wherever it can run, "off" never runs it.
_switch = KernelSwitch(default="auto")
# Ops whose fused step measured slower than the TBE path: MultiHash (probes folded into one TBE bag,
# which fbgemm's backward handles well): 1.38x of Full's step fused (1.27x with 8 update warps;
# 2.25x before the vector atomics) against 1.19x on the TBE path (H100, 26 x 1M rows, D=64,
# B=65536; its update kernel, 1.2-1.45 ms, touches k rows per id).
AUTO_SKIPS = frozenset({"multihash"})
mode = _switch.mode
set_mode = _switch.set


def current_mode() -> str:
    return _switch.value


def enabled_for(ids: torch.Tensor) -> bool:
    """Whether the fused training step may run for ``ids`` under the current ``mode`` (training:
    grad enabled; inference is ``fused_lookup``'s)."""
    return torch.is_grad_enabled() and _switch.wants_kernel(ids)


@functools.lru_cache(maxsize=None)
def _kernels() -> tuple[Any, Any, Any]:
    """Build the backward and update kernels (once per process; ``TRITON_INTERPRET`` is read
    here)."""
    import triton
    import triton.language as tl

    fused_lookup._kernel()  # defines fused_lookup's _partition_row, the rows' maths both share
    fused_lookup._mixed_kernel()  # and its MixedDim rank / block maths
    for name in ("_partition_row", "_mixed_ranks", "_block_local"):
        globals()[name] = getattr(fused_lookup, name)

    # Combines for tl.reduce / tl.associative_scan: tl.max, tl.sum and tl.cumsum are @jit library
    # functions the CPU interpreter cannot run when Triton was imported before TRITON_INTERPRET
    # was set (see fused_lookup). A kernel finds the functions it calls among its module globals.
    @triton.jit
    def longest(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def add(a, b):
        return a + b

    # Triton's own combines where it has them (the same a + b / maximum): the interpreter spots
    # them and reduces with numpy, instead of calling the combine per element (tens of seconds in
    # the CPU tests); compiled kernels are the same either way.
    globals()["_longest"] = getattr(tl.standard, "_elementwise_max", longest)
    globals()["_add"] = getattr(tl.standard, "_sum_combine", add)

    @triton.jit
    def list_rows(flags, rows_ptr, count_ptr, r, live, tag, BLOCK_B: tl.constexpr):
        # First touch of row r (of the table whose first flag is ``flags``) in this step: its flag
        # goes 0 -> 1 (the exchange decides between programs and lanes; the plain load skips the
        # atomic for rows already flagged), and the row joins the list as tag | r, at a slot
        # from one atomic add per program on the counter and a prefix sum over the lanes.
        flag = flags + tl.where(live, r, 0)
        seen = tl.load(flag, mask=live, other=1)
        want = live & (seen == 0)
        old = tl.atomic_xchg(flag, tl.full([BLOCK_B], 1, tl.int32), mask=want, sem="relaxed")
        new = want & (old == 0)
        fresh = new.to(tl.int32)
        count = tl.reduce(fresh, 0, _add)
        if count > 0:
            # The program's slots from ONE atomic add on the counter, done by lane 0 as a masked
            # vector atomic and handed to every lane by a reduction. Not a scalar atomic: compiled
            # by Triton 3.6 for sm_90, its result reached the lanes wrong under load (on an H100,
            # QR at 26 features, B=4096: slots far past the list, an illegal write here, and rows
            # missing from the update; benchmarks/NOTES.md), where the interpreter was right.
            lead = tl.arange(0, BLOCK_B) == 0
            old_count = tl.atomic_add(
                count_ptr + tl.full([BLOCK_B], 0, tl.int32), tl.where(lead, count, 0), mask=lead, sem="relaxed"
            )  # fmt: skip
            first = tl.reduce(tl.where(lead, old_count, 0), 0, _add)
            slot = first + tl.associative_scan(fresh, 0, _add) - 1
            tl.store(rows_ptr + slot, tag | r, mask=new)

    globals()["_list_rows"] = list_rows

    @triton.jit
    def add_quads(base, lo, hi, values, rows_live, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        # values[:, c] for c in [lo, hi) added at base + (c - lo), four columns per instruction:
        # Hopper's ``red.global.add.v4.f32``. Triton 3.6 compiles ``tl.atomic_add`` on fp32 to
        # one scalar atom.add per element (32 per thread per 64 x 64 tile), which bounds QR's
        # gradient kernel (benchmarks/NOTES.md). The tile is split into its four columns of each
        # quad with reshape + split, so which elements go together does not depend on the layout
        # the compiler picks. The caller guarantees: lo, hi and every row's base 16-byte aligned
        # (multiples of 4 floats), so a quad is wholly inside or outside [lo, hi).
        quad = tl.arange(0, BLOCK_D // 4) * 4
        # Addresses as integers: inline_asm_elementwise type-checks its operands as one binary op
        # would, and a pointer beside floats fails that.
        ptrs = (base[:, None] + (quad - lo)[None, :]).to(tl.int64)
        live = (rows_live[:, None] & ((quad >= lo) & (quad < hi))[None, :]).to(tl.int32)
        even, odd = tl.split(tl.reshape(values, [BLOCK_B, BLOCK_D // 4, 2, 2]))  # columns 4k + 2i + j: by j
        v0, v2 = tl.split(even)  # by i
        v1, v3 = tl.split(odd)
        tl.inline_asm_elementwise(
            "{ .reg .pred tzp; setp.ne.b32 tzp, $2, 0; @tzp red.relaxed.gpu.global.add.v4.f32 [$1], {$3, $4, $5, $6}; mov.b32 $0, 0; }",
            "=r,l,r,f,f,f,f", [ptrs, live, v0, v1, v2, v3], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip

    globals()["_add_quads"] = add_quads

    @triton.jit
    def bag_grads(offsets_ptr, grad_out_ptr, feature, mean, first, batch, grad_out_stride, cols, in_d,
                  DIM: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
        # Bags [first, first + BLOCK_B) of a feature: (in range, first id, length, upstream
        # gradient [BLOCK_B, BLOCK_D], divided by the bag length for mean pooling, IEEE as torch).
        bags = first + tl.arange(0, BLOCK_B)
        in_b = bags < batch
        starts = tl.load(offsets_ptr + feature * batch + bags, mask=in_b, other=0)
        lens = tl.load(offsets_ptr + feature * batch + bags + 1, mask=in_b, other=0) - starts
        grad = tl.load(
            grad_out_ptr + bags[:, None] * grad_out_stride + feature * DIM + cols[None, :],
            mask=in_b[:, None] & in_d[None, :], other=0.0,
        )  # fmt: skip
        denom = tl.broadcast_to(tl.maximum(lens, 1).to(tl.float32)[:, None], (BLOCK_B, cols.shape[0]))
        grad = tl.where(mean != 0, tl.math.div_rn(grad, denom), grad)
        return in_b, starts, lens, grad

    globals()["_bag_grads"] = bag_grads

    @triton.jit
    def grad_kernel(
        ids_ptr, offsets_ptr, grad_out_ptr, weights_ptr, grad_ptr, flags_ptr, rows_ptr, count_ptr, params_ptr,
        batch, grad_out_stride,
        K: tl.constexpr, OP: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr, MIX1: tl.constexpr, MIX2: tl.constexpr, TABLE_SHIFT: tl.constexpr, SMALL: tl.constexpr,
        VEC: tl.constexpr,
    ):  # fmt: skip
        # VEC: large tables' rows added four columns per instruction (``add_quads``; compiled
        # kernels only, every row 16-byte aligned). SMALL: bit j set where partition j's table has at most SMALL_ROWS rows (in every
        # feature of the group). params row of this program's feature: the inference row (feature, num_embeddings,
        # mean, per partition j: stride or seed, radix, table element offset), then per
        # partition j: the table's first flag (row base) and the table's index.
        row = params_ptr + tl.program_id(1) * (3 + 5 * K)
        feature = tl.load(row)
        n = tl.load(row + 1)
        mean = tl.load(row + 2)
        cols = tl.arange(0, BLOCK_D)
        in_d = cols < DIM
        # Mean pooling: out = sum / len, so every id of the bag gets grad / len (bag_grads).
        in_b, starts, lens, grad = _bag_grads(
            offsets_ptr, grad_out_ptr, feature, mean, tl.program_id(0).to(tl.int64) * BLOCK_B, batch, grad_out_stride,
            cols, in_d, DIM, BLOCK_B,
        )  # fmt: skip
        for i in range(0, tl.reduce(lens, 0, _longest)):
            live = in_b & (i < lens)
            ids = tl.load(ids_ptr + starts + i, mask=live, other=0)
            if OP != 3:
                ids = tl.where((ids >= 0) & (ids < n), ids, n)  # Full's OOV map
            # Partitions of small tables first (t < K), then the others (t >= K). Why this order:
            # Triton 3.6's TritonGPURemoveLayoutConversions (sm_90) fails ("PassManager::run
            # failed": a load's mask rematerialised in another layout than its pointer) when a
            # small table's per-row sums come after a large table's 2-D atomics in one iteration.
            # The tables differ (MultiHash's probes are all small or none), so the sums do not.
            for t in tl.static_range(2 * K):
                j = t % K
                small = (SMALL >> j) & 1
                if small == (t < K):
                    digit = _partition_row(ids, tl.load(row + 3 + 3 * j), tl.load(row + 4 + 3 * j), j, OP, MIX1, MIX2)
                    table_at = tl.load(row + 5 + 3 * j)  # element offset of partition j's table
                    first_flag = tl.load(row + 3 + 3 * K + 2 * j)
                    tag = tl.load(row + 4 + 3 * K + 2 * j) << TABLE_SHIFT  # the table's index, listed rows
                    # Partition j's gradient rows [BLOCK_B, BLOCK_D] and where its columns go.
                    part_grad = grad  # add, Full, multihash's probes: the gradient itself; concat: its columns
                    if OP == 2:  # concat: partition j's row is columns [j * WIDTH, (j + 1) * WIDTH)
                        lo = j * WIDTH
                        hi = (j + 1) * WIDTH
                    else:
                        lo = 0
                        hi = DIM
                        if OP == 0 and K > 1:  # mult: the gradient times the product of the other parts
                            for o in tl.static_range(K):
                                if o != j:
                                    other = _partition_row(
                                        ids, tl.load(row + 3 + 3 * o), tl.load(row + 4 + 3 * o), o, OP, MIX1, MIX2
                                    )  # fmt: skip
                                    at_o = tl.load(row + 5 + 3 * o) + other * WIDTH
                                    # Not masked by ``live``: with that mask Triton 3.6's layout
                                    # pass fails as above. Lanes past their bag read row 0 (their
                                    # ids load as 0), a product the masked atomics below drop.
                                    part = tl.load(weights_ptr + at_o[:, None] + cols[None, :], mask=in_d[None, :], other=0.0)
                                    part_grad = part_grad * part
                    dest = cols - lo
                    keep = (cols >= lo) & (cols < hi)
                    if small:
                        # A table of at most SMALL_ROWS rows (QR's remainders): most of the program's
                        # bags hit each row, so the program sums its bags' terms per row first and
                        # adds one row per row it hit (per-lane atomics would serialise on a few
                        # addresses: thousands of bags per row and step).
                        for r in range(0, tl.load(row + 4 + 3 * j)):
                            hit = live & (digit == r)
                            if tl.reduce(hit.to(tl.int32), 0, _add) > 0:
                                total = tl.reduce(tl.where(hit[:, None], part_grad, 0.0), 0, _add)
                                tl.atomic_add(grad_ptr + table_at + r * WIDTH + dest, total, mask=keep, sem="relaxed")
                                # Row r joins the list once per step: list_rows on lane 0 alone
                                # (no scalar atomics: see list_rows).
                                lane = tl.arange(0, BLOCK_B)
                                _list_rows(flags_ptr + first_flag, rows_ptr, count_ptr, lane * 0 + r, lane == 0, tag, BLOCK_B)
                    else:
                        at = table_at + digit * WIDTH  # element offset of each id's row (int64)
                        if VEC:
                            _add_quads(grad_ptr + at, lo, hi, part_grad, live, BLOCK_B, BLOCK_D)
                        else:
                            tl.atomic_add(
                                grad_ptr + at[:, None] + dest[None, :], part_grad, mask=live[:, None] & keep[None, :],
                                sem="relaxed",
                            )  # fmt: skip
                        _list_rows(flags_ptr + first_flag, rows_ptr, count_ptr, digit, live, tag, BLOCK_B)

    @triton.jit
    def mixed_grad_kernel(
        ids_ptr, offsets_ptr, grad_out_ptr, weights_ptr, remap_ptr, grad_ptr, flags_ptr, rows_ptr, count_ptr,
        proj_grad_ptr, params_ptr, batch, grad_out_stride,
        NB: tl.constexpr, REMAP: tl.constexpr, PROJ: tl.constexpr, DIM: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, TABLE_SHIFT: tl.constexpr, VEC: tl.constexpr,
    ):  # fmt: skip
        # VEC: rows added four columns per instruction (``add_quads``; every block's rows 16-byte
        # aligned). MixedDim (and Pruned, as D-wide blocks). params row: fused_lookup's mixed row (feature,
        # num_embeddings, mean, remap offset, per block: first rank, rows, table offset, width,
        # projected, projection offset), then per block: first flag, table index, element offset
        # of its projection's gradient in proj_grad. PROJ: bit b set where block b is projected
        # (in every feature of the group). A program covers the bag blocks pid, pid + programs,
        # ... (a few: MIXED_BAG_BLOCKS), so its projection gradients sum over more bags before
        # the one atomic add per element.
        row = params_ptr + tl.program_id(1) * (4 + 9 * NB)
        feature = tl.load(row)
        n = tl.load(row + 1)
        mean = tl.load(row + 2)
        cols = tl.arange(0, BLOCK_D)
        in_d = cols < DIM
        begin = tl.program_id(0).to(tl.int64) * BLOCK_B
        stride = tl.num_programs(0).to(tl.int64) * BLOCK_B
        for b in tl.static_range(NB):
            # One pass over the bags per block (ids, ranks and gradients are re-read per block:
            # cached), so each projected block's sums are loop-carried tiles.
            table_at = tl.load(row + 6 + 6 * b)
            width = tl.load(row + 7 + 6 * b)
            first_flag = tl.load(row + 4 + 6 * NB + 3 * b)
            tag = tl.load(row + 5 + 6 * NB + 3 * b) << TABLE_SHIFT
            if (PROJ >> b) & 1:
                # out = sum over the bag's ids of row @ P_i^T, so every id of the bag in block b
                # gets the same row gradient g @ P_i (P_i^T is [width, D], read here as its
                # transpose), and dL/dP_i^T = sum over bags of pooled_i^T @ g, pooled_i the sum of
                # the bag's block-b rows (read before any update: the update is a later launch).
                wcols = tl.arange(0, BLOCK_W)
                in_w = wcols < width
                projection = tl.load(row + 9 + 6 * b)
                p = tl.load(
                    weights_ptr + projection + wcols[None, :] * DIM + cols[:, None], mask=in_d[:, None] & in_w[None, :], other=0.0
                )  # fmt: skip
                total = tl.full([BLOCK_W, BLOCK_D], 0.0, tl.float32)
                for first in range(begin, batch, stride):
                    in_b, starts, lens, grad = _bag_grads(
                        offsets_ptr, grad_out_ptr, feature, mean, first, batch, grad_out_stride, cols, in_d, DIM, BLOCK_B
                    )  # fmt: skip
                    row_grad = tl.dot(grad, p, input_precision="ieee")  # [BLOCK_B, BLOCK_W], fp32 FMAs (no TF32)
                    pooled = tl.full([BLOCK_B, BLOCK_W], 0.0, tl.float32)
                    for i in range(0, tl.reduce(lens, 0, _longest)):
                        live = in_b & (i < lens)
                        ids = tl.load(ids_ptr + starts + i, mask=live, other=0)
                        local, hit = _block_local(_mixed_ranks(ids, live, n, remap_ptr, row, REMAP), live, row, b)
                        cells = (table_at + tl.where(hit, local, 0) * width)[:, None] + wcols[None, :]
                        inside = hit[:, None] & in_w[None, :]
                        pooled += tl.load(weights_ptr + cells, mask=inside, other=0.0)
                        if VEC:
                            _add_quads(grad_ptr + table_at + tl.where(hit, local, 0) * width, 0, width, row_grad, hit,
                                       BLOCK_B, BLOCK_W)  # fmt: skip
                        else:
                            tl.atomic_add(grad_ptr + cells, row_grad, mask=inside, sem="relaxed")
                        _list_rows(flags_ptr + first_flag, rows_ptr, count_ptr, local, hit, tag, BLOCK_B)
                    total += tl.dot(tl.trans(pooled), grad, input_precision="ieee")  # [BLOCK_W, BLOCK_D]
                # Every id of the step adds to the same P_i elements, so the program sums its
                # bags first and adds once: per-id atomics would serialise on those addresses.
                # proj_at, not at: the D-wide branch's loop assigns ``at`` a [BLOCK_B] tensor, which
                # after this block (a projected block before a D-wide one) would be a loop-carried
                # value changing type, a compile error.
                proj_at = tl.load(row + 6 + 6 * NB + 3 * b) + wcols[:, None] * DIM + cols[None, :]
                tl.atomic_add(proj_grad_ptr + proj_at, total, mask=in_w[:, None] & in_d[None, :], sem="relaxed")
            else:  # a D-wide block: the row itself, so the row gradient is g
                for first in range(begin, batch, stride):
                    in_b, starts, lens, grad = _bag_grads(
                        offsets_ptr, grad_out_ptr, feature, mean, first, batch, grad_out_stride, cols, in_d, DIM, BLOCK_B
                    )  # fmt: skip
                    for i in range(0, tl.reduce(lens, 0, _longest)):
                        live = in_b & (i < lens)
                        ids = tl.load(ids_ptr + starts + i, mask=live, other=0)
                        local, hit = _block_local(_mixed_ranks(ids, live, n, remap_ptr, row, REMAP), live, row, b)
                        at = table_at + tl.where(hit, local, 0) * width
                        if VEC:
                            _add_quads(grad_ptr + at, 0, DIM, grad, hit, BLOCK_B, BLOCK_D)
                        else:
                            tl.atomic_add(
                                grad_ptr + at[:, None] + cols[None, :], grad, mask=hit[:, None] & in_d[None, :], sem="relaxed"
                            )  # fmt: skip
                        _list_rows(flags_ptr + first_flag, rows_ptr, count_ptr, local, hit, tag, BLOCK_B)

    @triton.jit
    def update_kernel(
        rows_ptr, count_ptr, grad_ptr, flags_ptr, weights_ptr, state_ptr, tables_ptr, lr, eps,
        OPT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TABLE_SHIFT: tl.constexpr,
    ):  # fmt: skip
        # tables row t: weights element offset, width, first flag, optimizer state element offset.
        count = tl.load(count_ptr).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        step = tl.num_programs(0).to(tl.int64) * BLOCK_R
        for first in range(tl.program_id(0).to(tl.int64) * BLOCK_R, count, step):
            at = first + tl.arange(0, BLOCK_R)
            live = at < count
            entry = tl.load(rows_ptr + at, mask=live, other=0)
            table = entry >> TABLE_SHIFT
            r = entry & ((1 << TABLE_SHIFT) - 1)
            info = tables_ptr + table * 4
            width = tl.load(info + 1, mask=live, other=1)
            where = tl.load(info, mask=live, other=0) + r * width
            inside = live[:, None] & (cols[None, :] < width[:, None])
            cells = where[:, None] + cols[None, :]
            g = tl.load(grad_ptr + cells, mask=inside, other=0.0)
            w = tl.load(weights_ptr + cells, mask=inside, other=0.0)
            if OPT == 0:  # rowwise Adagrad: one accumulator per row, the mean of g * g over D
                state = state_ptr + tl.load(info + 3, mask=live, other=0) + r
                mean_square = tl.math.div_rn(tl.reduce(g * g, 1, _add), width.to(tl.float32))
                m = tl.load(state, mask=live, other=0.0) + mean_square
                tl.store(state, m, mask=live)
                multiplier = tl.math.div_rn(tl.full([BLOCK_R], lr, tl.float32), tl.sqrt_rn(m) + eps)
                w = w - multiplier[:, None] * g
            elif OPT == 1:  # Adagrad: one accumulator per element
                state = state_ptr + tl.load(info + 3, mask=live, other=0)[:, None] + r[:, None] * width[:, None] + cols[None, :]
                m = tl.load(state, mask=inside, other=0.0) + g * g
                tl.store(state, m, mask=inside)
                w = w - tl.math.div_rn(lr * g, tl.sqrt_rn(m) + eps)
            else:  # SGD
                w = w - lr * g
            tl.store(weights_ptr + cells, w, mask=inside)
            tl.store(grad_ptr + cells, tl.full([BLOCK_R, BLOCK_D], 0.0, tl.float32), mask=inside)
            tl.store(flags_ptr + tl.load(info + 2, mask=live, other=0) + r, tl.full([BLOCK_R], 0, tl.int32), mask=live)

    # Inline PTX (``add_quads``) exists only for compiled kernels: the interpreter gets VEC=0.
    globals()["_COMPILED"] = not type(grad_kernel).__name__.startswith("Interpreted")
    return grad_kernel, mixed_grad_kernel, update_kernel


_COMPILED = False  # set by _kernels(): whether they were built for the compiler (not the interpreter)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability; (9, 0) for a CPU tensor (only the sm_90 compile test
    launches compiled kernels with CPU tensors: its launches are recorded, never run)."""
    if device.type != "cuda":
        return (9, 0)
    return torch.cuda.get_device_capability(device)


def _quads_ok(
    offsets: list[int], widths: list[int], dim: int, grad: torch.Tensor, capability: tuple[int, int] | None = None
) -> bool:
    """Whether a group's gradient rows may take ``add_quads``: switched on, compiled kernels, a
    GPU with the vector ``red`` (Hopper, sm_90, or newer: on an A100 ptxas rejects it), and every
    row and column range 16-byte aligned (element offsets and widths multiples of 4, the buffer
    aligned)."""
    capability = capability or _capability(grad.device)
    return (
        VECTOR_ATOMICS
        and _COMPILED
        and capability >= (9, 0)
        and dim % 4 == 0
        and grad.data_ptr() % 16 == 0
        and all(x % 4 == 0 for x in list(offsets) + list(widths))
    )


# -- the collection's side -------------------------------------------------------------------
@dataclass
class _TrainState:
    """A collection's training buffers and kernel arguments (see the module docstring for their
    memory), valid while the TBE's weights and optimizer state stay put (``key``)."""

    key: tuple
    plan: Any  # fused_lookup's _Plan (the forward's)
    optimizer: int
    state: torch.Tensor  # base of the optimizer state offsets (weights for SGD: never read)
    tables: torch.Tensor  # [T, 4] int64: weights offset, width, first flag, state offset
    max_width: int
    max_partitions: int
    total_rows: int
    grad: torch.Tensor  # fp32, laid out as the weights (same element offsets)
    flags: torch.Tensor  # int32 per row of every table, 0 between steps
    rows: torch.Tensor  # int64 list of the rows touched in the step
    count: torch.Tensor  # int32 [1]: rows listed
    params: dict
    # MixedDim's projection Parameters (the autograd function's inputs, in this order) and the
    # element offset of each one's gradient in the step's flat gradient buffer.
    projections: list[torch.nn.Parameter] = field(default_factory=list)
    projection_at: list[int] = field(default_factory=list)
    projection_elements: int = 0


_STATES: "weakref.WeakKeyDictionary[Any, tuple[tuple, _TrainState | None]]" = weakref.WeakKeyDictionary()
_PLANS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # plans with Pruned features


def _optimizer_kind(tbe: Any) -> int | None:
    """The kernel's code of the TBE's optimizer, or None where the TBE path must run (another
    optimizer, weight decay, gradient clipping, max_norm)."""
    kind = OPTIMIZERS.get(getattr(getattr(tbe, "optimizer", None), "name", ""))
    args = getattr(tbe, "optimizer_args", None)
    if kind is None or args is None:
        return None
    if getattr(args, "weight_decay", 0.0) != 0.0 or getattr(args, "gradient_clipping", False):
        return None
    if getattr(args, "max_norm", 0.0) != 0.0:
        return None
    return kind


def _state_key(tbe: Any) -> tuple:
    """Addresses of the TBE's optimizer state (fbgemm's flat ``momentum1_*``)."""
    return tuple(
        t.data_ptr() if isinstance(t, torch.Tensor) else None
        for t in (fused_lookup.module_attr(tbe, name) for name in ("momentum1_dev", "momentum1_host", "momentum1_uvm"))
    )


def _pruned_blocks(layout: Any) -> "fused_lookup.DenseBlocks | None":
    """Pruned as fused_lookup's D-wide blocks: the OOV map, then the remap (id -> compact row or
    -1) as the rank, and one block of the ``keep`` rows, so a pruned id (-1, or a prefix id past
    ``keep``) hits no block and reads a zero vector. ``missing="default"`` with a remap adds a
    second block over the same table that holds rank -1 alone, at row ``keep`` (the shared
    default row, trained like any row, as on the TBE path). Without a remap the default row is
    the row of every id past ``keep``, which no block test expresses: None (the TBE path).
    Anything other than Pruned: None."""
    from tablezip.compress.pruned import PrunedLayout

    if type(layout) is not PrunedLayout:
        return None
    keep = layout.keep
    if not layout.uses_remap:
        return None if layout.default else fused_lookup.DenseBlocks((0,), (keep,), (0,), None)
    if layout.default:  # ranks are -1 or in [0, keep): block 1 ([-keep - 1, 0)) holds -1 only
        return fused_lookup.DenseBlocks((0, -keep - 1), (keep, keep + 1), (0, 0), layout.remap)
    return fused_lookup.DenseBlocks((0,), (keep,), (0,), layout.remap)


def plan_for(collection: Any) -> Any:
    """The forward's plan: fused_lookup's (shared with inference), or for collections with Pruned
    features (which inference keeps on the TBE path) the same builder with ``_pruned_blocks``,
    cached here; rebuilt when the storage, the projections or a remap moved."""
    from tablezip.compress.pruned import PrunedLayout

    if not any(type(l) is PrunedLayout for l in collection.layouts.values()):
        return fused_lookup.plan_for(collection)
    return fused_lookup.cached_plan(_PLANS, collection, (PrunedLayout,), _pruned_blocks)


def _build_state(collection: Any, plan: Any, key: tuple, native: bool = False) -> _TrainState | None:
    """The step's arguments and buffers. ``native``: for the C step (compress/fused_cpu.py), which
    keeps its rows' gradients compactly (``flags`` is then its int32 slot per row, -1 between
    steps; no weights-sized ``grad`` buffer or row list)."""
    from tablezip.compress.compositional import CompositionalLayout
    from tablezip.compress.full import FullLayout
    from tablezip.compress.mixed_dim import MixedDimLayout
    from tablezip.compress.multihash import MultiHashLayout
    from tablezip.compress.pruned import PrunedLayout

    tbe = collection.tbe
    kind = _optimizer_kind(tbe)
    if kind is None or plan.weights is None:
        return None
    supported = (FullLayout, CompositionalLayout, MultiHashLayout, MixedDimLayout, PrunedLayout)
    if not native and not all(type(l) in supported for l in collection.layouts.values()):
        return None  # (the C kernels' plan covers more layouts: its plan decides)
    cache = getattr(tbe, "lxu_cache_weights", None)
    if isinstance(cache, torch.Tensor) and cache.numel() > 0:
        return None  # cached rows would be newer than the storage the kernels read
    tables = list(tbe.split_embedding_weights())
    base = plan.weights
    weight_at = [(t.data_ptr() - base.data_ptr()) // 4 for t in tables]
    widths = [t.shape[1] for t in tables]
    if kind == OPTIMIZERS["EXACT_SGD"]:
        state, state_at = base, [0] * len(tables)
    else:
        momentum = [s[0] for s in tbe.split_optimizer_states()]
        if any(m.dtype != torch.float32 or m.device != base.device or not m.is_contiguous() for m in momentum):
            return None
        storage = momentum[0].untyped_storage().data_ptr()
        if any(m.untyped_storage().data_ptr() != storage for m in momentum):
            return None
        state = min(momentum, key=lambda m: m.data_ptr())
        state_at = [(m.data_ptr() - state.data_ptr()) // 4 for m in momentum]
    row_base, total = [], 0
    for t in tables:
        row_base.append(total)
        total += t.shape[0]
    table_of = {offset: i for i, offset in enumerate(weight_at)}
    span = max(at + t.numel() for at, t in zip(weight_at, tables))
    device = base.device
    info = torch.tensor(list(zip(weight_at, widths, row_base, state_at)), dtype=torch.int64, device=device)
    # Each feature's partitions / blocks -> (first flag, table index): from the plan's table offsets.
    extra = {}
    for f in plan.features:
        slots = [table_of[offset] for offset in f.table_offsets]
        extra[f.feature] = [x for t in slots for x in (row_base[t], t)]
    for h in plan.hybrid:  # (the C kernels' plans only)
        t = table_of[h.table_offset]
        extra[("hybrid", h.feature)] = [row_base[t], t]
    # MixedDim blocks: (first flag, table index, offset of the projection's gradient); the
    # projection Parameters in the order of their gradients.
    layouts = list(collection.layouts.values())
    projections: list[torch.nn.Parameter] = []
    projection_at: list[int] = []
    elements = 0
    for m in plan.mixed:
        values = []
        for b, offset in enumerate(m.table_offsets):
            t = table_of[offset]
            at = 0
            if m.projection_offsets[b] is not None:
                p = layouts[m.feature].projection_of(b)
                assert (p.data_ptr() - base.data_ptr()) // 4 == m.projection_offsets[b]  # the plan's own tensor
                at = elements
                projections.append(p)
                projection_at.append(at)
                elements += p.numel()
            values += [row_base[t], t, at]
        extra[("mixed", m.feature)] = values
    return _TrainState(
        key=key, plan=plan, optimizer=kind, state=state, tables=info, max_width=max(widths),
        max_partitions=max([len(f.partitions) for f in plan.features] + [1]), total_rows=total,
        grad=torch.zeros(0 if native else span, dtype=torch.float32, device=device),
        flags=torch.full((total,), -1 if native else 0, dtype=torch.int32, device=device),
        rows=torch.empty(0 if native else total, dtype=torch.int64, device=device),
        count=torch.zeros(1, dtype=torch.int32, device=device),
        params={"extra": extra}, projections=projections, projection_at=projection_at, projection_elements=elements,
    )  # fmt: skip


def state_for(collection: Any) -> _TrainState | None:
    """The collection's training state, or None where its training keeps the TBE path; rebuilt
    (buffers included) when the TBE's weights, its optimizer state, a projection or a remap
    moved."""
    plan = plan_for(collection)
    key = plan.key + _state_key(collection.tbe)
    cached = _STATES.get(collection)
    if cached is None or cached[0] != key:
        cached = _STATES[collection] = (key, _build_state(collection, plan, key))
    return cached[1]


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def backward_step(
    state: _TrainState, tbe: Any, ids: torch.Tensor, offsets: torch.Tensor, grad_out: torch.Tensor, batch: int, dim: int
) -> torch.Tensor | None:
    """Accumulate the rows' gradients of ``grad_out`` ([batch, F * dim]) and apply the TBE's
    optimizer to the touched rows (see the module docstring). Returns the MixedDim projections'
    gradients (fp32, flat, at ``state.projection_at``), None without projections."""
    grad_kernel, mixed_grad_kernel, update_kernel = _kernels()
    grad_out = grad_out.contiguous()
    block_d = _pow2(dim)
    groups: dict[tuple[int, str, int, int], list[Any]] = {}
    for f in state.plan.features:
        small = sum(1 << j for j, rows in enumerate(f.partitions) if rows <= SMALL_ROWS)
        groups.setdefault((len(f.partitions), f.op, f.width, small), []).append(f)
    extra = state.params["extra"]
    for (k, op, width, small), members in groups.items():
        key = (k, op, width, small, tuple(members))
        params = state.params.get(key)
        if params is None:
            rows = [
                [f.feature, f.num_embeddings, int(f.mean)]
                + [x for j in range(k) for x in (f.strides()[j], f.partitions[j], f.table_offsets[j])]
                + extra[f.feature]
                for f in members
            ]
            params = state.params[key] = torch.tensor(rows, dtype=torch.int64, device=ids.device)
        grid = (-(-batch // GRAD_BLOCK_BAGS), len(members))
        grad_kernel[grid](
            ids, offsets, grad_out, state.plan.weights, state.grad, state.flags, state.rows, state.count, params,
            batch, grad_out.stride(0),
            K=k, OP=fused_lookup.OPS[op], WIDTH=width, DIM=dim, BLOCK_B=GRAD_BLOCK_BAGS, BLOCK_D=block_d,
            MIX1=fused_lookup._MIX[0], MIX2=fused_lookup._MIX[1], TABLE_SHIFT=TABLE_BITS, SMALL=small,
            VEC=_quads_ok([o for f in members for o in f.table_offsets], [width], dim, state.grad),
            num_warps=fused_lookup.NUM_WARPS,
        )  # fmt: skip
    projection_grad = None
    if state.projection_elements:
        projection_grad = torch.zeros(state.projection_elements, dtype=torch.float32, device=ids.device)
    mixed_groups: dict[tuple[int, bool, int], list[Any]] = {}
    for m in state.plan.mixed:
        projected = sum(1 << b for b, p in enumerate(m.projection_offsets) if p is not None)
        mixed_groups.setdefault((len(m.starts), m.remap_offset is not None, projected), []).append(m)
    for (nb, remapped, projected), members in mixed_groups.items():
        key = ("mixed", nb, remapped, projected, tuple(members))
        params = state.params.get(key)
        if params is None:
            rows = [
                [m.feature, m.num_embeddings, int(m.mean), m.remap_offset or 0]
                + [
                    x
                    for b, p in enumerate(m.projection_offsets)
                    for x in (m.starts[b], m.rows[b], m.table_offsets[b], m.widths[b], int(p is not None), p or 0)
                ]
                + extra[("mixed", m.feature)]
                for m in members
            ]
            params = state.params[key] = torch.tensor(rows, dtype=torch.int64, device=ids.device)
        # tl.dot wants every side >= 16: the tiles are padded (masked) up to it.
        widths = [w for m in members for w, p in zip(m.widths, m.projection_offsets) if p is not None]
        block_w = max(16, _pow2(max(widths, default=16)))
        programs = -(-batch // (MIXED_BLOCK_BAGS * MIXED_BAG_BLOCKS))
        mixed_grad_kernel[(programs, len(members))](
            ids, offsets, grad_out, state.plan.weights, state.plan.remaps if remapped else params, state.grad,
            state.flags, state.rows, state.count, projection_grad if projection_grad is not None else state.grad,
            params, batch, grad_out.stride(0),
            NB=nb, REMAP=remapped, PROJ=projected, DIM=dim, BLOCK_B=MIXED_BLOCK_BAGS, BLOCK_D=max(16, block_d),
            BLOCK_W=block_w, TABLE_SHIFT=TABLE_BITS,
            VEC=_quads_ok([o for m in members for o in m.table_offsets], [w for m in members for w in m.widths], dim, state.grad),
            num_warps=fused_lookup.NUM_WARPS,
        )  # fmt: skip
    # At most one list entry per id and partition (and per row): the grid covers that bound,
    # the loop inside stops at the device-side count, so the host never waits for it.
    bound = min(state.total_rows, ids.numel() * state.max_partitions)
    programs = max(1, min(MAX_UPDATE_PROGRAMS, -(-bound // BLOCK_ROWS)))
    block_w = _pow2(state.max_width)
    update_kernel[(programs,)](
        state.rows, state.count, state.grad, state.flags, state.plan.weights, state.state, state.tables,
        float(tbe.learning_rate_tensor), float(tbe.optimizer_args.eps),
        OPT=state.optimizer, BLOCK_R=BLOCK_ROWS, BLOCK_D=block_w, TABLE_SHIFT=TABLE_BITS, num_warps=UPDATE_WARPS,
    )  # fmt: skip
    state.count.zero_()
    return projection_grad


class _FusedTrainLookup(torch.autograd.Function):
    """Pooled forward from the fused lookup kernels; the backward is the fused optimizer step, as
    TBE's own autograd function does it (the TBE's placeholder is the input that carries grad),
    and returns the MixedDim projections' gradients (inputs after ``batch``), which the user's
    dense optimizer applies, as on the TBE path."""

    @staticmethod
    def forward(ctx: Any, placeholder: torch.Tensor, collection: Any, state: _TrainState, ids: torch.Tensor,
                offsets: torch.Tensor, batch: int, in_c: bool, *projections: torch.Tensor) -> torch.Tensor:  # fmt: skip
        from tablezip.compress import fused_cpu

        plan = state.plan
        # The kernels read the projections in place (counted from the weights pointer): the
        # arguments only carry them through autograd.
        ranks = None
        if in_c:
            if fused_cpu.keeps_ranks(plan):
                ranks = torch.empty(ids.numel(), dtype=torch.int32)
            out = fused_cpu.forward(plan, ids, offsets, batch, len(collection.features), collection.dim, ranks)
        else:
            out = fused_lookup.pooled_lookup(
                ids, offsets, batch, len(collection.features), collection.dim, plan.weights, plan.features,
                plan.params, plan.mixed, plan.remaps,
            )  # fmt: skip
        ctx.save_for_backward(ids, offsets)
        ctx.collection, ctx.state, ctx.batch, ctx.in_c, ctx.ranks = collection, state, batch, in_c, ranks
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ids, offsets = ctx.saved_tensors
        collection, state = ctx.collection, ctx.state
        if ctx.in_c:
            from tablezip.compress import fused_cpu

            flat = fused_cpu.backward_step(state, collection.tbe, ids, offsets, grad_out, ctx.batch, collection.dim, ctx.ranks)
            ctx.ranks = None
        else:
            flat = backward_step(state, collection.tbe, ids, offsets, grad_out, ctx.batch, collection.dim)
        grads = tuple(
            flat[at : at + p.numel()].view_as(p) if flat is not None and ctx.needs_input_grad[7 + i] else None
            for i, (p, at) in enumerate(zip(state.projections, state.projection_at))
        )
        return (None, None, None, None, None, None, None) + grads


def _advance_iter(tbe: Any, kind: int) -> None:
    """fbgemm's forward advances ``iter`` (checkpoints) for rowwise Adagrad, not for SGD or
    Adagrad; the fused step does the same so the TBE's state matches the TBE path's."""
    if kind != OPTIMIZERS["EXACT_ROWWISE_ADAGRAD"]:
        return
    iter_cpu = getattr(tbe, "iter_cpu", None)
    if isinstance(iter_cpu, torch.Tensor):
        if iter_cpu.device.type != "cpu":  # (re-assigning a CPU buffer to itself cost 2 us per step)
            tbe.iter_cpu = iter_cpu = iter_cpu.cpu()
        if iter_cpu.item() == 0:
            iter_cpu.fill_(tbe.iter.cpu().item())
        iter_cpu.add_(1)
    tbe.iter.add_(1)


def auto_wants(plan: Any) -> bool:
    """Whether mode "auto" takes the fused step for a collection with this plan: not when a
    feature's op is one the fused step trains slower than the TBE path (``AUTO_SKIPS``)."""
    return not any(f.op in AUTO_SKIPS for f in plan.features)


def pooled(collection: Any, ids: torch.Tensor, offsets: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The collection's pooled output [batch, F * D] whose backward is the fused training step, or
    None where the TBE path must run (see the module docstring). ``ids``/``offsets``: the
    ordered KJT's values and offsets."""
    from tablezip.compress import fused_cpu

    if batch == 0 or ids.numel() == 0 or not torch.is_grad_enabled():
        return None
    in_c = not enabled_for(ids)  # on a CPU in mode "auto": the C step (compress/fused_cpu.py)
    if in_c and not fused_cpu.wanted(ids, _switch.value):
        return None
    placeholder = getattr(collection.tbe, "placeholder_autograd_tensor", None)
    if not isinstance(placeholder, torch.Tensor) or not placeholder.requires_grad:
        return None
    # Checked before the state: a skipped collection never allocates the step's buffers.
    c_plan = fused_cpu.plan_for(collection) if in_c else None
    if in_c and not fused_cpu.takes(c_plan):
        return None
    if not in_c and _switch.value == "auto" and not auto_wants(plan_for(collection)):
        return None
    state = fused_cpu.state_for(collection, c_plan) if in_c else state_for(collection)
    if state is None or state.plan.weights.device != ids.device:
        return None
    _advance_iter(collection.tbe, state.optimizer)
    return _FusedTrainLookup.apply(
        placeholder, collection, state, ids.contiguous(), offsets.to(torch.int64).contiguous(), batch, in_c,
        *state.projections,
    )  # fmt: skip
