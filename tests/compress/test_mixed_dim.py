"""Mixed-dimension embeddings: the paper's alpha rule, block assignment, exact bytes, budgets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import tablezip.compress.mixed_dim  # noqa: F401  (registers "mixed_dim" until compress/__init__ imports it)
from tablezip.compress import Full
from tablezip.compress.mixed_dim import (
    MixedDim,
    block_rows,
    block_sizes,
    id_ranks,
    mixed_dim_bytes,
    mixed_dim_methods_for_budget,
    solve_mixed_dims,
)
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, TableOptimizer, config_from_dict

DIM = 16
CRITEO = [471, 510, 37883, 21352, 127, 12, 7527, 230, 3, 10776, 3770, 34831, 2803, 26, 4939, 29166, 9, 2451,
          1197, 4, 32519, 13, 14, 10464, 49, 8044]  # fmt: skip


def zipf_counts(n: int, seed: int, shuffle: bool = False) -> np.ndarray:
    """Integer train counts ~ Zipf(1.1), sorted descending like prepared data unless shuffled."""
    counts = np.floor(1e5 / np.arange(1, n + 1) ** 1.1).astype(np.int64)
    return np.random.default_rng(seed).permutation(counts) if shuffle else counts


def features() -> list[FeatureSpec]:
    rng = np.random.default_rng(7)
    return [
        FeatureSpec("sorted", 200, counts=zipf_counts(200, 0)),
        FeatureSpec("no_counts", 150),
        FeatureSpec("unsorted", 180, counts=rng.integers(0, 1000, 180)),
        FeatureSpec("mean", 90, pooling="mean", counts=zipf_counts(90, 1)),
        FeatureSpec("four", 300, counts=zipf_counts(300, 3)),
        FeatureSpec("full", 30),
    ]


METHODS = {
    "sorted": MixedDim(alpha=0.5),
    "no_counts": MixedDim(alpha=0.4, blocks=3, base_dim=8),
    "unsorted": MixedDim(alpha=1.0),
    "mean": MixedDim(dims=(16, 8, 4), sizes=(5, 25, 60)),
    "four": MixedDim(dims=(16, 12, 8, 4)),  # geometric bounds 300^(i/4) = 4, 17, 72 -> sizes 4, 13, 55, 228
}
MIXED = ["sorted", "no_counts", "unsorted", "mean", "four"]


def reference_location(layout_config: MixedDim, feature: FeatureSpec, i: int) -> tuple[int, int]:
    """(block, row) of id ``i`` by the documented contract, in plain Python: rank by descending
    count (ties by id; id order without counts), OOV ids -> the extra last row of the last block."""
    n = feature.num_embeddings
    if not 0 <= i < n:
        return len(layout_config.sizes) - 1, layout_config.sizes[-1]
    if feature.counts is None:
        rank = i
    else:
        rank = sorted(range(n), key=lambda j: (-int(feature.counts[j]), j)).index(i)
    start = 0
    for block, size in enumerate(layout_config.sizes):
        if rank < start + size:
            return block, rank - start
        start += size
    raise AssertionError("rank outside every block")


def mixed_kjt(feats: list[FeatureSpec], batch: int, seed: int) -> KeyedJaggedTensor:
    """Bags of 0..5 ids that cover every id of each feature plus OOV ids on both sides, shuffled
    so that most bags mix ids of different blocks."""
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f in feats:
        pool = torch.arange(-3, f.num_embeddings + 3)
        extra = torch.randint(-3, f.num_embeddings + 3, (2 * batch,), generator=g)
        ids = torch.cat([pool, extra])[torch.randperm(pool.numel() + 2 * batch, generator=g)]
        bag = torch.randint(0, 6, (batch,), generator=g)
        bag[0] = 0  # an empty bag
        bag[-1] += max(0, int(ids.numel() - bag.sum()))  # the remainder, so every id is used
        values.append(ids[: int(bag.sum())])
        lengths.append(bag)
    return KeyedJaggedTensor(keys=[f.name for f in feats], values=torch.cat(values), lengths=torch.cat(lengths))


def reference_pooled(collection: CompressedEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Per bag: sum (or mean) over its ids of P_block @ row, every vector computed by hand."""
    weights = collection.table_weights()
    out = []
    for f in collection.features:
        jt = kjt[f.name]
        config = collection.methods[f.name]
        tables = [weights[t].detach() for t in collection.feature_tables(f.name)]
        pooled = torch.zeros(len(jt.lengths()), DIM)
        for b, bag in enumerate(jt.to_dense()):
            for i in bag.tolist():
                if isinstance(config, Full):
                    vec = tables[0][i if 0 <= i < f.num_embeddings else f.num_embeddings]
                else:
                    block, row = reference_location(config, f, i)
                    vec = tables[block][row]
                    if config.dims[block] < DIM:
                        vec = vec @ collection.layouts[f.name].projections[str(block)].detach()
                pooled[b] += vec
            if f.pooling.value == "mean" and len(bag):
                pooled[b] /= len(bag)
        out.append(pooled)
    return torch.cat(out, dim=1)


