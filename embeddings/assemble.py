"""The fused assemble: the collection's [B, F*D] output straight from TBE's pooled slots.

Why: when a collection cannot hand TBE's output back as it is (some feature combines several
slots, has narrow slots, or the slots are not in feature order), ``EmbeddingBagLookup._general``
calls ``combine`` per feature and concatenates the vectors. Under autograd every step of that
allocates: each product, sum or projection makes a fresh [B, D] tensor that the concatenation then
copies, and the backward allocates the gradient of each of them before ``split``'s backward copies
them all into the gradient TBE needs. On a CPU, where these ops are memory-bound and cheap to
dispatch, those extra passes and allocations are most of what the collection adds to fbgemm's
kernels (and the tens of MB allocated and freed per step make glibc hand memory back to the OS and
fault it in again on the next step).

Here one autograd function does it: the forward writes every feature's vector into the output in
place (``out=`` ops on column views: a copy, a product, a sum, a matrix product), the backward
writes every slot's gradient straight into ONE contiguous [bags, W] gradient of TBE's output.
The layouts say what their combine is (``FeatureLayout.combine_form``); a collection where some
layout says None keeps the per-feature path, and so does ``batch_transforms = False`` (the
reference) or ``fused_assemble = False``.

Exactness: identity, products, sums, concatenation and mean pooling are the very float ops the
per-feature path runs, in the same order, forward and backward, so results are bitwise equal
(tests/embeddings/test_assemble.py). MixedDim's projections are matrix products written into
column views, which BLAS may block differently from the per-feature ``addmm``: equal up to
rounding, tested with a tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import native
from .features import Pooling
from .registry import CombineForm, FeatureLayout
from .spare import SpareOutput

if TYPE_CHECKING:
    from .collection import EmbeddingBagLookup


@dataclass(frozen=True)
class _Op:
    """One feature's vector: its slots' columns in TBE's output and where the vector goes."""

    kind: str
    cols: tuple[tuple[int, int], ...]  # (first column, width) of each of its slots, slot order
    out: int  # first column of its vector in the output
    feature: int
    mean: bool
    projected: tuple[bool, ...] = ()  # "project": which slots have a weight
    slots: tuple[int, ...] = ()  # position of each of its slots among TBE's slots (column order)


