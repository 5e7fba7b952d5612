"""The single fbgemm TBE every collection stores its physical tables in.

One ``SplitTableBatchedEmbeddingBagsCodegen`` holds all tables of all features so a batch costs
one kernel call, and its fused optimizer updates only the rows a batch touched, inside backward.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)

from .registry import TableSpec


class TableOptimizerKind(str, enum.Enum):
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    ADAGRAD = "adagrad"
    SGD = "sgd"

    @property
    def fbgemm(self) -> EmbOptimType:
        return {
            TableOptimizerKind.ROWWISE_ADAGRAD: EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            TableOptimizerKind.ADAGRAD: EmbOptimType.EXACT_ADAGRAD,
            TableOptimizerKind.SGD: EmbOptimType.EXACT_SGD,
        }[self]


@dataclass(frozen=True)
class TableOptimizer:
    """The fused optimizer TBE applies to the rows used by a batch (rowwise Adagrad by default:
    one accumulator per row, which is why it is the usual choice for huge tables)."""

    kind: TableOptimizerKind = TableOptimizerKind.ROWWISE_ADAGRAD
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TableOptimizerKind(self.kind))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TableOptimizer.lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"TableOptimizer.eps must be a finite number > 0, got {self.eps!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TableOptimizer.weight_decay must be >= 0, got {self.weight_decay!r}")


def build_tbe(
    tables: Sequence[TableSpec],
    feature_table_map: Sequence[int],
    optimizer: TableOptimizer,
    device: torch.device,
    pooled: bool = True,
    bounds_check: bool = True,
) -> SplitTableBatchedEmbeddingBagsCodegen:
    """One TBE over ``tables``; slot i of the input reads table ``feature_table_map[i]``.

    ``bounds_check=False`` skips fbgemm's separate ``bounds_check_indices`` pass, on a CPU only
    (a CUDA TBE always keeps it: its kernels read rows unchecked). The caller then owns what that
    pass checks beyond rows, the offsets (``check_offsets``): fbgemm's CPU forward kernel
    range-checks every row itself before anything is written, and the backward reuses those rows
    (see ``EmbeddingBagLookup._checks_offsets``)."""
    on_cuda = device.type == "cuda"
    if optimizer.weight_decay > 0 and not on_cuda:
        # Measured: fbgemm-gpu-cpu 1.8.0 accepts weight_decay but its CPU kernels never apply it.
        raise ValueError(
            "TableOptimizer.weight_decay must be 0 on CPU: fbgemm's CPU TBE kernels ignore it "
            "(it works on CUDA)"
        )
    location = EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST
    compute = ComputeDevice.CUDA if on_cuda else ComputeDevice.CPU
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(t.rows, t.dim, location, compute) for t in tables],
        feature_table_map=list(feature_table_map),
        optimizer=optimizer.kind.fbgemm,
        learning_rate=optimizer.lr,
        eps=optimizer.eps,
        weight_decay=optimizer.weight_decay,
        # fbgemm ignores weight_decay unless a mode is named; L2 is what users mean by it.
        weight_decay_mode=WeightDecayMode.L2 if optimizer.weight_decay > 0 else WeightDecayMode.NONE,
        pooling_mode=PoolingMode.SUM if pooled else PoolingMode.NONE,
        # Every method's transform yields in-range rows; a violation is a bug, so fail loudly.
        bounds_check_mode=BoundsCheckMode.FATAL if bounds_check or on_cuda else BoundsCheckMode.NONE,
        device=device,
    )


def check_offsets(indices: torch.Tensor, offsets: torch.Tensor, monotonic: bool = True) -> None:
    """What fbgemm's ``bounds_check_indices`` (FATAL) checks of the offsets: they start at 0, never
    decrease and end at ``indices.numel()``, so every bag reads inside ``indices``.

    Why: on a CPU that pass is a scalar loop over every bag and id (~0.5 ms per step for 26 x 4096
    bags of one id), while fbgemm's CPU forward kernel already rejects any row outside its table
    (``Index i is out of bounds``), which leaves the offsets as the one thing to check; one
    vectorised compare over them costs a fraction of that. Stricter than FATAL in one point: it
    also rejects a first offset other than 0, which FATAL lets through. Raises ValueError. CPU
    tensors only: they are read as numpy views (no copy, and about half the time of the same
    compare through torch's dispatcher on 106k offsets). ``monotonic=False`` skips the one check
    that reads every offset, for offsets the caller built from lengths it knows are >= 0."""
    values = offsets.detach().numpy()
    n = values.shape[0]
    if n == 0:
        raise ValueError("TBE offsets must hold at least one value (0)")
    first, last = int(values[0]), int(values[-1])
    if first != 0 or last != indices.numel():
        raise ValueError(
            f"TBE offsets must start at 0 and end at the number of ids ({indices.numel()}), "
            f"got {first} and {last}: are the KeyedJaggedTensor's lengths/offsets consistent with its values?"
        )
    if monotonic and n > 1 and bool((values[1:] < values[:-1]).any()):
        raise ValueError(
            "TBE offsets must not decrease (a bag of negative length): are the KeyedJaggedTensor's "
            "lengths non-negative and its offsets consistent with them?"
        )


def init_uniform_(tbe: SplitTableBatchedEmbeddingBagsCodegen, generator: torch.Generator) -> None:
    """torchrec's default init, U(-sqrt(1/rows), sqrt(1/rows)) per table, reproducible from a seed."""
    for weight in tbe.split_embedding_weights():
        bound = math.sqrt(1.0 / weight.shape[0])
        values = torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            weight.copy_(values.to(weight.device))
