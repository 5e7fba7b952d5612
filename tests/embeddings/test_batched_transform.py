"""Batched id transforms (issue 6) must give exactly the rows of the per-feature reference.

The reference is every layout's own ``transform`` (``collection.batch_transforms = False``); the
batched path runs one ``transform_batch`` per batch group. Ids include negatives, ids past every
feature's id space and the int64 extremes, so every method's out-of-range rule is exercised.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import (
    QR,
    Full,
    Hash,
    Hybrid,
    KWay,
    LearnedThreshold,
    MixedDim,
    MultiHash,
    Pruned,
    Unified,
    prune_collection,
)
from tablezip.compress.hashing import hash_ids, hash_rows, seed_mix
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, native
from tablezip.embeddings.registry import FeatureLayout, IdBatch, joined
from tests.embeddings.test_conformance import DIM, FEATURES, KINDS, NAMES, build


@pytest.fixture(autouse=True)
def torch_assemble(monkeypatch) -> None:
    """These tests hold the batched transforms bitwise to the per-feature reference, MixedDim's
    projections included, which only the torch path of the fused assemble computes with the same
    BLAS products as ``combine``; the compiled one (tests/embeddings/test_native.py) sums them in
    another order."""
    monkeypatch.setenv(native.ENV_SWITCH, "0")

EXTREMES = torch.tensor([-(2**63), -(2**62), -1, 0, 1, 2**31, 2**62, 2**63 - 1])


def random_ids(count: int, high: int, seed: int) -> torch.Tensor:
    """Ids in range, negative, past ``high``, and the int64 extremes, shuffled."""
    g = torch.Generator().manual_seed(seed)
    parts = [
        torch.randint(0, high, (count,), generator=g),
        torch.randint(-3 * high, 0, (max(1, count // 4),), generator=g),
        torch.randint(high, 4 * high, (max(1, count // 4),), generator=g),
        torch.randint(-(2**62), 2**62, (max(1, count // 8),), generator=g),
        EXTREMES,
    ]
    ids = torch.cat(parts)
    return ids[torch.randperm(ids.numel(), generator=g)]


def random_kjt(names: list[str], batch: int, high: int, seed: int, max_len: int = 3) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(names) * batch,), generator=g)
    values = random_ids(int(lengths.sum()), high, seed)[: int(lengths.sum())]
    return KeyedJaggedTensor(keys=names, values=values, lengths=lengths)


def per_feature_rows(coll: CompressedEmbeddingBagCollection, ids: list[torch.Tensor], batched: bool):
    coll.batch_transforms = batched
    try:
        return coll.transform_ids(ids)
    finally:
        coll.batch_transforms = True


def assert_same_rows(coll: CompressedEmbeddingBagCollection, ids: list[torch.Tensor]) -> None:
    reference = per_feature_rows(coll, ids, batched=False)
    batched = per_feature_rows(coll, ids, batched=True)
    assert len(batched) == len(reference)
    for name, ref, got in zip(coll.feature_names, reference, batched):
        assert len(got) == len(ref), name
        for slot, (a, b) in enumerate(zip(ref, got)):
            assert b.dtype == a.dtype == torch.int64, (name, slot)
            assert torch.equal(a, b), (name, slot, coll.layouts[name].config)


def assert_same_vectors(coll: CompressedEmbeddingBagCollection, reference: torch.Tensor, out: torch.Tensor) -> None:
    """Bit-identical columns, except for folded features (``FeatureLayout.folds_slots``,
    MultiHash): the batched path pools all probe rows of a bag at once, so a bag of several ids
    adds the same rows in another order (allclose; bags of one id stay exact, see
    tests/compress/test_multihash.py)."""
    folded = torch.tensor([fold for fold in coll._folds for _ in range(coll.dim)])
    assert torch.equal(reference[:, ~folded], out[:, ~folded])
    torch.testing.assert_close(out[:, folded], reference[:, folded], rtol=1e-5, atol=1e-6)


def assert_same_outputs(coll: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor, steps: int = 2) -> None:
    """Forward bit-identical, and so are the tables after fused-optimizer training steps: a twin
    (deep copy: same tables and optimizer state) runs the per-feature reference."""
    reference = copy.deepcopy(coll)
    reference.batch_transforms = False
    coll.batch_transforms = True
    for _ in range(steps):
        outs = []
        for model in (reference, coll):
            out = model(kjt).values()
            (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
            outs.append(out.detach())
        assert_same_vectors(coll, outs[0], outs[1])
        # A folded feature's rows get the same gradient terms, summed in TBE's backward in another
        # order when a row repeats in one bag: allclose there, bit-identical everywhere else.
        folded = {t for f, fold in zip(coll.feature_names, coll._folds) if fold for t in coll.feature_tables(f)}
        for t, (a, b) in enumerate(zip(reference.table_weights(), coll.table_weights())):
            if t in folded:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b)
        for a, b in zip(reference.dense_parameters(), coll.dense_parameters()):
            assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad))
            a.grad = b.grad = None


@pytest.mark.parametrize("kind", KINDS)
def test_rows_of_every_method_match_the_per_feature_reference(kind):
    coll = build(kind)
    for seed, counts in enumerate([(40, 300, 17), (0, 5, 0), (1, 1, 1), (0, 0, 0)]):
        ids = [random_ids(c, f.num_embeddings, seed)[:c] if c else torch.zeros(0, dtype=torch.int64) for c, f in zip(counts, FEATURES)]
        assert_same_rows(coll, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_step_of_every_method_match_the_reference(kind):
    coll = build(kind)
    for seed in (1, 2):
        assert_same_outputs(coll, random_kjt(NAMES, 24, 3000, seed))


# One feature per config, several per method, with differing rows, seeds, remaps, probes,
# chunks, partitions and blocks, interleaved so that batch groups are not contiguous.
def _mixed_features_and_methods() -> tuple[list[FeatureSpec], dict[str, object]]:
    rng = np.random.default_rng(3)
    sizes = [12, 3000, 500, 77, 1000, 4, 2500, 640]
    unsorted = rng.permutation(np.arange(1, 641))  # counts whose top ids are not a prefix
    methods_per_size: list[list[object]] = [
        [Full(), Hash(rows=5, seed=1), Hybrid(hot=3, cold_rows=4, seed=2), Pruned(keep=4, missing="default")],
        [Hash(rows=301, seed=7), Full(), MultiHash(rows=211, probes=2, seed=1), QR(collisions=7, op="add"), Hybrid(hot=100, cold_rows=50)],
        [Hybrid(hot=60, cold_rows=33, seed=5, remap=True), Pruned(keep=120), Unified(rows=97, chunks=2, seed=3), MultiHash(rows=53, probes=3)],
        [Pruned(keep=20, remap=False), Hash(rows=9), LearnedThreshold(), KWay(partitions=(3, 5, 6), op="mult"), MixedDim(dims=(4,), keep=50)],
        [Pruned(keep=300, missing="default", remap=False), Unified(rows=97, chunks=2, seed=3), QR(collisions=4, op="concat"), Full(), MixedDim(dims=(8, 4), sizes=(300, 700)), MixedDim(dims=(8, 4), sizes=(300, 700), keep=450)],
        [Full(), Pruned(keep=5, remap=False), LearnedThreshold(init=0.1), MultiHash(rows=3, probes=2, seed=9)],
        [MixedDim(dims=(8, 4), sizes=(1000, 1500)), KWay(partitions=(14, 14, 14), op="add"), Unified(rows=31, chunks=1, table="other"), Hybrid(hot=0, cold_rows=40)],
        [MixedDim(dims=(8, 4), sizes=(200, 440)), Hybrid(hot=64, cold_rows=30, remap=True), Pruned(keep=640), Hash(rows=640, seed=2),
         MixedDim(dims=(4,), keep=100), MixedDim(dims=(8, 4), sizes=(200, 440), keep=500)],  # remapped keeps
    ]
    features, methods = [], {}
    for size, options in zip(sizes, methods_per_size):
        for j, method in enumerate(options):
            counts = unsorted if size == 640 and isinstance(method, (Hybrid, MixedDim)) else np.sort(rng.zipf(1.3, size))[::-1].copy()
            name = f"f{size}_{j}"
            features.append(FeatureSpec(name, size, counts=counts))
            methods[name] = method
    order = rng.permutation(len(features))  # interleave the methods
    features = [features[i] for i in order]
    return features, methods


def mixed_collection() -> CompressedEmbeddingBagCollection:
    features, methods = _mixed_features_and_methods()
    return CompressedEmbeddingBagCollection(features, DIM, methods, seed=4)


def test_mixed_collection_groups_interleaved_features_and_matches_the_reference():
    coll = mixed_collection()
    groups = coll._groups
    assert sum(len(g.features) for g in groups) == len(coll.features)
    assert any(g.features != list(range(g.features[0], g.features[-1] + 1)) for g in groups)
    assert len(groups) < len(coll.features)
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        counts = torch.randint(0, 40, (len(coll.features),), generator=g).tolist()
        ids = [random_ids(c, f.num_embeddings, seed + 10 * i)[:c] for i, (c, f) in enumerate(zip(counts, coll.features))]
        assert_same_rows(coll, ids)
    for seed in range(3):
        assert_same_outputs(coll, random_kjt(coll.feature_names, 16, 3000, seed, max_len=4))


def test_varying_batch_shapes_reuse_no_stale_per_id_constants():
    """Per-id constants are cached for the latest id counts; a new shape must rebuild them."""
    coll = mixed_collection()
    kjts = [random_kjt(coll.feature_names, b, 3000, seed) for seed, b in enumerate([8, 8, 3, 8, 1, 20])]
    for kjt in kjts:
        coll.batch_transforms = False
        reference = coll(kjt).values()
        coll.batch_transforms = True
        assert_same_vectors(coll, reference, coll(kjt).values())


def test_one_id_per_bag_single_group_matches_and_passes_through():
    """The Criteo shape (one id per bag) on a passthrough collection of one hash group."""
    features = [FeatureSpec(f"c{i}", n) for i, n in enumerate([50, 5000, 900, 20000])]
    coll = CompressedEmbeddingBagCollection(features, DIM, {f.name: Hash(rows=333, seed=i) for i, f in enumerate(features)})
    assert coll._passthrough and len(coll._groups) == 1
    batch = 64
    values = random_ids(batch * len(features), 20000, 5)[: batch * len(features)]
    kjt = KeyedJaggedTensor(keys=coll.feature_names, values=values, lengths=torch.ones(batch * len(features), dtype=torch.long))
    assert_same_outputs(coll, kjt)


def test_remaps_changed_after_build_are_read_live():
    """Pruned/Hybrid remaps are state (prune_collection, load_state_dict): the batched path must
    read the current arrays, never a copy taken at an earlier forward."""
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate([300, 40, 1000])]
    trained = CompressedEmbeddingBagCollection(features, DIM, seed=2)
    kjt = random_kjt(trained.feature_names, 16, 1000, 1)
    pruned = prune_collection(trained, keep={"f0": 30, "f2": 200}, by="norm")
    before = pruned(kjt).values()
    assert_same_outputs(pruned, kjt)
    with torch.no_grad():
        pruned.layouts["f0"].remap.copy_(torch.flip(pruned.layouts["f0"].remap, [0]))
    assert_same_outputs(pruned, kjt)
    assert not torch.equal(pruned(kjt).values(), before)

    hybrid = CompressedEmbeddingBagCollection(features, DIM, {f.name: Hybrid(hot=10, cold_rows=7, remap=True) for f in features})
    hybrid(kjt)
    state = {k: v for k, v in hybrid.layouts["f2"].state_dict().items()}
    state["remap"] = torch.roll(state["remap"], 5)
    hybrid.layouts["f2"].load_state_dict(state)
    assert_same_outputs(hybrid, kjt)


def test_constants_cached_under_inference_mode_serve_training_after():
    """Per-id constants first built under inference_mode (as a server would) are inference
    tensors; a training forward and backward with the same shapes must still work with them."""
    coll = mixed_collection()
    kjt = random_kjt(coll.feature_names, 8, 3000, 7)
    per_feature = list(torch.split(kjt.values(), kjt.length_per_key()))
    with torch.inference_mode():
        served = coll.transform_ids(per_feature)
    assert any(g.cache.expanded[1] for g in coll._groups)
    assert all(torch.equal(a, b) for x, y in zip(served, coll.transform_ids(per_feature)) for a, b in zip(x, y))
    assert_same_outputs(coll, kjt)


def test_default_transform_batch_is_the_per_feature_transform():
    """A method without a batched path keeps working through the base class's fallback."""
    coll = mixed_collection()
    ids = [random_ids(9, f.num_embeddings, i)[:9] for i, f in enumerate(coll.features)]
    reference = per_feature_rows(coll, ids, batched=False)
    for group in coll._groups:
        batch = IdBatch([ids[f] for f in group.features])
        fallback = FeatureLayout.transform_batch.__func__(group.cls, group.layouts, batch)
        for f, rows in zip(group.features, fallback):
            assert all(torch.equal(a, b) for a, b in zip(rows, reference[f]))


