"""Every Triton kernel of the fused paths (compress/fused_lookup.py, fused_train.py, fused_ids.py)
compiles for an H100 (sm_90) down to a cubin, at the launch sites' own arguments, on a machine
without a GPU.

Why: the other kernel tests run Triton's CPU interpreter, which never compiles, and Triton 3.6 (the
GPU image's) failed to compile ``fused_train``'s ``grad_kernel`` for mult tables and for groups
with a large table before a small one ("PassManager::run failed" in
TritonGPURemoveLayoutConversions), which kept QR/KWay/MultiHash off the fused training step on
CUDA; ``mixed_grad_kernel`` did not compile for a projected MixedDim block before a D-wide one.
This is their regression test.

How: each scenario runs the real launchers (a training step and an inference forward of a
collection, the id transforms) on CPU tensors with every kernel replaced by a recorder of its
launches; each distinct launch is then bound as Triton's JIT binds it on a GPU (argument types,
the 16-byte alignment and divisibility specialisations, the constexprs) and compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. Skipped without Triton, its CUDA backend or
its ptxas (CI).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Iterator

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import KWay, QR, Full, Hash, Hybrid, MixedDim, MultiHash, Pruned, fused_ids, fused_lookup, fused_train
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer

Launch = tuple[Any, tuple, dict]  # (the built kernel, positional arguments, keyword arguments)
BUILDERS = (fused_lookup._kernel, fused_lookup._mixed_kernel, fused_train._kernels, fused_ids._kernels)


def sm90_compiler() -> tuple[Any, Any, Any, Callable]:
    """(triton, ASTSource, the sm_90 target, the JIT's binder factory), or skip with the reason."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (CI: the TBE path only)")
    import triton

    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:  # another Triton's internals
        pytest.skip(f"triton {triton.__version__} lacks what this test binds launches with: {e}")
    if "nvidia" not in backends:
        pytest.skip(f"triton {triton.__version__} has no CUDA backend")
    from triton.runtime.jit import JITFunction

    if not isinstance(triton.language.standard.zeros, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreter-only in this process")
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 - the knob raises whatever its lookup raised
        pytest.skip(f"no ptxas for triton {triton.__version__}: {e}")
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip(f"no ptxas for triton {triton.__version__}")
    return triton, ASTSource, GPUTarget("cuda", 90, 32), create_function_from_signature


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Launch]]:
    """The kernels built for the compiler (not for the interpreter other tests build them for),
    each replaced by a recorder: the list fills as the launchers run. Dropped after the test."""
    sm90_compiler()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for build in BUILDERS:
        build.cache_clear()
    recorded: list[Launch] = []
    lookup, mixed = fused_lookup._kernel(), fused_lookup._mixed_kernel()
    train, ids = fused_train._kernels(), fused_ids._kernels()
    monkeypatch.setattr(fused_lookup, "_kernel", lambda: _Recorder(lookup, recorded))
    monkeypatch.setattr(fused_lookup, "_mixed_kernel", lambda: _Recorder(mixed, recorded))
    monkeypatch.setattr(fused_train, "_kernels", lambda: tuple(_Recorder(k, recorded) for k in train))
    monkeypatch.setattr(fused_ids, "_kernels", lambda: tuple(_Recorder(k, recorded) for k in ids))
    yield recorded
    for build in BUILDERS:
        build.cache_clear()


