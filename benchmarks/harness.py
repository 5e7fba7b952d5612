"""A small timing harness shared by the benchmark scripts.

Why a harness at all: every benchmark needs the same four things done the same way (a frozen
description of the workload, repeat-based timing with warmup, the machine/commit it ran on, and
results written as JSON + markdown + plot) so numbers from different scripts and machines can be
compared without re-reading each script.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch

# num_embeddings of C1..C26 in data/criteo_sample_110k.tsv.gz.
CRITEO_CARDINALITIES: tuple[tuple[str, int], ...] = (
    ("C1", 471), ("C2", 510), ("C3", 37883), ("C4", 21352), ("C5", 127), ("C6", 12),
    ("C7", 7527), ("C8", 230), ("C9", 3), ("C10", 10776), ("C11", 3770), ("C12", 34831),
    ("C13", 2803), ("C14", 26), ("C15", 4939), ("C16", 29166), ("C17", 9), ("C18", 2451),
    ("C19", 1197), ("C20", 4), ("C21", 32519), ("C22", 13), ("C23", 14), ("C24", 10464),
    ("C25", 49), ("C26", 8044),
)  # fmt: skip

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    """Everything that determines the input of a benchmark, so a result can be reproduced.

    ``features`` holds ``(name, num_embeddings)`` pairs; ids of a feature lie in
    ``[0, num_embeddings)``. Every bag has exactly ``bag_len`` ids. ``zipf`` is the exponent of
    a truncated Zipf law over the ids (None: uniform). Frozen so it can key a result record.
    """

    features: tuple[tuple[str, int], ...]
    dim: int
    batch: int
    bag_len: int = 1
    zipf: float | None = None
    seed: int = 0

    @property
    def distribution(self) -> str:
        return "uniform" if self.zipf is None else f"zipf({self.zipf:g})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = [list(f) for f in self.features]
        data["distribution"] = self.distribution
        return data

    def sample_ids(self) -> dict[str, torch.Tensor]:
        """Seeded int64 ids per feature, ``batch * bag_len`` of them, bag-major.

        Zipf ranks are sent through a random permutation of the id space: in real logs the hot
        ids are not the smallest ones, and keeping them contiguous would make the popular rows
        share cache lines, flattering any uncompressed table.
        """
        rng = np.random.default_rng(self.seed)
        count = self.batch * self.bag_len
        out: dict[str, torch.Tensor] = {}
        for name, n in self.features:
            if self.zipf is None:
                ids = rng.integers(0, n, size=count)
            else:
                weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** self.zipf
                ranks = rng.choice(n, size=count, p=weights / weights.sum())
                ids = rng.permutation(n)[ranks]
            out[name] = torch.from_numpy(ids.astype(np.int64))
        return out


def add_gpu_workload_args(parser: "argparse.ArgumentParser", device_help: str | None = None) -> None:
    """The GPU scripts' shared options: where results go and the workload's shape (26 tables of
    1M rows, D=64, B=65536 by default: the design's GPU case), on ``--device`` (cuda)."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tables", type=int, default=26)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--device", default="cuda", help=device_help)


def import_without_fbgemm() -> None:
    """Make ``tablezip.compress`` importable where torchrec/fbgemm are not installed (the lent GPU
    image): ``tablezip.embeddings``' package ``__init__`` imports the collection, hence torchrec,
    so it is replaced by a bare package when it cannot be imported. Registry, features and every
    method only need torch; the kernel-only GPU scripts run on that."""
    try:
        importlib.import_module("tablezip.embeddings")
    except ImportError:
        package = types.ModuleType("tablezip.embeddings")
        package.__path__ = [str(Path(__file__).resolve().parent.parent / "embeddings")]  # type: ignore[attr-defined]
        sys.modules["tablezip.embeddings"] = package
    importlib.import_module("tablezip.compress")


def time_fn(
    fn: Callable[[], object], warmup: int = 3, repeats: int = 7, min_seconds: float = 0.2
) -> dict[str, Any]:
    """Per-call time of ``fn`` in ms: median and p90 over ``repeats``.

    One repeat runs ``fn`` enough times to last about ``min_seconds``, so timer resolution and
    per-call jitter average out inside a repeat, while the spread between repeats still shows
    interference from other processes. Warmup calls (allocator, lazy init, caches) are not
    counted; the fastest one sizes the repeats. The garbage collector is paused while timing,
    as in ``timeit``, so a collection triggered by earlier allocations does not land in one case.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    calibration = []
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        calibration.append(time.perf_counter() - start)
    iterations = max(1, math.ceil(min_seconds / max(min(calibration), 1e-9)))
    per_repeat_ms: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            per_repeat_ms.append((time.perf_counter() - start) * 1e3 / iterations)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        "median_ms": statistics.median(per_repeat_ms),
        "p90_ms": float(np.percentile(per_repeat_ms, 90)),
        "per_repeat_ms": per_repeat_ms,
        "iterations": iterations,
    }


def time_interleaved(
    fns: Mapping[Hashable, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 0.2,
    on_repeat: Callable[[int], None] | None = None,
) -> dict[Hashable, dict[str, Any]]:
    """Per-call time in ms of every function of ``fns``, with the repeats interleaved.

    Why not ``time_fn`` per case: on a shared machine the load drifts over minutes, and timing
    case A's repeats and then case B's lets that drift masquerade as a speed difference. Here
    repeat r runs every case once (``iterations`` calls, sized as in ``time_fn`` from the
    fastest warmup call) before repeat r + 1 starts, and the starting case rotates, so drift and
    position effects hit all cases alike; a ratio of two medians is then a paired comparison.
    Warmup happens once per case, not per repeat: at large batches one call takes a good part of
    a second and per-repeat warmups would double the run. The collector is paused inside each
    timed block and run between blocks, so garbage from one case is never collected in another.
    ``on_repeat(r)`` is called after each repeat (progress output).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    keys = list(fns)
    iterations: dict[Hashable, int] = {}
    for key in keys:
        calibration = []
        for _ in range(max(warmup, 1)):
            start = time.perf_counter()
            fns[key]()
            calibration.append(time.perf_counter() - start)
        iterations[key] = max(1, math.ceil(min_seconds / max(min(calibration), 1e-9)))
    per_repeat_ms: dict[Hashable, list[float]] = {key: [] for key in keys}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(repeats):
            shift = r % len(keys) if keys else 0
            for key in keys[shift:] + keys[:shift]:
                gc.collect()
                gc.disable()
                fn, n = fns[key], iterations[key]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                per_repeat_ms[key].append((time.perf_counter() - start) * 1e3 / n)
                if gc_was_enabled:
                    gc.enable()
            if on_repeat is not None:
                on_repeat(r)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        key: {
            "median_ms": statistics.median(ms),
            "p90_ms": float(np.percentile(ms, 90)),
            "per_repeat_ms": ms,
            "iterations": iterations[key],
        }
        for key, ms in per_repeat_ms.items()
    }


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def git_commit() -> str:
    """HEAD of the repository, or "unknown" (no commit yet, no git): results must still be written."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def env_info() -> dict[str, Any]:
    """Where and how a result was produced: timings mean nothing without the machine and threads."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "fbgemm_gpu": _version("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm_gpu"),
        "torchrec": _version("torchrec"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        # torch's huge-page switch (read before torch's first allocation): large CPU tensors fault
        # in 2 MiB at a time instead of 4 KiB, which halves some large-batch times.
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # Other processes on the machine skew timings most on few cores: record how busy it was.
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "command": " ".join(sys.orig_argv),
    }


def write_results(
    name: str,
    records: Sequence[Mapping[str, Any]],
    markdown_table: str,
    fig: Any | None = None,
    out_dir: Path = RESULTS_DIR,
) -> list[Path]:
    """Write ``<name>.json`` (one record per case), ``<name>.md`` and, given a matplotlib
    figure, ``<name>.png`` under ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(list(records), indent=2) + "\n")
    paths[1].write_text(markdown_table.rstrip() + "\n")
    if fig is not None:
        png = out_dir / f"{name}.png"
        fig.savefig(png, dpi=120, bbox_inches="tight")
        paths.append(png)
    return paths


def time_cuda_fn(fn: Callable[[], object], warmup: int = 5, repeats: int = 20, iterations: int = 10) -> dict[str, Any]:
    """Per-call GPU time in ms from CUDA events around ``iterations`` calls (host timers would
    measure launch, not execution); median and p90 over ``repeats``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_repeat_ms: list[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        per_repeat_ms.append(start.elapsed_time(end) / iterations)
    return {
        "median_ms": statistics.median(per_repeat_ms),
        "p90_ms": float(np.percentile(per_repeat_ms, 90)),
        "per_repeat_ms": per_repeat_ms,
        "iterations": iterations,
    }