# -- the paper's rule --------------------------------------------------------------------------
def test_alpha_rule_reproduces_hand_computed_example():
    # 1000 ids, 3 geometric blocks: ranks [0,10), [10,100), [100,1000) (1000^(1/3)=10, 1000^(2/3)=100).
    counts = np.array([64] * 10 + [4] * 90 + [1] * 900)
    assert block_sizes(1000, 3) == [10, 90, 900]
    # Mean per-id probability p_i = (64, 4, 1) / 1900. Alg. 1: lambda = d_bar * max(p)^-alpha,
    # d_i = lambda * p_i^alpha = d_bar * (p_i / p_0)^alpha.
    # alpha = 1/2, d_bar = 64: 64 * (1, 1/16, 1/64)^(1/2) = (64, 16, 8).
    assert solve_mixed_dims(counts, 64, 0.5, 3) == [(10, 64), (90, 16), (900, 8)]
    # alpha = 1/4: 64 * (1, 1/2, 1/(2*sqrt 2)) = (64, 32, 22.63) -> 22.63 rounds to the multiple of
    # 4 nearest, 24 (TBE rows are multiples of 4 floats wide).
    assert solve_mixed_dims(counts, 64, 0.25, 3) == [(10, 64), (90, 32), (900, 24)]
    # base_dim = d_bar = 32 with D = 64: (32, 8, 4).
    assert solve_mixed_dims(counts, 64, 0.5, 3, base_dim=32) == [(10, 32), (90, 8), (900, 4)]
    # alpha = 1: (64, 4, 1) -> the last two clamp up to min_dim = 4, and blocks of one width merge.
    assert solve_mixed_dims(counts, 64, 1.0, 3) == [(10, 64), (990, 4)]
    # Ranking is by count, not by id: reversing the ids changes nothing but the remap.
    assert solve_mixed_dims(counts[::-1].copy(), 64, 0.5, 3) == [(10, 64), (90, 16), (900, 8)]


def test_without_counts_ids_are_ranked_by_value_with_a_zipf_prior():
    # p(rank r) ~ 1/(r+1); blocks of 1000 ids: [0,32), [32,1000) for 2 blocks (1000^(1/2) = 31.6).
    solved = solve_mixed_dims(None, 64, 1.0, 2, num_embeddings=1000)
    harmonic = 1.0 / np.arange(1, 1001)
    p = np.array([harmonic[:32].mean(), harmonic[32:].mean()])
    expected_tail = int(np.floor(64 * p[1] / p[0] / 4 + 0.5) * 4)
    assert solved == [(32, 64), (968, max(4, expected_tail))]


@pytest.mark.parametrize("n, blocks, expected", [(1000, 4, [6, 26, 146, 822]), (3, 4, [1, 1, 1]), (10, 1, [10]),
                                                  (10**6, 4, [32, 968, 30623, 968377])])
def test_geometric_block_sizes(n, blocks, expected):
    assert block_sizes(n, blocks) == expected


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), blocks=st.integers(1, 8))
def test_block_sizes_tile_the_ids(n, blocks):
    sizes = block_sizes(n, blocks)
    assert sum(sizes) == n and len(sizes) == min(n, blocks) and min(sizes) >= 1


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 10**6), min_size=1, max_size=300),
    blocks=st.integers(1, 6),
    alpha=st.floats(0.05, 1.0),
    budget_scale=st.floats(0.0, 1.2),
)
def test_budget_solver_fits_and_keeps_popular_blocks_wider(counts, blocks, alpha, budget_scale):
    counts = np.array(counts)
    dim = 32
    remap = bool(np.any(np.diff(counts) > 0))
    sizes = block_sizes(len(counts), blocks)
    narrow = mixed_dim_bytes(sizes, [4] * len(sizes), dim, remap)
    wide = mixed_dim_bytes(sizes, [dim] * len(sizes), dim, remap)  # no projections at all
    least, most = min(narrow, wide), max(narrow, wide)
    budget = int(least + budget_scale * (most - least))
    solved = solve_mixed_dims(counts, dim, alpha, blocks, budget)
    dims = [d for _, d in solved]
    assert sum(s for s, _ in solved) == len(counts)
    assert mixed_dim_bytes([s for s, _ in solved], dims, dim, remap) <= budget
    assert all(d % 4 == 0 and 4 <= d <= dim for d in dims)
    assert all(a > b for a, b in zip(dims, dims[1:]))  # more popular per id -> wider; equal widths merged
    below_any = (len(counts) + 1) * 4 * (4 + remap)  # 4-float rows alone (+ int32 remap), no projection
    with pytest.raises(ValueError, match="budget_bytes"):
        solve_mixed_dims(counts, dim, alpha, blocks, below_any - 1)


# -- index maths -------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 400),
    blocks=st.integers(1, 6),
    shuffle=st.booleans(),
    ids=st.lists(st.integers(-(2**62), 2**62), max_size=40),
)
def test_every_id_lands_in_exactly_one_block_and_known_ids_never_collide(n, blocks, shuffle, ids):
    sizes = block_sizes(n, blocks)
    starts = torch.tensor([0] + np.cumsum(sizes[:-1]).tolist())
    rows = torch.tensor(sizes[:-1] + [sizes[-1] + 1])
    remap = None
    if shuffle:
        remap = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(n)), torch.tensor([n])]).int()
    probe = torch.tensor(ids + list(range(-2, n + 2)), dtype=torch.int64)
    out = block_rows(id_ranks(probe, n, remap), starts, rows)
    placed = out >= 0
    assert torch.all(placed.sum(0) == 1)  # exactly one slot per id
    assert torch.all(out < rows.unsqueeze(1))  # in range of that block's table
    block = placed.to(torch.int64).argmax(0)
    row = out.max(0).values
    known = (probe >= 0) & (probe < n)
    pairs = set(zip(block[known].tolist(), row[known].tolist()))
    assert len(pairs) == len(set(probe[known].tolist()))  # distinct known ids -> distinct rows
    assert (len(sizes) - 1, sizes[-1]) not in pairs  # the OOV row belongs to unknown ids only
    assert torch.all(block[~known] == len(sizes) - 1) and torch.all(row[~known] == sizes[-1])


