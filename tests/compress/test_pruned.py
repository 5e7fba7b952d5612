"""Row pruning (post-training) and OptEmbed's learned threshold, against hand-computed references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Imported by module so the methods are registered before any collection is built or loaded.
from tablezip.compress import Full, Hash
from tablezip.compress.pruned import (
    LearnedThreshold,
    Pruned,
    choose_rows,
    long_tail_step_grad,
    prefix_remap,
    prune_collection,
    pruned_methods_for_budget,
    pruned_rows,
    row_norms,
    rows_below_threshold,
    threshold_penalty,
)
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer
from tests.conftest import random_kjt

DIM = 8
_rng = np.random.default_rng(0)
FEATURES = [
    FeatureSpec("a", 50, counts=_rng.integers(0, 6, 50)),  # few distinct counts: many ties
    FeatureSpec("b", 1000, counts=np.sort(_rng.zipf(1.3, 1000))[::-1].copy()),
    FeatureSpec("c", 7, pooling="mean", counts=_rng.integers(0, 100, 7)),
]
NAMES = [f.name for f in FEATURES]
CRITEO = [471, 510, 37883, 21352, 127, 12, 7527, 230, 3, 10776, 3770, 34831, 2803, 26, 4939, 29166, 9,
          2451, 1197, 4, 32519, 13, 14, 10464, 49, 8044]  # fmt: skip


# -- independent references ----------------------------------------------------------------
def py_norm(row: list[float]) -> float:
    return math.sqrt(sum(x * x for x in row))


def py_step_grad(x: float) -> float:
    """OptEmbed's (DST's) long-tailed estimator, written from the formula."""
    a = abs(x)
    return 2 - 4 * a if a <= 0.4 else (0.4 if a <= 1 else 0.0)


def reference_keep(weights: torch.Tensor, keep: int, by: str, counts=None) -> list[int]:
    """Hand sort: largest score first, lower id on ties; returned ascending."""
    w = weights.detach().tolist()
    score = [py_norm(r) for r in w] if by == "norm" else [float(c) for c in counts]
    return sorted(sorted(range(len(w)), key=lambda i: (-score[i], i))[:keep])


def row_counts(feature: FeatureSpec) -> list[float]:
    return [float(c) for c in feature.counts] + [0.0]  # the OOV row has no count


def id_vector(collection, name: str, i: int) -> torch.Tensor:
    """The vector one id contributes, from the method's documented contract."""
    feature = next(f for f in collection.features if f.name == name)
    n = feature.num_embeddings
    o = i if 0 <= i < n else n
    layout = collection.layouts[name]
    table = collection.table_weights()[collection.feature_tables(name)[0]].detach()
    config = layout.config
    if isinstance(config, Full):
        return table[o]
    if isinstance(config, LearnedThreshold):
        row = table[o]
        return row if py_norm(row.tolist()) > float(layout.threshold.detach()) else torch.zeros_like(row)
    assert isinstance(config, Pruned)
    r = int(layout.remap.tolist()[o])
    if r >= 0:
        return table[r]
    return table[config.keep] if config.missing == "default" else torch.zeros(table.shape[1])


