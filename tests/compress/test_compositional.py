"""Compositional embeddings: QR and k-way complementary partitions against hand-computed rows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Registers "qr" and "kway" until compress/__init__.py imports the module.
from tablezip.compress.compositional import (
    CompositionalLayout,
    KWay,
    QR,
    init_bound,
    kway_methods_for_budget,
    mixed_radix_digits,
    concat_partitions,
    qr_methods_for_budget,
    qr_split,
    smallest_bytes,
)
from tablezip.compress import Full, full_bytes
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer
from tablezip.embeddings.registry import config_from_dict
from tests.conftest import random_kjt

FEATURES = [FeatureSpec("a", 50), FeatureSpec("b", 1000), FeatureSpec("c", 7, pooling="mean")]
NAMES = [f.name for f in FEATURES]
CRITEO = [471, 510, 37883, 21352, 127, 12, 7527, 230, 3, 10776, 3770, 34831, 2803, 26, 4939, 29166, 9,
          2451, 1197, 4, 32519, 13, 14, 10464, 49, 8044]  # fmt: skip
CRITEO_FEATURES = [FeatureSpec(f"C{i + 1}", n) for i, n in enumerate(CRITEO)]


# -- independent reference -----------------------------------------------------------------
def hand_digits(x: int, n: int, partitions: tuple[int, ...]) -> tuple[int, ...]:
    """Out-of-space ids -> the OOV id n, then positional digits, most significant first."""
    x = x if 0 <= x < n else n
    digits = []
    for size in reversed(partitions):
        digits.append(x % size)
        x //= size
    assert x == 0, "partitions do not cover the id"
    return tuple(reversed(digits))


def hand_partitions(config, n: int) -> tuple[int, ...]:
    if isinstance(config, QR):  # quotient table, then remainder table
        return (math.ceil((n + 1) / config.collisions), config.collisions)
    return config.partitions


def hand_vector(op: str, rows: list[torch.Tensor]) -> torch.Tensor:
    if op == "mult":
        out = torch.ones_like(rows[0])
        for r in rows:
            out = out * r
        return out
    if op == "add":
        return torch.stack(rows).sum(0)
    return torch.cat(rows)


def reference_pooled(collection: CompressedEmbeddingBagCollection, kjt) -> torch.Tensor:
    """Per bag: the sum (or mean) over its ids of each id's combined rows."""
    weights = collection.table_weights()
    out = []
    for feature in collection.features:
        config = collection.methods[feature.name]
        tables = [weights[t] for t in collection.feature_tables(feature.name)]
        partitions = hand_partitions(config, feature.num_embeddings)
        jt = kjt[feature.name]
        ids = jt.values().tolist()
        offsets = jt.offsets().tolist()
        bags = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            vec = torch.zeros(collection.dim)
            for x in ids[start:end]:
                digits = hand_digits(x, feature.num_embeddings, partitions)
                vec = vec + hand_vector(config.op, [t[d] for t, d in zip(tables, digits)])
            if feature.pooling.value == "mean" and end > start:
                vec = vec / (end - start)
            bags.append(vec)
        out.append(torch.stack(bags))
    return torch.cat(out, dim=1)


# -- index maths ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), collisions=st.integers(1, 200))
def test_qr_pairs_are_distinct_and_reconstruct_the_id(n, collisions):
    ids = torch.arange(n + 1)  # known ids and the OOV id
    q, r = qr_split(ids, collisions)
    assert torch.equal(q * collisions + r, ids)
    assert int(r.min()) >= 0 and int(r.max()) < collisions
    assert int(q.max()) < math.ceil((n + 1) / collisions)
    assert torch.unique(q * collisions + r).numel() == n + 1


@settings(max_examples=100, deadline=None)
@given(partitions=st.lists(st.integers(1, 30), min_size=2, max_size=6), data=st.data())
def test_mixed_radix_partitions_are_complementary(partitions, data):
    total = math.prod(partitions)
    n = data.draw(st.integers(0, min(total, 20_000) - 1))  # ids [0, n] need prod >= n + 1
    ids = torch.arange(n + 1)
    digits = mixed_radix_digits(ids, tuple(partitions))
    assert len(digits) == len(partitions)
    for d, size in zip(digits, partitions):
        assert int(d.min()) >= 0 and int(d.max()) < size
    tuples = torch.stack(digits, dim=1)
    assert torch.unique(tuples, dim=0).shape[0] == n + 1  # distinct ids -> distinct index tuples
    for x in data.draw(st.lists(st.integers(0, n), max_size=5)):
        assert tuple(tuples[x].tolist()) == hand_digits(x, n + 1, tuple(partitions))


