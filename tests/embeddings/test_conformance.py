"""One conformance suite over every registered method: what any method must guarantee."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec, MethodConfig, registered
from tests.conftest import random_kjt

DIM = 8
# Skewed counts so frequency-aware methods see a realistic, non-trivial ranking.
_rng = np.random.default_rng(0)
FEATURES = [
    FeatureSpec("small", 12, counts=np.sort(_rng.zipf(1.3, 12))[::-1].copy()),
    FeatureSpec("large", 3000, counts=np.sort(_rng.zipf(1.3, 3000))[::-1].copy()),
    FeatureSpec("mean", 500, pooling="mean", counts=np.sort(_rng.zipf(1.3, 500))[::-1].copy()),
]
NAMES = [f.name for f in FEATURES]

# kind -> (factory of one valid config for a feature, kwargs of an invalid config, field it must name)
EXAMPLES: dict[str, tuple[Callable[[FeatureSpec], MethodConfig], dict, str]] = {}


def example(kind: str, invalid: dict, field: str):
    def wrap(factory):
        EXAMPLES[kind] = (factory, invalid, field)
        return factory

    return wrap


@example("full", {}, "")
def _full(f):
    from tablezip.compress import Full

    return Full()


@example("hash", {"rows": 0}, "rows")
def _hash(f):
    from tablezip.compress import Hash

    return Hash(rows=max(2, f.num_embeddings // 7), seed=1)


@example("multihash", {"rows": 0}, "rows")
def _multihash(f):
    from tablezip.compress import MultiHash

    return MultiHash(rows=max(2, f.num_embeddings // 7), probes=2, seed=1)


@example("qr", {"collisions": 0}, "collisions")
def _qr(f):
    from tablezip.compress import QR

    return QR(collisions=4)


@example("kway", {"partitions": (4,)}, "partitions")
def _kway(f):
    from tablezip.compress import KWay

    side = 2
    while side**3 < f.num_embeddings + 1:
        side += 1
    return KWay(partitions=(side, side, side), op="add")


@example("unified", {"rows": 0}, "rows")
def _unified(f):
    from tablezip.compress import Unified

    return Unified(rows=257, chunks=2, seed=1)


@example("hybrid", {"hot": -1, "cold_rows": 4}, "hot")
def _hybrid(f):
    from tablezip.compress import Hybrid

    return Hybrid(hot=f.num_embeddings // 4, cold_rows=max(2, f.num_embeddings // 16), seed=1)


@example("pruned", {"keep": 0}, "keep")
def _pruned(f):
    from tablezip.compress import Pruned

    # "default": pruned ids still train a row, so backward reaches every table
    return Pruned(keep=max(1, (f.num_embeddings + 1) // 4), missing="default")


@example("learned_threshold", {"init": float("nan")}, "init")
def _learned_threshold(f):
    from tablezip.compress import LearnedThreshold

    return LearnedThreshold()  # t = 0 keeps every row, so every row gets a gradient


@example("mixed_dim", {"alpha": 0.0}, "alpha")
def _mixed_dim(f):
    from tablezip.compress import MixedDim

    # Two blocks of half the ids each, so random test ids reach both (alpha sizing: test_mixed_dim.py).
    # The 12-id feature gets one projected block: test ids rarely fall in its id space.
    if f.num_embeddings < 100:
        return MixedDim(dims=(4,), sizes=(f.num_embeddings,))
    if f.pooling.value == "mean":  # the low-budget fit's shape: one block, the rarest 20% without a row
        return MixedDim(dims=(4,), keep=f.num_embeddings * 4 // 5)
    half = f.num_embeddings // 2
    return MixedDim(dims=(8, 4), sizes=(half, f.num_embeddings - half))


KINDS = sorted(registered())


def build(kind: str, seed: int = 0) -> CompressedEmbeddingBagCollection:
    factory = EXAMPLES[kind][0]
    return CompressedEmbeddingBagCollection(FEATURES, DIM, {f.name: factory(f) for f in FEATURES}, seed=seed)


def test_every_registered_method_has_a_conformance_example():
    assert set(KINDS) == set(EXAMPLES), "add an example for each new method to EXAMPLES"


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_finiteness_and_empty_bags(kind):
    coll = build(kind)
    kjt = random_kjt(NAMES, 32, 3000, max_len=4, seed=1)
    out = coll(kjt).values()
    assert out.shape == (32, len(FEATURES) * DIM) and torch.isfinite(out).all()
    empty = (kjt.lengths().view(len(FEATURES), 32) == 0)
    for i in range(len(FEATURES)):
        assert torch.all(out[empty[i], i * DIM:(i + 1) * DIM] == 0)


@pytest.mark.parametrize("kind", KINDS)
def test_sum_pooling_is_the_sum_of_single_id_bags(kind):
    """Catches a wrong pooling order (e.g. combining pooled rows of a non-linear method)."""
    coll = build(kind)
    kjt = random_kjt(NAMES, 16, 3000, max_len=5, seed=2)
    pooled = coll(kjt).values().view(16, len(FEATURES), DIM)
    lengths = kjt.lengths().view(len(FEATURES), 16)
    counts = lengths.sum(1)
    n = int(counts.max())
    # every id in a bag of its own; features with fewer ids get trailing empty bags
    single_lengths = (torch.arange(n).unsqueeze(0) < counts.unsqueeze(1)).long().view(-1)
    singles = KeyedJaggedTensor(keys=NAMES, values=kjt.values(), lengths=single_lengths)
    per_id = coll(singles).values().view(n, len(FEATURES), DIM)
    for i, f in enumerate(FEATURES):
        vecs = per_id[: int(counts[i]), i]
        bags = torch.repeat_interleave(torch.arange(16), lengths[i])
        expected = torch.zeros(16, DIM).index_add_(0, bags, vecs)
        if f.pooling.value == "mean":
            expected = expected / lengths[i].clamp(min=1).unsqueeze(1)
        torch.testing.assert_close(pooled[:, i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_space_ids_follow_a_contract(kind):
    coll = build(kind)
    ids = torch.tensor([-1, -(2**40), 3000, 10**12, 0])
    kjt = KeyedJaggedTensor(keys=NAMES, values=ids.repeat(len(FEATURES)), lengths=torch.ones(5 * len(FEATURES), dtype=torch.long))
    out = coll(kjt).values()
    assert torch.isfinite(out).all()
    # deterministic: the same unknown id gives the same vector twice
    torch.testing.assert_close(coll(kjt).values(), out, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_reaches_every_parameter(kind):
    coll = build(kind)
    kjt = random_kjt(NAMES, 64, 3000, max_len=3, seed=3)
    before = [w.detach().clone() for w in coll.table_weights()]
    coll(kjt).values().pow(2).sum().backward()
    for i, (b, a) in enumerate(zip(before, coll.table_weights())):
        assert not torch.equal(b, a), f"table {i} untouched"
    for name, p in coll.named_parameters():
        if any(p is q for q in coll.fused_parameters()):
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_export_load_parity_and_bytes(kind, tmp_path):
    coll = build(kind, seed=3)
    coll(random_kjt(NAMES, 16, 3000, seed=4)).values().sum().backward()
    loaded = CompressedEmbeddingBagCollection.load(coll.export(tmp_path / kind))
    kjt = random_kjt(NAMES, 64, 3000, max_len=4, seed=5, id_low=-2)
    with torch.no_grad():
        assert torch.equal(loaded(kjt).values(), coll(kjt).values())
    assert loaded.memory_bytes() == coll.memory_bytes()
    stored = sum(w.numel() * w.element_size() for w in coll.table_weights())
    stored += sum(t.numel() * t.element_size() for l in coll.layouts.values() for t in l.state_dict().values())
    assert coll.memory_bytes() == stored


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_model(kind):
    kjt = random_kjt(NAMES, 8, 3000, seed=6)
    torch.manual_seed(0)
    a = build(kind, seed=9)(kjt).values()
    torch.manual_seed(0)
    b = build(kind, seed=9)(kjt).values()
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", [k for k in KINDS if EXAMPLES.get(k, (None, {}, ""))[2]])
def test_invalid_config_names_the_field(kind):
    _, invalid, field = EXAMPLES[kind]
    with pytest.raises(ValueError, match=field):
        registered()[kind](**invalid)


@pytest.mark.parametrize("kind", KINDS)
def test_single_tbe_matches_one_embedding_bag_per_table(kind):
    """The one-TBE plumbing (slots, offsets, dropped ids, unpooled slots) against a plain loop
    over torch.nn.EmbeddingBag modules holding the same weights."""
    from benchmarks.baselines import LoopedCollection

    coll = build(kind, seed=2)
    looped = LoopedCollection(coll)
    kjt = random_kjt(NAMES, 32, 3000, max_len=4, seed=7, id_low=-2)
    one_id_each = KeyedJaggedTensor(keys=NAMES, values=torch.arange(-2, 94), lengths=torch.ones(96, dtype=torch.long))
    with torch.no_grad():
        for batch in (kjt, one_id_each):  # the collection has a shortcut for one id per bag
            torch.testing.assert_close(coll(batch).values(), looped(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_lookup_is_the_single_id_bag_and_survives_load_inference(kind, tmp_path):
    """``lookup`` is what serving returns: it must equal the model's own vector for a bag of one id."""
    from tablezip.embeddings import load_inference

    coll = build(kind, seed=4)
    ids = torch.tensor([0, 5, 2999, 3000, -1, 7])
    for i, name in enumerate(NAMES):
        singles = KeyedJaggedTensor(
            keys=NAMES,
            values=ids.repeat(len(NAMES)),
            lengths=torch.ones(len(NAMES) * ids.numel(), dtype=torch.long),
        )
        with torch.no_grad():
            expected = coll(singles).values()[:, i * DIM : (i + 1) * DIM]
        assert torch.equal(coll.lookup(name, ids), expected)
    served = load_inference(coll.export(tmp_path / kind))
    assert not served.training
    assert torch.equal(served.lookup(NAMES[-1], ids), coll.lookup(NAMES[-1], ids))
    with pytest.raises(KeyError, match="unknown feature"):
        coll.lookup("nope", ids)
