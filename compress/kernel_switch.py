"""The mode switch and Triton probe shared by tablezip's optional Triton kernels.

Why one module: the fused id transforms (``fused_ids``) and the fused inference lookup
(``fused_lookup``) follow the same contract, and a user who A/B tests one expects the other to
behave the same way: "auto" runs a kernel only for CUDA tensors with Triton importable, "on" runs
it on any device (on a CPU that needs Triton's interpreter, ``TRITON_INTERPRET=1``; the CPU tests
use it), "off" always takes the reference path. Each kernel family keeps its own switch, so one can
be turned off while the other runs. Nothing here imports Triton at module import.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch

MODES = ("auto", "on", "off")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports; cached, so it is asked once per process."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (no compiler/driver): the reference path
        return False
    return True


def _checked(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {value!r}")
    return value


class KernelSwitch:
    """One kernel family's mode ("auto", "on" or "off"; see the module docstring)."""

    def __init__(self, default: str = "auto") -> None:
        self.value = _checked(default)

    def set(self, value: str) -> None:
        """Use ``value`` from now on (process-wide; ``mode`` for a block)."""
        self.value = _checked(value)

    @contextmanager
    def mode(self, value: str) -> Iterator[None]:
        """Within the block, use ``value``; the previous mode comes back on exit, even on error."""
        before, self.value = self.value, _checked(value)
        try:
            yield
        finally:
            self.value = before

    def wants_kernel(self, tensor: torch.Tensor) -> bool:
        """Whether the kernel runs for ``tensor`` under the current mode."""
        if self.value == "off":
            return False
        if self.value == "auto" and not tensor.is_cuda:
            return False
        return triton_available()