def test_qr_is_two_way_mixed_radix():
    ids = torch.arange(1001)
    q, r = qr_split(ids, 7)
    assert [torch.equal(a, b) for a, b in zip([q, r], mixed_radix_digits(ids, (143, 7)))] == [True, True]


# -- pooled outputs against hand computation -------------------------------------------------
@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_qr_pooled_equals_hand_computed_rows(op):
    methods = {"a": QR(collisions=4, op=op), "b": QR(collisions=7, op=op), "c": QR(collisions=3, op=op)}
    collection = CompressedEmbeddingBagCollection(FEATURES, 8, methods, seed=1)
    assert [t.rows for t in collection.table_specs()] == [13, 4, 143, 7, 3, 3]
    assert all(t.dim == (4 if op == "concat" else 8) for t in collection.table_specs())
    kjt = random_kjt(NAMES, batch=64, id_high=1200, id_low=-5, max_len=5, seed=2)
    out = collection(kjt).values()
    torch.testing.assert_close(out, reference_pooled(collection, kjt))
    empty = kjt.lengths().view(3, 64) == 0
    assert empty.any() and (kjt.lengths() > 1).any()
    for f in range(3):
        assert torch.all(out[:, f * 8:(f + 1) * 8][empty[f]] == 0)


def test_mult_pools_products_not_the_product_of_sums():
    """Guards the reference itself: a layout pooling before multiplying would differ."""
    collection = CompressedEmbeddingBagCollection([FeatureSpec("b", 1000)], 8, {"b": QR(collisions=7)}, seed=1)
    kjt = random_kjt(["b"], batch=32, id_high=1000, max_len=5, seed=4)
    q_table, r_table = collection.table_weights()
    q, r = qr_split(kjt.values(), 7)
    offsets = kjt.offsets()[:-1]
    bag = torch.nn.functional.embedding_bag
    wrong = bag(q, q_table.detach(), offsets, mode="sum") * bag(r, r_table.detach(), offsets, mode="sum")
    assert (kjt.lengths() > 1).sum() > 5
    assert not torch.allclose(collection(kjt).values(), wrong, atol=1e-6)


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_kway_pooled_equals_hand_computed_rows(op):
    dim = 12  # three tables of width 4 for concat
    methods = {"a": KWay((5, 4, 3), op), "b": KWay((11, 10, 10), op), "c": KWay((2, 2, 2), op)}
    collection = CompressedEmbeddingBagCollection(FEATURES, dim, methods, seed=3)
    assert [t.rows for t in collection.table_specs()] == [5, 4, 3, 11, 10, 10, 2, 2, 2]
    kjt = random_kjt(NAMES, batch=64, id_high=1100, id_low=-3, max_len=4, seed=5)
    torch.testing.assert_close(collection(kjt).values(), reference_pooled(collection, kjt))


@pytest.mark.parametrize("config", [QR(collisions=5), QR(collisions=3, op="concat"), KWay((8, 8), "add")])
def test_out_of_space_ids_share_the_oov_vector(config):
    feature = FeatureSpec("a", 50)
    collection = CompressedEmbeddingBagCollection([feature], 8, {"a": config})
    ids = torch.tensor([50, -1, -(2**62), 51, 10**15, 49, 0])
    kjt = KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(7, dtype=torch.long))
    out = collection(kjt).values()
    for i in range(1, 5):
        torch.testing.assert_close(out[i], out[0], rtol=0, atol=0)
    assert not torch.equal(out[5], out[0]) and not torch.equal(out[6], out[0])
    torch.testing.assert_close(out, reference_pooled(collection, kjt))


def test_distinct_ids_get_distinct_vectors():
    feature = FeatureSpec("b", 1000)
    for config in [QR(collisions=32), KWay((10, 10, 11))]:
        collection = CompressedEmbeddingBagCollection([feature], 8, {"b": config}, seed=6)
        kjt = KeyedJaggedTensor(keys=["b"], values=torch.arange(1001), lengths=torch.ones(1001, dtype=torch.long))
        assert torch.unique(collection(kjt).values(), dim=0).shape[0] == 1001


