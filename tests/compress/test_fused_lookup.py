"""The fused inference lookup of QR/KWay, MultiHash and MixedDim (+ Full) collections
(compress/fused_lookup.py) against the TBE path: bit for bit for bags of one id (MixedDim: ids
of D-wide blocks; projected blocks allclose), allclose for longer bags.

CI has no GPU and no Triton: the kernel tests skip there. With Triton installed they run the
kernel in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernel is built)
under ``fused_lookup.mode("on")``; on a GPU ``benchmarks/gpu_fused_lookup.py`` and
``benchmarks/gpu_collection.py`` repeat the checks at full size. The switches and the fallback
to the TBE path are tested everywhere.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import numpy as np

from tablezip.compress import KWay, QR, Full, MixedDim, MultiHash, Pruned, fused_cpu, fused_lookup, fused_train
from tablezip.compress.hashing import MIX
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer, native
from tests.conftest import random_kjt

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CI: the TBE path only)")

DIM = 24  # not a power of two: the kernel masks the columns past D
FEATURES = [
    FeatureSpec("full", 50), FeatureSpec("qr", 1000), FeatureSpec("kway3", 300, pooling="mean"),
    FeatureSpec("add", 900), FeatureSpec("concat", 700), FeatureSpec("qr_mean", 2000, pooling="mean"),
    FeatureSpec("kway4", 5000),
]  # fmt: skip
METHODS = {
    "full": Full(), "qr": QR(collisions=7), "kway3": KWay(partitions=(3, 11, 10)), "add": QR(collisions=5, op="add"),
    "concat": KWay(partitions=(30, 30), op="concat"), "qr_mean": QR(collisions=40), "kway4": KWay(partitions=(2, 9, 17, 20)),
}  # fmt: skip
NAMES = [f.name for f in FEATURES]


@pytest.fixture(params=["triton", "c"])
def kernel(request, monkeypatch):
    """Each backend of the fused lookup on a CPU: "triton", the kernel under Triton's interpreter
    (built fresh for the test and dropped after it; skipped without Triton), and "c", the compiled
    C kernel of compress/fused_cpu.py (mode "auto" of fused_lookup; skipped without a compiler)."""
    if request.param == "c":
        if native.library() is None:
            pytest.skip("the compiled CPU kernels could not be built")
        with fused_cpu.mode("on"):
            yield request.param
        return
    if not HAS_TRITON:
        pytest.skip("triton is not installed (CI: the C kernel and the TBE path)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_lookup._kernel.cache_clear()
    fused_lookup._mixed_kernel.cache_clear()
    with fused_lookup.mode("on"):
        yield request.param
    fused_lookup._kernel.cache_clear()
    fused_lookup._mixed_kernel.cache_clear()


def one_id_kjt(names: list[str], batch: int, seed: int) -> KeyedJaggedTensor:
    """One id per bag, with negative and past-the-end ids (the OOV row) among them."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-40, 6000, (len(names) * batch,), generator=g)
    values[:3] = torch.tensor([-(2**63), 2**63 - 1, 4999])
    return KeyedJaggedTensor(keys=names, values=values, lengths=torch.ones(len(names) * batch, dtype=torch.long))


