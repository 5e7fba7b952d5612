"""Fused GPU inference lookup: compositional embeddings (QR / KWay), MultiHash and MixedDim read,
combined and pooled by Triton kernels, straight from the TBE's weight storage.

Why: ``op="mult"`` is not linear, so the TBE path looks every id up unpooled (one "bag" per id
and partition table: k rows of D floats written out per id), multiplies the k parts with torch
ops, pools the products with ``index_add_`` (or not at all for one-id bags) and concatenates the
features' vectors: on an H100 at 26 x 1M rows, D=64, B=65536 that was 3.6 ms against Full's
0.8 ms. Per bag, this kernel computes each id's partition rows (the same mixed-radix maths as
``CompositionalLayout.transform``), loads those rows from the tables in place, multiplies (or
adds, or concatenates) them in registers, sums over the bag and writes the feature's [B, D]
slice of the output once. Full features beside them are the one-partition case (their OOV map
is the quotient digit), so a typical Full + QR collection is one launch per (partitions, op,
table width).

MultiHash is the same kernel with ``op="multihash"``: the "partitions" are the k probes, all
reading the feature's one shared table, each row the splitmix64 hash of the id with the probe's
mixed seed (``fused_ids``' HASH maths, no OOV map), summed in probe order. Why: the TBE path
hashes in separate launches, stacks the probes and has TBE pool bags of k rows (1.24-1.28x
Full's forward on the H100); here the hash costs nothing beside the row reads.

MixedDim has its own kernel (``MixedLookup``): per id the OOV map, the remap gather where there
is one (int32, counted from one base pointer), the block whose ranks hold it, its ``d_i``-wide
row and, for blocks narrower than D, ``row @ P_i^T`` summed one input column at a time (the
projection is read in place: it is counted from the weights pointer, so trained or loaded
projections are used as they are), accumulated over the bag. Ranks past every block (``keep``)
read nothing: a zero vector, as the TBE path's dropped ids. Why: the TBE path pays per-block
slots, drop handling and a projection pass over the pooled output (2.77x Full's forward).

On a CPU, mode "auto" hands the collection to the compiled C kernel of compress/fused_cpu.py
instead, on that module's plan (this one plus Pruned, Hash, Unified and Hybrid; its own switch,
``fused_cpu.mode``).

When: inference only (``torch.is_grad_enabled()`` False: ``no_grad`` or ``inference_mode``),
ids on CUDA and Triton importable (``mode("auto")``), every feature Full or QR/KWay, and the
tables in fp32 storage of one fbgemm training TBE (MixedDim: projections fp32 and contiguous,
remaps int32, on the same device; a moved projection or remap rebuilds the plan). Training keeps the TBE path: its
fused-optimizer backward needs TBE's autograd. ``mode("off")`` forces the TBE path (A/B
benchmarks, the reference); ``mode("on")`` also runs on CPU tensors, through Triton's
interpreter (``TRITON_INTERPRET=1`` before the first kernel is built), which is how the CPU tests
check it. Importing this module never imports Triton.

Exactness against the TBE path: for bags of one id the products are formed in the same order
(``combine`` multiplies left to right) and the bag sum is 0 + product, so the output is
bit-identical (``mult``; ``add`` is 0 + (r0 + r1 + ...), also the same additions; ``concat``
copies; ``multihash`` is 0 + (r0 + r1 + ...) where TBE's folded bag adds ((0 + r0) + r1) + ...,
the same sums since 0 + r0 is r0). MixedDim ids of D-wide blocks (and Full) are bit-identical too
(the row plus exact zeros); projected blocks are allclose (rtol 1e-5, atol 1e-6 in the tests):
the kernel projects each id and sums column by column, the TBE path pools per block first and
multiplies with the BLAS's own summation order (on the H100, cuBLAS happened to agree bit for
bit on the benchmark's tables). A possible fused multiply-add of the bag sum with the last factor rounds once, which
with a zero accumulator is the product's own rounding. For longer bags the TBE path pools in
another order (per table then combined, or ``index_add_`` of per-id products with atomics on
CUDA), so the results are allclose, not bit-equal. Mean pooling divides with IEEE rounding
(``div_rn``), as torch does.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tablezip.compress.kernel_switch import MODES, KernelSwitch, triton_available  # noqa: F401

OPS = {"mult": 0, "add": 1, "concat": 2, "multihash": 3}
# splitmix64's multipliers (compress/hashing.MIX), as the unsigned constants the kernel multiplies by
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
BLOCK_BAGS = 32  # bags per program; each program covers every column of one feature's bags
NUM_WARPS = 4


_switch = KernelSwitch()
mode = _switch.mode


def current_mode() -> str:
    return _switch.value


def enabled_for(ids: torch.Tensor) -> bool:
    """Whether the fused lookup may run for ``ids`` under the current ``mode`` (inference only)."""
    return not torch.is_grad_enabled() and _switch.wants_kernel(ids)


@dataclass(frozen=True)
class FeatureLookup:
    """What the kernel needs of one feature: its position in the output (``feature``, also its
    index in the KJT's offsets), its id space (ids outside ``[0, num_embeddings)`` read the OOV
    id ``num_embeddings``), the combine ``op``, the mixed-radix ``partitions`` (most significant
    first; Full is the single partition ``(num_embeddings + 1,)``), each partition table's
    element offset from the weights pointer, the tables' row ``width`` (D, or D / k for concat)
    and whether the bag is averaged."""

    feature: int
    num_embeddings: int
    op: str
    partitions: tuple[int, ...]
    table_offsets: tuple[int, ...]
    width: int
    mean: bool
    seeds: tuple[int, ...] = ()  # multihash: each probe's mixed seed (hashing.seed_mix)

    def strides(self) -> list[int]:
        """Divisor of each digit: digit j is ``(id // stride_j) % partitions[j]`` (no modulo for
        the first, the quotient), as ``mixed_radix_digits`` computes it."""
        if self.op in ("multihash", "hashcat"):
            return list(self.seeds)  # the params column that holds strides holds the seeds here
        strides = [1] * len(self.partitions)
        for j in range(len(self.partitions) - 2, -1, -1):
            strides[j] = strides[j + 1] * self.partitions[j + 1]
        return strides


@dataclass(frozen=True)
class MixedLookup:
    """What the mixed-dimension kernel needs of one MixedDim feature: per frequency block its
    first rank (``starts``), its table's rows (the OOV row in the last block; only ranks below
    ``keep`` with ``keep``), the table's element offset from the weights pointer and row width,
    and the element offset of its projection ``P_i^T`` ([width, D], fp32, also counted from the
    weights pointer, so it may be negative) or None for a D-wide block used as it is. ``remap_offset``: element offset of
    the feature's int32 id -> rank array from the remap base pointer, None without one."""

    feature: int
    num_embeddings: int
    starts: tuple[int, ...]
    rows: tuple[int, ...]
    table_offsets: tuple[int, ...]
    widths: tuple[int, ...]
    projection_offsets: tuple[int | None, ...]
    remap_offset: int | None
    mean: bool


