"""Data-parallel training of a model whose embedding tables live in one fused-optimizer TBE.

Why not DDP: fbgemm's TBE updates the table rows a batch touched *inside* backward (fused
rowwise Adagrad), so there is no table gradient left for an allreduce to average. Instead every
worker keeps a full replica of the tables and applies exactly the same update:

1. each worker reads its shard of the global batch (``shard_bounds``);
2. before the collection runs, every worker all-gathers the sparse ids of all shards
   (``gather_kjt``) and looks up the *global* batch;
3. it keeps its own rows of the pooled output through ``_KeepRows``, whose backward all-gathers
   the pooled-output gradients of every worker, so every worker's TBE backward sees the same
   ids and the same gradients and makes bit-identical table updates;
4. the remaining dense parameters get their gradients summed by one flattened allreduce
   (``allreduce_grads``).

Each worker's loss is its share of the global-batch mean (sum over its rows / global rows), so
summed gradients equal the single-process gradient of the same global batch; this also holds
for an uneven or empty last shard, which a mean per worker divided by the world size would not.

Cost per step: an all-gather of the ids (B*F int64 for one id per bag) and of the pooled
gradients (B*F*D fp32), one allreduce of the dense gradients, and the embedding forward and
backward of the whole global batch on every worker (replicated, not split).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

__all__ = [
    "Replica",
    "ReplicatedTables",
    "allreduce_grads",
    "gather_kjt",
    "merge_kjts",
    "model_state",
    "replica_digests",
    "shard_bounds",
    "state_digest",
]


@dataclass(frozen=True)
class Replica:
    """Where this process sits in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, exports, checkpoints and logs; all ranks hold the same parameters."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch of ``rows`` that ``rank`` trains on.

    Balanced like ``torch.tensor_split``: shards differ by at most one row, the first ``rows %
    world_size`` ranks take the extra ones, and with ``rows`` divisible by the world size rank w
    gets exactly rows [w*b, (w+1)*b). A batch smaller than the world leaves some shards empty.
    """
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _all_gather_varlen(tensor: torch.Tensor, sizes: Sequence[int], group: Any = None) -> list[torch.Tensor]:
    """All-gather 1-D tensors of different lengths (``sizes[w]`` from rank w): padded to the
    longest, since ``all_gather`` needs equal shapes, then trimmed."""
    longest = max(sizes)
    padded = tensor.new_zeros(longest)
    padded[: tensor.numel()] = tensor
    out = [tensor.new_empty(longest) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [t[:n] for t, n in zip(out, sizes)]


def _all_gather_sizes(values: Sequence[int], device: torch.device, group: Any = None) -> list[list[int]]:
    """Every rank's small integer header, e.g. [batch rows, id count]."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def gather_kjt(kjt: KeyedJaggedTensor, group: Any = None) -> tuple[KeyedJaggedTensor, list[int]]:
    """The KJT of the global batch (rank 0's bags first, then rank 1's, ...) and each rank's
    batch size. One all-gather of sizes, one of [lengths, values] packed together."""
    features = len(kjt.keys())
    lengths, values = kjt.lengths(), kjt.values()
    headers = _all_gather_sizes([kjt.stride(), values.numel()], values.device, group)
    payload = torch.cat([lengths.to(torch.int64), values.to(torch.int64)])
    parts = _all_gather_varlen(payload, [features * rows + ids for rows, ids in headers], group)
    shards = [
        KeyedJaggedTensor(
            keys=kjt.keys(),
            values=part[features * rows :].to(values.dtype),
            lengths=part[: features * rows].to(lengths.dtype),
            stride=rows,
        )
        for (rows, _), part in zip(headers, parts)
    ]
    return merge_kjts(shards), [rows for rows, _ in headers]


def merge_kjts(shards: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """One KJT whose bags are the bags of ``shards`` in order (a batch split by rows, put back
    together). KJT values are feature-major, so each feature's ids are interleaved shard by shard."""
    keys = shards[0].keys()
    features = len(keys)
    lengths = torch.cat([s.lengths().view(features, s.stride()) for s in shards], dim=1).reshape(-1)
    per_shard = [torch.split(s.values(), s.length_per_key()) for s in shards]
    values = torch.cat([ids[f] for f in range(features) for ids in per_shard])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=sum(s.stride() for s in shards))