# -- through the collection --------------------------------------------------------------------
def test_pooled_equals_projected_rows_computed_by_hand():
    feats = features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, METHODS, seed=3)
    kjt = mixed_kjt(feats, batch=48, seed=4)
    out = collection(kjt).values()
    torch.testing.assert_close(out, reference_pooled(collection, kjt))
    lengths = kjt.lengths().view(len(feats), -1)
    for f in range(len(feats)):
        assert torch.all(out[:, f * DIM:(f + 1) * DIM][lengths[f] == 0] == 0)
    # The bags really mix blocks: some bag of "four" holds ids of >= 3 different blocks.
    config = collection.methods["four"]
    assert config.sizes == (4, 13, 55, 228)
    bags = kjt["four"].to_dense()
    blocks_per_bag = [{reference_location(config, feats[4], i)[0] for i in bag.tolist()} for bag in bags]
    assert max(len(b) for b in blocks_per_bag) >= 3


def test_blocks_follow_counts_and_unsorted_counts_use_a_remap():
    feats = features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, METHODS)
    unsorted = collection.layouts["unsorted"]
    counts = feats[2].counts
    assert unsorted.config.remap is True and "remap" in unsorted.state_dict()
    assert unsorted.config.dims[0] == DIM
    top = np.argsort(-counts, kind="stable")[: unsorted.config.sizes[0]]
    rows = unsorted.transform(torch.as_tensor(top))
    assert torch.all(rows[0] >= 0)  # the most frequent ids are in block 0 (dim D)
    assert all(torch.all(r == -1) for r in rows[1:])
    rarest = torch.as_tensor(np.argsort(-counts, kind="stable")[-5:])
    assert torch.all(unsorted.transform(rarest)[-1] >= 0)
    for name in ("sorted", "no_counts", "mean"):
        layout = collection.layouts[name]
        assert layout.config.remap is False and "remap" not in layout.state_dict()
        first = layout.transform(torch.arange(layout.config.sizes[0]))
        assert torch.equal(first[0], torch.arange(layout.config.sizes[0]))  # prepared ids: no remap needed
    assert collection.layouts["no_counts"].config.dims[0] == 8  # base_dim
    with pytest.raises(ValueError, match="remap"):
        CompressedEmbeddingBagCollection(feats, DIM, {"unsorted": MixedDim(remap=False)})


def test_adjacent_blocks_of_one_width_merge():
    feature = FeatureSpec("f", 100)
    config = MixedDim(dims=(16, 16, 8, 8), sizes=(3, 7, 20, 70))
    collection = CompressedEmbeddingBagCollection([feature], DIM, {"f": config})
    assert collection.methods["f"] == MixedDim(dims=(16, 8), sizes=(10, 90), remap=False, blocks=2)
    assert [(t.rows, t.dim) for t in collection.table_specs()] == [(10, 16), (91, 8)]
    assert collection.memory_bytes() == (10 * 16 + 91 * 8 + 8 * 16) * 4  # one projection for the merged pair


def test_memory_bytes_are_exact():
    feats = features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, METHODS)
    expected = (30 + 1) * DIM * 4  # the Full feature
    for f in feats[:5]:
        config = collection.methods[f.name]
        rows = list(config.sizes)
        rows[-1] += 1  # OOV row
        expected += sum(r * d * 4 for r, d in zip(rows, config.dims))
        expected += sum(d * DIM * 4 for d in config.dims if d < DIM)  # projections
        expected += (f.num_embeddings + 1) * 4 if config.remap else 0  # int32 id -> rank
        assert collection.layouts[f.name].extra_bytes() + sum(
            collection.table_specs()[t].bytes for t in collection.feature_tables(f.name)
        ) == mixed_dim_bytes(config.sizes, config.dims, DIM, config.remap)
    assert collection.memory_bytes() == expected