def reference_pooled(collection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    out = []
    for feature in collection.features:
        jt = kjt[feature.name]
        offsets = jt.offsets().tolist()
        values = jt.values().tolist()
        bags = []
        for b in range(len(offsets) - 1):
            ids = values[offsets[b]: offsets[b + 1]]
            vec = torch.zeros(collection.dim)
            for i in ids:
                vec = vec + id_vector(collection, feature.name, i)
            if feature.pooling.value == "mean" and ids:
                vec = vec / len(ids)
            bags.append(vec)
        out.append(torch.stack(bags))
    return torch.cat(out, dim=1)


def each_id_kjt(features, low: int = -2, extra: int = 2) -> tuple[KeyedJaggedTensor, dict[str, list[int]]]:
    """Every id of ``[low, n + extra)`` in a bag of its own; shorter features get empty bags."""
    ids = {f.name: list(range(low, f.num_embeddings + extra)) for f in features}
    batch = max(len(v) for v in ids.values())
    lengths = torch.cat([(torch.arange(batch) < len(ids[f.name])).long() for f in features])
    values = torch.tensor([i for f in features for i in ids[f.name]], dtype=torch.int64)
    return KeyedJaggedTensor(keys=[f.name for f in features], values=values, lengths=lengths), ids


def per_id(collection, kjt, name: str, count: int) -> torch.Tensor:
    i = collection.feature_names.index(name)
    return collection(kjt).values()[:count, i * collection.dim:(i + 1) * collection.dim]


def trained(features=FEATURES, methods=None, steps: int = 3, seed: int = 1) -> CompressedEmbeddingBagCollection:
    """A collection after a few fused Adagrad steps, so rows are no longer at their init."""
    coll = CompressedEmbeddingBagCollection(features, DIM, methods, optimizer=TableOptimizer(lr=0.2), seed=seed)
    names = [f.name for f in features]
    for s in range(steps):
        coll(random_kjt(names, 64, 1100, max_len=4, seed=100 + s)).values().pow(2).sum().backward()
    return coll


# -- index maths ---------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 60),
    data=st.data(),
    ids=st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70)), min_size=1, max_size=40),
)
def test_pruned_rows_match_reference(n, data, ids):
    kept = sorted(data.draw(st.sets(st.integers(0, n), max_size=n + 1)))
    remap = [-1] * (n + 1)
    for row, i in enumerate(kept):
        remap[i] = row
    got = pruned_rows(torch.tensor(ids, dtype=torch.int64), torch.tensor(remap, dtype=torch.int32))
    assert got.dtype == torch.int64
    assert got.tolist() == [remap[i if 0 <= i < n else n] for i in ids]
    assert all(-1 <= r < len(kept) for r in got.tolist())


def test_prefix_remap():
    assert prefix_remap(5, 3).tolist() == [0, 1, 2, -1, -1, -1]
    assert prefix_remap(3, 4).tolist() == [0, 1, 2, 3]
    assert prefix_remap(3, 4).dtype == torch.int32


def test_long_tail_estimator_values():
    x = torch.tensor([0.0, 0.2, -0.2, 0.4, -0.5, 1.0, 1.01, -3.0])
    assert long_tail_step_grad(x).tolist() == pytest.approx([py_step_grad(v) for v in x.tolist()])


# -- configs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Pruned(keep=0), "keep"),
        (lambda: Pruned(keep=-4), "keep"),
        (lambda: Pruned(keep=2.0), "keep"),
        (lambda: Pruned(keep=True), "keep"),
        (lambda: Pruned(keep=3, missing="mean"), "missing"),
        (lambda: LearnedThreshold(init=float("nan")), "init"),
        (lambda: LearnedThreshold(init="0"), "init"),
        (lambda: CompressedEmbeddingBagCollection([FeatureSpec("x", 5)], DIM, {"x": Pruned(keep=7)}), "keep"),
    ],
)
def test_invalid_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_keep_may_cover_the_oov_row():
    coll = CompressedEmbeddingBagCollection([FeatureSpec("x", 5)], DIM, {"x": Pruned(keep=6)})
    assert coll.table_specs()[0].rows == 6


# -- Pruned layout -------------------------------------------------------------------------
@pytest.mark.parametrize("default", [False, True])
def test_fresh_layout_keeps_the_id_prefix(default):
    missing = "default" if default else "zero"
    methods = {"a": Pruned(keep=51, missing=missing), "b": Pruned(keep=20, missing=missing), "c": Pruned(keep=3, missing=missing)}
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, methods, seed=2)
    assert coll.layouts["b"].may_drop is not default
    kjt = random_kjt(NAMES, 64, 1100, id_low=-5, max_len=5, seed=3)
    out = coll(kjt).values()
    torch.testing.assert_close(out, reference_pooled(coll, kjt))
    empty = kjt.lengths().view(3, 64) == 0
    for f in range(3):
        assert torch.all(out[empty[f], f * DIM:(f + 1) * DIM] == 0)