@functools.lru_cache(maxsize=None)
def _kernel() -> Any:
    """Build the Triton kernel (once per process; ``TRITON_INTERPRET`` is read here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def longest(a, b):
        return tl.maximum(a, b)

    # Our own combine for tl.reduce: tl.max is a @jit library function, which the CPU interpreter
    # cannot run when Triton was imported before TRITON_INTERPRET was set. A kernel finds the
    # functions it calls among its module's globals, so the combine is put there.
    globals()["_longest"] = longest

    @triton.jit
    def partition_row(ids, stride, radix, J: tl.constexpr, OP: tl.constexpr, MIX1: tl.constexpr, MIX2: tl.constexpr):
        # Row of partition (multihash: probe) J of each id. Shared with the fused training
        # kernels (compress/fused_train.py), so forward and backward find the same rows.
        if OP == 3:
            # Probe J's row: splitmix64 of id ^ mixed seed (``stride``) on uint64 (wrapping
            # multiplies, logical shifts), top 63 bits modulo rows; fused_ids' HASH maths exactly.
            z = (ids ^ stride).to(tl.uint64, bitcast=True)
            z = (z ^ (z >> 30)) * MIX1
            z = (z ^ (z >> 27)) * MIX2
            z = z ^ (z >> 31)
            digit = ((z >> 1) % radix.to(tl.uint64, bitcast=True)).to(tl.int64, bitcast=True)
        else:
            digit = ids // stride
            if J > 0:
                digit = digit % radix
        return digit

    globals()["_partition_row"] = partition_row

    @triton.jit
    def lookup_kernel(
        ids_ptr, offsets_ptr, out_ptr, weights_ptr, params_ptr, batch, out_stride,
        K: tl.constexpr, OP: tl.constexpr, WIDTH: tl.constexpr, DIM: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, MIX1: tl.constexpr, MIX2: tl.constexpr,
    ):  # fmt: skip
        # params row of this program's feature: feature, num_embeddings, mean, then per
        # partition j: stride (multihash: the probe's mixed seed), radix (rows), table element
        # offset (multihash: the same table for every probe).
        row = params_ptr + tl.program_id(1) * (3 + 3 * K)
        feature = tl.load(row)
        n = tl.load(row + 1)
        mean = tl.load(row + 2)
        bags = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = bags < batch
        starts = tl.load(offsets_ptr + feature * batch + bags, mask=in_b, other=0)
        lens = tl.load(offsets_ptr + feature * batch + bags + 1, mask=in_b, other=0) - starts
        cols = tl.arange(0, BLOCK_D)
        in_d = cols < DIM
        # tl.full, not tl.zeros (a @jit library function the interpreter runs only when Triton
        # was imported with TRITON_INTERPRET set; see fused_ids).
        acc = tl.full([BLOCK_B, BLOCK_D], 0.0, tl.float32)
        for i in range(0, tl.reduce(lens, 0, _longest)):
            live = in_b & (i < lens)
            ids = tl.load(ids_ptr + starts + i, mask=live, other=0)
            if OP != 3:  # multihash hashes every int64 id, as hashing.hash_ids does (no OOV row)
                ids = tl.where((ids >= 0) & (ids < n), ids, n)  # Full's OOV map
            vec = tl.full([BLOCK_B, BLOCK_D], 0.0, tl.float32)
            for j in tl.static_range(K):
                # digit j: the quotient/remainder digit, or probe j's splitmix64 row (multihash)
                digit = _partition_row(ids, tl.load(row + 3 + 3 * j), tl.load(row + 4 + 3 * j), j, OP, MIX1, MIX2)
                base = weights_ptr + tl.load(row + 5 + 3 * j) + digit[:, None] * WIDTH
                if OP == 2:  # concat: partition j fills columns [j * WIDTH, (j + 1) * WIDTH)
                    mine = (cols >= j * WIDTH) & (cols < (j + 1) * WIDTH)
                    part = tl.load(base + (cols - j * WIDTH)[None, :], mask=live[:, None] & mine[None, :], other=0.0)
                    vec = tl.where(mine[None, :], part, vec)
                else:
                    part = tl.load(base + cols[None, :], mask=live[:, None] & in_d[None, :], other=0.0)
                    if j == 0:
                        vec = part
                    elif OP == 0:  # mult, left to right like CompositionalLayout.combine
                        vec = vec * part
                    else:  # add, and multihash's probe sum (probe order, as TBE's folded bag)
                        vec = vec + part
            acc += vec
        # div_rn does not broadcast: the divisor is spread over the columns first.
        denom = tl.broadcast_to(tl.maximum(lens, 1).to(tl.float32)[:, None], (BLOCK_B, BLOCK_D))
        acc = tl.where(mean != 0, tl.math.div_rn(acc, denom), acc)
        out = out_ptr + bags[:, None] * out_stride + feature * DIM + cols[None, :]
        tl.store(out, acc, mask=in_b[:, None] & in_d[None, :])

    return lookup_kernel


@functools.lru_cache(maxsize=None)
def _mixed_kernel() -> Any:
    """Build the MixedDim kernel (once per process; ``TRITON_INTERPRET`` is read here)."""
    import triton
    import triton.language as tl

    _kernel()  # puts the tl.reduce combine (_longest) among this module's globals

    @triton.jit
    def mixed_ranks(ids, live, n, remap_ptr, row, REMAP: tl.constexpr):
        # Frequency rank of each id (mixed_dim.id_ranks): the OOV rank is n, then the int32 remap
        # (its offset at row + 3) where there is one. Shared with the fused training kernels
        # (compress/fused_train.py), so forward and backward find the same rows.
        ranks = tl.where((ids >= 0) & (ids < n), ids, n)
        if REMAP:
            ranks = tl.load(remap_ptr + tl.load(row + 3) + ranks, mask=live, other=0).to(tl.int64)
        return ranks

    @triton.jit
    def block_local(ranks, live, row, B: tl.constexpr):
        # Row of each rank in block B's table and whether the block holds it: an id reads the one
        # block whose ranks hold it; ranks past every block (>= keep) read none.
        local = ranks - tl.load(row + 4 + 6 * B)
        hit = live & (local >= 0) & (local < tl.load(row + 5 + 6 * B))
        return local, hit

    globals()["_mixed_ranks"] = mixed_ranks
    globals()["_block_local"] = block_local

    @triton.jit
    def mixed_kernel(
        ids_ptr, offsets_ptr, out_ptr, weights_ptr, remap_ptr, params_ptr, batch, out_stride,
        NB: tl.constexpr, REMAP: tl.constexpr, DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # params row: feature, num_embeddings, mean, remap offset, then per block: first rank,
        # rows, table offset, width, projected (0: D wide, the row itself), projection offset.
        row = params_ptr + tl.program_id(1) * (4 + 6 * NB)
        feature = tl.load(row)
        n = tl.load(row + 1)
        mean = tl.load(row + 2)
        bags = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_b = bags < batch
        starts = tl.load(offsets_ptr + feature * batch + bags, mask=in_b, other=0)
        lens = tl.load(offsets_ptr + feature * batch + bags + 1, mask=in_b, other=0) - starts
        cols = tl.arange(0, BLOCK_D)
        in_d = cols < DIM
        acc = tl.full([BLOCK_B, BLOCK_D], 0.0, tl.float32)
        for i in range(0, tl.reduce(lens, 0, _longest)):
            live = in_b & (i < lens)
            ids = tl.load(ids_ptr + starts + i, mask=live, other=0)
            ranks = _mixed_ranks(ids, live, n, remap_ptr, row, REMAP)
            for b in tl.static_range(NB):
                # Ranks past every block (>= keep) read nothing: a zero vector, as the TBE path's
                # dropped ids.
                local, hit = _block_local(ranks, live, row, b)
                width = tl.load(row + 7 + 6 * b)
                base = weights_ptr + tl.load(row + 6 + 6 * b) + tl.where(hit, local, 0) * width
                projection = tl.load(row + 9 + 6 * b)
                if tl.load(row + 8 + 6 * b) == 0:  # a D-wide block: the row itself
                    acc += tl.load(base[:, None] + cols[None, :], mask=hit[:, None] & in_d[None, :], other=0.0)
                else:  # row @ P_i^T, one input column at a time (P_i is small and stays in cache)
                    for c in range(0, width):
                        x = tl.load(base + c, mask=hit, other=0.0)
                        p = tl.load(weights_ptr + projection + c * DIM + cols, mask=in_d, other=0.0)
                        acc += x[:, None] * p[None, :]
        denom = tl.broadcast_to(tl.maximum(lens, 1).to(tl.float32)[:, None], (BLOCK_B, BLOCK_D))
        acc = tl.where(mean != 0, tl.math.div_rn(acc, denom), acc)
        out = out_ptr + bags[:, None] * out_stride + feature * DIM + cols[None, :]
        tl.store(out, acc, mask=in_b[:, None] & in_d[None, :])

    return mixed_kernel


def pooled_lookup(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    batch: int,
    num_features: int,
    dim: int,
    weights: torch.Tensor,
    features: Sequence[FeatureLookup],
    params_cache: dict | None = None,
    mixed: Sequence[MixedLookup] = (),
    remaps: torch.Tensor | None = None,
) -> torch.Tensor:
    """[batch, num_features * dim] pooled vectors of ``features`` from one launch per
    (partitions, op, width) group. ``ids`` (int64) and ``offsets`` ([num_features * batch + 1],
    int64) are a KJT's values and offsets; ``weights`` is the fp32 tensor the table offsets
    count from. Columns of features not listed are left uninitialised. ``params_cache`` keeps
    the small per-group parameter tensors between calls. ``mixed``: MixedDim features, one
    launch per (blocks, remap or not) group; ``remaps`` is the int32 tensor their remap offsets
    count from."""
    out = torch.empty(batch, num_features * dim, dtype=torch.float32, device=ids.device)
    if batch == 0:
        return out
    groups: dict[tuple[int, str, int], list[FeatureLookup]] = {}
    for f in features:
        groups.setdefault((len(f.partitions), f.op, f.width), []).append(f)
    kernel = _kernel()
    block_d = 1 << max(0, (dim - 1).bit_length())
    for (k, op, width), members in groups.items():
        key = (k, op, width, tuple(members), ids.device)
        params = params_cache.get(key) if params_cache is not None else None
        if params is None:
            rows = [
                [f.feature, f.num_embeddings, int(f.mean)]
                + [x for j in range(k) for x in (f.strides()[j], f.partitions[j], f.table_offsets[j])]
                for f in members
            ]
            params = torch.tensor(rows, dtype=torch.int64, device=ids.device)
            if params_cache is not None:
                params_cache[key] = params
        grid = (-(-batch // BLOCK_BAGS), len(members))
        kernel[grid](
            ids, offsets, out, weights, params, batch, out.stride(0),
            K=k, OP=OPS[op], WIDTH=width, DIM=dim, BLOCK_B=BLOCK_BAGS, BLOCK_D=block_d, MIX1=_MIX[0], MIX2=_MIX[1],
            num_warps=NUM_WARPS,
        )  # fmt: skip
    by_blocks: dict[tuple[int, bool], list[MixedLookup]] = {}
    for m in mixed:
        by_blocks.setdefault((len(m.starts), m.remap_offset is not None), []).append(m)
    for (nb, remapped), members in by_blocks.items():
        key = ("mixed", nb, remapped, tuple(members), ids.device)
        params = params_cache.get(key) if params_cache is not None else None
        if params is None:
            rows = [
                [m.feature, m.num_embeddings, int(m.mean), m.remap_offset or 0]
                + [
                    x
                    for b, p in enumerate(m.projection_offsets)
                    for x in (m.starts[b], m.rows[b], m.table_offsets[b], m.widths[b], int(p is not None), p or 0)
                ]
                for m in members
            ]
            params = torch.tensor(rows, dtype=torch.int64, device=ids.device)
            if params_cache is not None:
                params_cache[key] = params
        _mixed_kernel()[(-(-batch // BLOCK_BAGS), len(members))](
            ids, offsets, out, weights, remaps if remapped else params, params, batch, out.stride(0),
            NB=nb, REMAP=remapped, DIM=dim, BLOCK_B=BLOCK_BAGS, BLOCK_D=block_d, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


# -- the collection's side -------------------------------------------------------------------
class _Plan:
    """A collection's kernel arguments, valid while the TBE's weight storage stays put."""

    def __init__(
        self,
        key: tuple,
        weights: torch.Tensor | None,
        features: list[FeatureLookup],
        mixed: list[MixedLookup] | None = None,
        remaps: torch.Tensor | None = None,
    ) -> None:
        self.key = key
        self.weights = weights  # None: the collection is not supported
        self.features = features
        self.mixed = mixed or []
        self.remaps = remaps  # base of the MixedDim remaps' offsets (None: no remap)
        self.hybrid: list[HybridLookup] = []  # the C kernels' plans only (compress/fused_cpu.py)
        self.params: dict = {}


_PLANS: "weakref.WeakKeyDictionary[Any, _Plan]" = weakref.WeakKeyDictionary()


def module_attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, without the exception an ``nn.Module`` raises inside for a
    name it lacks (the plan and state keys ask the TBE on every call for fbgemm's flat tensors,
    of which it has one placement out of three, and the raised-and-caught AttributeErrors were a
    good part of a small lookup's Python time). The same lookup order: the class and the
    instance's own attributes first (left to ``getattr``), then the module's parameters, buffers
    and submodules."""
    if not isinstance(obj, torch.nn.Module) or name in obj.__dict__ or hasattr(type(obj), name):
        return getattr(obj, name, None)
    for store in (obj._parameters, obj._buffers, obj._modules):
        if name in store:
            return store[name]
    return None