class _KeepRows(torch.autograd.Function):
    """Forward: this rank's rows of the global pooled output. Backward: the pooled-output
    gradients of all ranks, concatenated, so the collection's backward (and the TBE's fused
    update inside it) sees the gradient of the whole global batch on every rank."""

    @staticmethod
    def forward(ctx: Any, pooled: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:rank])
        return pooled[start : start + sizes[rank]].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        width = grad.shape[1]
        parts = _all_gather_varlen(grad.contiguous().view(-1), [n * width for n in ctx.sizes], ctx.group)
        return torch.cat(parts).view(-1, width), None, None, None


class ReplicatedTables:
    """Hooks on a collection that make its forward/backward act on the global batch.

    Hooks instead of a wrapper module keep parameter names, ``state_dict`` keys and every
    model's ``self.embeddings(kjt)`` call unchanged. They act only in training mode, so
    evaluation (rank 0 alone, ``model.eval()``) runs the plain collection with no collectives.
    """

    def __init__(self, collection: nn.Module, replica: Replica, group: Any = None) -> None:
        self.replica = replica
        self.group = group
        self.expected_rows: int | None = None
        self._sizes: list[int] | None = None
        self._handles = [
            collection.register_forward_pre_hook(self._before, with_kwargs=True),
            collection.register_forward_hook(self._after),
        ]

    def expect(self, rows: int) -> None:
        """The local batch size of the coming step: a collection call with another batch size
        (a model that looks up something other than the batch) would be summed wrong, so it is
        refused rather than silently trained."""
        self.expected_rows = rows

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not module.training:
            return None
        kjt = args[0] if args else kwargs["features"]
        if self._sizes is not None:
            raise RuntimeError("the collection ran twice in one step; data-parallel training supports one lookup per batch")
        if self.expected_rows is not None and kjt.stride() != self.expected_rows:
            raise RuntimeError(
                f"the collection was called with {kjt.stride()} bags per feature, the local batch has "
                f"{self.expected_rows} rows; data-parallel training supports models that look up the batch's KJT once"
            )
        global_kjt, self._sizes = gather_kjt(kjt, self.group)
        return ((global_kjt, *args[1:]), kwargs) if args else (args, {**kwargs, "features": global_kjt})

    def _after(self, module: nn.Module, args: tuple, output: KeyedTensor) -> KeyedTensor | None:
        if not module.training:
            return None
        sizes, self._sizes = self._sizes, None
        values = _KeepRows.apply(output.values(), sizes, self.replica.rank, self.group)
        return KeyedTensor(keys=output.keys(), length_per_key=output.length_per_key(), values=values)


def allreduce_grads(params: Sequence[torch.Tensor], extra: torch.Tensor | None = None, group: Any = None) -> torch.Tensor | None:
    """Sum the gradients of ``params`` over all ranks with ONE allreduce of a flat bucket.

    A rank without a gradient for a parameter (an empty shard) contributes zeros; a flag per
    parameter in the same bucket keeps the gradient ``None`` where no rank had one, so Adam skips
    it exactly as it would in one process. ``extra`` (e.g. the loss) rides along and its sum is
    returned.
    """
    grads = [p.grad for p in params]
    device = params[0].device if params else torch.device("cpu")
    pieces = [g.reshape(-1) if g is not None else torch.zeros(p.numel(), device=device) for p, g in zip(params, grads)]
    flags = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=device)
    tail = extra.detach().reshape(-1).to(torch.float32) if extra is not None else torch.zeros(0, device=device)
    bucket = torch.cat([*pieces, flags, tail])
    dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group)
    total = sum(piece.numel() for piece in pieces)
    summed_flags = bucket[total : total + len(params)].tolist()
    offset = 0
    for p, flag in zip(params, summed_flags):
        n = p.numel()
        if flag > 0:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(bucket[offset : offset + n].view_as(p))
        offset += n
    return bucket[total + len(params) :] if extra is not None else None


def state_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """sha256 over names, dtypes, shapes and raw bytes: equal digests mean bit-identical state."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Everything that must agree across replicas: the model's state_dict (TBE weights and
    momentum included) and the dense optimizer's tensors."""
    yield from sorted(model.state_dict().items())
    if optimizer is not None:
        for index, state in sorted(optimizer.state_dict()["state"].items()):
            for key, value in sorted(state.items()):
                if isinstance(value, torch.Tensor):
                    yield f"optimizer.{index}.{key}", value


def replica_digests(digest: bytes, group: Any = None) -> list[str]:
    """Every rank's digest (hex), gathered as uint8 tensors so no object pickling is involved."""
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    if not (dist.is_available() and dist.is_initialized()):
        return [digest.hex()]
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = mine.to(device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [bytes(t.cpu().tolist()).hex() for t in out]