@pytest.mark.parametrize("missing", ["zero", "default"])
def test_fused_step_changes_exactly_the_used_compact_rows(missing):
    coll = CompressedEmbeddingBagCollection(FEATURES[:2], DIM, {"b": Pruned(keep=30, missing=missing)},
                                            optimizer=TableOptimizer(kind="sgd", lr=0.5))  # fmt: skip
    kjt = random_kjt(NAMES[:2], 32, 100, max_len=3, seed=4)
    before = coll.table_weights()[1].detach().clone()
    coll(kjt).values().pow(2).sum().backward()
    changed = set(torch.nonzero((before != coll.table_weights()[1]).any(1)).flatten().tolist())
    ids = kjt["b"].values().tolist()
    used = {i for i in ids if i < 30} | ({30} if missing == "default" and any(i >= 30 for i in ids) else set())
    assert changed == used


# -- choosing rows -------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 7, 20, 40])
def test_choose_rows_by_norm_matches_hand_sort(keep):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, DIM, generator=g)
    w[10] = w[3]  # exact ties: equal rows and a negated row have the same norm
    w[25] = -w[3]
    w[30] = w[31]
    got = choose_rows(w, keep, by="norm")
    assert got.dtype == torch.int64
    assert got.tolist() == reference_keep(w, keep, "norm")


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=60), data=st.data())
def test_choose_rows_by_frequency_matches_hand_sort(counts, data):
    keep = data.draw(st.integers(1, len(counts)))
    w = torch.zeros(len(counts), 2)
    got = choose_rows(w, keep, by="frequency", counts=np.array(counts))
    assert got.tolist() == reference_keep(w, keep, "frequency", counts)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"keep": 3, "by": "frequency"}, "counts"), ({"keep": 3, "by": "frequency", "counts": np.ones(4)}, "counts"),
     ({"keep": 0}, "keep"), ({"keep": 11}, "keep"), ({"keep": 2, "by": "random"}, "by")],
)
def test_choose_rows_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_rows(torch.randn(10, 4), **kwargs)


# -- prune_collection ----------------------------------------------------------------------
@pytest.mark.parametrize("by", ["norm", "frequency"])
@pytest.mark.parametrize("missing", ["zero", "default"])
def test_prune_keeps_trained_rows_bit_identical(by, missing):
    coll = trained()
    keep = {"a": 10, "b": 200}
    pruned = prune_collection(coll, keep=keep, by=by, missing=missing)
    assert pruned.methods == {"a": Pruned(10, missing), "b": Pruned(200, missing), "c": Full()}
    assert pruned.dim == coll.dim and pruned.optimizer_config == coll.optimizer_config
    kjt, ids = each_id_kjt(FEATURES)
    old_w = coll.table_weights()
    with torch.no_grad():
        before, after = coll(kjt).values(), pruned(kjt).values()
    for f, feature in enumerate(FEATURES):
        n = feature.num_embeddings
        count = len(ids[feature.name])
        old = before[:count, f * DIM:(f + 1) * DIM]
        new = after[:count, f * DIM:(f + 1) * DIM]
        if feature.name not in keep:
            assert torch.equal(new, old)
            continue
        table = old_w[f].detach()
        kept = reference_keep(table, keep[feature.name], by, row_counts(feature) if by == "frequency" else None)
        assert pruned.layouts[feature.name].remap.tolist() == [kept.index(i) if i in kept else -1 for i in range(n + 1)]
        kept_set = set(kept)
        pruned_mean = table[[i for i in range(n + 1) if i not in kept_set]].mean(0)
        for row, i in enumerate(ids[feature.name]):
            o = i if 0 <= i < n else n
            if o in kept_set:
                assert torch.equal(new[row], old[row]), (feature.name, i)
            elif missing == "zero":
                assert torch.all(new[row] == 0), (feature.name, i)
            else:
                torch.testing.assert_close(new[row], pruned_mean)
    # multi-id bags, MEAN pooling included
    bags = random_kjt(NAMES, 48, 1100, id_low=-3, max_len=5, seed=7)
    torch.testing.assert_close(pruned(bags).values(), reference_pooled(pruned, bags))