def both(coll: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(TBE path, fused path) outputs under ``no_grad``."""
    with torch.no_grad():
        with fused_lookup.mode("off"):
            reference = coll(kjt).values()
        return reference, coll(kjt).values()


def count_calls(monkeypatch, module, name: str, calls: list[int] | None = None) -> list[int]:
    """Wrap ``module.name`` so each call appends 1 to the returned list (``calls`` if given; the
    real function runs)."""
    calls = [] if calls is None else calls
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def spy(monkeypatch) -> list[int]:
    """Count the fused lookups: ``pooled_lookup`` (the Triton kernel's launcher) and
    ``fused_cpu.forward`` (the C kernel's)."""
    return count_calls(monkeypatch, fused_cpu, "forward", count_calls(monkeypatch, fused_lookup, "pooled_lookup"))


# -- without Triton too ------------------------------------------------------------------
def test_cpu_modes_pick_the_path(monkeypatch):
    """On a CPU, inference in fused_lookup "auto" takes the C kernel (fused_cpu "auto" or "on"),
    the TBE path with fused_cpu "off"; fused_lookup "off" is the TBE path; training is not this
    module's (fused_train's)."""
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS)
    triton_calls = count_calls(monkeypatch, fused_lookup, "pooled_lookup")
    c_calls = count_calls(monkeypatch, fused_cpu, "forward")
    kjt = one_id_kjt(NAMES, 8, 0)
    assert fused_lookup.current_mode() == "auto" and fused_cpu.current_mode() == "auto"
    with fused_train.mode("off"):
        coll(kjt).values().sum().backward()  # training, on the TBE path
    assert c_calls == []
    with torch.no_grad(), fused_cpu.mode("off"):
        reference = coll(kjt).values()
    assert c_calls == []
    with fused_lookup.mode("off"), torch.no_grad():
        coll(kjt)
    assert c_calls == []
    if native.library() is not None:
        with torch.no_grad():
            out = coll(kjt).values()  # the defaults: the C kernel
        assert len(c_calls) == 1
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert triton_calls == []
    with pytest.raises(ValueError, match="mode must be"):
        with fused_lookup.mode("gpu"):
            pass


def test_strides_are_the_mixed_radix_divisors():
    f = fused_lookup.FeatureLookup(0, 100, "mult", (2, 9, 17, 20), (0, 0, 0, 0), 8, False)
    assert f.strides() == [9 * 17 * 20, 17 * 20, 20, 1]


# -- the kernel (Triton's interpreter on a CPU) -----------------------------------------
def test_one_id_bags_are_bit_identical_for_every_op(kernel, monkeypatch):
    """mult (2, 3 and 4 partitions), add, concat and Full, sum and mean, ids out of range."""
    calls = spy(monkeypatch)
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, seed=1)
    for seed, batch in ((0, 1), (1, 37), (2, 70)):  # 70 bags: three programs per feature
        reference, fused = both(coll, one_id_kjt(NAMES, batch, seed))
        assert torch.equal(reference, fused)
    assert len(calls) == 3


def assert_longer_and_empty_bags_allclose(features, names, methods, seed: int, kjt_seed: int) -> None:
    """Bags of up to 6 ids (negative ones included) and empty bags: allclose to the TBE path (ids
    summed in another order), and every empty bag reads exactly zero."""
    coll = CompressedEmbeddingBagCollection(features, DIM, methods, seed=seed)
    kjt = random_kjt(names, 45, 6000, max_len=6, seed=kjt_seed, id_low=-10)
    reference, fused = both(coll, kjt)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-7)
    empty = kjt.lengths().view(len(names), 45) == 0
    assert empty.any()
    for f in range(len(names)):
        assert torch.all(fused[empty[f], f * DIM : (f + 1) * DIM] == 0)


def test_longer_and_empty_bags_are_allclose(kernel):
    assert_longer_and_empty_bags_allclose(FEATURES, NAMES, METHODS, seed=2, kjt_seed=3)


def test_inference_mode_and_trained_tables_are_read_live(kernel):
    """The kernel reads the TBE's storage in place: after training steps (TBE path) and after
    ``load_state_dict`` its output follows the new weights."""
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, optimizer=TableOptimizer(lr=0.5), seed=3)
    twin = copy.deepcopy(coll)
    kjt = one_id_kjt(NAMES, 20, 4)
    for _ in range(2):
        coll(random_kjt(NAMES, 16, 6000, seed=5)).values().pow(2).sum().backward()
    reference = both(coll, kjt)[0]
    with torch.inference_mode():  # (fbgemm's CPU TBE itself cannot run under inference_mode)
        assert torch.equal(coll(kjt).values(), reference)
    twin.load_state_dict(coll.state_dict())
    assert torch.equal(both(twin, kjt)[1], reference)


def test_collections_the_kernel_does_not_cover_take_the_tbe_path(kernel, monkeypatch):
    calls = spy(monkeypatch)
    kjt = one_id_kjt(NAMES[:2], 8, 6)
    # Pruned's default row without a remap: no plan covers it (Triton's inference plan takes no
    # Pruned at all; the C plan no block test for that default row); Full alone is TBE's own lookup.
    for methods in ({"full": Full(), "qr": Pruned(keep=20, missing="default", remap=False)}, {"full": Full(), "qr": Full()}):
        coll = CompressedEmbeddingBagCollection(FEATURES[:2], DIM, methods)
        reference, out = both(coll, kjt)
        assert torch.equal(reference, out)
    quantized = CompressedEmbeddingBagCollection(FEATURES[:2], DIM, {"qr": QR(collisions=7)}).export(
        _tmp := __import__("tempfile").mkdtemp(), dtype="int8"
    )
    from tablezip.embeddings.quantized import QuantizedEmbeddingBagCollection

    with torch.no_grad():
        QuantizedEmbeddingBagCollection.load(quantized)(kjt)
    assert calls == []


