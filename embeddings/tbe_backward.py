"""A CPU TBE's backward and exact optimizer step in C: for TBEs with a table read by several
features (unified embedding's shared table), and for compressed collections, where it measured
faster than fbgemm's CPU backward.

Why: fbgemm's CPU backward (fbgemm-gpu-cpu 1.8.0, ``embedding_backward_split_cpu_template.cpp``)
runs its vectorised SpMDM + rowwise-Adagrad kernels only for tables read by one feature; a shared
table takes a generic loop, one float at a time on one thread. Measured (bare TBE, B=4096, D=16,
one thread, 12 small tables and one 1.2M-row table read by 14 features): 9.5-9.9 ms per fwd+bwd
against 4.9-5.5 ms with the same ids in 14 separate tables (benchmarks/NOTES.md). Here the whole
TBE's backward is one C pass (``tz_tbe_backward`` in embeddings/native.c): every touched row's
gradient is summed over every feature and bag that read it, then the row and its optimizer state
get one update with fbgemm's formulas (rowwise Adagrad, Adagrad or SGD), in place in the TBE's
own weights and state, as fbgemm's fused backward does.

The forward stays fbgemm's (called inside an autograd function whose backward is the C pass, with
the TBE's placeholder as the input that carries grad, as fbgemm's own function does), so outputs
are bit for bit fbgemm's. The update equals fbgemm's up to float rounding (another summation order
for the row's gradient and its sum of squares): allclose, tested against the fbgemm path
(tests/embeddings/test_tbe_backward.py), which stays the reference and the fallback.

When (``mode``): "auto" (default): CPU training of a TBE with a shared table, or of a collection
that is not all Full (the caller says so: ``prefer``) whose rows are at most ``AUTO_MAX_DIM``
wide; "on": any CPU training TBE it can run;
"off": fbgemm's backward. And only for a pooled (SUM) fp32 TBE on the host, one of the three
optimizers, the compiled kernels built; anything else runs fbgemm's path. Per-sample weights (the
zero-weight drops) scale each id's gradient, so a weight-0 id adds an exact zero: the same tables,
bit for bit, as compacting those ids away.

Measured (shuffled A/Bs in one process, 26 Criteo-sample features at 10x), training steps at
B=4096, D=16, one thread: unified 0.85x the time with it, multihash 0.85x, hash 0.91x, hybrid
0.91x, kway/qr 0.92-0.93x, pruned 0.93x, md 0.94x; two threads: unified 0.85x, hash 0.90x;
B=32768, D=64: unified 0.93x, hash 0.98x; Full 1.01-1.02x (fbgemm's kernels are at their best on
large unshared tables), so "auto" leaves all-Full collections on fbgemm's path.

Memory: an int32 per row of every table (-1 between steps), and a [rows, max D] float buffer for
the touched rows' gradients (rows: the fewer of the step's ids and all tables' rows), kept between
steps.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from . import native

MODES = ("auto", "on", "off")
mode = "auto"
# "auto" takes the C pass for unshared tables only up to this width: at D=16 it measured 6-15%
# faster steps than fbgemm's for every compressed method, at D=64 1.0-1.16x slower (QR 1.10x, hash
# 1.16x at B=512; QR 1.01x at B=4096), where fbgemm's vectorised kernels do more per row. Shared
# tables take it at any width (fbgemm's path for them is scalar: unified 0.93x at D=64, B=32768).
AUTO_MAX_DIM = 16

_OPTIMIZERS = {"exact_row_wise_adagrad": 0, "exact_adagrad": 1, "exact_sgd": 2}


def set_mode(value: str) -> None:
    """Switch the C backward: "auto", "on" or "off" (see the module docstring)."""
    global mode
    if value not in MODES:
        raise ValueError(f"tbe_backward.mode must be one of {', '.join(MODES)}, got {value!r}")
    mode = value


@contextlib.contextmanager
def mode_as(value: str) -> Iterator[None]:
    """``set_mode(value)`` for a ``with`` block, the previous mode restored after. A collection built
    in mode "off" groups a shared table's TBE slots, as fbgemm's CPU backward needs."""
    previous = mode
    set_mode(value)
    try:
        yield
    finally:
        set_mode(previous)


@dataclass
class _State:
    key: tuple
    feat: torch.Tensor  # [F, 6] int64: row base, rows, weights offset, D, output column, state offset
    slot: torch.Tensor  # int32 per linear row, -1 between calls
    max_d: int
    optimizer: int
    touched: torch.Tensor  # int64, 2 per id: grown as needed
    acc: torch.Tensor  # fp32, max_d per id: grown as needed


_STATES: "weakref.WeakKeyDictionary[Any, tuple[tuple, _State | None]]" = weakref.WeakKeyDictionary()


def _key(tbe: Any) -> tuple:
    weights = getattr(tbe, "weights_host", None)
    state = getattr(tbe, "momentum1_host", None)
    return (
        weights.data_ptr() if isinstance(weights, torch.Tensor) else None,
        state.data_ptr() if isinstance(state, torch.Tensor) else None,
        getattr(getattr(tbe, "optimizer", None), "value", None),
    )


def _build(tbe: Any, key: tuple) -> _State | None:
    """The kernel's per-feature table, or None where fbgemm's path must run."""
    optimizer = _OPTIMIZERS.get(getattr(getattr(tbe, "optimizer", None), "value", ""))
    weights = getattr(tbe, "weights_host", None)
    args = getattr(tbe, "optimizer_args", None)
    if optimizer is None or args is None or not isinstance(weights, torch.Tensor) or weights.numel() == 0:
        return None
    if weights.dtype != torch.float32 or weights.device.type != "cpu" or not weights.is_contiguous():
        return None
    if int(getattr(tbe, "pooling_mode", -1)) != 0:  # SUM only (the collection pools MEAN itself)
        return None
    if args.weight_decay != 0.0 or args.gradient_clipping or args.max_norm != 0.0:
        return None
    state = getattr(tbe, "momentum1_host", None)
    if optimizer != 2 and (not isinstance(state, torch.Tensor) or state.dtype != torch.float32 or not state.is_contiguous()):
        return None
    hash_cumsum = tbe.hash_size_cumsum.tolist()
    weights_offsets = tbe.weights_offsets.tolist()
    d_offsets = tbe.D_offsets.tolist()
    state_offsets = tbe.momentum1_offsets.tolist() if optimizer != 2 else [0] * len(weights_offsets)
    features = len(weights_offsets)
    total = hash_cumsum[-1]
    # Each slot's table rows from the table itself (a shared table's slots may be apart in the TBE:
    # then hash_size_cumsum is not monotonic and its differences are not row counts).
    table_rows = [int(t.shape[0]) for t in tbe.split_embedding_weights()]
    rows = [table_rows[t] for t in tbe.feature_table_map]
    feat = torch.tensor(
        [[hash_cumsum[f], rows[f], weights_offsets[f], d_offsets[f + 1] - d_offsets[f], d_offsets[f], state_offsets[f]] for f in range(features)],
        dtype=torch.int64,
    )  # fmt: skip
    max_d = max(d_offsets[f + 1] - d_offsets[f] for f in range(features))
    return _State(
        key=key, feat=feat, slot=torch.full((max(1, total),), -1, dtype=torch.int32), max_d=max_d, optimizer=optimizer,
        touched=torch.empty(0, dtype=torch.int64), acc=torch.empty(0, dtype=torch.float32),
    )  # fmt: skip


def state_for(tbe: Any) -> _State | None:
    """The TBE's kernel arguments and buffers (None: fbgemm's path), rebuilt when its weights or
    optimizer state moved."""
    key = _key(tbe)
    cached = _STATES.get(tbe)
    if cached is None or cached[0] != key:
        cached = _STATES[tbe] = (key, _build(tbe, key))
    return cached[1]


_SHARED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _shared(tbe: Any) -> bool:
    """Whether some table of the TBE is read by several slots (fixed when the TBE is built: kept,
    not recounted on every training lookup)."""
    shared = _SHARED.get(tbe)
    if shared is None:
        table_map = list(getattr(tbe, "feature_table_map", []))
        shared = _SHARED[tbe] = len(set(table_map)) < len(table_map)
    return shared


def lookup(
    tbe: Any, indices: torch.Tensor, offsets: torch.Tensor, prefer: bool = False, per_sample_weights: torch.Tensor | None = None
) -> torch.Tensor | None:
    """TBE's pooled output whose backward is the C pass, or None where ``tbe(indices, offsets)``
    (fbgemm's path) must run. ``prefer``: the caller's collection is one "auto" takes the C pass
    for (not all Full)."""
    if mode == "off" or not torch.is_grad_enabled() or indices.device.type != "cpu":
        return None
    if mode == "auto" and not (_shared(tbe) or (prefer and int(getattr(tbe, "max_D", AUTO_MAX_DIM + 1)) <= AUTO_MAX_DIM)):
        return None
    placeholder = getattr(tbe, "placeholder_autograd_tensor", None)
    if not isinstance(placeholder, torch.Tensor) or not placeholder.requires_grad:
        return None
    if native.library() is None:
        return None
    state = state_for(tbe)
    if state is None:
        return None
    if per_sample_weights is not None:
        if per_sample_weights.dtype != torch.float32 or per_sample_weights.requires_grad:
            return None  # a weight that needs its own gradient is fbgemm's business
        per_sample_weights = per_sample_weights.contiguous()
    return _TBEWithCBackward.apply(
        placeholder, tbe, state, indices.to(torch.int64).contiguous(), offsets.to(torch.int64).contiguous(), per_sample_weights
    )  # fmt: skip


class _TBEWithCBackward(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, placeholder: torch.Tensor, tbe: Any, state: _State, indices: torch.Tensor, offsets: torch.Tensor,
        per_sample_weights: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        # Grad is off in here: fbgemm's forward only, bit for bit.
        out = tbe(indices, offsets) if per_sample_weights is None else tbe(indices, offsets, per_sample_weights=per_sample_weights)
        ctx.tbe, ctx.state = tbe, state
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        indices, offsets, per_sample_weights = ctx.saved_tensors
        tbe, state = ctx.tbe, ctx.state
        if grad.stride(1) != 1 and grad.stride(1) != 0:
            grad = grad.contiguous()  # the C pass reads adjacent columns, or one value per row (stride 0)
        features = state.feat.shape[0]
        batch = (offsets.numel() - 1) // features
        # Rows a step can touch: at most one per id, and at most every row of every table (at
        # B=32768 and D=64 a bound by ids alone would keep ~220 MB of accumulators).
        rows = min(indices.numel(), state.slot.numel())
        if state.touched.numel() < 2 * rows:
            state.touched = torch.empty(2 * rows, dtype=torch.int64)
            state.acc = torch.empty(rows * state.max_d, dtype=torch.float32)
        lib = native.library()
        assert lib is not None
        weights = tbe.weights_host
        momentum = tbe.momentum1_host if state.optimizer != 2 else weights
        done = lib.tz_tbe_backward(
            grad.data_ptr(), grad.stride(0), grad.stride(1), indices.data_ptr(), offsets.data_ptr(),
            native.ptr(per_sample_weights), features, batch,
            state.feat.data_ptr(), weights.data_ptr(), momentum.data_ptr(), state.slot.data_ptr(),
            state.touched.data_ptr(), state.acc.data_ptr(), state.max_d, state.optimizer,
            float(tbe.learning_rate_tensor), float(tbe.optimizer_args.eps),
        )  # fmt: skip
        if done == -1 - features:
            raise MemoryError("tablezip: the C backward ran out of memory")
        if done < 0:
            raise IndexError(f"tablezip: a row of TBE slot {-1 - done} is outside its table (nothing was updated)")
        return (None, None, None, None, None, None)