def _storage_key(tbe: Any) -> tuple:
    """Cheap identity of the TBE's weight storage (fbgemm's flat ``weights_dev`` /
    ``weights_host`` / ``weights_uvm``): the plan is rebuilt when it moves."""
    key: list[Any] = [id(tbe)]
    for name in ("weights_dev", "weights_host", "weights_uvm"):
        t = module_attr(tbe, name)
        key.append(t.data_ptr() if isinstance(t, torch.Tensor) else None)
    return tuple(key)


@functools.cache
def _mixed_dim_layout() -> type:
    from tablezip.compress.mixed_dim import MixedDimLayout  # (imported here: it imports this module's package)

    return MixedDimLayout


def _dense_key(collection: Any) -> tuple:
    """Addresses of the dense tensors the plan points into besides the TBE storage (MixedDim
    projections and remaps): ``.to()`` or replacing a parameter moves them, ``load_state_dict``
    (an in-place copy) does not. Only MixedDim layouts are asked, as ``_build_plan`` reads these
    tensors of them alone (asking every layout for ``projections`` was most of the plan's 23 us
    lookup per forward at 26 Hash features)."""
    mixed = _mixed_dim_layout()
    key: list[Any] = []
    for layout in collection.layouts.values():
        if isinstance(layout, mixed):
            # Read from the modules' own stores (MixedDimLayout registers both, ``remap`` as a
            # buffer that may be None): ``layout.projections``, ``.remap`` and the ParameterDict's
            # values() each go through nn.Module.__getattr__, ~0.5 us apiece, 50-75 us per call
            # for 26 MixedDim features.
            key.extend(p.data_ptr() for p in layout._modules["projections"]._parameters.values())
            remap = layout._buffers.get("remap")
            key.append(remap.data_ptr() if isinstance(remap, torch.Tensor) else None)
    return tuple(key)