@pytest.mark.parametrize("missing", ["zero", "default"])
def test_pruned_bytes_are_exact(missing):
    pruned = prune_collection(trained(steps=1), keep={"a": 5, "b": 100}, missing=missing)
    extra = 1 if missing == "default" else 0
    expected = (5 + extra) * DIM * 4 + 51 * 4 + (100 + extra) * DIM * 4 + 1001 * 4 + 8 * DIM * 4
    assert pruned.memory_bytes() == expected
    stored = sum(w.numel() * w.element_size() for w in pruned.table_weights())
    stored += sum(t.numel() * t.element_size() for l in pruned.layouts.values() for t in l.state_dict().values())
    assert stored == expected


@pytest.mark.parametrize("missing", ["zero", "default"])
def test_export_load_is_bit_identical(missing, tmp_path):
    pruned = prune_collection(trained(), keep={"a": 10, "b": 150}, by="frequency", missing=missing)
    loaded = CompressedEmbeddingBagCollection.load(pruned.export(tmp_path / missing))
    kjt = random_kjt(NAMES, 64, 1100, max_len=4, seed=8, id_low=-4)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), pruned(kjt).values())
    assert loaded.memory_bytes() == pruned.memory_bytes()
    assert torch.equal(loaded.layouts["b"].remap, pruned.layouts["b"].remap)