def test_budget_config_fits_and_is_resolved():
    feature = FeatureSpec("f", 5000, counts=zipf_counts(5000, 2, shuffle=True))
    full = (5000 + 1) * DIM * 4
    for budget in (full // 2, full // 3):
        collection = CompressedEmbeddingBagCollection([feature], DIM, {"f": MixedDim(budget_bytes=budget)})
        # Only 4 widths exist at D=16 and the tail block holds most ids: one step is coarse.
        assert budget * 0.7 < collection.memory_bytes() <= budget
        resolved = collection.methods["f"]
        assert resolved.budget_bytes is None and resolved.remap is True and resolved.dims[0] == DIM
        rebuilt = CompressedEmbeddingBagCollection([feature], DIM, {"f": resolved})
        assert rebuilt.memory_bytes() == collection.memory_bytes()
    with pytest.raises(ValueError, match="budget_bytes"):
        CompressedEmbeddingBagCollection([feature], DIM, {"f": MixedDim(budget_bytes=full // 5)})


def test_export_load_is_bit_identical(tmp_path):
    feats = features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, METHODS, optimizer=TableOptimizer(lr=0.3), seed=5)
    kjt = mixed_kjt(feats, batch=32, seed=6)
    collection(kjt).values().pow(2).sum().backward()  # move the tables away from their init
    with torch.no_grad():
        for p in collection.dense_parameters():
            p.mul_(1.5)
    loaded = CompressedEmbeddingBagCollection.load(collection.export(tmp_path / "art"))
    assert loaded.methods == collection.methods
    assert loaded.memory_bytes() == collection.memory_bytes()
    assert torch.equal(loaded(kjt).values(), collection(kjt).values())
    # The remap came from the artifact, not from counts (the manifest has none).
    assert loaded.features[2].counts is None
    assert torch.equal(loaded.layouts["unsorted"].remap, collection.layouts["unsorted"].remap)


def test_backward_reaches_used_rows_and_every_projection():
    feats = features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, METHODS, optimizer=TableOptimizer(kind="sgd", lr=0.1))
    kjt = mixed_kjt(feats, batch=48, seed=8)
    before = [w.detach().clone() for w in collection.table_weights()]
    collection(kjt).values().sum().backward()
    after = collection.table_weights()
    for f in feats[:5]:
        config = collection.methods[f.name]
        used = {reference_location(config, f, i) for i in kjt[f.name].values().tolist()}
        for block, t in enumerate(collection.feature_tables(f.name)):
            changed = set(torch.nonzero((before[t] != after[t]).any(dim=1)).flatten().tolist())
            assert changed == {row for b, row in used if b == block}, (f.name, block)
        projections = dict(collection.layouts[f.name].projections.items())
        assert set(projections) == {str(i) for i, d in enumerate(config.dims) if d < DIM}
        for p in projections.values():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert len(collection.dense_parameters()) >= 4


# -- budget fitter -----------------------------------------------------------------------------
def criteo_features() -> list[FeatureSpec]:
    out = []
    for i, n in enumerate(CRITEO):
        counts = None if i % 5 == 4 else zipf_counts(n, i, shuffle=(i == 2))
        out.append(FeatureSpec(f"C{i + 1}", n, counts=counts))
    return out


@pytest.mark.parametrize("dim, ratio, blocks", [(16, 2, 1), (16, 3, 1), (64, 10, 1), (16, 2, 4), (16, 3, 4),
                                                (64, 2, 4), (64, 10, 4)])
def test_budget_fitter_fits_criteo(dim, ratio, blocks):
    feats = criteo_features()
    full = sum((f.num_embeddings + 1) * dim * 4 for f in feats)
    budget = full // ratio
    methods = mixed_dim_methods_for_budget(feats, dim, budget, blocks=blocks)
    collection = CompressedEmbeddingBagCollection(feats, dim, methods)
    assert budget * 0.8 < collection.memory_bytes() <= budget
    assert isinstance(methods["C9"], Full) and isinstance(methods["C20"], Full)  # 3 and 4 ids
    c3 = methods["C3"]  # the largest feature, with shuffled counts
    assert isinstance(c3, MixedDim) and c3.remap is (blocks > 1) and len(c3.dims) <= blocks
    for m in methods.values():
        if isinstance(m, MixedDim):  # one scale for all blocks: rarer per id -> never wider
            assert list(m.dims) == sorted(m.dims, reverse=True) and m.dims[-1] < dim
    if blocks == 1:  # the paper's table-level rule: bigger tables never get wider rows
        sized = sorted((f.num_embeddings, methods[f.name].dims[0] if isinstance(methods[f.name], MixedDim) else dim)
                       for f in feats)
        assert [d for _, d in sized] == sorted((d for _, d in sized), reverse=True)


@pytest.mark.parametrize("dim, ratio", [(16, 10), (16, 100), (16, 1000), (64, 100), (64, 1000)])
def test_budget_fitter_refuses_budgets_below_one_narrow_row_per_id(dim, ratio):
    # Every id keeps a row of >= 4 floats, so mixed dims cannot go below ~D/4 of Full's bytes.
    feats = criteo_features()
    full = sum((f.num_embeddings + 1) * dim * 4 for f in feats)
    with pytest.raises(ValueError, match="budget_bytes"):
        mixed_dim_methods_for_budget(feats, dim, full // ratio)


def test_budget_fitter_keeps_everything_full_when_it_fits():
    feats = criteo_features()[:6]
    full = sum((f.num_embeddings + 1) * DIM * 4 for f in feats)
    assert mixed_dim_methods_for_budget(feats, DIM, full) == {f.name: Full() for f in feats}


# -- configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"alpha": -0.3}, "alpha"), ({"blocks": 0}, "blocks"),
     ({"min_dim": 3}, "min_dim"), ({"min_dim": 0}, "min_dim"), ({"base_dim": 6}, "base_dim"),
     ({"base_dim": 4, "min_dim": 8}, "base_dim"), ({"dims": (16, 6)}, "dims"), ({"dims": ()}, "dims"),
     ({"sizes": (0, 3)}, "sizes"), ({"dims": (8,), "sizes": (3, 4)}, "dims"), ({"blocks": 3, "dims": (8, 4)}, "blocks"),
     ({"dims": (8, 4), "budget_bytes": 1000}, "budget_bytes"), ({"budget_bytes": 0}, "budget_bytes"),
     ({"remap": "yes"}, "remap")],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MixedDim(**kwargs)


@pytest.mark.parametrize(
    "config, field",
    [(MixedDim(dims=(32, 8)), "dims"), (MixedDim(base_dim=32), "base_dim"), (MixedDim(min_dim=32), "min_dim"),
     (MixedDim(sizes=(10, 10)), "sizes"), (MixedDim(dims=(16,) * 60), "dims"),
     (MixedDim(budget_bytes=100), "budget_bytes")],
)
def test_invalid_for_the_feature_names_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        CompressedEmbeddingBagCollection([FeatureSpec("f", 50)], DIM, {"f": config})


def test_config_round_trips_through_dict():
    config = MixedDim(alpha=0.25, dims=(16, 8), sizes=(3, 7), remap=True)
    assert config_from_dict(config.to_dict()) == config
    assert config.to_dict()["type"] == "mixed_dim"


def test_a_single_block_needs_no_remap():
    # The paper's Criteo setting: one block per feature, so ranking ids inside it is pointless.
    feature = FeatureSpec("f", 100, counts=np.random.default_rng(0).integers(1, 50, 100))
    collection = CompressedEmbeddingBagCollection([feature], DIM, {"f": MixedDim(dims=(8,))})
    assert collection.methods["f"].remap is False and not collection.layouts["f"].may_drop
    assert collection.memory_bytes() == (101 * 8 + 8 * DIM) * 4
    ids = torch.tensor([5, 99, -1, 100])
    assert torch.equal(collection.layouts["f"].transform(ids)[0], torch.tensor([5, 99, 100, 100]))


# -- dropping the rarest ids (keep) ------------------------------------------------------------
def kept_location(config: MixedDim, feature: FeatureSpec, i: int) -> tuple[int, int] | None:
    """(block, row) of id ``i``, or None when it has no row: out of range, or rank >= keep."""
    if not 0 <= i < feature.num_embeddings:
        return None
    block, row = reference_location(config, feature, i)
    return None if sum(config.sizes[:block]) + row >= config.keep else (block, row)


def keep_features() -> list[FeatureSpec]:
    rng = np.random.default_rng(11)
    return [
        FeatureSpec("sorted", 200, counts=zipf_counts(200, 0)),
        FeatureSpec("unsorted", 180, counts=rng.integers(1, 1000, 180)),
        FeatureSpec("mean", 100, pooling="mean"),
        FeatureSpec("single", 120, counts=zipf_counts(120, 4)),
    ]


KEEP_METHODS = {
    "sorted": MixedDim(dims=(16, 8, 4), sizes=(10, 30, 160), keep=25),  # cuts the middle block
    "unsorted": MixedDim(alpha=0.5, blocks=3, keep=150),  # remap decides who keeps a row
    "mean": MixedDim(dims=(8, 4), sizes=(20, 80), keep=100),  # every known id kept, no OOV row
    "single": MixedDim(dims=(4,), keep=7),  # the fitter's shape: one block, a prefix of rows
}


def test_keep_truncates_blocks_and_bytes_are_exact():
    feats = keep_features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, KEEP_METHODS)
    sorted_, unsorted, mean, single = (collection.methods[f.name] for f in feats)
    # Blocks past rank 25 vanish: (16, 8) over (10, 190) ids, rows 10 and 15; no OOV row.
    assert (sorted_.dims, sorted_.sizes, sorted_.keep, sorted_.remap) == ((16, 8), (10, 190), 25, False)
    assert unsorted.remap is True and unsorted.keep == 150 and sum(unsorted.sizes) == 180
    assert (mean.dims, mean.sizes) == ((8, 4), (20, 80))
    assert (single.dims, single.sizes, single.remap) == ((4,), (120,), False)
    rows = [t.rows for t in collection.table_specs()]
    assert rows[:2] == [10, 15] and rows[-3:] == [20, 80, 7]
    assert all(collection.layouts[f.name].may_drop for f in feats)
    expected = 0
    for f in feats:
        config = collection.methods[f.name]
        nbytes = mixed_dim_bytes(config.sizes, config.dims, DIM, config.remap, config.keep)
        layout_bytes = collection.layouts[f.name].extra_bytes() + sum(
            collection.table_specs()[t].bytes for t in collection.feature_tables(f.name)
        )
        assert layout_bytes == nbytes
        expected += nbytes
    assert collection.memory_bytes() == expected
    assert mixed_dim_bytes((10, 190), (16, 8), DIM, False, 25) == (10 * 16 + 15 * 8 + 8 * DIM) * 4
    assert mixed_dim_bytes((120,), (4,), DIM, True, 7) == (7 * 4 + 4 * DIM) * 4 + 121 * 4  # remap: ranks matter


def test_dropped_ids_pool_as_zero_vectors_through_fbgemm():
    feats = keep_features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, KEEP_METHODS, seed=2)
    kjt = mixed_kjt(feats, batch=40, seed=3)
    weights = collection.table_weights()
    expected = []
    for f in feats:
        config, layout = collection.methods[f.name], collection.layouts[f.name]
        tables = [weights[t].detach() for t in collection.feature_tables(f.name)]
        pooled = torch.zeros(40, DIM)
        for b, bag in enumerate(kjt[f.name].to_dense()):
            for i in bag.tolist():
                where = kept_location(config, f, i)
                if where is not None:
                    vec = tables[where[0]][where[1]]
                    projection = layout.projection_of(where[0])
                    pooled[b] += vec if projection is None else vec @ projection.detach()
            if f.pooling.value == "mean" and len(bag):
                pooled[b] /= len(bag)  # a dropped id still counts in the mean: it is a zero vector
        expected.append(pooled)
    torch.testing.assert_close(collection(kjt).values(), torch.cat(expected, dim=1))
    single = feats[3]
    vectors = collection.lookup("single", torch.arange(-2, single.num_embeddings + 2))
    known = vectors[2:-2]
    assert torch.all(known[7:] == 0) and torch.all(vectors[:2] == 0) and torch.all(vectors[-2:] == 0)
    assert torch.all(known[:7].abs().sum(1) > 0)
    unsorted = collection.methods["unsorted"]
    top = np.argsort(-feats[1].counts, kind="stable")
    dropped = collection.lookup("unsorted", torch.as_tensor(top[unsorted.keep:]))
    assert torch.all(dropped == 0) and torch.all(collection.lookup("unsorted", torch.as_tensor(top[:unsorted.keep])).abs().sum(1) > 0)


