"""The compiled CPU kernels (``native.c``: the fused assemble, the compaction of dropped ids):
built on first use with the system's C compiler, loaded with ctypes.

Why C, and why this way: the fused assemble on a CPU is a few dozen small memory-bound torch ops
per training step (benchmarks/NOTES.md, issue 3: 2.5-3.3 ms of a 7-8 ms step for QR and
MixedDim), each a pass over strided column views with its own dispatch; one pass over the rows in
C does the same float operations in a fraction of that. A plain C file with no torch headers
compiles in well under a second (a torch C++ extension takes a minute and pins the ABI of one
torch build), and ctypes needs nothing but the tensors' pointers.

Nothing depends on it: when no compiler is found or the build fails, ``library()`` returns None
(with one warning) and the assemble keeps its torch path, which is also the reference the tests
hold this one to. ``TABLEZIP_NATIVE=0`` turns it off. The shared object is cached per source,
compiler and machine under ``TABLEZIP_NATIVE_CACHE`` (default ``~/.cache/tablezip/native``),
written to a temporary name and renamed, so concurrent processes (Ray workers) never load a
half-written file.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
# -ffp-contract=off: no fused multiply-adds, so a product or sum rounds exactly as torch's does
# (the bitwise-equality contract of embeddings/assemble.py). -march=native: the widest vectors
# this CPU has (the kernels pick their width from the target); the cache key holds the CPU's
# feature flags, so a cache shared by different CPUs never loads code built for another.
# -fno-math-errno: sqrtf becomes the IEEE sqrt instruction (the same correctly rounded result), no
# call into libm.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-Wno-psabi", "-fPIC", "-shared", "-pthread", "-std=c11")
ENV_SWITCH = "TABLEZIP_NATIVE"
VERSION = 9  # tz_native_version() of the source this module declares
ENV_CACHE = "TABLEZIP_NATIVE_CACHE"

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_tried = False

_i64, _f32p, _i64p, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int


def enabled() -> bool:
    """False when ``TABLEZIP_NATIVE`` is 0/false/off/no."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def compiler() -> str | None:
    """``$CC``, else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    """``TABLEZIP_NATIVE_CACHE``, else ``~/.cache/tablezip/native``; where that cannot be created
    or written (a read-only home on a CI runner or a container), a per-user folder in the temp dir."""
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit)
    preferred = Path.home() / ".cache" / "tablezip" / "native"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tablezip-native-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    """The shared object for this source, compiler and machine (built unless cached)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), platform.machine(), platform.system(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"tz_native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            # A compiler without -march=native for this target (some cross or older compilers):
            # the portable build (4-wide vectors) rather than none.
            portable = [f for f in FLAGS if f != "-march=native"]
            retry = subprocess.run([cc, *portable, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
            if retry.returncode != 0:
                raise RuntimeError(f"{cc} failed ({result.returncode}): {result.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    lib.tz_native_version.restype = _i64
    lib.tz_native_version.argtypes = []
    lib.tz_compact_unit_bags.restype = _i64
    lib.tz_compact_unit_bags.argtypes = [_i64p, _i64, _i64p, _i64, _i64p, _i64p]
    lib.tz_rows.restype = None
    lib.tz_rows.argtypes = [
        _i64p, _i64p, _i64p, _i64, _i64p, _i64, ctypes.c_void_p, _i64p, _i64, _i64, _i64, ctypes.c_uint64, ctypes.c_uint64,
    ]
    lib.tz_digits.restype = None
    lib.tz_digits.argtypes = [_i64p, _i64p, _i64, _i64p, _i64, _i64p, _i64p, _i64]
    lib.tz_tbe_backward.restype = _i64
    lib.tz_tbe_backward.argtypes = [
        _f32p, _i64, _i64, _i64p, _i64p, _f32p, _i64, _i64, _i64p, _f32p, _f32p, ctypes.c_void_p, _i64p, _f32p, _i64,
        _i64, ctypes.c_float, ctypes.c_float,
    ]
    lib.tz_fused_forward.restype = _int
    lib.tz_fused_forward.argtypes = [
        _i64p, _i64p, _i64, _f32p, _i64, _i64, _f32p, ctypes.c_void_p, ctypes.c_void_p, _i64p, _i64p, _i64, _i64, ctypes.c_uint64,
        ctypes.c_uint64, _int, _i64,
    ]
    lib.tz_fused_backward.restype = _i64
    lib.tz_fused_backward.argtypes = [
        _i64p, _i64p, _i64, _f32p, _i64, _i64, _i64, _f32p, _f32p, ctypes.c_void_p, ctypes.c_void_p, _i64p, _i64p,
        _i64, _i64p,
        ctypes.c_void_p, _i64p, _f32p, _i64, _i64, ctypes.c_void_p, _i64, ctypes.c_float, ctypes.c_float,
        ctypes.c_uint64, ctypes.c_uint64,
    ]
    lib.tz_assemble_forward.restype = _int
    lib.tz_assemble_forward.argtypes = [
        _f32p, _i64, _f32p, _i64, _i64, _i64, _i64p, _i64, _f32p, _f32p, _i64, _int,
    ]
    lib.tz_assemble_backward.restype = _int
    lib.tz_assemble_backward.argtypes = [
        _f32p, _i64, _f32p, _i64, _f32p, _i64, _i64, _i64, _i64, _i64p, _i64, _i64, _f32p, _f32p, _i64p,
        _i64p, _i64, _f32p, _i64, _int,
    ]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (switched off, no compiler, or the build failed: warned once)."""
    global _loaded, _tried
    if not enabled():
        return None
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        try:
            cc = compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc)")
            lib = ctypes.CDLL(str(_build(cc)))
            _declare(lib)
            if lib.tz_native_version() != VERSION:
                raise RuntimeError("stale shared object (version mismatch)")
            _loaded = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(f"tablezip: compiled CPU kernels unavailable, using the torch paths ({err})", stacklevel=2)
            _loaded = None
        _tried = True
        return _loaded


# Below this many floats per call (rows x output columns), one thread: a second one competes with
# torch's OpenMP workers, which spin for a while after each parallel op (measured at B=4096,
# D=16, 26 features on 2 cores: QR's backward 1.05 ms on one thread, 1.88 ms on two).
PARALLEL_FLOATS = 1 << 22


def threads(rows: int, cols: int) -> int:
    """Threads for one call of ``rows`` x ``cols`` floats: one for small calls, else torch's
    intra-op setting (so ``torch.set_num_threads`` bounds both)."""
    if rows * cols < PARALLEL_FLOATS:
        return 1
    return max(1, torch.get_num_threads())


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pointer_array(tensors: list[torch.Tensor]) -> ctypes.Array:
    """A C array of the tensors' data pointers (kept alive by the caller with the tensors)."""
    return (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])