def test_prune_collection_argument_errors():
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, {"c": Hash(rows=3)})
    cases = [
        ({"keep": {"a": 3}, "budget_bytes": 10**6}, "not both"),
        ({"keep": {"zz": 3}}, "zz"),
        ({"keep": {"c": 2}}, "'c'"),
        ({"keep": {"a": 0}}, "keep"),
        ({"keep": {"a": 52}}, "keep"),
        ({"keep": {"a": 3}, "by": "magic"}, "by"),
        ({"keep": {"a": 3}, "missing": "mean"}, "missing"),
        ({"budget_bytes": 100}, "budget_bytes"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            prune_collection(coll, **kwargs)
    no_counts = CompressedEmbeddingBagCollection([FeatureSpec("x", 20)], DIM)
    with pytest.raises(ValueError, match="counts"):
        prune_collection(no_counts, keep={"x": 3}, by="frequency")
    lt = CompressedEmbeddingBagCollection(FEATURES, DIM, {"a": LearnedThreshold()})
    with pytest.raises(ValueError, match="threshold"):
        prune_collection(lt, keep={"a": 3})


def criteo_features() -> list[FeatureSpec]:
    rng = np.random.default_rng(1)
    return [FeatureSpec(f"C{i + 1}", n, counts=np.sort(rng.zipf(1.2, n))[::-1].copy()) for i, n in enumerate(CRITEO)]


@pytest.mark.parametrize("by", ["norm", "frequency"])
def test_budget_is_respected(by):
    features = criteo_features()
    dim = 16
    coll = CompressedEmbeddingBagCollection(features, dim, seed=3)
    full = coll.full_bytes()
    for ratio in (2, 10):
        budget = full // ratio
        pruned = prune_collection(coll, budget_bytes=budget, by=by)
        assert budget * 0.98 < pruned.memory_bytes() <= budget, ratio
        for name, method in pruned.methods.items():
            if isinstance(method, Pruned):  # the kept rows are the feature's best by `by`
                f = next(f for f in features if f.name == name)
                table = coll.table_weights()[coll.feature_tables(name)[0]]
                counts = np.append(f.counts, 0) if by == "frequency" else None
                assert torch.equal(pruned.table_weights()[pruned.feature_tables(name)[0]],
                                   table[choose_rows(table, method.keep, by, counts)])  # fmt: skip
    # every pruned feature still pays a 4-byte remap per id (1/16 of Full at dim 16)
    for ratio in (100, 1000):
        with pytest.raises(ValueError, match="budget_bytes"):
            prune_collection(coll, budget_bytes=full // ratio, by=by)
    assert prune_collection(coll, budget_bytes=full, by=by).methods == coll.methods


def test_budget_with_a_learned_threshold_feature():
    coll = trained(methods={"b": LearnedThreshold()}, steps=1)
    coll.layouts["b"].threshold.data.fill_(float(row_norms(coll.table_weights()[1].detach()).median()))
    kept_b = 1001 - rows_below_threshold(coll, "b").numel()
    b_bytes = (kept_b + 1) * DIM * 4 + 1001 * 4
    budget = b_bytes + 8 * DIM * 4 + 900  # a (51 rows) must shrink, c (8 rows) fits as Full
    pruned = prune_collection(coll, budget_bytes=budget, missing="default")
    assert pruned.methods["b"] == Pruned(kept_b, "default")
    assert isinstance(pruned.methods["a"], Pruned) and pruned.methods["c"] == Full()
    assert budget - DIM * 4 < pruned.memory_bytes() <= budget


def test_budget_fitter_for_untrained_pruning(tmp_path):
    features = criteo_features()
    dim = 16
    full = sum((n + 1) * dim * 4 for n in CRITEO)
    for ratio in (2, 10, 100, 1000):  # prefix pruning stores no remap, so every ratio is reachable
        methods = pruned_methods_for_budget(features, dim, full // ratio)
        coll = CompressedEmbeddingBagCollection(features, dim, methods)
        assert coll.memory_bytes() <= full // ratio
        assert full // ratio - coll.memory_bytes() < len(features) * dim * 4  # cap + 1 would not fit
        caps = {m.keep for m in methods.values() if isinstance(m, Pruned)}
        assert len(caps) == 1  # one water-filled cap
        assert all(not m.remap for m in methods.values() if isinstance(m, Pruned))
    with pytest.raises(ValueError, match="budget_bytes"):
        pruned_methods_for_budget(features, dim, len(features) * dim * 4 - 1)
    assert pruned_methods_for_budget(features, dim, full) == {f.name: Full() for f in features}
    small = [FeatureSpec("x", 300), FeatureSpec("y", 40)]
    coll = CompressedEmbeddingBagCollection(small, dim, pruned_methods_for_budget(small, dim, 341 * dim * 4 // 3))
    coll(random_kjt(["x", "y"], 8, 400, seed=1)).values().sum().backward()
    loaded = CompressedEmbeddingBagCollection.load(coll.export(tmp_path / "fit"))
    kjt = random_kjt(["x", "y"], 16, 400, seed=2, id_low=-2)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), coll(kjt).values())


# -- LearnedThreshold ----------------------------------------------------------------------
def test_learned_threshold_masks_rows_at_or_below_t():
    coll = trained(methods={"b": LearnedThreshold(), "c": LearnedThreshold(init=0.05)}, steps=2)
    assert coll.memory_bytes() == (51 + 1001 + 8) * DIM * 4 + 2 * 4
    table = coll.table_weights()[1].detach()
    norms = sorted(py_norm(r) for r in table.tolist())
    coll.layouts["b"].threshold.data.fill_((norms[500] + norms[501]) / 2)
    kjt, ids = each_id_kjt(FEATURES)
    with torch.no_grad():
        out = coll(kjt).values()
    torch.testing.assert_close(out, reference_pooled(coll, kjt), rtol=0, atol=0)
    b = out[: len(ids["b"]), DIM:2 * DIM]
    assert 490 < int((b == 0).all(1).sum()) < 510
    # a row exactly at the threshold is masked (strict >)
    coll.layouts["b"].threshold.data.fill_(float(row_norms(table[7:8])[0]))
    with torch.no_grad():
        assert torch.all(per_id(coll, kjt, "b", len(ids["b"]))[ids["b"].index(7)] == 0)
    below = rows_below_threshold(coll, "b").tolist()
    t = float(coll.layouts["b"].threshold.detach())
    assert 7 in below and below == [i for i, r in enumerate(table.tolist()) if not py_norm(r) > t]
    with pytest.raises(ValueError, match="learned_threshold|LearnedThreshold"):
        rows_below_threshold(coll, "a")


def test_gradient_reaches_threshold_and_rows():
    """SGD update of the rows and d(loss)/dt equal the straight-through maths done by hand."""
    features = [FeatureSpec("b", 200)]
    lr = 0.1
    coll = CompressedEmbeddingBagCollection(features, DIM, {"b": LearnedThreshold()},
                                            optimizer=TableOptimizer(kind="sgd", lr=lr), seed=2)  # fmt: skip
    with torch.no_grad():  # cover every branch of the estimator: |x| <= 0.4, <= 1, > 1
        w = coll.table_weights()[0]
        w[0:10] *= 0.7 / row_norms(w[0:10]).unsqueeze(1)
        w[10:20] *= 2.0 / row_norms(w[10:20]).unsqueeze(1)
        coll.layouts["b"].threshold.fill_(float(row_norms(w[20:40]).median()) + 1e-4)
    ids = list(range(40))
    kjt = KeyedJaggedTensor(keys=["b"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.long))
    before = coll.table_weights()[0].detach().clone()
    t = float(coll.layouts["b"].threshold.detach())
    coll(kjt).values().sum().backward()  # d(loss)/d(output) = 1 everywhere
    grad_t = 0.0
    expected = before.clone()
    for i in ids:
        e = before[i].tolist()
        norm = py_norm(e)
        h, m, s = py_step_grad(norm - t), float(norm > t), sum(e)
        grad_t += -h * s
        expected[i] = torch.tensor([x - lr * (m + h * s * x / norm) for x in e])
    assert coll.layouts["b"].threshold.grad is not None
    assert coll.layouts["b"].threshold.grad.item() == pytest.approx(grad_t, rel=1e-4)
    assert grad_t != 0
    torch.testing.assert_close(coll.table_weights()[0], expected)
    assert any(py_norm(before[i].tolist()) <= t for i in ids)  # masked rows still learn


def test_training_with_the_optembed_penalty_raises_the_threshold():
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, {n: LearnedThreshold() for n in NAMES}, seed=3)
    dense = torch.optim.SGD(coll.dense_parameters(), lr=0.05)
    pruned_before = {n: rows_below_threshold(coll, n).numel() for n in NAMES}
    target = torch.randn(32, 3 * DIM, generator=torch.Generator().manual_seed(0))
    for step in range(5):
        dense.zero_grad()
        out = coll(random_kjt(NAMES, 32, 1100, max_len=3, seed=20 + step)).values()
        loss = (out - target).pow(2).mean() + 1.0 * threshold_penalty(coll)
        loss.backward()
        dense.step()
    for n in NAMES:
        assert float(coll.layouts[n].threshold.detach()) > 0.15, n
    for n in ("a", "b"):  # c's 8 rows are larger (init scale 1/sqrt(rows)); 5 steps do not reach them
        assert rows_below_threshold(coll, n).numel() > pruned_before[n], n


@pytest.mark.parametrize("missing", ["zero", "default"])
def test_learned_threshold_prunes_to_the_same_model(missing, tmp_path):
    coll = trained(methods={"a": LearnedThreshold(), "b": LearnedThreshold()})
    for f in (0, 1):
        norms = row_norms(coll.table_weights()[f].detach())
        coll.layouts[NAMES[f]].threshold.data.fill_(float(norms.quantile(0.6)))
    below_b = set(rows_below_threshold(coll, "b").tolist())
    pruned = prune_collection(coll, missing=missing)
    assert pruned.methods["b"] == Pruned(1001 - len(below_b), missing)
    assert pruned.methods["c"] == Full()
    remap = pruned.layouts["b"].remap.tolist()
    assert [i for i, r in enumerate(remap) if r < 0] == sorted(below_b)
    kjt, _ = each_id_kjt(FEATURES)
    bags = random_kjt(NAMES, 48, 1100, id_low=-3, max_len=5, seed=9)
    with torch.no_grad():
        assert torch.equal(pruned(kjt).values(), coll(kjt).values())
        torch.testing.assert_close(pruned(bags).values(), coll(bags).values())
    loaded = CompressedEmbeddingBagCollection.load(pruned.export(tmp_path / "lt"))
    with torch.no_grad():
        assert torch.equal(loaded(bags).values(), pruned(bags).values())


def test_learned_threshold_export_load_and_penalty(tmp_path):
    coll = trained(methods={"a": LearnedThreshold(init=0.1), "b": LearnedThreshold(init=-0.2)}, steps=2)
    loaded = CompressedEmbeddingBagCollection.load(coll.export(tmp_path / "lt"))
    kjt = random_kjt(NAMES, 64, 1100, max_len=4, seed=10, id_low=-3)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), coll(kjt).values())
    assert loaded.memory_bytes() == coll.memory_bytes() == (51 + 1001 + 8) * DIM * 4 + 2 * 4
    ts = [float(coll.layouts[n].threshold.detach()) for n in ("a", "b")]
    assert float(threshold_penalty(coll).detach()) == pytest.approx(sum(math.exp(-t) for t in ts))
    assert float(threshold_penalty(CompressedEmbeddingBagCollection(FEATURES, DIM))) == 0.0


def test_learned_threshold_above_every_row_keeps_one_zero_row():
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, {"a": LearnedThreshold(init=100.0)})
    pruned = prune_collection(coll)
    assert pruned.methods["a"] == Pruned(1, "zero")
    assert pruned.layouts["a"].remap.tolist() == [-1] * 51
    kjt, ids = each_id_kjt(FEATURES)
    assert torch.all(per_id(pruned, kjt, "a", len(ids["a"])) == 0)