def test_keep_round_trips_through_export(tmp_path):
    feats = keep_features()
    collection = CompressedEmbeddingBagCollection(feats, DIM, KEEP_METHODS, optimizer=TableOptimizer(lr=0.3), seed=5)
    kjt = mixed_kjt(feats, batch=24, seed=6)
    collection(kjt).values().pow(2).sum().backward()
    loaded = CompressedEmbeddingBagCollection.load(collection.export(tmp_path / "art"))
    assert loaded.methods == collection.methods and loaded.memory_bytes() == collection.memory_bytes()
    assert torch.equal(loaded(kjt).values(), collection(kjt).values())
    assert config_from_dict(KEEP_METHODS["sorted"].to_dict()) == KEEP_METHODS["sorted"]


@pytest.mark.parametrize(
    "kwargs, n, match",
    [({"keep": 0}, 50, r"keep must be None or an integer in \[1, num_embeddings\]"),
     ({"keep": 2.5}, 50, r"keep must be None or an integer in \[1, num_embeddings\]"),
     ({"keep": True}, 50, r"keep must be None or an integer in \[1, num_embeddings\]"),
     ({"keep": 51}, 50, r"keep must be in \[1, num_embeddings=50\]")],
)
def test_invalid_keep_names_the_field_and_range(kwargs, n, match):
    with pytest.raises(ValueError, match=match):
        CompressedEmbeddingBagCollection([FeatureSpec("f", n)], DIM, {"f": MixedDim(dims=(8,), **kwargs)})