def test_hash_rows_equals_hash_ids_for_shared_and_per_id_operands():
    ids = random_ids(5000, 10**6, 0)
    for rows, seed in [(1, 0), (7, 3), (2**31 - 1, 2**62), (10**6, 2**63 - 1)]:
        assert torch.equal(hash_rows(ids, rows, seed_mix(seed)), hash_ids(ids, rows, seed))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 10**7, ids.shape, generator=g)
    seeds = torch.randint(0, 2**63 - 1, ids.shape, generator=g)
    expected = torch.stack([hash_ids(i.view(1), int(r), int(s)) for i, r, s in zip(ids[:300], rows[:300], seeds[:300])]).view(-1)
    mixed = torch.tensor([seed_mix(int(s)) for s in seeds[:300]])
    assert torch.equal(hash_rows(ids[:300], rows[:300], mixed), expected)
    before = ids.clone()
    hash_rows(ids, 7, 0)
    assert torch.equal(ids, before)  # in-place maths never touches the input


def test_joined_views_adjacent_parts_and_copies_the_rest():
    base = torch.arange(20)
    parts = list(torch.split(base, [3, 0, 7, 10]))
    view = joined(parts)
    assert torch.equal(view, base) and view.data_ptr() == base.data_ptr()
    middle = joined(parts[2:])
    assert torch.equal(middle, base[3:]) and middle.data_ptr() == base[3:].data_ptr()
    shuffled = joined([parts[2], parts[0]])
    assert torch.equal(shuffled, torch.cat([parts[2], parts[0]])) and shuffled.data_ptr() != base.data_ptr()
    other = torch.arange(5)
    assert torch.equal(joined([parts[0], other]), torch.cat([parts[0], other]))
    assert joined([torch.zeros(0, dtype=torch.int64)] * 3).numel() == 0
    strided = base[::2]
    assert torch.equal(joined([strided[:3], strided[3:]]), strided)


def test_quantized_collection_uses_the_batched_path_too():
    from tablezip.embeddings.quantized import quantize

    coll = mixed_collection()
    served = quantize(coll, "int8")
    kjt = random_kjt(coll.feature_names, 8, 3000, 3)
    served.batch_transforms = False
    reference = served(kjt).values()
    served.batch_transforms = True
    assert torch.equal(served(kjt).values(), reference)
