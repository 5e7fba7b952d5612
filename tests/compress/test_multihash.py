"""Multi-probe hashing: rows from independent salted hashes, one shared table, vectors summed."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# Registers "multihash" until compress/__init__.py imports the module.
from tablezip.compress.multihash import MultiHash, multihash_methods_for_budget, multihash_rows
from tablezip.compress import QR, Full, Hash, Pruned, full_bytes, hash_ids, hash_methods_for_budget
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer
from tablezip.embeddings.registry import interleaved, joined
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tests.conftest import random_kjt
from tests.reference import reference_hash

DIM = 8
FEATURES = [FeatureSpec("a", 50), FeatureSpec("b", 1000), FeatureSpec("c", 300, pooling="mean")]
NAMES = [f.name for f in FEATURES]
METHODS = {"a": MultiHash(rows=7, probes=3, seed=5), "b": MultiHash(rows=40), "c": MultiHash(rows=16, probes=4, seed=1)}
CRITEO = [471, 510, 37883, 21352, 127, 12, 7527, 230, 3, 10776, 3770, 34831, 2803, 26, 4939, 29166, 9,
          2451, 1197, 4, 32519, 13, 14, 10464, 49, 8044]  # fmt: skip
CRITEO_FEATURES = [FeatureSpec(f"C{i + 1}", n) for i, n in enumerate(CRITEO)]


def reference_rows(config: MultiHash, ids: list[int]) -> list[list[int]]:
    """Per id, its row under every probe; probe p hashes with seed ``seed * 16 + p``."""
    return [[reference_hash(i, config.rows, config.seed * 16 + p) for p in range(config.probes)] for i in ids]


def reference_pooled(collection: CompressedEmbeddingBagCollection, kjt) -> torch.Tensor:
    weights = collection.table_weights()
    out = []
    for feature in collection.features:
        config = collection.methods[feature.name]
        (table,) = set(collection.feature_tables(feature.name))
        jt = kjt[feature.name]
        rows = reference_rows(config, jt.values().tolist())
        bags = []
        offsets = jt.offsets().tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            vec = torch.zeros(DIM)
            for probes in rows[start:end]:
                for r in probes:
                    vec = vec + weights[table][r]
            if feature.pooling.value == "mean" and end > start:
                vec = vec / (end - start)
            bags.append(vec)
        out.append(torch.stack(bags))
    return torch.cat(out, dim=1)


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30),
    rows=st.integers(1, 2**40),
    probes=st.integers(1, 16),
    seed=st.integers(0, 2**59 - 1),
)
def test_rows_match_reference_and_stay_in_range(ids, rows, probes, seed):
    got = multihash_rows(torch.tensor(ids, dtype=torch.int64), rows, probes, seed)
    assert len(got) == probes
    expected = reference_rows(MultiHash(rows=rows, probes=probes, seed=seed), ids)
    assert [list(r) for r in zip(*(g.tolist() for g in got))] == expected
    assert all(0 <= r < rows for g in got for r in g.tolist())


def test_one_probe_is_the_hashing_trick():
    ids = torch.arange(-50, 5000)
    (rows,) = multihash_rows(ids, 97, 1, 3)
    assert torch.equal(rows, hash_ids(ids, 97, 3 * 16))
    assert torch.equal(multihash_rows(ids, 97, 1, 0)[0], hash_ids(ids, 97, 0))


def test_probes_are_independent():
    ids = torch.arange(20_000)
    first, second = multihash_rows(ids, 1000, 2, 0)
    assert (first == second).float().mean() < 0.01  # ~1/1000 by chance
    # two ids share a whole vector only if every probe collides: far rarer than one hash
    pairs = first * 1000 + second
    assert torch.unique(pairs).numel() > 0.99 * ids.numel()
    assert torch.unique(first).numel() == 1000


def test_pooled_equals_sum_of_probe_rows():
    collection = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, seed=2)
    kjt = random_kjt(NAMES, batch=48, id_high=1500, id_low=-20, max_len=5, seed=3)
    out = collection(kjt).values()
    torch.testing.assert_close(out, reference_pooled(collection, kjt))
    empty = kjt.lengths().view(3, 48) == 0
    assert empty.any()
    for f in range(3):
        assert torch.all(out[:, f * DIM:(f + 1) * DIM][empty[f]] == 0)


def test_table_is_stored_once_per_feature():
    collection = CompressedEmbeddingBagCollection(FEATURES, DIM, {"a": MultiHash(rows=7, probes=3), "b": MultiHash(rows=40)})
    assert collection.feature_tables("a") == [0, 0, 0]
    assert collection.feature_tables("b") == [1, 1]
    assert [t.rows for t in collection.table_specs()] == [7, 40, 301]
    assert collection.memory_bytes() == (7 + 40 + 301) * DIM * 4
    assert sum(w.numel() * 4 for w in collection.table_weights()) == collection.memory_bytes()


def test_init_keeps_the_scale_of_one_row():
    collection = CompressedEmbeddingBagCollection([FeatureSpec("a", 50)], DIM, {"a": MultiHash(rows=64, probes=4)})
    (weights,) = collection.table_weights()
    bound = math.sqrt(1 / 64) / math.sqrt(4)
    assert weights.abs().max() <= bound + 1e-7
    assert weights.abs().max() > 0.9 * bound


def test_fused_step_changes_exactly_the_probed_rows():
    collection = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS, optimizer=TableOptimizer(lr=0.5))
    kjt = random_kjt(NAMES, batch=16, id_high=1200, id_low=-3, max_len=2, seed=9)
    before = [w.detach().clone() for w in collection.table_weights()]
    collection(kjt).values().sum().backward()
    after = collection.table_weights()
    for feature in collection.features:
        (table,) = set(collection.feature_tables(feature.name))
        used = {r for probes in reference_rows(METHODS[feature.name], kjt[feature.name].values().tolist()) for r in probes}
        changed = set(torch.nonzero((before[table] != after[table]).any(dim=1)).flatten().tolist())
        assert changed == used, feature.name


@pytest.mark.parametrize(
    "kwargs, field",
    [({"rows": 0}, "rows"), ({"rows": -2}, "rows"), ({"rows": 2.5}, "rows"), ({"rows": 4, "probes": 0}, "probes"),
     ({"rows": 4, "probes": 17}, "probes"), ({"rows": 4, "seed": -1}, "seed"), ({"rows": 4, "seed": 2**59}, "seed")],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MultiHash(**kwargs)


@pytest.mark.parametrize("ratio", [2, 10, 100, 1000])
def test_budget_fits_and_round_trips(ratio, tmp_path):
    dim = 16
    budget = full_bytes(CRITEO_FEATURES, dim) // ratio
    methods = multihash_methods_for_budget(CRITEO_FEATURES, dim, budget)
    hashed = {n: m for n, m in methods.items() if isinstance(m, MultiHash)}
    assert hashed and all(m.probes == 2 for m in hashed.values())
    assert methods["C9"] == Full()  # 3 ids: never worth hashing
    assert len({m.rows for m in hashed.values()}) == 1  # one water-filled cap
    # the same split as single hashing, so the same bytes
    single = hash_methods_for_budget(CRITEO_FEATURES, dim, budget)
    assert {n for n, m in single.items() if isinstance(m, Hash)} == set(hashed)
    collection = CompressedEmbeddingBagCollection(CRITEO_FEATURES, dim, methods, seed=1)
    assert 0.95 * budget < collection.memory_bytes() <= budget
    names = [f.name for f in CRITEO_FEATURES]
    collection(random_kjt(names, 8, 40_000, seed=1)).values().sum().backward()
    loaded = CompressedEmbeddingBagCollection.load(collection.export(tmp_path / "art"))
    kjt = random_kjt(names, 32, 40_000, id_low=-3, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), collection(kjt).values())
    assert loaded.memory_bytes() == collection.memory_bytes()


def test_budget_below_one_row_per_feature_is_refused():
    with pytest.raises(ValueError, match="budget_bytes"):
        multihash_methods_for_budget(CRITEO_FEATURES, 16, 16 * 4 * 10)


# -- folded probes (FeatureLayout.folds_slots): one TBE slot, a bag of probes * L rows ---------
def _one_id_kjt(names: list[str], batch: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-30, 2000, (len(names) * batch,), generator=g)
    return KeyedJaggedTensor(keys=names, values=values, lengths=torch.ones(len(names) * batch, dtype=torch.long))


def _train_pair(features, methods, kjt, optimizer: TableOptimizer, steps: int = 2):
    """(outputs, tables) of the folded (batched) path and of its deep-copied twin on the
    per-feature reference (each probe pooled apart, then summed), after ``steps`` fused steps
    of a loss whose gradient differs per bag and column."""
    folded = CompressedEmbeddingBagCollection(features, DIM, methods, optimizer=optimizer, seed=3)
    reference = copy.deepcopy(folded)
    reference.batch_transforms = False
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(steps):
        for i, coll in enumerate((folded, reference)):
            out = coll(kjt).values()
            (out.pow(2) * torch.linspace(-1, 1, out.shape[1])).sum().backward()
            outs[i].append(out.detach())
    return outs, [list(folded.table_weights()), list(reference.table_weights())], folded


def test_probes_fold_into_one_tbe_slot_per_feature():
    collection = CompressedEmbeddingBagCollection(FEATURES, DIM, METHODS)
    assert collection.feature_tables("a") == [0, 0, 0]  # logical slots, artifacts: unchanged
    assert collection.tbe_feature_table_map() == [0, 1, 2]  # what TBE sees: one slot each
    assert collection._passthrough_folded  # no _general, no combine: TBE's output is the vector
    mixed = CompressedEmbeddingBagCollection(FEATURES, DIM, {"a": Full(), "b": MultiHash(rows=40, probes=3), "c": QR(collisions=5)})
    assert mixed.tbe_feature_table_map() == [0, 1, 2, 3] and not mixed._passthrough_folded


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adagrad", "sgd"])
def test_folded_one_id_bags_equal_the_reference_bit_for_bit(kind):
    """One id per bag: TBE adds the probe rows of the id in probe order, starting from 0, which
    is exactly ``combine``'s sum of the per-probe bags of one row, so the first forward is
    bit-identical. The tables get the same gradient terms per row, summed by the backward in
    another order where a row repeats (two ids or two probes hit it): allclose from then on."""
    kjt = _one_id_kjt(NAMES, 64, seed=4)
    outs, tables, _ = _train_pair(FEATURES, METHODS, kjt, TableOptimizer(kind=kind, lr=0.3))
    assert torch.equal(outs[0][0], outs[1][0])  # the same tables: bit for bit
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-7)  # after a step: allclose
    for got, ref in zip(*tables):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_folded_bags_of_several_ids_are_allclose_to_the_reference():
    """Longer bags: the same rows added in another order (id by id instead of probe by probe)."""
    kjt = random_kjt(NAMES, batch=48, id_high=1500, id_low=-20, max_len=6, seed=5)
    outs, tables, folded = _train_pair(FEATURES, METHODS, kjt, TableOptimizer(lr=0.3))
    for got, ref in zip(*outs):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for got, ref in zip(*tables):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and both are still the plain sum of the probe rows
        torch.testing.assert_close(folded(kjt).values(), reference_pooled(folded, kjt))


def test_folded_features_beside_other_methods_in_general():
    """MultiHash next to Full, QR (unpooled) and Pruned drops: ``_general`` with a folded slot."""
    features = [FeatureSpec("a", 50), FeatureSpec("b", 1000), FeatureSpec("c", 300, pooling="mean"), FeatureSpec("d", 900), FeatureSpec("e", 400)]
    methods = {"a": Full(), "b": MultiHash(rows=40, probes=3, seed=2), "c": MultiHash(rows=16), "d": QR(collisions=7), "e": Pruned(keep=100)}
    names = [f.name for f in features]
    for kjt, exact in ((_one_id_kjt(names, 32, seed=6), True), (random_kjt(names, 32, 1200, id_low=-5, max_len=4, seed=7), False)):
        outs, tables, folded = _train_pair(features, methods, kjt, TableOptimizer(lr=0.2))
        assert not folded._passthrough_folded
        if exact:
            assert torch.equal(outs[0][0], outs[1][0])
        for got, ref in zip(*outs):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        for got, ref in zip(*tables):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fold_is_a_view_of_the_batched_probe_rows():
    """``transform_batch`` returns the probes as columns of one [N, probes] block, so the fold
    (every probe row of an id side by side) costs no copy."""
    collection = CompressedEmbeddingBagCollection(FEATURES, DIM, {n: MultiHash(rows=33, probes=3) for n in NAMES})
    ids = [torch.arange(-5, 40), torch.arange(0), torch.arange(7, 20)]
    per_feature = collection.transform_ids(ids)
    flat = joined([interleaved(rows) for rows in per_feature])
    assert flat.data_ptr() == per_feature[0][0].data_ptr() and flat.numel() == 3 * sum(i.numel() for i in ids)
    for rows, feature_ids in zip(per_feature, ids):
        expected = torch.stack(multihash_rows(feature_ids, 33, 3, 0), dim=1).view(-1)
        assert torch.equal(interleaved(rows), expected)
    # parts that are not one block are stacked
    parts = [torch.arange(4), torch.arange(10, 14)]
    assert torch.equal(interleaved(parts), torch.tensor([0, 10, 1, 11, 2, 12, 3, 13]))
