"""The byte-budget planner: exact bytes, the knapsack, the proxy, plan JSON."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tablezip.compress import Full, Hash
from tablezip.compress.planner import (
    FeatureData,
    Plan,
    _hull,
    _Option,
    choose,
    config_bytes,
    plan_budget,
    proxy_gain,
    row_bytes,
)
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec


def planted(n_ids: int, rows: int, seed: int) -> FeatureData:
    """Zipf-ish ids whose click rate depends on the id: a feature worth keeping exactly."""
    rng = np.random.default_rng(seed)
    ctr = rng.uniform(0.02, 0.6, n_ids)
    def draw(k):
        ids = np.minimum(rng.zipf(1.3, k) - 1, n_ids - 1)
        return ids, (rng.random(k) < ctr[ids]).astype(np.float64)
    (ti, tl), (vi, vl) = draw(rows), draw(rows // 4)
    return FeatureData(ti, tl, vi, vl)


def test_fp32_config_bytes_equal_the_collection_memory_bytes():
    f = FeatureSpec("a", 5000)
    for config in (Full(), Hash(rows=300)):
        coll = CompressedEmbeddingBagCollection([f], 16, {"a": config})
        assert config_bytes(f, 16, config) == coll.memory_bytes()
    assert row_bytes(16, "int8") == 20 and row_bytes(16, "int4") == 12 and row_bytes(16, "float16") == 32
    with pytest.raises(ValueError, match="dtype must be one of"):
        row_bytes(16, "int2")


def test_proxy_prefers_exact_rows_to_collisions_and_noise_features_gain_nothing():
    f = FeatureSpec("a", 2000)
    data = planted(2000, 40_000, seed=0)
    full = proxy_gain(f, 16, Full(), data)
    hashed = proxy_gain(f, 16, Hash(rows=16), data)
    assert full > hashed > 0
    rng = np.random.default_rng(1)
    noise = FeatureData(rng.integers(0, 2000, 40_000), data.train_labels, rng.integers(0, 2000, 10_000), data.valid_labels)
    assert proxy_gain(f, 16, Full(), noise) < 0.05 * full


def brute_force(options: dict[str, list[_Option]], budget: int) -> float:
    best = -np.inf
    for combo in itertools.product(*options.values()):
        if sum(o.bytes for o in combo) <= budget:
            best = max(best, sum(o.gain for o in combo))
    return best


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(1, 50), st.floats(0, 10)), min_size=1, max_size=5), min_size=1, max_size=4),
    st.integers(0, 150),
)
def test_knapsack_fits_and_is_within_one_step_of_the_optimum(raw, budget):
    options = {
        f"f{i}": [_Option(Hash(rows=8 + j), b, g) for j, (b, g) in enumerate(opts)] for i, opts in enumerate(raw)
    }
    chosen = choose(options, budget)
    cheapest = sum(min(o.bytes for o in opts) for opts in options.values())
    if chosen is None:
        assert cheapest > budget
        return
    assert sum(o.bytes for o in chosen.values()) <= budget
    # greedy over concave hulls loses at most one hull step against the true optimum
    step = max(
        [h[i].gain - h[i - 1].gain for h in map(_hull, options.values()) for i in range(1, len(h))] + [0.0]
    )
    assert sum(o.gain for o in chosen.values()) >= brute_force(options, budget) - step - 1e-9


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.integers(2, 3000), min_size=1, max_size=5),
    st.floats(1.5, 500),
    st.sampled_from([("float32",), ("int8",), ("float32", "int8", "int4")]),
)
def test_plan_never_exceeds_its_budget_and_its_bytes_are_exact(sizes, ratio, dtypes):
    features = [FeatureSpec(f"f{i}", n) for i, n in enumerate(sizes)]
    data = {f.name: planted(f.num_embeddings, 2000, seed=i) for i, f in enumerate(features)}
    budget = max(1, int(sum((n + 1) * 16 * 4 for n in sizes) / ratio))  # 0 is refused as budget_bytes, not tested here
    try:
        plan = plan_budget(features, 16, budget, data, dtypes=dtypes, keep_full_below=10)
    except ValueError as err:
        assert "below the smallest plan" in str(err)
        return
    assert plan.bytes <= budget
    assert plan.bytes == sum(config_bytes(f, 16, plan.methods[f.name], plan.dtype) for f in features)
    if plan.dtype == "float32":
        coll = CompressedEmbeddingBagCollection(features, 16, plan.methods_for(features, 16))
        assert coll.memory_bytes() == plan.bytes


def test_small_features_stay_full_and_big_ones_get_compressed():
    features = [FeatureSpec("small", 50), FeatureSpec("big", 20_000)]
    data = {"small": planted(50, 5000, 0), "big": planted(20_000, 20_000, 1)}
    budget = 51 * 64 + 2000 * 64
    plan = plan_budget(features, 16, budget, data, dtypes=("float32",), keep_full_below=100)
    assert plan.methods["small"] == Full() and plan.methods["big"].kind != "full"
    assert plan.bytes <= budget


def test_plan_json_round_trip_and_clear_rejections(tmp_path):
    features = [FeatureSpec("a", 300), FeatureSpec("b", 40)]
    data = {"a": planted(300, 3000, 0), "b": planted(40, 3000, 1)}
    plan = plan_budget(features, 16, 100 * 64, data, keep_full_below=50)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.methods_for(features, 16) == dict(plan.methods)
    with pytest.raises(ValueError, match=r"unknown features \['a'\]"):
        again.methods_for([FeatureSpec("b", 40), FeatureSpec("c", 40)], 16)
    with pytest.raises(ValueError, match="other vocabularies"):
        again.methods_for([FeatureSpec("a", 301), FeatureSpec("b", 40)], 16)
    with pytest.raises(ValueError, match="dim 16"):
        again.methods_for(features, 8)
    broken = json.loads(plan.to_json())
    broken["format"] = "x"
    with pytest.raises(ValueError, match="not a tablezip plan"):
        Plan.from_dict(broken)
    del broken["format"]
    broken = json.loads(plan.to_json())
    del broken["features"][0]["method"]
    with pytest.raises(ValueError, match="malformed field"):
        Plan.from_dict(broken)
    with pytest.raises(ValueError, match="budget_bytes=10 is below the smallest plan"):
        plan_budget(features, 16, 10, data)
    with pytest.raises(ValueError, match="no planning data"):
        plan_budget(features, 16, 10_000, {"a": data["a"]})
