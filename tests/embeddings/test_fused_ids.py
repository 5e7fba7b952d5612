"""The fused Triton id transforms (compress/fused_ids.py) against the torch path, bit for bit.

CI has no GPU and no Triton: the kernel tests skip there. With Triton installed they run the
kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before the kernels are
built) under ``fused_ids.mode("on")``; on a GPU ``benchmarks/gpu_collection.py`` repeats the
checks at full size. The mode switch and the torch fallback are tested everywhere.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Iterator

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import Full, Hash, Hybrid, Pruned, fused_cpu, fused_ids
from tablezip.compress.hashing import hash_ids, hash_rows, seed_mix
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec
from tablezip.embeddings.registry import IdBatch
from tests.embeddings.test_batched_transform import mixed_collection, per_feature_rows, random_ids, random_kjt
from tests.embeddings.test_conformance import build

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (CI: the torch path only)")


@pytest.fixture(autouse=True)
def tbe_path() -> Iterator[None]:
    """The id transforms are the TBE path's: the fused C lookup (compress/fused_cpu.py), which reads
    Hash, Hybrid and Pruned rows itself, is off here (its own tests compare it with this path)."""
    with fused_cpu.mode("off"):
        yield


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels under Triton's interpreter (the tests' ids are CPU tensors, also on a
    machine with a GPU), built fresh for the test and dropped after it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_ids._kernels.cache_clear()
    with fused_ids.mode("on"):
        yield
    fused_ids._kernels.cache_clear()


def count_launches(monkeypatch) -> list[str]:
    """Record every fused ``rows`` call that returned kernel rows (not a torch fallback)."""
    launched: list[str] = []
    real = fused_ids.rows

    def spy(batch, method, *args, **kwargs):
        out = real(batch, method, *args, **kwargs)
        if out is not None:
            launched.append(("hash", "hybrid", "pruned")[method])
        return out

    monkeypatch.setattr(fused_ids, "rows", spy)
    return launched


@pytest.fixture
def compiled(monkeypatch):
    """The C pass of ``rows`` (mode "auto" on CPU ids), or skip where no compiler built it."""
    from tablezip.embeddings import native

    if native.library() is None:
        pytest.skip("the compiled CPU kernels are unavailable (no C compiler)")
    monkeypatch.setattr(fused_ids, "NATIVE_CPU", True)
    assert fused_ids.current_mode() == "auto"


@pytest.fixture(params=["triton", "c"])
def path(request) -> str:
    """Which fused rows a test checks, as the ``fused_ids.mode`` that selects them: "on", the
    Triton kernel (in its CPU interpreter; skipped without Triton), or "auto", the C pass on CPU
    ids (skipped without a C compiler). Either is held to the torch path, bit for bit."""
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed (CI: the torch path only)")
        request.getfixturevalue("interpreted")
        return "on"
    request.getfixturevalue("compiled")
    return "auto"


def assert_fused_rows_equal(coll: CompressedEmbeddingBagCollection, ids: list[torch.Tensor], path: str = "on") -> None:
    """The rows of ``path`` ("on": the Triton kernel; "auto" on CPU ids: the C pass) equal the
    torch path's and the per-feature transforms', bit for bit."""
    with fused_ids.mode("off"):
        reference = per_feature_rows(coll, ids, batched=True)
    with fused_ids.mode(path):
        fused = per_feature_rows(coll, ids, batched=True)
    per_feature = per_feature_rows(coll, ids, batched=False)
    for name, ref, got, old in zip(coll.feature_names, reference, fused, per_feature):
        for a, b, c in zip(ref, got, old):
            assert b.dtype == torch.int64, name
            assert torch.equal(a, b), (name, coll.layouts[name].config)
            assert torch.equal(c, b), (name, coll.layouts[name].config)


# -- without Triton too ------------------------------------------------------------------
def test_auto_mode_keeps_cpu_ids_off_the_triton_kernels(monkeypatch):
    """CPU ids in "auto": never the Triton kernels; the C pass where ``NATIVE_CPU`` (and a
    compiler), else None (the torch path); "off" is always the torch path."""
    ids = torch.arange(10)
    assert fused_ids.current_mode() == "auto"
    assert not fused_ids.enabled_for(ids)
    with fused_ids.mode("off"):
        assert not fused_ids.enabled_for(ids)
        assert fused_ids.rows(IdBatch([ids]), fused_ids.HASH, a=[7], b=[0]) is None
    monkeypatch.setattr(fused_ids, "NATIVE_CPU", False)
    batch = IdBatch([ids])
    assert fused_ids.rows(batch, fused_ids.HASH, a=[7], b=[0]) is None
    rows, weights = fused_ids.zero_weight_drops(torch.tensor([3, -1, 0, -1, 9]))
    assert torch.equal(rows, torch.tensor([3, 0, 0, 0, 9]))
    assert torch.equal(weights, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="mode must be"):
        with fused_ids.mode("gpu"):
            pass


def test_without_triton_even_mode_on_falls_back_to_torch(monkeypatch):
    """No Triton (CI): the module imports, and even ``mode("on")`` gives the torch rows."""
    import importlib

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    fused_ids.triton_available.cache_clear()
    try:
        importlib.reload(fused_ids)  # the module itself never imports Triton
        assert not fused_ids.triton_available()
        ids = random_ids(50, 1000, 3)
        with fused_ids.mode("on"):
            assert fused_ids.rows(IdBatch([ids]), fused_ids.HASH, a=[7], b=[0]) is None
            coll = CompressedEmbeddingBagCollection([FeatureSpec("a", 1000)], 8, {"a": Hash(rows=7)})
            assert torch.equal(coll.transform_ids([ids])[0][0], hash_ids(ids, 7))
    finally:
        fused_ids.triton_available.cache_clear()


def test_per_feature_tables_are_cached_and_starts_follow_the_counts():
    batch = IdBatch([torch.arange(3), torch.arange(0), torch.arange(5)])
    a = batch.per_feature([4, 5, 6])
    assert a is batch.per_feature([4, 5, 6]) and a.dtype == torch.int64
    assert torch.equal(batch.feature_starts(), torch.tensor([0, 3, 3, 8]))
    # A constant that differs per feature is the small table gathered per id.
    assert torch.equal(batch.constant([4, 5, 6]), torch.tensor([4, 4, 4, 6, 6, 6, 6, 6]))


# -- the kernels (Triton's interpreter on a CPU) -----------------------------------------
@pytest.mark.parametrize(
    "kind, launch", [("hash", "hash"), ("hybrid", "hybrid"), ("pruned", "pruned"), ("multihash", "hash"), ("unified", "hash")]
)
def test_conformance_collections_fused_rows_equal_the_torch_rows(kind, launch, path, monkeypatch):
    """MultiHash (one Hash launch per probe) and Unified (per chunk) use the Hash kernel too."""
    launched = count_launches(monkeypatch)
    coll = build(kind)
    for seed, counts in enumerate([(40, 300, 17), (0, 5, 0), (1, 1, 1), (0, 0, 0)]):
        ids = [random_ids(c, f.num_embeddings, seed)[:c] if c else torch.zeros(0, dtype=torch.int64) for c, f in zip(counts, coll.features)]
        assert_fused_rows_equal(coll, ids, path)
    assert launch in launched


def test_mixed_collection_fused_rows_equal_the_torch_rows(path, monkeypatch):
    """Every Hash/Hybrid/Pruned config of the interleaved collection: remaps and prefixes,
    default and zero, per-feature rows and seeds (the feature search in the kernel; the C pass's
    per-feature constants)."""
    launched = count_launches(monkeypatch)
    coll = mixed_collection()
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        counts = torch.randint(0, 40, (len(coll.features),), generator=g).tolist()
        ids = [random_ids(c, f.num_embeddings, seed + 10 * i)[:c] for i, (c, f) in enumerate(zip(counts, coll.features))]
        assert_fused_rows_equal(coll, ids, path)
    assert {"hash", "hybrid", "pruned"} <= set(launched)


def test_hash_kernel_over_extreme_ids_seeds_and_row_counts(path):
    """Ids at the int64 extremes, seeds up to 2**63 - 1, row counts from 1 to 2**62: the uint64
    maths in the kernel equals hash_ids (out-of-place reference) and hash_rows (in place)."""
    seeds = [0, 1, 2**63 - 1, 12345]
    rows = [1, 3, 2**31 + 11, 2**62]
    per_feature = [random_ids(700, 10**6, s) for s in range(4)]
    batch = IdBatch(per_feature)
    fused = fused_ids.rows(batch, fused_ids.HASH, a=rows, b=[seed_mix(s) for s in seeds], mix=fused_ids_mix())
    assert fused is not None
    expected = torch.cat([hash_ids(ids, r, s) for ids, r, s in zip(per_feature, rows, seeds)])
    assert torch.equal(fused, expected)
    assert torch.equal(fused, hash_rows(batch.ids, batch.constant(rows), batch.constant([seed_mix(s) for s in seeds])))
    # Shared values: the kernel skips the feature search.
    shared = fused_ids.rows(IdBatch(per_feature), fused_ids.HASH, a=[999] * 4, b=[seed_mix(7)] * 4, mix=fused_ids_mix())
    assert torch.equal(shared, hash_ids(torch.cat(per_feature), 999, 7))


def fused_ids_mix() -> tuple[int, int]:
    from tablezip.compress.hashing import MIX

    return MIX


def test_kernel_crosses_blocks_and_reads_unaligned_views(path):
    """More ids than one block, and ids that start mid-storage (a group after other features)."""
    values = random_ids(3000, 5000, 9)
    parts = torch.split(values[7:], [1500, 1, values.numel() - 7 - 1501])
    batch = IdBatch(list(parts))
    assert batch.ids.data_ptr() == values[7:].data_ptr()  # a view, not a copy
    layouts_rows = [300, 17, 4096]
    fused = fused_ids.rows(batch, fused_ids.HASH, a=layouts_rows, b=[1, 2, 3], mix=fused_ids_mix())
    reference = hash_rows(batch.ids, batch.constant(layouts_rows), batch.constant([1, 2, 3]))
    assert torch.equal(fused, reference)


@needs_triton
def test_zero_weight_drops_kernel(interpreted):
    rows = torch.tensor([5, -1, 0, -1, 7] * 500)
    fused = fused_ids.zero_weight_drops(rows)
    with fused_ids.mode("off"):
        reference = fused_ids.zero_weight_drops(rows)
    assert torch.equal(fused[0], reference[0]) and torch.equal(fused[1], reference[1])
    assert fused[1].dtype == torch.float32


@pytest.mark.parametrize("by_weight", [False, True])
def test_collection_forward_and_steps_with_fused_transforms(path, by_weight, monkeypatch):
    """Whole collection (Hash, Hybrid, Pruned zero and default, Full): the fused rows and the
    torch path train to the same tables, bit for bit; with drops by weight as on CUDA, and
    without."""
    import copy

    launched = count_launches(monkeypatch)
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate([300, 5000, 40, 1000, 77, 2000])]
    methods = {
        "f0": Hash(rows=50, seed=3), "f1": Hybrid(hot=100, cold_rows=60, seed=1), "f2": Pruned(keep=7),
        "f3": Pruned(keep=90, remap=False), "f4": Full(), "f5": Hybrid(hot=30, cold_rows=5, remap=True),
    }  # fmt: skip
    fused = CompressedEmbeddingBagCollection(features, 8, methods, seed=2)
    fused.drop_by_weight = by_weight
    reference = copy.deepcopy(fused)
    names = fused.feature_names
    for seed in range(2):
        kjt = random_kjt(names, 16, 5000, seed, max_len=3)
        outs = []
        for model, m in ((reference, "off"), (fused, path)):
            with fused_ids.mode(m):
                out = model(kjt).values()
                out.pow(2).sum().backward()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(reference.table_weights(), fused.table_weights()):
            assert torch.equal(a, b)
    assert {"hash", "hybrid", "pruned"} <= set(launched)  # the fused rows ran for every kind
    one_id = KeyedJaggedTensor(keys=names, values=torch.arange(6 * 4) * 211 - 3, lengths=torch.ones(24, dtype=torch.long))
    with fused_ids.mode("off"):
        expected = reference(one_id).values()
    with fused_ids.mode(path):
        assert torch.equal(fused(one_id).values(), expected)


def test_c_rows_refuse_remaps_they_cannot_read(compiled):
    """A remap that is not int32 makes the C pass decline (None: the torch path runs), never
    misread it; ids out of range read a remap's last (OOV) entry, the default row replaces -1."""
    # A remap has n + 1 entries: ids out of [0, n) read the last (the OOV entry).
    remap = torch.tensor([5, 4, 3, 2, 1, 0, -1, -1, 7, 8, -1])
    ids = IdBatch([torch.tensor([-1, 3, 9, 10, 11, 6])])
    assert fused_ids.rows(ids, fused_ids.PRUNED, c=[4], d=[10], remaps=[remap]) is None  # int64: declined
    rows = fused_ids.rows(ids, fused_ids.PRUNED, c=[4], d=[10], remaps=[remap.to(torch.int32)])
    assert torch.equal(rows, torch.tensor([-1, 2, 8, -1, -1, -1]))
    # With the default row (c = keep = 4): every -1 reads row 4.
    rows = fused_ids.rows(ids, fused_ids.PRUNED, c=[4], d=[10], remaps=[remap.to(torch.int32)], default=True)
    assert torch.equal(rows, torch.tensor([4, 2, 8, 4, 4, 4]))