# -- init, bytes, training -----------------------------------------------------------------
@pytest.mark.parametrize("op, parts", [("mult", 2), ("mult", 3), ("add", 2), ("concat", 2)])
def test_init_gives_vectors_the_scale_of_full(op, parts):
    n = 37883
    config = QR(collisions=195, op=op) if parts == 2 else KWay((34, 34, 34), op)
    collection = CompressedEmbeddingBagCollection([FeatureSpec("x", n)], 16, {"x": config}, seed=7)
    bound = init_bound(op, parts, n + 1)
    for w in collection.table_weights():
        assert bound * 0.9 < w.abs().max() <= bound
    kjt = KeyedJaggedTensor(keys=["x"], values=torch.arange(n + 1), lengths=torch.ones(n + 1, dtype=torch.long))
    std = collection(kjt).values().std().item()
    full_std = math.sqrt(1 / (3 * (n + 1)))  # of U(-sqrt(1/N), sqrt(1/N))
    assert 0.85 * full_std < std < 1.15 * full_std


def test_bytes_are_the_partition_tables():
    collection = CompressedEmbeddingBagCollection(FEATURES, 8, {"a": QR(collisions=4), "b": KWay((11, 10, 10))})
    assert collection.memory_bytes() == (13 + 4 + 11 + 10 + 10 + 8) * 8 * 4
    concat = CompressedEmbeddingBagCollection(FEATURES, 8, {"a": QR(collisions=4, op="concat")})
    assert concat.memory_bytes() == (13 + 4) * 4 * 4 + (1001 + 8) * 8 * 4


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_fused_step_changes_exactly_the_used_rows(op):
    methods = {"a": QR(collisions=4, op=op), "b": KWay((10, 10, 11), op="add" if op == "concat" else op)}
    collection = CompressedEmbeddingBagCollection(FEATURES, 8, methods, optimizer=TableOptimizer(lr=0.5))
    kjt = random_kjt(NAMES, batch=16, id_high=1100, id_low=-2, max_len=3, seed=9)
    before = [w.detach().clone() for w in collection.table_weights()]
    collection(kjt).values().sum().backward()
    after = collection.table_weights()
    for feature in FEATURES[:2]:
        config = methods[feature.name]
        partitions = hand_partitions(config, feature.num_embeddings)
        digits = [hand_digits(x, feature.num_embeddings, partitions) for x in kjt[feature.name].values().tolist()]
        for j, t in enumerate(collection.feature_tables(feature.name)):
            used = {d[j] for d in digits}
            changed = set(torch.nonzero((before[t] != after[t]).any(dim=1)).flatten().tolist())
            assert changed == used, (feature.name, j)


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: QR(collisions=0), "collisions"),
        (lambda: QR(collisions=2.0), "collisions"),
        (lambda: QR(op="max"), "op"),
        (lambda: KWay(()), "partitions"),
        (lambda: KWay((4,)), "partitions"),
        (lambda: KWay((4, 0)), "partitions"),
        (lambda: KWay((2,) * 17), "partitions"),
        (lambda: KWay((2**40, 2**40)), "partitions"),
        (lambda: KWay((4, 4), op="prod"), "op"),
    ],
)
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_configs_normalise_to_plain_json():
    assert KWay([3, 4]) == KWay((3, 4)) and hash(KWay([3, 4])) == hash(KWay((3, 4)))
    assert type(KWay(tuple(np.array([3, 4]))).partitions[0]) is int
    assert type(QR(collisions=np.int64(5)).collisions) is int
    for config in [KWay((3, 4), "concat"), QR(collisions=9, op="add")]:
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "config, dim, match",
    [
        (KWay((4, 4)), 8, "partitions"),  # covers 16 ids, the feature has 20 + OOV
        (QR(op="concat"), 12, "op='concat'.*dim=12"),  # 6-wide tables: not a TBE width
        (KWay((3, 3, 3), "concat"), 8, "op='concat'.*dim=8"),
    ],
)
def test_layout_checks_that_need_the_feature(config, dim, match):
    with pytest.raises(ValueError, match=match):
        CompressedEmbeddingBagCollection([FeatureSpec("f", 20)], dim, {"f": config})


# -- budget fitting ------------------------------------------------------------------------
DIM = 16
FULL = full_bytes(CRITEO_FEATURES, DIM)