# -- MultiHash: salted probes of one table, summed (op "multihash") ------------------------
MH_FEATURES = [
    FeatureSpec("full", 50), FeatureSpec("mh2", 5000), FeatureSpec("mh3_mean", 3000, pooling="mean"),
    FeatureSpec("mh1", 800), FeatureSpec("qr", 1000),
]  # fmt: skip
MH_METHODS = {
    "full": Full(), "mh2": MultiHash(rows=97, probes=2), "mh3_mean": MultiHash(rows=61, probes=3, seed=5),
    "mh1": MultiHash(rows=40, probes=1, seed=2), "qr": QR(collisions=7),
}  # fmt: skip
MH_NAMES = [f.name for f in MH_FEATURES]


def test_kernel_hash_constants_are_hashing_s():
    """The kernel module keeps its own copy (it loads without tablezip in the GPU benchmark)."""
    assert fused_lookup._MIX == MIX


def test_multihash_one_id_bags_are_bit_identical(kernel, monkeypatch):
    """Folded TBE bags add the probe rows from 0 in probe order; the kernel does the same, and
    hashes every int64 id (extremes and negatives included) to the torch rows."""
    calls = spy(monkeypatch)
    for methods in (MH_METHODS, {n: MH_METHODS[n] for n in MH_NAMES[:4]}):  # with QR, and Full + MultiHash only
        names = list(methods)
        coll = CompressedEmbeddingBagCollection(MH_FEATURES[: len(names)], DIM, methods, seed=4)
        for seed, batch in ((0, 1), (1, 70)):
            reference, fused = both(coll, one_id_kjt(names, batch, seed))
            assert torch.equal(reference, fused)
    assert len(calls) == 4


def test_multihash_longer_and_empty_bags_are_allclose(kernel):
    assert_longer_and_empty_bags_allclose(MH_FEATURES, MH_NAMES, MH_METHODS, seed=5, kjt_seed=6)


# -- MixedDim: frequency blocks of their own width, projected to D -------------------------
_UNSORTED = np.random.default_rng(0).integers(1, 1000, 2000).astype(np.float64)  # needs a remap
MD_FEATURES = [
    FeatureSpec("full", 50), FeatureSpec("md3", 5000), FeatureSpec("md_remap", 2000, counts=_UNSORTED),
    FeatureSpec("md_keep", 3000, pooling="mean"), FeatureSpec("md1", 800), FeatureSpec("md_keep_remap", 2000, counts=_UNSORTED),
]  # fmt: skip
MD_METHODS = {
    "full": Full(),
    "md3": MixedDim(dims=(24, 12, 4), sizes=(10, 500, 4490)),
    "md_remap": MixedDim(dims=(24, 8), sizes=(100, 1900)),
    "md_keep": MixedDim(dims=(16, 8, 4), sizes=(30, 300, 2670), keep=1000),
    "md1": MixedDim(dims=(8,)),
    "md_keep_remap": MixedDim(dims=(12, 4), sizes=(50, 1950), keep=700),
}  # fmt: skip
MD_NAMES = [f.name for f in MD_FEATURES]
# Projected blocks: the kernel sums row[c] * P[c, :] over c in order, the TBE path's mm in
# cuBLAS's / MKL's order, so a few ulps apart (vectors of magnitude ~1).
MD_TOL = dict(rtol=1e-5, atol=1e-6)


def _md_collection(seed: int) -> CompressedEmbeddingBagCollection:
    coll = CompressedEmbeddingBagCollection(MD_FEATURES, DIM, MD_METHODS, seed=seed)
    assert any(l.remap is not None for l in coll.layouts.values() if hasattr(l, "remap"))
    return coll


def test_mixed_dim_one_id_bags_match(kernel, monkeypatch):
    """Ids of D-wide blocks and Full are bit-identical (the row itself, plus exact zeros); ids of
    projected blocks allclose; dropped ids (keep) and OOV ids read what the TBE path reads."""
    calls = spy(monkeypatch)
    coll = _md_collection(6)
    for seed, batch in ((0, 1), (1, 70)):
        kjt = one_id_kjt(MD_NAMES, batch, seed)
        reference, fused = both(coll, kjt)
        torch.testing.assert_close(fused, reference, **MD_TOL)
        ranks = coll.layouts["md3"].transform(kjt["md3"].values())[0]  # block 0 (D wide) rows
        wide = ranks >= 0
        f = MD_NAMES.index("md3")
        assert torch.equal(fused[wide, f * DIM : (f + 1) * DIM], reference[wide, f * DIM : (f + 1) * DIM])
        assert torch.equal(fused[:, :DIM], reference[:, :DIM])  # Full
    assert len(calls) == 2