class AssemblePlan:
    """The ops of one collection, fixed by its layouts and slot plan (built once, then cached)."""

    def __init__(
        self, ops: list[_Op], layouts: list[FeatureLayout], dim: int, width: int, widths: tuple[int, ...] = ()
    ) -> None:
        self.ops = ops
        self.layouts = layouts
        self.dim = dim
        self.width = width  # columns of TBE's output
        self.widths = widths  # of each TBE slot, in column order
        # True: every forward and backward takes its column views with one ``split`` per tensor
        # (TBE's output, its gradient, the output, the output's gradient) and reuses them; a
        # "project" op whose slots are all D wide (no weight) skips the contiguous copy of its
        # gradient that only the products need; and a gradient BLAS cannot read (the expanded one
        # of a plain ``sum``) is materialised into one scratch buffer reused by every op, whose
        # products run right after (a fresh [B, D] copy per op writes to cold memory). False: a
        # slice per use and a fresh copy per op (the "before" of that change in
        # benchmarks/NOTES.md, issue 3). The same float ops on the same values: bitwise equal.
        self.lean_views = bool(widths) and all(op.slots for op in ops)
        self.all_pooled = all(l.pooled_in_tbe for l in layouts)
        self.any_mean = any(op.mean for op in ops)
        self.saves_input = any(op.kind in ("mult", "project") for op in ops)
        # The backward writes TBE's gradient into TBE's own output (see ``_Assemble.backward``);
        # False allocates a fresh one (the "before" of that change in benchmarks/NOTES.md). A
        # ``gather`` plan (unified) keeps TBE's output for its backward only for this.
        self.reuse_output = True
        # The projected slots of every "project" op: (op index, slot index, index into
        # ``weights()``). One product per slot, written into its column view of the output, except
        # for runs of neighbouring same-width features (``batch_runs`` below: one bmm over strided
        # views, no stacking of the slots).
        self.projections: list[tuple[int, int, int]] = []
        for i, op in enumerate(ops):
            for j, has_weight in enumerate(op.projected):
                if has_weight:
                    self.projections.append((i, j, len(self.projections)))
        self.projections_of: dict[int, list[tuple[int, int]]] = {}  # op -> its (slot, weight index)
        for i, j, w in self.projections:
            self.projections_of.setdefault(i, []).append((j, w))
        # True (CPU only): the output's memory is kept when a forward returns and the next forward
        # writes into it again if nothing else holds it by then (see ``output``). A fresh output
        # of [B, F*D] floats is new memory from the OS on every call (glibc maps blocks above its
        # mmap threshold afresh and unmaps them on free; smaller ones go back at its trim
        # threshold), and each of its 4 KiB pages faults on first touch: at B=32768, D=64, 53k
        # faults, ~80 ms of a ~300 ms forward, paid by whichever op writes a column block first.
        # False: a fresh tensor per call (the "before" of that change in benchmarks/NOTES.md).
        self.reuse_out = True
        self._spare = SpareOutput()
        # True: runs of identity ops (no MEAN) whose slots are adjacent in TBE's output and whose
        # vectors are adjacent in the output are one copy of the run's columns, forward and
        # backward (a unified or Full-heavy collection: 26 [B, D] copies become a few wide ones,
        # each row one longer contiguous stretch). False: one copy per op. Copies either way.
        self.merge_runs = True
        self.runs, self.in_run = _identity_runs(ops, dim)
        # True: runs of consecutive single-slot "project" ops of one slot width whose slots and
        # vectors are evenly spaced in TBE's output and in the output (``_op_runs``: MixedDim
        # features of one block of one width next to each other, as the fitters make them) run as
        # ONE ``bmm`` per run on 3-D strided views, forward and backward ([r, B, w] slots times the
        # run's stacked [r, w, D] weights; one gradient materialisation per run), instead of one
        # ``mm`` per feature (md at 10x: 54 products per step -> 30). Measured small: the md
        # collection's assemble alone 5.96 -> 5.62 ms (hot), its whole step -2..4%, about the
        # noise (the products are bound by their strided column reads and writes, not dispatch).
        # Bitwise equal: CPU ``bmm`` runs the same GEMM per matrix as ``mm`` (tested in
        # tests/embeddings/test_assemble.py). Not for QR/KWay's products: the same idea as one
        # elementwise product over [B, r, D] views measured ~2x slower than r column products
        # (TensorIterator then steps row by row through 16-float pieces). False: one op per
        # feature (the "before" of that change in benchmarks/NOTES.md).
        self.batch_runs = True
        self.op_runs = _op_runs(ops, dim)
        self.in_op_run = [False] * len(ops)
        for run in self.op_runs:
            for i in run.ops:
                self.in_op_run[i] = True
        # Index into ``weights()`` of each run's projections, in op order.
        self.run_weights = [[self.projections_of[i][0][1] for i in run.ops] for run in self.op_runs]
        # Widest gradient block a run or op may need materialised (see ``_Assemble.backward``).
        self.scratch_width = max([dim] + [len(run.ops) * dim for run in self.op_runs])
        # True: a plan of identity ops only (no MEAN, every slot D wide: unified, whose shared
        # table's slots come out of TBE grouped, not in feature order) fills its output with ONE
        # ``index_select`` of [B, slots, D] along the slots, which copies row after row (measured
        # 2.5x faster than 26 column-block copies at B=32768, D=64, and 2x at B=4096, D=16: each
        # column copy strides through every row of both tensors). False: a copy per op (or run).
        # Copies either way: bitwise equal.
        self.gather = True
        self.order: tuple[int, ...] | None = None  # the slot of each vector, for ``gather``
        if all(op.kind == "identity" and not op.mean and op.cols[0][1] == dim for op in ops) and widths:
            if all(w == dim for w in widths):
                self.order = tuple(op.cols[0][0] // dim for op in ops)
        self._order_index: dict[torch.device, torch.Tensor] = {}
        # True (CPU, fp32): forward and backward run as one pass over the rows in C
        # (embeddings/native.c), when it could be built (``native.library()``): each row's
        # slots are read once and every feature's vector computed while they are in cache, where
        # the torch path makes a separate strided pass (and dispatch) per op. Same float ops in the
        # same order for identity/add/mult/concat/mean: bitwise equal; projections sum in another
        # order than BLAS: equal up to rounding (tests/embeddings/test_native.py). False: the torch
        # path below (the reference, and the "before" in benchmarks/NOTES.md). Not for a ``gather``
        # plan (unified: copies only, out of order): there torch's one row-wise ``index_select``
        # forward and the column copies backward are as fast or faster than the C pass (unified's
        # step 1.01x and 1.10x slower with it, A/Bs in shuffled order on 2026-12-07).
        self.native = not (self.gather and self.order is not None)
        self.program, self.max_cols = _program(ops, self.projections_of)

    def native_ok(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> bool:
        """Whether this call may take the C path: switched on, built, a CPU fp32 input whose rows
        have unit column stride, fp32 CPU weights."""
        return (
            self.native
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and x.stride(1) == 1
            and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
            and native.library() is not None
        )

    def order_index(self, device: torch.device) -> torch.Tensor:
        """``order`` as an int64 tensor on ``device`` (built once per device)."""
        index = self._order_index.get(device)
        if index is None:
            assert self.order is not None
            index = self._order_index[device] = torch.tensor(self.order, dtype=torch.int64, device=device)
        return index

    def output(self, like: torch.Tensor, batch: int) -> torch.Tensor:
        """A [batch, F*D] tensor for the forward to fill: with ``reuse_out``, the kept memory of an
        earlier output once nothing references it (embeddings/spare.py), else a new tensor."""
        cols = len(self.ops) * self.dim
        if not self.reuse_out:
            return like.new_empty(batch, cols)
        return self._spare.new(like, batch, cols)

    def weights(self) -> list[torch.Tensor]:
        """The current projection weights, in op order (read each forward: ``load_state_dict`` and
        ``.to`` may have replaced their data)."""
        out: list[torch.Tensor] = []
        for op in self.ops:
            if op.kind == "project":
                out.extend(self.layouts[op.feature].projection_weights())
        return out

    def __call__(self, pooled: torch.Tensor, batch: int, lengths: torch.Tensor) -> torch.Tensor:
        """[batch, F*D] from TBE's output ``pooled`` [bags >= batch, width]. The caller checks that
        every unpooled feature has bags of exactly one id (its per-id rows are then its bags)."""
        divisors = None
        if self.any_mean:
            divisors = lengths.clamp(min=1).to(pooled.dtype)
        return _Assemble.apply(self, pooled, batch, divisors, *self.weights())


def plan_for(lookup: "EmbeddingBagLookup") -> AssemblePlan | None:
    """The collection's plan, built on first use and kept (it depends only on the layouts and the
    slot plan, which never change); None when some layout's combine has no ``CombineForm``."""
    cached = lookup.__dict__.get("_assemble_plan", False)
    if cached is not False:
        return cached
    plan = _build(lookup)
    lookup.__dict__["_assemble_plan"] = plan  # a cache, not module state
    return plan


def _build(lookup: "EmbeddingBagLookup") -> AssemblePlan | None:
    layouts = list(lookup.layouts.values())
    dims = [lookup._tables[lookup._slot_table[s]].dim for s in lookup._tbe_order]
    start: dict[int, tuple[int, int]] = {}
    column = 0
    for s, d in zip(lookup._tbe_order, dims):
        start[s] = (column, d)
        column += d
    position = {s: i for i, s in enumerate(lookup._tbe_order)}
    ops: list[_Op] = []
    for f, (layout, slots, feature) in enumerate(zip(layouts, lookup._feature_slots, lookup.features)):
        mean = feature.pooling is Pooling.MEAN
        if lookup._folds[f]:  # batched: one TBE slot whose bags pooled every probe (folds_slots)
            if start[slots[0]][1] != lookup.dim:
                return None
            ops.append(_Op("identity", (start[slots[0]],), f * lookup.dim, f, mean, (), (position[slots[0]],)))
            continue
        form = layout.combine_form()
        if form is None:
            return None
        cols = tuple(start[s] for s in slots)
        if not _fits(form, cols, lookup.dim):
            return None
        projected = tuple(w is not None for w in form.weights) if form.kind == "project" else ()
        ops.append(_Op(form.kind, cols, f * lookup.dim, f, mean, projected, tuple(position[s] for s in slots)))
    return AssemblePlan(ops, layouts, lookup.dim, column, tuple(dims))


def _identity_runs(ops: list[_Op], dim: int) -> tuple[list[tuple[int, int, int]], list[bool]]:
    """Maximal runs of consecutive identity ops without MEAN whose slots follow each other in
    TBE's columns as their vectors do in the output: (first TBE column, first output column,
    width) of each run of two or more, and whether each op belongs to one."""
    runs: list[tuple[int, int, int]] = []
    in_run = [False] * len(ops)
    members: list[int] = []

    def close() -> None:
        if len(members) > 1:
            first = ops[members[0]]
            runs.append((first.cols[0][0], first.out, dim * len(members)))
            for i in members:
                in_run[i] = True
        members.clear()

    for i, op in enumerate(ops):
        if op.kind != "identity" or op.mean or op.cols[0][1] != dim:
            close()
            continue
        if members:
            last = ops[members[-1]]
            if not (op.out == last.out + dim and op.cols[0][0] == last.cols[0][0] + dim):
                close()
        members.append(i)
    close()
    return runs, in_run


@dataclass(frozen=True)
class _Run:
    """Consecutive "project" ops (``ops``, two or more, op order) that one ``bmm`` computes: each
    has one projected slot ``width`` wide, op ``k``'s at TBE column ``first + k * width`` and its
    vector at output column ``out + k * D``, so the run's slots and vectors are 3-D strided views
    of one column block each."""

    ops: tuple[int, ...]
    first: int
    width: int
    out: int


def _op_runs(ops: list[_Op], dim: int) -> list[_Run]:
    """Maximal runs of two or more consecutive single-slot "project" ops without MEAN, of one
    slot width, whose slots follow each other in TBE's columns as their vectors do in the output
    (see ``_Run``)."""
    runs: list[_Run] = []
    members: list[int] = []

    def close() -> None:
        if len(members) > 1:
            first = ops[members[0]]
            runs.append(_Run(tuple(members), first.cols[0][0], first.cols[0][1], first.out))
        members.clear()

    for i, op in enumerate(ops):
        if op.kind != "project" or op.mean or op.projected != (True,):
            close()
            continue
        if members:
            last = ops[members[-1]]
            width = last.cols[0][1]
            if not (
                op.cols[0][1] == width and op.cols[0][0] == last.cols[0][0] + width and op.out == last.out + dim
            ):
                close()
        members.append(i)
    close()
    return runs


def _fits(form: CombineForm, cols: tuple[tuple[int, int], ...], dim: int) -> bool:
    """Whether the slot widths are the ones the form's maths needs (else the per-feature path)."""
    widths = [w for _, w in cols]
    if form.kind == "identity":
        return widths == [dim]
    if form.kind in ("mult", "add"):
        return bool(widths) and all(w == dim for w in widths)
    if form.kind == "concat":
        return sum(widths) == dim
    return len(form.weights) == len(widths) and all(
        (w is None and width == dim) or (w is not None and tuple(w.shape) == (width, dim))
        for w, width in zip(form.weights, widths)
    )


def _slices(x: torch.Tensor, op: _Op) -> list[torch.Tensor]:
    return [x[:, a : a + w] for a, w in op.cols]


class _Views:
    """Column views of one [rows, columns] tensor for every op: with ``lean`` one ``split`` per
    tensor makes all of them at once (a C++ loop instead of a Python slice per use) and each op
    reads its own; else a slice per use, as before."""

    def __init__(self, x: torch.Tensor, plan: AssemblePlan, slots: bool) -> None:
        self.x = x
        self.lean = plan.lean_views
        if self.lean:
            self.views = x.split(list(plan.widths), dim=1) if slots else x.split(plan.dim, dim=1)

    def of(self, op: _Op) -> list[torch.Tensor]:
        """The op's slots (a TBE-side tensor)."""
        if self.lean:
            return [self.views[k] for k in op.slots]
        return _slices(self.x, op)

    def slot(self, op: _Op, j: int) -> torch.Tensor:
        if self.lean:
            return self.views[op.slots[j]]
        a, w = op.cols[j]
        return self.x[:, a : a + w]

    def vector(self, op: _Op, dim: int) -> torch.Tensor:
        """The op's D columns (an output-side tensor)."""
        if self.lean:
            return self.views[op.feature]
        return self.x[:, op.out : op.out + dim]


class _Assemble(torch.autograd.Function):
    """Forward: every feature's vector written into one [batch, F*D] output. Backward: every slot's
    gradient written into one contiguous [bags, width] gradient of TBE's output (what fbgemm's
    backward needs anyway), and each projection's gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        plan: AssemblePlan,
        pooled: torch.Tensor,
        batch: int,
        divisors: torch.Tensor | None,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        x = pooled if pooled.shape[0] == batch else pooled[:batch]
        out = plan.output(pooled, batch)
        if plan.native_ok(x, weights):
            kept = [w.contiguous() for w in weights]
            divs = None if divisors is None else divisors.contiguous()
            used = native.library().tz_assemble_forward(  # type: ignore[union-attr]
                x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), batch, plan.dim,
                plan.program.data_ptr(), len(plan.ops), native.pointer_array(kept), native.ptr(divs),
                0 if divs is None else divs.stride(0), native.threads(batch, out.shape[1]),
            )  # fmt: skip
            if used < 0:
                raise MemoryError("tablezip: the compiled assemble ran out of memory")
            ctx.plan, ctx.batch, ctx.bags, ctx.divisors, ctx.native = plan, batch, pooled.shape[0], divs, True
            # TBE's output is kept for the products' gradients and to become TBE's gradient
            # (``reuse_output``, as below).
            ctx.save_for_backward(pooled if plan.saves_input or plan.reuse_output else None, *weights)
            return out
        if plan.gather and plan.order is not None:
            index = plan.order_index(x.device)
            torch.index_select(x.view(batch, -1, plan.dim), 1, index, out=out.view(batch, -1, plan.dim))
            ctx.plan, ctx.batch, ctx.bags, ctx.divisors = plan, batch, pooled.shape[0], divisors
            # ``reuse_output``: TBE's output is kept for the backward only to become TBE's gradient
            # there (memory already faulted in, instead of a fresh [bags, W] buffer per step, which
            # glibc maps afresh and the column copies fault in: unified's CPU step at B=4096, D=16
            # 7.5-7.8 -> 5.7-6.0 ms, benchmarks/NOTES.md). Costs nothing in memory: the buffer the
            # backward would allocate is the same size, and a second backward is refused.
            ctx.save_for_backward(pooled if plan.reuse_output else None, *weights)
            return out
        xs, outs = _Views(x, plan, slots=True), _Views(out, plan, slots=False)
        written = [False] * len(plan.ops)  # "project": whether its vector holds a first term yet
        merged = plan.merge_runs
        if merged:
            for first, start, width in plan.runs:
                out[:, start : start + width].copy_(x[:, first : first + width])
        batched = plan.batch_runs and bool(plan.op_runs)
        stacked: list[torch.Tensor] = []
        if batched:
            stacked = _runs_forward(plan, x, out, weights)
        for i, op in enumerate(plan.ops):
            if (merged and plan.in_run[i]) or (batched and plan.in_op_run[i]):
                continue
            dst = outs.vector(op, plan.dim)
            parts = xs.of(op)
            if op.kind == "identity":
                dst.copy_(parts[0])
            elif op.kind in ("mult", "add"):
                combine = torch.mul if op.kind == "mult" else torch.add
                if len(parts) == 1:
                    dst.copy_(parts[0])
                else:
                    combine(parts[0], parts[1], out=dst)
                    for part in parts[2:]:
                        combine(dst, part, out=dst)
            elif op.kind == "concat":
                column = 0
                for part in parts:
                    dst[:, column : column + part.shape[1]].copy_(part)
                    column += part.shape[1]
            else:  # project: D-wide slots first, as MixedDimLayout.combine; products below
                for part, has_weight in zip(parts, op.projected):
                    if not has_weight:
                        dst.add_(part) if written[i] else dst.copy_(part)
                        written[i] = True
                continue
            if op.mean:
                assert divisors is not None
                dst.div_(divisors[op.feature].unsqueeze(1))
        for i, j, w in plan.projections:
            if batched and plan.in_op_run[i]:
                continue
            op = plan.ops[i]
            dst = outs.vector(op, plan.dim)
            part = xs.slot(op, j)
            dst.addmm_(part, weights[w]) if written[i] else torch.mm(part, weights[w], out=dst)
            written[i] = True
        for op in plan.ops:
            if op.kind == "project" and op.mean:
                assert divisors is not None
                outs.vector(op, plan.dim).div_(divisors[op.feature].unsqueeze(1))
        ctx.plan = plan
        ctx.batch = batch
        ctx.bags = pooled.shape[0]
        ctx.divisors = divisors
        # The stacked weights of each run (a copy made here, not an input: what this forward used,
        # for the backward's products).
        ctx.stacked = stacked
        ctx.save_for_backward(pooled if plan.saves_input else None, *weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: AssemblePlan = ctx.plan
        pooled, *weights = ctx.saved_tensors
        batch, bags = ctx.batch, ctx.bags
        if getattr(ctx, "native", False):
            return _native_backward(ctx, plan, pooled, weights, grad, batch, bags)
        # TBE's output is dead once its own slots have been read here (fbgemm's backward does not
        # need it), so its memory becomes the gradient: one [bags, W] buffer less per step. On a CPU
        # that keeps QR's step under glibc's trim threshold (measured: ~1300-2300 page faults per
        # step otherwise, from memory handed back to the OS and faulted in again). A second
        # backward through the same graph (retain_graph) is then refused by autograd's version
        # check on the saved output, never computed from overwritten rows.
        reuse = plan.reuse_output and pooled is not None and pooled.is_contiguous()
        grad_pooled = pooled if reuse else grad.new_empty(bags, plan.width)
        if bags > batch:
            grad_pooled[batch:].zero_()
        gx = grad_pooled[:batch]
        x = None if pooled is None else (pooled if bags == batch else pooled[:batch])
        gxs, gs = _Views(gx, plan, slots=True), _Views(grad, plan, slots=False)
        xs = None if x is None else _Views(x, plan, slots=True)
        projected_grads: dict[int, torch.Tensor] = {}
        wanted = ctx.needs_input_grad[4:]
        grad_weights: list[torch.Tensor | None] = [None] * len(wanted)
        scratch: torch.Tensor | None = None
        merged = plan.merge_runs
        if merged:
            for first, start, width in plan.runs:
                gx[:, first : first + width].copy_(grad[:, start : start + width])
        stacked: list[torch.Tensor] = getattr(ctx, "stacked", [])
        batched = bool(stacked)  # the forward ran the runs batched (its switch may change since)
        if batched:
            assert x is not None
            scratch = _runs_backward(plan, x, gx, grad, stacked, wanted, grad_weights)
        for i, op in enumerate(plan.ops):
            if (merged and plan.in_run[i]) or (batched and plan.in_op_run[i]):
                continue
            g = gs.vector(op, plan.dim)
            if op.mean:  # the autograd of ``pooled / divisor``
                g = g / ctx.divisors[op.feature].unsqueeze(1)
            targets = gxs.of(op)
            if op.kind == "identity":
                targets[0].copy_(g)
            elif op.kind == "add":
                for target in targets:
                    target.copy_(g)
            elif op.kind == "concat":
                column = 0
                for target in targets:
                    target.copy_(g[:, column : column + target.shape[1]])
                    column += target.shape[1]
            elif op.kind == "mult":  # the targets may be the parts themselves (reuse)
                assert xs is not None
                parts = xs.of(op)
                if len(parts) == 2:  # QR: p1's gradient overwrites p1 once p0's is computed
                    left = g * parts[1]
                    torch.mul(g, parts[0], out=targets[1])
                    targets[0].copy_(left)
                else:
                    for target, part in zip(targets, _mult_backward(g, parts)):
                        target.copy_(part)
            else:
                for target, has_weight in zip(targets, op.projected):
                    if not has_weight:
                        target.copy_(g)
                if gs.lean and not any(op.projected):
                    continue  # no product reads g
                # Both products read g: materialise it once if BLAS cannot read it as it is (the
                # expanded gradient of a plain ``sum``), instead of once inside each product.
                readable = g.stride(1) == 1 and g.stride(0) >= g.shape[1]
                if gs.lean:
                    # Into one scratch buffer that every op reuses (it stays in cache, where a fresh
                    # [B, D] tensor per op is written to cold memory), and the op's products run
                    # now, while it is there. Same products of the same values: bitwise equal.
                    if not readable:
                        if scratch is None:
                            scratch = torch.empty_like(g, memory_format=torch.contiguous_format)
                        g = scratch[:, : g.shape[1]].copy_(g)
                    _project_backward(op, g, plan.projections_of[i], xs, gxs, weights, wanted, grad_weights)
                    continue
                projected_grads[i] = g if readable else g.contiguous()
        for i, j, w in plan.projections:  # the weight's gradient first: it reads the slot
            if i not in projected_grads:
                continue  # done above
            assert xs is not None
            op = plan.ops[i]
            g = projected_grads[i]
            grad_weights[w] = torch.mm(xs.slot(op, j).t(), g) if wanted[w] else None
            torch.mm(g, weights[w].t(), out=gxs.slot(op, j))
        return (None, grad_pooled, None, None, *grad_weights)


def _native_backward(
    ctx: Any,
    plan: AssemblePlan,
    pooled: torch.Tensor | None,
    weights: list[torch.Tensor],
    grad: torch.Tensor,
    batch: int,
    bags: int,
) -> tuple[torch.Tensor | None, ...]:
    """The backward in one C pass over the rows: every slot's gradient into TBE's gradient (TBE's
    own output, reused, when it was kept contiguous), each wanted projection's gradient summed
    over the rows (per thread, then over threads)."""
    reuse = plan.reuse_output and pooled is not None and pooled.is_contiguous()
    grad_pooled = pooled if reuse else grad.new_empty(bags, plan.width)
    if bags > batch:
        grad_pooled[batch:].zero_()
    x = None if pooled is None else pooled[:batch]
    wanted = ctx.needs_input_grad[4:]
    kept = [w.contiguous() for w in weights]
    sizes = [w.numel() for w in kept]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    threads = native.threads(batch, grad.shape[1])
    scratch = grad.new_zeros(threads, total) if total and any(wanted) else None
    offset_t = torch.tensor(offsets[:-1] or [0], dtype=torch.int64)
    wanted_t = torch.tensor([int(bool(w)) for w in wanted] or [0], dtype=torch.int64)
    divs = ctx.divisors
    used = native.library().tz_assemble_backward(  # type: ignore[union-attr]
        native.ptr(x), 0 if x is None else x.stride(0), grad_pooled.data_ptr(), grad_pooled.stride(0),
        grad.data_ptr(), grad.stride(0), grad.stride(1), batch, plan.dim, plan.program.data_ptr(), len(plan.ops),
        plan.max_cols, native.pointer_array(kept), native.ptr(scratch), offset_t.data_ptr(), wanted_t.data_ptr(),
        total, native.ptr(divs), 0 if divs is None else divs.stride(0), threads,
    )  # fmt: skip
    if used < 0:
        raise MemoryError("tablezip: the compiled assemble ran out of memory")
    if reuse:
        # Written from C, which autograd cannot see: mark TBE's saved output as modified, so a
        # second backward through this graph is refused, as after the torch path's in-place ops.
        torch.autograd.graph.increment_version(grad_pooled)
    grad_weights: list[torch.Tensor | None] = [None] * len(kept)
    for k, w in enumerate(kept):
        if wanted[k]:
            assert scratch is not None
            grad_weights[k] = scratch[0, offsets[k] : offsets[k + 1]].view_as(w)
    return (None, grad_pooled, None, None, *grad_weights)


_KINDS = {"identity": 0, "mult": 1, "add": 2, "concat": 3, "project": 4}


def _program(ops: list[_Op], projections_of: dict[int, list[tuple[int, int]]]) -> tuple[torch.Tensor, int]:
    """The ops as the C kernels' program (layout in native.c): per op kind, slot count,
    output column, mean, feature, then (column, width, weight index or -1) per slot. Also the
    widest op's total slot width (the C backward's per-row buffer)."""
    words: list[int] = []
    widest = 0
    for i, op in enumerate(ops):
        weight_of = dict(projections_of.get(i, []))
        words += [_KINDS[op.kind], len(op.cols), op.out, int(op.mean), op.feature]
        for j, (col, width) in enumerate(op.cols):
            words += [col, width, weight_of.get(j, -1)]
        widest = max(widest, sum(w for _, w in op.cols))
    return torch.tensor(words or [0], dtype=torch.int64), widest


def _run_block(t: torch.Tensor, start: int, run: _Run, per_op: int) -> torch.Tensor:
    """The run's ``len(run.ops) * per_op`` columns of ``t`` from ``start`` as [rows, ops, per_op]
    (a view: the columns are contiguous in each row; a stride-0 gradient stays stride 0)."""
    return t[:, start : start + len(run.ops) * per_op].unflatten(1, (len(run.ops), per_op))


def _runs_forward(
    plan: AssemblePlan, x: torch.Tensor, out: torch.Tensor, weights: tuple[torch.Tensor, ...]
) -> list[torch.Tensor | None]:
    """Every ``_Run``'s vectors into ``out``: one ``bmm`` of its [r, B, w] slots and its stacked
    [r, w, D] weights, written into the [r, B, D] view of its vectors (what ``mm`` per op writes).
    Returns each run's stacked weights, for the backward."""
    stacked: list[torch.Tensor] = []
    for run, indices in zip(plan.op_runs, plan.run_weights):
        w = torch.stack([weights[k] for k in indices])
        dst = _run_block(out, run.out, run, plan.dim).transpose(0, 1)
        torch.bmm(_run_block(x, run.first, run, run.width).transpose(0, 1), w, out=dst)
        stacked.append(w)
    return stacked


def _runs_backward(
    plan: AssemblePlan,
    x: torch.Tensor,
    gx: torch.Tensor,
    grad: torch.Tensor,
    stacked: list[torch.Tensor],
    wanted: tuple[bool, ...],
    grad_weights: list[torch.Tensor | None],
) -> torch.Tensor | None:
    """The gradients of every ``_Run``: its projections' (first: they read the slots, and ``gx``
    may be ``x`` itself, TBE's output reused) and its slots' into ``gx``, one ``bmm`` each, the
    products the per-op code runs per op. Returns the scratch buffer it made for a gradient BLAS
    cannot read (None if none), for the per-op code to reuse."""
    scratch: torch.Tensor | None = None
    for run, w, indices in zip(plan.op_runs, stacked, plan.run_weights):
        columns = grad[:, run.out : run.out + len(run.ops) * plan.dim]
        if not (columns.stride(1) == 1 and columns.stride(0) >= columns.shape[1]):  # e.g. ``sum``'s expanded one
            # Materialised once per run into one buffer every run reuses (see the per-op code).
            if scratch is None:
                scratch = torch.empty(grad.shape[0], plan.scratch_width, dtype=grad.dtype, device=grad.device)
            columns = scratch[:, : columns.shape[1]].copy_(columns)
        g = columns.unflatten(1, (len(run.ops), plan.dim)).transpose(0, 1)  # [r, B, D]
        slots = _run_block(x, run.first, run, run.width).transpose(0, 1)  # [r, B, w]
        if any(wanted[k] for k in indices):  # first: it reads the slots, which gx may overwrite
            per_weight = torch.bmm(slots.transpose(1, 2), g).unbind(0)
            for k, gw in zip(indices, per_weight):
                grad_weights[k] = gw if wanted[k] else None
        torch.bmm(g, w.transpose(1, 2), out=_run_block(gx, run.first, run, run.width).transpose(0, 1))
    return scratch


def _project_backward(
    op: _Op,
    g: torch.Tensor,
    projections: list[tuple[int, int]],
    xs: "_Views | None",
    gxs: "_Views",
    weights: list[torch.Tensor],
    wanted: tuple[bool, ...],
    grad_weights: list[torch.Tensor | None],
) -> None:
    """The products of one "project" op's backward: each projected slot's weight gradient (first:
    it reads the slot, which may be TBE's output reused as its gradient) and the slot's gradient."""
    assert xs is not None
    for j, w in projections:
        grad_weights[w] = torch.mm(xs.slot(op, j).t(), g) if wanted[w] else None
        torch.mm(g, weights[w].t(), out=gxs.slot(op, j))


def _mult_backward(g: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of ``((p0 * p1) * p2) * ...`` as autograd computes them: going back through
    product j, its left factor (the product of the slots before j, recomputed exactly) gets
    ``g_j * p_j`` and slot j gets ``g_j * left``. New tensors, so the caller may overwrite the
    parts with them."""
    if len(parts) == 1:
        return [g]
    prefixes = [parts[0]]
    for part in parts[1:-1]:
        prefixes.append(prefixes[-1] * part)
    grads: list[torch.Tensor] = [g] * len(parts)
    running = g
    for j in range(len(parts) - 1, 0, -1):
        grads[j] = running * prefixes[j - 1]
        running = running * parts[j]
    grads[0] = running
    return grads