@pytest.mark.parametrize(
    "fitter, kwargs, ratio",
    [
        (qr_methods_for_budget, {}, 2),
        (qr_methods_for_budget, {}, 10),
        (qr_methods_for_budget, {"op": "concat"}, 100),
        (kway_methods_for_budget, {}, 100),
        (kway_methods_for_budget, {"op": "add"}, 10),
        (kway_methods_for_budget, {"op": "concat"}, 1000),
    ],
)
def test_budget_fits_and_round_trips(fitter, kwargs, ratio, tmp_path):
    budget = FULL // ratio
    methods = fitter(CRITEO_FEATURES, DIM, budget, **kwargs)
    assert methods["C9"] == Full() or ratio == 1000  # 3 ids stay Full unless the budget is tiny
    compressed = [m for m in methods.values() if not isinstance(m, Full)]
    assert compressed and all(m.op == kwargs.get("op", "mult") for m in compressed)
    collection = CompressedEmbeddingBagCollection(CRITEO_FEATURES, DIM, methods, seed=1)
    assert 0.85 * budget < collection.memory_bytes() <= budget
    names = [f.name for f in CRITEO_FEATURES]
    collection(random_kjt(names, 8, 40_000, seed=1)).values().sum().backward()
    loaded = CompressedEmbeddingBagCollection.load(collection.export(tmp_path / "art"))
    kjt = random_kjt(names, 32, 40_000, id_low=-3, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), collection(kjt).values())
    assert loaded.memory_bytes() == collection.memory_bytes()