class _Recorder:
    """Stands in for a built kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel: Any, recorded: list[Launch]) -> None:
        self.kernel, self.recorded = kernel, recorded

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.recorded.append((self.kernel, args, kwargs))


def compile_for_sm90(recorded: list[Launch]) -> tuple[list[str], list[str]]:
    """Compile each distinct launch as Triton's JIT would for an H100: (the launches compiled, the
    launches failed with the compiler's last line), each as the kernel and its constexprs."""
    triton, ASTSource, target, binder_for = sm90_compiler()
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    seen: set[str] = set()
    compiled, failed = [], []
    for kernel, args, kwargs in recorded:
        bound, specialization, options = binder_for(kernel.signature, kernel.params, backend)(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        names = [p.name for p in kernel.params]
        label = f"{kernel.__name__}({', '.join(f'{names[path[0]]}={v}' for path, v in constexprs.items())})"
        key = f"{label} {signature} {attrs} {options}"
        if key in seen:
            continue
        seen.add(key)
        try:
            triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
            compiled.append(label)
        except Exception as e:  # noqa: BLE001 - the compiler's errors share no base class
            failed.append(f"{label}: {(str(e).strip().splitlines() or [type(e).__name__])[-1]}")
    return compiled, failed


def bags(names: list[str], batch: int = 8) -> KeyedJaggedTensor:
    """Bags of 0-2 ids (their values do not matter: no kernel runs)."""
    lengths = torch.arange(len(names) * batch) % 3
    return KeyedJaggedTensor(keys=names, values=torch.arange(int(lengths.sum())) % 37, lengths=lengths)


def train_and_infer(features: list[FeatureSpec], methods: dict, dim: int, optimizer: str) -> None:
    """The fused training step (forward lookup, gradients, update) and the fused inference lookup."""
    coll = CompressedEmbeddingBagCollection(features, dim, methods, optimizer=TableOptimizer(kind=optimizer), seed=3)
    kjt = bags([f.name for f in features])
    with fused_train.mode("on"):
        coll(kjt).values().sum().backward()
    with fused_lookup.mode("on"), torch.no_grad():
        coll(kjt)


# One gradient launch per (partitions, op, width, small tables). SMALL (tables of at most
# fused_train.SMALL_ROWS rows) in the orders that failed on Triton 3.6 and the ones that did not:
# large then small (qr's quotient and remainder), small around large, small first, all small.
COMPOSITIONAL = {
    "full": Full(), "qr": QR(collisions=7), "kway_small_first": KWay(partitions=(3, 200)),
    "kway_mixed": KWay(partitions=(4, 60, 5)), "kway_small": KWay(partitions=(3, 7, 15)),
    "add": QR(collisions=5, op="add"), "concat": KWay(partitions=(40, 20), op="concat"),
    "multihash": MultiHash(rows=60, probes=2), "multihash_small": MultiHash(rows=20, probes=3),
}  # fmt: skip


def compositional(dim: int, optimizer: str) -> None:
    """Full, QR / KWay (mult, add, concat) and MultiHash features of 300 ids each."""
    train_and_infer([FeatureSpec(name, 300) for name in COMPOSITIONAL], COMPOSITIONAL, dim, optimizer)


def mixed_dim(dim: int, optimizer: str) -> None:
    """MixedDim (projected and D-wide blocks, with and without a remap, a projected block before
    a D-wide one) and Pruned (remap, default row, prefix): the MixedDim kernels."""
    methods = {
        "md": MixedDim(dims=(dim, 8, 4), sizes=(20, 80, 200)), "md_projected_first": MixedDim(dims=(12, dim), sizes=(100, 200)),
        "pruned": Pruned(keep=90), "pruned_default": Pruned(keep=70, missing="default"), "prefix": Pruned(keep=150, remap=False),
    }  # fmt: skip
    counts = torch.randperm(300, generator=torch.Generator().manual_seed(0)).numpy()  # unsorted: md gets a remap
    features = [FeatureSpec(name, 300, counts=counts if name == "md" else None) for name in methods]
    train_and_infer(features, methods, dim, optimizer)


def id_transforms() -> None:
    """Hash (two features: a per-feature search), Hybrid (with and without a remap) and Pruned
    (zero, default, prefix) rows from a collection's batched id transforms, and the drops by
    weight of the TBE path on CUDA."""
    methods = {
        "hash": Hash(rows=50, seed=3), "hash_too": Hash(rows=40, seed=5),
        "hybrid": Hybrid(hot=100, cold_rows=60, seed=1), "hybrid_remap": Hybrid(hot=30, cold_rows=5, remap=True),
        "pruned": Pruned(keep=7), "pruned_default": Pruned(keep=70, missing="default"), "prefix": Pruned(keep=90, remap=False),
    }  # fmt: skip
    coll = CompressedEmbeddingBagCollection([FeatureSpec(name, 300) for name in methods], 16, methods, seed=2)
    with fused_ids.mode("on"):
        coll.transform_ids([torch.arange(5) for _ in methods])
        fused_ids.zero_weight_drops(torch.tensor([3, -1, 0]))


SCENARIOS: dict[str, tuple[Callable[[], None], set[str]]] = {
    # D=64 is the benchmarks' width (Triton 3.6 failed there); 24 is not a power of two (masked
    # columns, 12-wide concat tables). The three optimizers are the update kernel's three branches.
    "compositional-d64": (lambda: compositional(64, "rowwise_adagrad"), {"grad_kernel", "update_kernel", "lookup_kernel"}),
    "compositional-d24": (lambda: compositional(24, "sgd"), {"grad_kernel", "update_kernel", "lookup_kernel"}),
    "mixed-dim-d64": (lambda: mixed_dim(64, "adagrad"), {"mixed_grad_kernel", "update_kernel", "mixed_kernel"}),
    "id-transforms": (id_transforms, {"rows_kernel", "drops_kernel"}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kernels_compile_for_sm90(launches, scenario):
    run, kernels = SCENARIOS[scenario]
    run()
    assert {kernel.__name__ for kernel, _, _ in launches} == kernels  # the fused paths ran, no fallback
    compiled, failed = compile_for_sm90(launches)
    assert not failed, f"{len(failed)} of {len(failed) + len(compiled)} launches failed to compile:\n" + "\n".join(failed)


def test_regression_cases_are_launched(launches):
    """The D=64 scenario holds the launches Triton 3.6 failed on, so its passing means they
    compile: mult (every mult launch failed) with each order of small and large tables, add and
    concat with a large table before a small one."""
    compositional(64, "rowwise_adagrad")
    grads = {
        (g["OP"], g["K"], g["SMALL"]) for kernel, _, g in launches if kernel.__name__ == "grad_kernel" and g["DIM"] == 64
    }  # fmt: skip
    mult, add, concat = (fused_lookup.OPS[op] for op in ("mult", "add", "concat"))
    assert {(mult, 2, 0b10), (mult, 3, 0b101), (mult, 2, 0b01), (mult, 3, 0b111), (add, 2, 0b10), (concat, 2, 0b10)} <= grads


def ptx_of(launch: Launch) -> str:
    """The PTX Triton's JIT would build for ``launch`` on an H100."""
    triton, ASTSource, target, binder_for = sm90_compiler()
    from triton.compiler.compiler import make_backend

    kernel, args, kwargs = launch
    backend = make_backend(target)
    bound, specialization, options = binder_for(kernel.signature, kernel.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__).asm["ptx"]


@pytest.mark.parametrize("vector", [True, False])
def test_gradient_rows_use_vector_reductions(launches, monkeypatch, vector):
    """With ``VECTOR_ATOMICS`` the gradient kernels' large-table rows compile to Hopper's
    four-float ``red.global.add.v4.f32`` (no per-float ``atom.add.f32`` left for them: what made
    QR's gradient kernel 2.2 ms -> 1.0 ms on an H100), and without it to scalar atomics only. Guards
    the inline PTX against being dropped (it has no result anyone reads) or rejected by ptxas."""
    monkeypatch.setattr(fused_train, "VECTOR_ATOMICS", vector)
    compositional(64, "rowwise_adagrad")
    mixed_dim(64, "adagrad")
    grads = [launch for launch in launches if launch[0].__name__ in ("grad_kernel", "mixed_grad_kernel")]
    assert grads and all(kwargs["VEC"] is vector for _, _, kwargs in grads)
    # Full alone (K=1, a large table) and QR-style mult (K=2, a small remainder table).
    full = next(l for l in grads if l[0].__name__ == "grad_kernel" and l[2]["K"] == 1 and l[2]["SMALL"] == 0)
    qr = next(l for l in grads if l[0].__name__ == "grad_kernel" and l[2]["OP"] == fused_lookup.OPS["mult"] and l[2]["SMALL"] == 0b10)
    dense = next(l for l in grads if l[0].__name__ == "mixed_grad_kernel" and l[2]["PROJ"] == 0)
    for launch in (full, qr, dense):
        ptx = ptx_of(launch)
        vectors = ptx.count("red.relaxed.gpu.global.add.v4.f32")
        scalars = ptx.count("atom.global.gpu.relaxed.add.f32")
        if vector:
            # 64 bags x 64 columns over 128 threads: 8 quads per thread and table (a loop body).
            assert vectors >= 8, (launch[0].__name__, launch[2])
            # Left: only the small table's per-program row sums (QR's remainders), one per row.
            assert scalars == (1 if launch is qr else 0), (launch[0].__name__, launch[2], scalars)
        else:
            assert vectors == 0 and scalars >= 32, (launch[0].__name__, launch[2], scalars)