def test_keep_needs_a_remap_when_counts_are_unsorted():
    feature = FeatureSpec("f", 60, counts=np.random.default_rng(1).integers(1, 50, 60))
    with pytest.raises(ValueError, match="remap"):
        CompressedEmbeddingBagCollection([feature], DIM, {"f": MixedDim(dims=(4,), keep=10, remap=False)})


# -- budget fitter below a row per id ------------------------------------------------------
def sorted_criteo_features() -> list[FeatureSpec]:
    """``criteo_features`` with C3's counts sorted, as prepared data has them: no remap needed."""
    feats = criteo_features()
    feats[2] = FeatureSpec("C3", CRITEO[2], counts=zipf_counts(CRITEO[2], 2))
    return feats


def criteo_probabilities(feats: list[FeatureSpec]) -> dict[str, np.ndarray]:
    """Per-id query probability of every feature in rank order (Zipf(1) prior without counts)."""
    out = {}
    for f in feats:
        counts = f.counts if f.counts is not None else 1.0 / np.arange(1, f.num_embeddings + 1)
        ranked = -np.sort(-np.asarray(counts, dtype=np.float64), kind="stable")
        out[f.name] = ranked / ranked.sum()
    return out


@pytest.mark.parametrize("ratio", [10, 100, 1000])
def test_drop_rare_fitter_reaches_budgets_below_a_row_per_id(ratio):
    # C3's shuffled counts need a 37884-entry remap, more than the 100x and 1000x budgets.
    feats = criteo_features() if ratio == 10 else sorted_criteo_features()
    full = sum((f.num_embeddings + 1) * DIM * 4 for f in feats)
    budget = full // ratio
    methods = mixed_dim_methods_for_budget(feats, DIM, budget, drop_rare=True)
    collection = CompressedEmbeddingBagCollection(feats, DIM, methods)
    assert 0.97 * budget < collection.memory_bytes() <= budget
    probabilities = criteo_probabilities(feats)
    last_kept, first_dropped = [], []
    for f in feats:
        m = methods[f.name]
        if isinstance(m, Full):
            continue
        assert m.keep is not None and 1 <= m.keep <= f.num_embeddings  # keep = n: only the OOV row goes
        assert collection.methods[f.name] == m  # the fitter's configs are already resolved
        layout_bytes = collection.layouts[f.name].extra_bytes() + sum(
            collection.table_specs()[t].bytes for t in collection.feature_tables(f.name)
        )
        assert layout_bytes == mixed_dim_bytes(m.sizes, m.dims, DIM, m.remap, m.keep)
        assert m.remap is (f.name == "C3" and ratio == 10)  # the one feature with shuffled counts
        assert list(m.dims) == sorted(m.dims, reverse=True)
        p = probabilities[f.name]
        if m.keep > 1:  # one row is kept whatever the rule says: a table needs one
            last_kept.append(p[m.keep - 1])
        if m.keep < f.num_embeddings:
            first_dropped.append(p[m.keep])
    assert len(first_dropped) >= 5  # the large features do drop ids
    # One scale for the whole collection: no dropped id is more popular than any kept one.
    assert max(first_dropped) <= min(last_kept)