@dataclass(frozen=True)
class DenseBlocks:
    """A layout this module does not know, read as MixedDim-like D-wide blocks: per block its first
    rank, rows and which of the feature's tables (its index in ``feature_tables``) it reads, after
    the OOV map and the optional int32 ``remap`` (id -> rank). The fused training step describes
    Pruned this way (compress/fused_train.py); inference never passes one."""

    starts: tuple[int, ...]
    rows: tuple[int, ...]
    slots: tuple[int, ...]
    remap: torch.Tensor | None


@dataclass(frozen=True)
class HashedParts:
    """A layout this module does not know, read as hashed partitions: partition j's row of an id is
    the splitmix64 row of the id with ``seeds[j]`` (mixed) in ``rows`` (MultiHash's maths, no OOV
    map), the partitions summed (``op="multihash"``) or concatenated (``"hashcat"``, each ``width``
    wide). Only the C kernels (compress/fused_cpu.py) take it, for Hash and Unified on a CPU: the
    Triton kernels have no "hashcat"."""

    rows: int
    seeds: tuple[int, ...]
    op: str
    width: int


@dataclass(frozen=True)
class HybridRows:
    """Hybrid, for the C kernels only: an id's one row is its hot row (through the int32 ``remap``
    where there is one, else ids below ``hot``), or ``hot`` + the splitmix64 row of the id with
    ``seed`` (mixed) in ``cold_rows`` (compress/hybrid.py's maths)."""

    hot: int
    cold_rows: int
    seed: int
    remap: torch.Tensor | None


