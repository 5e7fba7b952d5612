"""Output memory kept between CPU forwards and written again once nobody holds it.

Why: a fresh [B, F*D] fp32 output is new memory from the OS on every call (glibc maps blocks above
its mmap threshold afresh and unmaps them on free; smaller ones go back at its trim threshold),
and each of its 4 KiB pages faults on first touch: at B=32768, D=64, 53k faults, ~80 ms of a
~300 ms forward (benchmarks/NOTES.md). The fused assemble (embeddings/assemble.py) and the fused
C lookup (compress/fused_cpu.py) write their outputs into the memory of the previous one when it
is free again.
"""
from __future__ import annotations

import threading
from typing import Any

import torch

# torch's count of the references to a storage's memory (private; None where a torch lacks it).
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def sole_owner(storage: torch.UntypedStorage) -> bool:
    """Whether ``storage`` (the Python object kept here) is the only reference to its memory: no
    tensor, view or other storage object uses it. False where torch lacks the counter."""
    return _USE_COUNT is not None and _USE_COUNT(storage._cdata) == 1


class SpareOutput:
    """The memory of the last output handed out, reused by ``new`` when nothing else holds it.

    Safe because the check counts every holder: each tensor or view of the memory, a tensor
    autograd saved for a backward (a later layer's input), a numpy array over it, all hold a
    reference to its storage, so the count is 1 (our own reference) only once all of them are gone;
    then nobody can read what the next forward writes. Under a lock, so two threads never take the
    same memory. Costs one output's memory between calls. CPU only: CUDA's caching allocator
    already reuses memory (and tracks the streams that use it)."""

    def __init__(self) -> None:
        self.storage: torch.UntypedStorage | None = None
        self._lock = threading.Lock()

    def new(self, like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """A [rows, cols] tensor of ``like``'s dtype and device, uninitialised: the kept memory when
        it is free and large enough, else new memory (kept for the next call)."""
        if like.device.type != "cpu":
            return like.new_empty(rows, cols)
        need = rows * cols * like.element_size()
        with self._lock:
            spare = self.storage
            if spare is not None and spare.nbytes() >= need and sole_owner(spare) and spare.device == like.device:
                return like.new_empty(0).set_(spare, 0, (rows, cols), (cols, 1))
            out = like.new_empty(rows, cols)
            self.storage = out.untyped_storage() if _USE_COUNT is not None else None
            return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled / deep-copied without the kept memory (a cache) and its lock (not picklable)."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