@pytest.mark.parametrize("ratio, blocks", [(2, 1), (3, 1), (2, 4), (3, 4)])
def test_drop_rare_changes_nothing_where_a_row_per_id_fits(ratio, blocks):
    feats = criteo_features()
    full = sum((f.num_embeddings + 1) * DIM * 4 for f in feats)
    plain = mixed_dim_methods_for_budget(feats, DIM, full // ratio, blocks=blocks)
    assert mixed_dim_methods_for_budget(feats, DIM, full // ratio, blocks=blocks, drop_rare=True) == plain
    assert all(m.keep is None for m in plain.values() if isinstance(m, MixedDim))


def test_drop_rare_fitter_trains_and_drops_through_the_collection():
    feats = sorted_criteo_features()
    full = sum((f.num_embeddings + 1) * DIM * 4 for f in feats)
    methods = mixed_dim_methods_for_budget(feats, DIM, full // 1000, blocks=4, drop_rare=True)
    collection = CompressedEmbeddingBagCollection(feats, DIM, methods, optimizer=TableOptimizer(kind="sgd", lr=0.1))
    assert collection.memory_bytes() <= full // 1000
    c21 = methods["C21"]  # sorted counts: ids are ranks
    vectors = collection.lookup("C21", torch.arange(c21.keep + 3))
    assert torch.all(vectors[c21.keep:] == 0) and torch.all(vectors[: c21.keep].abs().sum(1) > 0)
    kjt = KeyedJaggedTensor(keys=[f.name for f in feats], values=torch.zeros(26, dtype=torch.int64),
                            lengths=torch.ones(26, dtype=torch.int64))  # fmt: skip
    before = [w.detach().clone() for w in collection.table_weights()]
    collection(kjt).values().sum().backward()
    assert any(not torch.equal(b, a) for b, a in zip(before, collection.table_weights()))


def test_drop_rare_refuses_budgets_below_one_row_per_feature():
    feats = criteo_features()
    with pytest.raises(ValueError, match="budget_bytes=1000 is below the smallest mixed-dim collection that drops"):
        mixed_dim_methods_for_budget(feats, DIM, 1000, drop_rare=True)
    # The shuffled C3 needs its id -> rank array to know which ids are rare: 37884 * 4 bytes.
    full = sum((f.num_embeddings + 1) * DIM * 4 for f in feats)
    with pytest.raises(ValueError, match="rank array"):
        mixed_dim_methods_for_budget(feats, DIM, full // 100, drop_rare=True)


# -- the CPU step's fast paths (benchmarks/NOTES.md, issue 3) against the paths they replace ---------
def _single_block_collection() -> CompressedEmbeddingBagCollection:
    """Single-block layouts with a remap (unsorted counts), with and without ``keep``, a
    two-block one (its own transform group), and Full and Pruned features between them."""
    from tablezip.compress import Pruned

    rng = np.random.default_rng(11)
    b_counts = rng.integers(0, 1000, 1000)
    b_counts[0] = 5000  # id 0 kept: its row differs from the OOV one (-1), which negative ids read
    feats = [
        FeatureSpec("a", 300, counts=rng.integers(0, 1000, 300)),
        FeatureSpec("full", 40),
        FeatureSpec("b", 1000, counts=b_counts),
        FeatureSpec("c", 77, counts=rng.integers(0, 1000, 77)),
        FeatureSpec("pruned", 500),
        FeatureSpec("d", 640, counts=rng.integers(0, 1000, 640)),
        FeatureSpec("e", 250, counts=rng.integers(0, 1000, 250)),
    ]
    methods = {
        "a": MixedDim(dims=(4,), keep=120),
        "full": Full(),
        "b": MixedDim(dims=(8,), keep=900),
        "c": MixedDim(dims=(4,)),  # no keep: every rank has a row, OOV included (and no remap then)
        "pruned": Pruned(keep=100, remap=False),
        "d": MixedDim(dims=(DIM,), keep=200),  # D wide: no projection
        "e": MixedDim(dims=(8, 4), sizes=(50, 200), keep=150),
    }
    return CompressedEmbeddingBagCollection(feats, DIM, methods, seed=3)


def _switch(coll: CompressedEmbeddingBagCollection, on: bool) -> CompressedEmbeddingBagCollection:
    from tablezip.compress.mixed_dim import MixedDimLayout
    from tablezip.embeddings.assemble import plan_for

    for layout in coll.layouts.values():
        if isinstance(layout, MixedDimLayout):
            layout.row_table = layout.single_block_test = on
    coll.unit_drops = on
    plan = plan_for(coll)
    assert plan is not None
    plan.lean_views = on and bool(plan.widths)
    return coll


def _ids(coll: CompressedEmbeddingBagCollection, count: int, seed: int) -> list[torch.Tensor]:
    """In range, negative, past the id space and the int64 extremes."""
    g = torch.Generator().manual_seed(seed)
    extremes = torch.tensor([-(2**63), -1, 0, 2**31, 2**63 - 1])
    out = []
    for f in coll.features:
        ids = torch.cat([torch.randint(-20, f.num_embeddings + 20, (count,), generator=g), extremes])
        out.append(ids[torch.randperm(ids.numel(), generator=g)])
    return out


def test_row_table_and_single_block_test_give_the_reference_rows():
    coll = _single_block_collection()
    groups = sorted(len(g.features) for g in coll._groups if g.cls.__name__ == "MixedDimLayout")
    assert groups == [1, 1, 3]  # a, b, d (one block, remap); c (one block, none); e (two blocks)
    for seed in range(3):
        ids = _ids(coll, 200, seed)
        coll.batch_transforms = False
        reference = coll.transform_ids(ids)
        coll.batch_transforms = True
        for on in (True, False):
            _switch(coll, on)
            for name, ref, got in zip(coll.feature_names, reference, coll.transform_ids(ids)):
                assert len(ref) == len(got)
                for a, b in zip(ref, got):
                    assert b.dtype == torch.int64 and torch.equal(a, b), (name, on)


def test_row_table_follows_remap_changes():
    """The table is derived from the remaps (state: ``load_state_dict``, in-place writes): a
    changed remap must rebuild it, never serve rows from the old one."""
    coll = _single_block_collection()
    ids = _ids(coll, 100, 0)
    coll.transform_ids(ids)  # builds the table
    state = coll.layouts["b"].state_dict()
    state["remap"] = torch.cat([torch.roll(state["remap"][:-1], 7), state["remap"][-1:]])
    coll.layouts["b"].load_state_dict(state)
    with torch.no_grad():
        coll.layouts["a"].remap[:10] = torch.flip(coll.layouts["a"].remap[:10], [0])
    got = coll.transform_ids(ids)
    coll.batch_transforms = False
    reference = coll.transform_ids(ids)
    for ref, new in zip(reference, got):
        assert all(torch.equal(a, b) for a, b in zip(ref, new))


@pytest.mark.parametrize("bags", ["single", "random"])
def test_step_fast_paths_are_bitwise_the_old_paths(bags):
    """Row table, single-block test, drops compacted over all slots at once (bags of one id) and
    the assemble's hoisted views against a twin with all of them off: same outputs, projection
    gradients, tables and optimizer state, bit for bit (the same float ops in the same order)."""
    import copy

    fast = _switch(_single_block_collection(), True)
    slow = _switch(copy.deepcopy(fast), False)
    names = fast.feature_names
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        if bags == "single":
            lengths = torch.ones(len(names) * 32, dtype=torch.int64)
        else:
            lengths = torch.randint(0, 3, (len(names) * 32,), generator=g)
        values = torch.randint(-5, 1100, (int(lengths.sum()),), generator=g)
        kjt = KeyedJaggedTensor(keys=names, values=values, lengths=lengths)
        weights = None
        seen: dict[bool, list[torch.Tensor]] = {}
        for model in (fast, slow):
            for p in model.dense_parameters():
                p.grad = None
            out = model(kjt).values()
            if weights is None:
                weights = torch.randn(out.shape, generator=g)
            loss = (out * weights).sum() if step % 2 == 0 else out.sum()  # dense and expanded gradients
            loss.backward()
            grads = [p.grad.clone() for p in model.dense_parameters() if p.grad is not None]
            seen[model is fast] = [out.detach()] + grads
        assert len(seen[True]) == len(seen[False]) > 1
        assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False]))
    for a, b in zip(fast.table_weights(), slow.table_weights()):
        assert torch.equal(a, b)
    states = [[t for per in m.tbe.split_optimizer_states() for t in per] for m in (fast, slow)]
    assert all(torch.equal(a, b) for a, b in zip(*states))


def test_unit_drops_leave_rows_of_layouts_that_never_drop_to_fbgemm_check(monkeypatch):
    """Compacting every slot at once must not hide a -1 from a layout that never drops (a bug):
    fbgemm's forward kernel still sees it and refuses it (the TBE path: the fused C lookup, which
    never calls ``transform_batch``, is off)."""
    from tablezip.compress import fused_cpu
    from tablezip.compress.full import FullLayout

    monkeypatch.setattr(fused_cpu._switch, "value", "off")

    coll = _single_block_collection()
    names = coll.feature_names
    ones = torch.ones(len(names) * 4, dtype=torch.int64)
    kjt = KeyedJaggedTensor(keys=names, values=torch.arange(len(names) * 4) % 40, lengths=ones)
    coll(kjt)  # fine

    def minus_one(cls, layouts, batch):
        return batch.split_slots([torch.full_like(batch.ids, -1)])

    monkeypatch.setattr(FullLayout, "transform_batch", classmethod(minus_one))
    with pytest.raises(RuntimeError, match="out of bounds"):
        coll(kjt)


def test_projection_weights_are_the_combine_forms_weights_in_block_order():
    """The fused assemble reads ``projection_weights`` each forward instead of building the
    form: the same Parameter objects, D-wide blocks skipped, also after a projection is replaced."""
    feature = FeatureSpec("f", 1000)
    layout = CompressedEmbeddingBagCollection([feature], 16, {"f": MixedDim(dims=(16, 8, 4), sizes=(100, 300, 600))}).layouts["f"]
    form = [w for w in layout.combine_form().weights if w is not None]
    assert len(form) == 2 and all(a is b for a, b in zip(layout.projection_weights(), form))
    layout.projections["2"] = torch.nn.Parameter(torch.zeros(4, 16))
    assert layout.projection_weights()[1] is layout.projections["2"]
    assert [w.shape for w in layout.projection_weights()] == [torch.Size([8, 16]), torch.Size([4, 16])]