@dataclass(frozen=True)
class HybridLookup:
    """What the C kernels need of one Hybrid feature (``HybridRows`` placed: the table's element
    offset, the remap's offset from the plan's remap base and its length)."""

    feature: int
    mean: bool
    hot: int
    cold_rows: int
    seed: int
    table_offset: int
    remap_offset: int | None
    remap_size: int


def _build_plan(
    collection: Any, key: tuple, extra: Callable[[Any], DenseBlocks | HashedParts | HybridRows | None] | None = None
) -> _Plan:
    """The kernels' arguments for ``collection``. ``extra``: how to read the layouts of other types
    (None: that layout is not supported), for the fused training step's and the C kernels' plans."""
    import numpy as np

    from tablezip.compress.compositional import CompositionalLayout
    from tablezip.compress.full import FullLayout
    from tablezip.compress.hashing import seed_mix
    from tablezip.compress.mixed_dim import MixedDimLayout
    from tablezip.compress.multihash import MultiHashLayout, probe_seed

    unsupported = _Plan(key, None, [])
    layouts = list(collection.layouts.values())
    known = (FullLayout, CompositionalLayout, MultiHashLayout, MixedDimLayout)
    blocks = {i: extra(l) for i, l in enumerate(layouts) if type(l) not in known} if extra is not None else {}
    if not all(type(l) in known or blocks.get(i) is not None for i, l in enumerate(layouts)):
        return unsupported
    if not blocks and not any(isinstance(l, (CompositionalLayout, MultiHashLayout, MixedDimLayout)) for l in layouts):
        return unsupported  # Full alone is TBE's pooled passthrough already
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    except ImportError:
        return unsupported
    if not isinstance(collection.tbe, SplitTableBatchedEmbeddingBagsCodegen):
        return unsupported  # e.g. the int8/int4/fp16 inference TBE
    tables = list(collection.tbe.split_embedding_weights())
    if not tables or any(t.dtype != torch.float32 or t.dim() != 2 or (t.shape[0] > 1 and t.stride() != (t.shape[1], 1)) for t in tables):
        return unsupported
    storage = tables[0].untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() != storage for t in tables):
        return unsupported
    base = min(tables, key=lambda t: t.data_ptr())
    # The lowest-addressed remap is the base: every remap offset is then >= 0.
    remap_list = sorted(
        [l.remap for l in layouts if isinstance(l, MixedDimLayout) and l.remap is not None]
        + [b.remap for b in blocks.values() if isinstance(b, (DenseBlocks, HybridRows)) and b.remap is not None],
        key=lambda r: r.data_ptr(),
    )
    if any(r.device != base.device or r.dtype != torch.int32 or not r.is_contiguous() for r in remap_list):
        return unsupported
    for l in layouts:
        if isinstance(l, MixedDimLayout):
            dense = list(l.projections.values()) + ([l.remap] if l.remap is not None else [])
            if any(t.device != base.device or not t.is_contiguous() for t in dense):
                return unsupported
            if any(p.dtype != torch.float32 for p in l.projections.values()):
                return unsupported
            if l.remap is not None and l.remap.dtype != torch.int32:
                return unsupported
    features, mixed, hybrid = [], [], []
    for f, (layout, feature) in enumerate(zip(layouts, collection.features)):
        slots = collection.feature_tables(feature.name)
        offsets = tuple((tables[t].data_ptr() - base.data_ptr()) // 4 for t in slots)
        mean = feature.pooling.value == "mean"
        if isinstance(blocks.get(f), HybridRows):  # the C kernels' Hybrid
            y = blocks[f]
            remap_at = None if y.remap is None else (y.remap.data_ptr() - remap_list[0].data_ptr()) // 4
            size = 0 if y.remap is None else y.remap.numel()
            hybrid.append(HybridLookup(f, mean, y.hot, y.cold_rows, y.seed, offsets[0], remap_at, size))
            continue
        if isinstance(blocks.get(f), HashedParts):  # the C kernels' Hash and Unified
            h = blocks[f]
            features.append(FeatureLookup(f, feature.num_embeddings, h.op, (h.rows,) * len(h.seeds), offsets, h.width, mean, h.seeds))
            continue
        if f in blocks:  # D-wide blocks, no projection (the caller's layouts, e.g. Pruned in training)
            b = blocks[f]
            assert isinstance(b, DenseBlocks)
            remap_at = None if b.remap is None else (b.remap.data_ptr() - remap_list[0].data_ptr()) // 4
            mixed.append(MixedLookup(
                f, feature.num_embeddings, b.starts, b.rows, tuple(offsets[s] for s in b.slots),
                (collection.dim,) * len(b.starts), (None,) * len(b.starts), remap_at, mean,
            ))  # fmt: skip
            continue
        if isinstance(layout, MixedDimLayout):
            # Projections are counted from the weights pointer too (fp32, 4-byte aligned), so the
            # kernel needs no pointer per block; they are read in place, trained or loaded.
            projections = tuple(
                None if p is None else (p.data_ptr() - base.data_ptr()) // 4
                for p in (layout.projection_of(b) for b in range(len(layout.dims)))
            )
            remap_at = None if layout.remap is None else (layout.remap.data_ptr() - remap_list[0].data_ptr()) // 4
            starts = tuple(int(x) for x in np.cumsum([0] + layout.sizes[:-1]))
            mixed.append(
                MixedLookup(f, feature.num_embeddings, starts, tuple(layout._rows), offsets, tuple(layout.dims), projections, remap_at, mean)
            )
            continue
        seeds: tuple[int, ...] = ()
        if isinstance(layout, FullLayout):
            partitions, op, width = (feature.num_embeddings + 1,), "add", collection.dim
        elif isinstance(layout, MultiHashLayout):  # every probe slot reads the one shared table
            partitions, op, width = (layout.rows,) * layout.probes, "multihash", collection.dim
            seeds = tuple(seed_mix(probe_seed(layout.seed, p)) for p in range(layout.probes))
        else:
            partitions, op, width = tuple(layout.partitions), layout.op, layout.table_dim
        features.append(
            FeatureLookup(f, feature.num_embeddings, op, partitions, offsets, width, mean, seeds)
        )
    plan = _Plan(key, base, features, mixed, remap_list[0] if remap_list else None)
    plan.hybrid = hybrid
    return plan


def cached_plan(
    cache: "weakref.WeakKeyDictionary[Any, _Plan]", collection: Any, remapped: tuple[type, ...], extra: Callable[[Any], Any]
) -> _Plan:
    """``_build_plan(collection, extra=extra)``, kept in ``cache`` and rebuilt when the TBE's storage,
    the MixedDim tensors or the remap of a layout of the ``remapped`` types moved (the fused training
    step's and the C kernels' plans)."""
    layouts = [l for l in collection.layouts.values() if type(l) in remapped]
    key = (
        _storage_key(collection.tbe)
        + _dense_key(collection)
        + tuple(l.remap.data_ptr() if l.uses_remap else None for l in layouts)
    )
    plan = cache.get(collection)
    if plan is None or plan.key != key:
        plan = cache[collection] = _build_plan(collection, key, extra=extra)
    return plan


def plan_for(collection: Any) -> _Plan:
    """The collection's kernel plan (``weights`` None: not supported), rebuilt when the TBE's
    storage or the dense tensors it points into moved. Shared with the fused training path
    (compress/fused_train.py), which runs this forward kernel on the same plan."""
    key = _storage_key(collection.tbe) + _dense_key(collection)
    plan = _PLANS.get(collection)
    if plan is None or plan.key != key:
        plan = _PLANS[collection] = _build_plan(collection, key)
    return plan


def pooled(collection: Any, ids: torch.Tensor, offsets: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The collection's pooled output [batch, F * D] from the fused kernel (Triton's on CUDA, the C
    kernel on a CPU under "auto"), or None where the TBE path must run (training, mode "off", no
    Triton or compiler, or a collection the kernels do not cover). ``ids``/``offsets``: the ordered KJT's values and offsets."""
    from tablezip.compress import fused_cpu

    if torch.is_grad_enabled():
        return None
    if not enabled_for(ids):
        if not fused_cpu.wanted(ids, _switch.value):
            return None
        # On a CPU in mode "auto": the C kernel (compress/fused_cpu.py), on its own plan, which
        # also covers Pruned, Hash, Unified and Hybrid.
        plan = fused_cpu.plan_for(collection)
        if not fused_cpu.takes(plan):
            return None
        return fused_cpu.forward(
            plan, ids.contiguous(), offsets.to(torch.int64).contiguous(), batch, len(collection.features), collection.dim
        )
    plan = plan_for(collection)
    if plan.weights is None or plan.weights.device != ids.device:
        return None
    return pooled_lookup(
        ids.contiguous(), offsets.to(torch.int64).contiguous(), batch, len(collection.features), collection.dim,
        plan.weights, plan.features, plan.params, plan.mixed, plan.remaps,
    )  # fmt: skip
