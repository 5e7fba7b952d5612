"""DIN-style field attention on Criteo-like data: query/key split, attention maths, training."""
from __future__ import annotations

import pytest
import torch

from tablezip.compress import Hash
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec
from tablezip.models import FieldAttention, default_query_fields
from tests.conftest import random_kjt

FEATURES = [FeatureSpec("a", 20), FeatureSpec("b", 300), FeatureSpec("c", 5), FeatureSpec("d", 50)]
NAMES = [f.name for f in FEATURES]


def build(query=("b",), seed: int = 0, num_dense: int = 3) -> FieldAttention:
    torch.manual_seed(seed)
    coll = CompressedEmbeddingBagCollection(FEATURES, 4, {"b": Hash(rows=16)}, seed=seed)
    return FieldAttention(coll, num_dense=num_dense, query_fields=query, attention=(8,), hidden=(16, 8), bottom=(8,))


def test_default_query_fields_are_the_highest_cardinality_in_feature_order():
    assert default_query_fields(FEATURES, 2) == ["b", "d"]
    with pytest.raises(ValueError, match="query field count"):
        default_query_fields(FEATURES, 4)


@pytest.mark.parametrize(
    "query, match",
    [((), "query_fields"), (("zz",), "unknown \\['zz'\\]"), (("a", "a"), "distinct"), (tuple(NAMES), "key field")],
)
def test_bad_query_fields_name_the_problem(query, match):
    coll = CompressedEmbeddingBagCollection(FEATURES, 4)
    with pytest.raises(ValueError, match=match):
        FieldAttention(coll, num_dense=3, query_fields=query)


def test_attention_is_the_unit_applied_to_keys_against_the_query_mean():
    model = build(query=("b", "d"))
    model.eval()  # Dice uses running statistics: per-sample maths independent of the batch
    kjt = random_kjt(NAMES, 5, 20, seed=1)
    pooled = model.embeddings(kjt).values().view(5, 4, 4)
    query, weights, context = model.attend(pooled)
    torch.testing.assert_close(query, (pooled[:, 1] + pooled[:, 3]) / 2)
    keys = pooled[:, [0, 2]]
    expected_w = model.attention.mlp(model.attention.features(keys, query.unsqueeze(1))).squeeze(-1)
    torch.testing.assert_close(weights, expected_w)
    torch.testing.assert_close(context, (expected_w.unsqueeze(-1) * keys).sum(1))


def test_prediction_of_a_sample_does_not_depend_on_its_batch_in_eval():
    model = build().eval()
    dense = torch.randn(6, 3)
    kjt = random_kjt(NAMES, 6, 20, seed=2)
    full = model(dense, kjt)
    first = model(dense[:1], _first(kjt))
    torch.testing.assert_close(full[:1], first)


def _first(kjt):
    """The first sample of a KJT as a batch of one."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    lengths = kjt.lengths().view(len(NAMES), -1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.reshape(-1).cumsum(0)]).view(-1)
    values, per = [], []
    for f in range(len(NAMES)):
        start = int(offsets[f * lengths.shape[1]])
        n = int(lengths[f, 0])
        values.append(kjt.values()[start:start + n])
        per.append(n)
    return KeyedJaggedTensor(keys=NAMES, values=torch.cat(values), lengths=torch.tensor(per))


def test_learns_a_pairing_between_the_query_and_a_key_field_end_to_end():
    """Label = 1 iff key field 'a' carries the id its query 'b' points to (a pairing).

    The logit needs b-and-a jointly; gradients must flow through attention, the MLP and the
    fused TBE update. A few hundred steps get well above chance."""
    torch.manual_seed(0)
    model = build(query=("b",), num_dense=0)
    fused = {id(p) for p in model.embeddings.fused_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in fused], lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        b = torch.randint(0, 10, (n,), generator=gen)
        match = torch.rand(n, generator=gen) < 0.5
        a = torch.where(match, b, (b + torch.randint(1, 10, (n,), generator=gen)) % 10)
        c = torch.randint(0, 5, (n,), generator=gen)
        d = torch.randint(0, 50, (n,), generator=gen)
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        kjt = KeyedJaggedTensor(keys=NAMES, values=torch.cat([a, b, c, d]), lengths=torch.ones(4 * n, dtype=torch.long))
        return torch.zeros(n, 0), kjt, match.float()

    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(400):
        dense, kjt, y = batch(256)
        loss = loss_fn(model(dense, kjt), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dense, kjt, y = batch(2000)
    with torch.no_grad():
        acc = ((model(dense, kjt) > 0).float() == y).float().mean().item()
    assert acc > 0.8, acc