def test_full_oov_map_by_the_c_pass_equals_the_torch_map(compiled, monkeypatch):
    """Full's batched OOV map runs the C pass on CPU ids (PRUNED's maths with keep = n and the
    default row): equal to the torch compare-and-select, ids out of range both ways included."""
    from tablezip.compress.full import FullLayout, batch_oov_rows

    sizes = [1, 40, 2**40, 7]
    layouts = [FullLayout(FeatureSpec(f"f{i}", n), 4, Full()) for i, n in enumerate(sizes)]
    per_feature = [random_ids(300, n + 5, i) for i, n in enumerate(sizes)]
    per_feature[2][:3] = torch.tensor([-(2**63), 2**63 - 1, 2**40])
    batch = IdBatch(per_feature)
    launched = count_launches(monkeypatch)
    rows = batch_oov_rows(layouts, batch)
    assert launched == [] and rows.dtype == torch.int64  # native_rows, not fused_ids.rows
    expected = torch.cat([torch.where((i >= 0) & (i < n), i, n) for i, n in zip(per_feature, sizes)])
    assert torch.equal(rows, expected)
    monkeypatch.setattr(fused_ids, "NATIVE_CPU", False)
    assert torch.equal(batch_oov_rows(layouts, batch), expected)


def count_native(monkeypatch) -> list[str]:
    """Record every C pass that returned rows: "rows" (native_rows) or "digits" (native_digits)."""
    launched: list[str] = []
    for name in ("native_rows", "native_digits"):
        real = getattr(fused_ids, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            if out is not None:
                launched.append(_name.split("_")[1])
            return out

        monkeypatch.setattr(fused_ids, name, spy)
    return launched


@pytest.mark.parametrize("kind, launch", [("qr", "digits"), ("kway", "digits"), ("mixed_dim", "rows"), ("full", "rows")])
def test_c_digits_and_row_tables_equal_the_torch_rows(kind, launch, compiled, monkeypatch):
    """QR / KWay (2 and 3 partitions: the mixed-radix digits), MixedDim with a remap (its row
    table read as Pruned remaps) and Full (the OOV map) by the C passes: the torch path's rows."""
    launched = count_native(monkeypatch)
    coll = build(kind)
    for seed, counts in enumerate([(40, 300, 17), (0, 5, 0), (1, 1, 1), (0, 0, 0)]):
        ids = [random_ids(c, f.num_embeddings, seed)[:c] if c else torch.zeros(0, dtype=torch.int64) for c, f in zip(counts, coll.features)]
        assert_fused_rows_equal(coll, ids, path="auto")
    assert launch in launched


def test_c_digits_of_extreme_ids_and_radices(compiled):
    """Ids at the int64 extremes and out of range (the OOV id), radices from 1 up: digits equal
    compositional's mixed_radix_digits of the OOV-mapped ids."""
    from tablezip.compress.compositional import mixed_radix_digits
    from tablezip.compress.full import oov_rows

    sizes = [10**12, 5, 999]
    partitions = [(1000, 7, 1), (3, 2, 2), (1, 1, 1000)]
    per_feature = [random_ids(200, n + 3, i) for i, n in enumerate(sizes)]
    out = fused_ids.native_digits(IdBatch(per_feature), sizes, partitions)
    assert out is not None and out.shape == (3, sum(p.numel() for p in per_feature))
    expected = [mixed_radix_digits(oov_rows(ids, n), parts) for ids, n, parts in zip(per_feature, sizes, partitions)]
    for j in range(3):
        assert torch.equal(out[j], torch.cat([e[j] for e in expected])), j


def test_c_pass_reads_each_features_ids_in_place_or_joins_strided_ones(compiled):
    """Features' ids from separate tensors are read where they lie (``batch.ids`` is never
    joined); a strided one makes the C pass read the joined copy instead. Same rows either way."""
    separate = [random_ids(50, 300, 1), random_ids(0, 10, 2)[:0], random_ids(70, 9000, 3)]
    batch = IdBatch(separate)
    rows = fused_ids.rows(batch, fused_ids.HASH, a=[11, 13, 17], b=[seed_mix(s) for s in (1, 2, 3)], mix=fused_ids_mix())
    assert batch._ids is None  # not joined
    expected = torch.cat([hash_ids(i, r, s) for i, r, s in zip(separate, [11, 13, 17], [1, 2, 3])])
    assert torch.equal(rows, expected)
    strided = [random_ids(200, 300, 4)[::2], separate[2]]
    batch = IdBatch(strided)
    digits = fused_ids.native_digits(batch, [300, 9000], [(20, 16), (100, 91)])
    from tablezip.compress.compositional import mixed_radix_digits
    from tablezip.compress.full import oov_rows

    for j in range(2):
        want = torch.cat([mixed_radix_digits(oov_rows(i, n), p)[j] for i, n, p in zip(strided, [300, 9000], [(20, 16), (100, 91)])])
        assert torch.equal(digits[j], want)


def test_c_pass_arguments_are_rebuilt_when_a_remap_moves(compiled, monkeypatch):
    """The C pass keeps each group's constant table and remap offsets between calls (keyed by the
    values and the remaps' addresses): a remap replaced by another tensor must be read, not the
    old one; a full cache is cleared, not grown."""
    ids = IdBatch([torch.tensor([0, 1, 2, 11])])
    first = torch.tensor([5, 6, 7, -1, -1, -1, -1, -1, -1, -1, 9], dtype=torch.int32)
    assert torch.equal(fused_ids.rows(ids, fused_ids.PRUNED, c=[3], d=[10], remaps=[first]), torch.tensor([5, 6, 7, 9]))
    second = torch.tensor([1, 1, 1, -1, -1, -1, -1, -1, -1, -1, 2], dtype=torch.int32)
    assert torch.equal(fused_ids.rows(ids, fused_ids.PRUNED, c=[3], d=[10], remaps=[second]), torch.tensor([1, 1, 1, 2]))
    monkeypatch.setattr(fused_ids, "_PREPARED_MAX", 2)
    for rows in (3, 4, 5, 6):
        fused_ids.rows(ids, fused_ids.HASH, a=[rows], b=[0], mix=fused_ids_mix())
        assert len(fused_ids._PREPARED) <= 2


def test_c_pass_declines_a_zero_divisor(compiled):
    """Row counts or radices of 0 (no valid config has them) go to the torch path, which raises,
    instead of a C division by zero that would kill the process."""
    ids = IdBatch([torch.arange(4)])
    assert fused_ids.native_rows(ids, fused_ids.HASH, a=[0], b=[1], mix=fused_ids_mix()) is None
    assert fused_ids.native_digits(ids, [10], [(0, 3)]) is None
    assert fused_ids.native_digits(ids, [10], [(4, 3)]) is not None