def test_mixed_dim_dropped_ids_read_zero(kernel):
    coll = _md_collection(7)
    values = torch.tensor([0, 999, 1000, 2999, 5000, -1])  # md_keep: kept, kept, dropped x2, OOV x2
    kjt = KeyedJaggedTensor(keys=MD_NAMES, values=values.repeat(len(MD_NAMES)), lengths=torch.ones(6 * len(MD_NAMES), dtype=torch.long))
    reference, fused = both(coll, kjt)
    f = MD_NAMES.index("md_keep")
    block = fused[:, f * DIM : (f + 1) * DIM]
    assert torch.all(block[2:] == 0) and torch.all(block[:2].abs().sum(1) > 0)
    torch.testing.assert_close(fused, reference, **MD_TOL)


def test_mixed_dim_longer_bags_trained_projections_and_loads(kernel, monkeypatch):
    """Bags of 0-6 ids allclose; the projections are read in place (after training steps of the
    TBE path and after ``load_state_dict``), and a moved parameter or a replaced remap rebuilds
    the plan."""
    calls = spy(monkeypatch)
    coll = CompressedEmbeddingBagCollection(MD_FEATURES, DIM, MD_METHODS, optimizer=TableOptimizer(lr=0.5), seed=8)
    twin = copy.deepcopy(coll)
    kjt = random_kjt(MD_NAMES, 45, 6000, max_len=6, seed=9, id_low=-10)
    reference, fused = both(coll, kjt)
    torch.testing.assert_close(fused, reference, **MD_TOL)
    optimizer = torch.optim.SGD([p for n, p in coll.named_parameters() if "projections" in n], lr=0.5)
    for _ in range(2):
        with fused_train.mode("off"):  # the TBE path's training (the C step is fused_train's test)
            coll(random_kjt(MD_NAMES, 16, 6000, seed=10)).values().pow(2).sum().backward()
        optimizer.step()
    reference, fused = both(coll, kjt)
    torch.testing.assert_close(fused, reference, **MD_TOL)
    twin.load_state_dict(coll.state_dict())
    torch.testing.assert_close(both(twin, kjt)[1], reference, **MD_TOL)
    layout = twin.layouts["md3"]
    layout.projections["1"] = torch.nn.Parameter(layout.projections["1"].detach().clone() * 2)
    reference, fused = both(twin, kjt)
    torch.testing.assert_close(fused, reference, **MD_TOL)
    # A replaced remap (other ranks for the same ids) rebuilds the plan too: the kernel reads the
    # new tensor, not the old one's memory.
    remapped = twin.layouts["md_remap"]
    old_remap = remapped.remap
    remapped.remap = old_remap.flip(0).contiguous()
    assert not torch.equal(remapped.remap, old_remap)
    reference, fused = both(twin, kjt)
    torch.testing.assert_close(fused, reference, **MD_TOL)
    assert len(calls) == 5


def test_module_attr_is_getattr_with_a_default():
    """The plan keys' attribute reader gives what ``getattr(obj, name, None)`` gives, for every
    place a module can hold a name (parameter, buffer, a buffer set to None, submodule, plain and
    class attributes, a property) and for a name it lacks, and on objects that are no module."""

    class Layout(torch.nn.Module):
        kind = "class attribute"

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2))
            self.register_buffer("remap", torch.arange(3))
            self.register_buffer("empty", None)
            self.projections = torch.nn.ParameterDict({"0": torch.nn.Parameter(torch.zeros(1))})
            self.plain = 5

        @property
        def doubled(self) -> int:
            return 2 * self.plain

    layout = Layout()
    names = ["weight", "remap", "empty", "projections", "plain", "kind", "doubled", "missing", "training"]
    for name in names:
        assert fused_lookup.module_attr(layout, name) is getattr(layout, name, None) or (
            fused_lookup.module_attr(layout, name) == getattr(layout, name, None)
        ), name
    assert fused_lookup.module_attr(layout, "missing") is None
    assert fused_lookup.module_attr(layout, "projections") is layout.projections
    assert fused_lookup.module_attr(object(), "projections") is None