@pytest.mark.parametrize("ratio", [2, 10])
def test_qr_fitter_uses_memory_reducing_collisions(ratio):
    methods = qr_methods_for_budget(CRITEO_FEATURES, DIM, FULL // ratio)
    for f in CRITEO_FEATURES:
        m = methods[f.name]
        if isinstance(m, QR):
            n = f.num_embeddings + 1
            assert 2 <= m.collisions <= math.ceil(math.sqrt(n))  # beyond sqrt(N) rows only grow
            assert math.ceil(n / m.collisions) + m.collisions < n
    big = [methods[f"C{i}"] for i in (3, 12, 21)]
    assert all(isinstance(m, QR) for m in big)
    # one cap: the big features end up within a few rows of each other
    sizes = [math.ceil((CRITEO[i - 1] + 1) / m.collisions) + m.collisions for i, m in zip((3, 12, 21), big)]
    assert max(sizes) - min(sizes) <= 0.2 * max(sizes)


@pytest.mark.parametrize(
    "fitter, kwargs, ratio",
    [(qr_methods_for_budget, {}, 100), (qr_methods_for_budget, {}, 1000), (kway_methods_for_budget, {}, 1000)],
)
def test_budget_below_the_smallest_structure_is_refused(fitter, kwargs, ratio):
    # two partitions need ~2 sqrt(N) rows per feature: 3277 rows in all, more than Full / 100
    with pytest.raises(ValueError, match="budget_bytes"):
        fitter(CRITEO_FEATURES, DIM, FULL // ratio, **kwargs)


def test_kway_fitter_prefers_fewest_partitions():
    methods = kway_methods_for_budget(CRITEO_FEATURES, DIM, FULL // 10)
    assert all(len(m.partitions) == 2 for m in methods.values() if isinstance(m, KWay))
    deep = kway_methods_for_budget(CRITEO_FEATURES, DIM, FULL // 100)
    assert max(len(m.partitions) for m in deep.values() if isinstance(m, KWay)) > 2
    for f in CRITEO_FEATURES:
        if isinstance(deep[f.name], KWay):
            assert math.prod(deep[f.name].partitions) >= f.num_embeddings + 1


def test_fitter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="op"):
        qr_methods_for_budget(CRITEO_FEATURES, DIM, FULL // 2, op="max")
    with pytest.raises(ValueError, match="max_partitions"):
        kway_methods_for_budget(CRITEO_FEATURES, DIM, FULL // 2, max_partitions=1)


# -- fallbacks below the plain minimum --------------------------------------------------------
def assert_partition_property(features, methods) -> None:
    """Every compressed feature: the ids [0, n] (the OOV id included) get distinct row tuples."""
    for f in features:
        m = methods[f.name]
        if isinstance(m, Full):
            continue
        partitions = hand_partitions(m, f.num_embeddings)
        assert math.prod(partitions) >= f.num_embeddings + 1
        digits = torch.stack(mixed_radix_digits(torch.arange(f.num_embeddings + 1), partitions), dim=1)
        assert torch.unique(digits, dim=0).shape[0] == f.num_embeddings + 1, f.name


@pytest.mark.parametrize(
    "fitter, ratio, op, parts",
    [(qr_methods_for_budget, 100, "concat", 2), (kway_methods_for_budget, 300, "mult", 7),
     (kway_methods_for_budget, 1000, "concat", 4)],
)
def test_fallbacks_reach_budgets_below_the_plain_minimum(fitter, ratio, op, parts):
    budget = FULL // ratio
    with pytest.raises(ValueError, match="budget_bytes"):
        fitter(CRITEO_FEATURES, DIM, budget)  # without the fallback: refused, as before
    methods = fitter(CRITEO_FEATURES, DIM, budget, fallback=True)
    compressed = [m for m in methods.values() if not isinstance(m, Full)]
    assert compressed and all(m.op == op for m in compressed)
    assert max(len(hand_partitions(m, 1000)) for m in compressed) == parts
    if op == "mult":  # deeper partitions only where the cap needs them: the fewest that fit
        assert min(len(m.partitions) for m in compressed) == 2
    collection = CompressedEmbeddingBagCollection(CRITEO_FEATURES, DIM, methods, seed=1)
    assert 0.9 * budget < collection.memory_bytes() <= budget
    assert_partition_property(CRITEO_FEATURES, methods)
    # Through fbgemm: the largest feature's 37884 ids and its OOV id get 37885 distinct vectors.
    c3 = collection.lookup("C3", torch.arange(CRITEO[2] + 1))
    assert torch.unique(c3, dim=0).shape[0] == CRITEO[2] + 1


@pytest.mark.parametrize("fitter, ratio", [(qr_methods_for_budget, 2), (qr_methods_for_budget, 10),
                                           (kway_methods_for_budget, 10), (kway_methods_for_budget, 100)])
def test_fallback_changes_nothing_where_the_plain_fit_works(fitter, ratio):
    assert fitter(CRITEO_FEATURES, DIM, FULL // ratio, fallback=True) == fitter(CRITEO_FEATURES, DIM, FULL // ratio)


def test_budgets_below_every_fallback_are_refused_with_the_minimum():
    least_qr = smallest_bytes(CRITEO_FEATURES, DIM, "concat", 2)
    assert FULL // 1000 < least_qr < FULL // 100  # QR concat: half the bytes of ~2 sqrt(N) rows each
    with pytest.raises(ValueError, match=rf"budget_bytes={FULL // 1000} .* QR .*\({least_qr} bytes, 128x smaller .*kway"):
        qr_methods_for_budget(CRITEO_FEATURES, DIM, FULL // 1000, fallback=True)
    least_kway = smallest_bytes(CRITEO_FEATURES, DIM, "concat", 16)
    with pytest.raises(ValueError, match=rf"budget_bytes={least_kway - 1} .*k-way .*\({least_kway} bytes"):
        kway_methods_for_budget(CRITEO_FEATURES, DIM, least_kway - 1, fallback=True)
    assert kway_methods_for_budget(CRITEO_FEATURES, DIM, least_kway, fallback=True)  # the minimum itself fits
    with pytest.raises(ValueError, match="max_partitions"):
        kway_methods_for_budget(CRITEO_FEATURES, DIM, FULL // 2, max_partitions=17, fallback=True)


def test_concat_partitions_follow_the_tbe_width():
    assert [concat_partitions(d) for d in (4, 8, 12, 16, 64)] == [0, 2, 3, 4, 16]
    # D = 4 allows no concat split: the QR fallback has nothing to try and refuses plainly.
    with pytest.raises(ValueError, match="budget_bytes"):
        qr_methods_for_budget(CRITEO_FEATURES, 4, full_bytes(CRITEO_FEATURES, 4) // 100, fallback=True)


@pytest.mark.parametrize(
    "methods",
    [
        {"a": QR(collisions=7), "b": QR(collisions=7)},  # plain int radices
        {"a": QR(collisions=7), "b": QR(collisions=3)},  # per-id radices
        {"a": KWay(partitions=(9, 6, 7)), "b": KWay(partitions=(3, 11, 10)), "c": KWay(partitions=(40, 3, 3))},
    ],
)
def test_chained_digits_are_the_divide_and_remainder_digits(methods):
    """``chained_digits`` (one division per digit boundary) gives the very rows of a division and a
    remainder per digit, and of each feature's own ``transform``, ids out of space included."""
    features = [FeatureSpec(name, 300 + 17 * i) for i, name in enumerate(methods)]
    coll = CompressedEmbeddingBagCollection(features, 8, methods)
    g = torch.Generator().manual_seed(0)
    per_feature = [torch.cat([torch.randint(-50, f.num_embeddings + 50, (500,), generator=g), torch.tensor([-(2**40), 2**40])]) for f in features]
    layouts = list(coll.layouts.values())
    chained = coll.transform_ids(per_feature)
    try:
        CompositionalLayout.chained_digits = False
        divided = coll.transform_ids(per_feature)
    finally:
        CompositionalLayout.chained_digits = True
    reference = [layout.transform(ids) for layout, ids in zip(layouts, per_feature)]
    for a, b, c in zip(chained, divided, reference):
        assert len(a) == len(b) == len(c)
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)