@pytest.mark.parametrize("missing", ["zero", "default"])
def test_prefix_pruning_without_remap_equals_the_remap_version(missing):
    """remap=False keeps ids [0, keep) by arithmetic; it must read the same rows as the prefix remap."""
    features = [FeatureSpec("a", 50), FeatureSpec("b", 1000)]
    with_remap = CompressedEmbeddingBagCollection(features, DIM, {"b": Pruned(keep=77, missing=missing)}, seed=4)
    without = CompressedEmbeddingBagCollection(features, DIM, {"b": Pruned(keep=77, missing=missing, remap=False)}, seed=4)
    assert with_remap.memory_bytes() - without.memory_bytes() == 1001 * 4
    assert "remap" not in without.layouts["b"].state_dict()
    kjt = random_kjt(["a", "b"], 64, 1100, max_len=4, seed=3, id_low=-3)
    torch.testing.assert_close(without(kjt).values(), with_remap(kjt).values(), rtol=0, atol=0)


# -- dropped ids as zero weights (drop_by_weight) -----------------------------------------
def _drop_twins(features, methods, optimizer=TableOptimizer()):
    """The same collection twice (same tables and optimizer state): compaction and zero weights."""
    import copy

    compacting = CompressedEmbeddingBagCollection(features, DIM, methods, optimizer=optimizer, seed=5)
    assert not compacting.drop_by_weight  # the CPU default: compaction
    weighted = copy.deepcopy(compacting)
    weighted.drop_by_weight = True
    return compacting, weighted


def _assert_same_training(compacting, weighted, kjts, steps: int = 2) -> None:
    """Forward outputs, then the tables and optimizer state after each fused step, bit for bit."""
    for kjt in kjts:
        for _ in range(steps):
            outs = []
            for model in (compacting, weighted):
                out = model(kjt).values()
                (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
                outs.append(out.detach())
            assert torch.equal(outs[0], outs[1])
            for a, b in zip(compacting.table_weights(), weighted.table_weights()):
                assert torch.equal(a, b)
            for a, b in zip(compacting.tbe.split_optimizer_states(), weighted.tbe.split_optimizer_states()):
                for x, y in zip(a, b):
                    assert torch.equal(x, y)


DROP_FEATURES = [
    FeatureSpec("a", 50),
    FeatureSpec("b", 1000, pooling="mean"),
    FeatureSpec("c", 300),
    FeatureSpec("d", 7, pooling="mean"),
    FeatureSpec("e", 2000),
]
DROP_METHODS = {
    "a": Pruned(keep=9),  # prefix through the remap
    "b": Pruned(keep=100, remap=False),  # MEAN still counts a dropped id
    "c": Pruned(keep=1),  # almost every id dropped
    "d": Full(),
    "e": Pruned(keep=40, remap=False),
}


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_zero_weight_drops_train_exactly_like_compaction(optimizer):
    """Passthrough collection (Pruned zero + Full): the weighted TBE call with rows of weight 0
    gives the compaction path's outputs, tables and optimizer states after two fused steps."""
    compacting, weighted = _drop_twins(DROP_FEATURES, DROP_METHODS, TableOptimizer(kind=optimizer, lr=0.3))
    assert weighted._passthrough_by_weight and not weighted._passthrough
    names = [f.name for f in DROP_FEATURES]
    kjts = [random_kjt(names, 48, 2100, max_len=4, seed=s, id_low=-5) for s in range(3)]
    _assert_same_training(compacting, weighted, kjts)


def test_zero_weight_drops_with_empty_and_all_dropped_bags():
    """Empty bags, bags whose every id is dropped (read as zero; MEAN divides by the original
    length) and bags of one id: the same vectors as compaction."""
    compacting, weighted = _drop_twins(DROP_FEATURES, DROP_METHODS)
    names = [f.name for f in DROP_FEATURES]
    batch = 6
    per_feature = {  # lengths per bag, ids
        "a": ([0, 2, 1, 0, 3, 1], [49, 60, 3, 10, 11, 12, 0]),
        "b": ([2, 0, 0, 1, 2, 0], [500, 999, 700, 5, 999]),
        "c": ([1, 1, 3, 0, 0, 0], [0, 1, 2, 3, -1]),
        "d": ([0, 0, 0, 0, 0, 1], [3]),
        "e": ([4, 0, 1, 1, 0, 0], [41, 42, 2000, -7, 39, 100]),
    }
    lengths = torch.tensor([x for n in names for x in per_feature[n][0]])
    values = torch.tensor([x for n in names for x in per_feature[n][1]])
    kjt = KeyedJaggedTensor(keys=names, values=values, lengths=lengths)
    out = weighted(kjt).values()
    assert out.shape == (batch, len(names) * DIM)
    assert torch.all(out[1, DIM : 2 * DIM] == 0) and torch.all(out[0, 2 * DIM : 3 * DIM] != 0)
    assert torch.all(out[1, 0:DIM] == 0) and torch.all(out[4, 4 * DIM : 5 * DIM] == 0)
    _assert_same_training(compacting, weighted, [kjt])


def test_zero_weight_drops_in_the_general_path():
    """Mixed with methods that leave the fast path (a QR combine, a LearnedThreshold pooled
    after TBE, a default-row Pruned): drops by weight there too, bit-identical to compaction."""
    from tablezip.compress import QR

    features = DROP_FEATURES + [FeatureSpec("q", 400), FeatureSpec("t", 60, pooling="mean"), FeatureSpec("p", 90)]
    methods = {**DROP_METHODS, "q": QR(collisions=7), "t": LearnedThreshold(init=0.01), "p": Pruned(keep=12, missing="default")}
    compacting, weighted = _drop_twins(features, methods)
    assert not weighted._passthrough_by_weight and weighted._drops
    names = [f.name for f in features]
    kjts = [random_kjt(names, 32, 2100, max_len=3, seed=s, id_low=-5) for s in range(2)]
    _assert_same_training(compacting, weighted, kjts)
    one_id = KeyedJaggedTensor(keys=names, values=torch.arange(len(names) * 8) * 37 % 1100, lengths=torch.ones(len(names) * 8, dtype=torch.long))
    _assert_same_training(compacting, weighted, [one_id])


def test_zero_weight_drops_need_batch_transforms_and_no_weight_decay():
    """The per-feature reference path (batch_transforms = False) keeps compaction even when
    drop_by_weight is set; weight decay (CUDA only) turns the weighted drops off."""
    compacting, weighted = _drop_twins(DROP_FEATURES, DROP_METHODS)
    weighted.batch_transforms = False
    calls = []
    real = weighted._drop_missing
    weighted._drop_missing = lambda *a, **k: calls.append(1) or real(*a, **k)
    names = [f.name for f in DROP_FEATURES]
    kjt = random_kjt(names, 8, 2100, max_len=3, seed=1)
    weighted(kjt)
    assert calls
    weighted.batch_transforms = True
    calls.clear()
    weighted(kjt)
    assert not calls
    decayed = CompressedEmbeddingBagCollection(DROP_FEATURES, DIM, DROP_METHODS, optimizer=TableOptimizer(weight_decay=0.0))
    assert not decayed.drop_by_weight  # CPU
