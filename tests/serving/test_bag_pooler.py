"""LookupBags for Full features without the model's forward (``NumpyBagPooler``): the same bits
as ``module(kjt)`` for every bag shape, sum and mean pooling, OOV ids, stored -0.0 and NaN, and
the forward is still used wherever the pooler does not cover the request."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import Full, Hash
from tablezip.embeddings import CompressedEmbeddingBagCollection
from tablezip.serving import reader as reader_module
from tablezip.serving.compute import pool_bags
from tablezip.serving.model import load_model
from tablezip.serving.validation import Limits
from tests.embeddings.test_conformance import DIM, FEATURES, NAMES

from .test_parity import bits, trained

SIGNALING_NAN = np.array([0x7F800001], dtype=np.uint32).view(np.float32)[0]


def forward(coll: CompressedEmbeddingBagCollection, lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The model's answer [B, F, D] for all of its features (``lengths`` [F, B])."""
    kjt = KeyedJaggedTensor(keys=NAMES, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths.reshape(-1)))
    with torch.no_grad():
        return coll(kjt).values().view(lengths.shape[1], len(NAMES), DIM).numpy()


def bags(pattern: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``pattern`` rotated per feature as [F, B] lengths, random ids with OOV and huge ones mixed in."""
    rng = np.random.default_rng(seed)
    lengths = np.stack([np.roll(np.asarray(pattern, dtype=np.int32), f) for f in range(len(NAMES))])
    values = rng.integers(0, 3200, int(lengths.sum()))  # "small" has 12 ids, "mean" 500, "large" 3000: many OOV
    values[rng.choice(values.size, min(4, values.size), replace=False)] = [2**40, 2**62, 3000, 12][: min(4, values.size)]
    return lengths, values


# Each way the pooler sums: <= 1 id per bag (all ones, and with empty bags), short padded bags,
# and a long bag among empty ones (np.add.at).
PATTERNS = [[1] * 6, [1, 0, 1, 1, 0, 0, 1], [2, 0, 1, 3, 7, 1, 0, 4], [0, 0, 150, 0, 1, 0, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    """A trained Full model (one mean feature) whose "large" table holds -0.0, a quiet NaN and a
    signaling NaN, served from its exported artifact."""
    coll = trained("full")
    with torch.no_grad():
        table = coll.table_weights()[coll.feature_tables("large")[0]]
        table[7] = torch.tensor([-0.0, 0.0, float("nan"), -1.5, -0.0, 2.0, -0.0, 1e-40])
        table[8, 0] = torch.from_numpy(np.array([SIGNALING_NAN]))
        table[9] = -0.0
    return coll, coll.export(tmp_path_factory.mktemp("pooler") / "full")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pooler_gives_the_forward_bits_over_a_real_server(pattern, full_model, serve, connect):
    coll, artifact = full_model
    server = serve(artifact)
    pooler = server.holder.current.bag_pooler
    assert pooler is not None and pooler.covers(list(range(len(NAMES))))  # the fast path serves these features
    client = connect(server)
    lengths, values = bags(pattern, seed=len(pattern))
    got = client.lookup_bags(NAMES, lengths.reshape(-1), values)
    np.testing.assert_array_equal(bits(got), bits(forward(coll, lengths, values)))
    # A subset in another order: the model sees the rest as empty bags.
    order = [2, 0]
    per_feature = np.split(values, np.cumsum(lengths.sum(axis=1))[:-1])
    zeroed = np.zeros_like(lengths)
    zeroed[order] = lengths[order]
    expected = forward(coll, zeroed, np.concatenate([per_feature[i] for i in sorted(order)]))[:, order]
    got = client.lookup_bags([NAMES[i] for i in order], lengths[order].reshape(-1), np.concatenate([per_feature[i] for i in order]))
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_stored_negative_zero_and_nan_rows_in_bags(full_model, serve, connect):
    """TBE sums into +0.0: -0.0 comes back +0.0 and a signaling NaN comes back quiet, in bags of one
    and in longer bags, and the same through Lookup."""
    coll, artifact = full_model
    client = connect(serve(artifact))
    large = NAMES.index("large")
    lengths = np.zeros((len(NAMES), 4), dtype=np.int32)
    lengths[large] = [1, 1, 2, 1]
    values = np.array([7, 8, 9, 9, 9], dtype=np.int64)
    got = client.lookup_bags(NAMES, lengths.reshape(-1), values)
    expected = forward(coll, lengths, values)
    np.testing.assert_array_equal(bits(got), bits(expected))
    assert not np.signbit(got[0, large, [0, 4, 6]]).any() and not np.signbit(got[2:, large]).any()
    assert bits(got)[1, large, 0] == 0x7FC00001  # quieted, as TBE does
    np.testing.assert_array_equal(bits(client.lookup("large", [7, 8, 9])), bits(coll.lookup("large", torch.tensor([7, 8, 9])).numpy()))


def test_mixed_model_uses_the_pooler_only_where_it_covers(tmp_path, serve, connect):
    methods = {"small": Full(), "large": Hash(rows=101), "mean": Full()}
    coll = CompressedEmbeddingBagCollection(FEATURES, DIM, methods, seed=5)
    coll(KeyedJaggedTensor(keys=NAMES, values=torch.arange(12) % 12, lengths=torch.ones(12, dtype=torch.int64))).values().sum().backward()
    coll.eval()
    server = serve(coll.export(tmp_path / "mixed"))
    pooler = server.holder.current.bag_pooler
    assert pooler is not None and pooler.covers([0, 2]) and not pooler.covers([0, 1])
    client = connect(server)
    lengths, values = bags([2, 0, 1, 3, 1], seed=9)
    np.testing.assert_array_equal(bits(client.lookup_bags(NAMES, lengths.reshape(-1), values)), bits(forward(coll, lengths, values)))
    only = lengths.copy()
    only[1] = 0
    per_feature = np.split(values, np.cumsum(lengths.sum(axis=1))[:-1])
    subset = np.concatenate([per_feature[2], per_feature[0]])
    expected = forward(coll, only, np.concatenate([per_feature[0], per_feature[2]]))[:, [2, 0]]
    got = client.lookup_bags(["mean", "small"], lengths[[2, 0]].reshape(-1), subset)
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_chunked_pooling_equals_one_shot(full_model):
    coll, artifact = full_model
    model = load_model(str(artifact))
    lengths, values = bags([0, 1, 2, 3, 1, 1, 5, 0, 1] * 40, seed=3)
    positions = list(range(len(NAMES)))
    whole = pool_bags(model, positions, lengths, values, lambda stage: None)
    assert isinstance(whole, np.ndarray)  # the pooler, not the forward
    chunked = pool_bags(model, positions, lengths, values, lambda stage: None, chunk=50)
    np.testing.assert_array_equal(bits(np.ascontiguousarray(whole)), bits(chunked))
    np.testing.assert_array_equal(bits(np.ascontiguousarray(whole)), bits(forward(coll, lengths, values)))


def test_a_pooler_that_disagrees_with_the_model_is_not_used(full_model, monkeypatch, caplog):
    """The load-time check can fail: a pooler that sums pairwise (like np.add.reduceat) is refused."""
    _, artifact = full_model

    def pairwise(table, rows, lengths, max_steps=64):
        out = np.zeros((lengths.size, table.shape[1]), dtype=np.float32)
        nonempty = np.flatnonzero(lengths)
        starts = np.cumsum(lengths) - lengths
        out[nonempty] = np.add.reduceat(table.take(rows, axis=0), starts[nonempty], axis=0)
        return out

    monkeypatch.setattr(reader_module, "_bag_sums", pairwise)
    with caplog.at_level(logging.WARNING, logger="tablezip.serving.reader"):
        model = load_model(str(artifact))
    assert model.bag_pooler is None and "differs from the model's forward" in caplog.text


@pytest.mark.parametrize("pattern", [[1] * 5, [1, 0, 1, 1, 0], [0, 0, 0]])
def test_a_repeated_request_shape_reuses_its_layout_with_the_forward_bits(pattern, full_model, serve, connect):
    """Clients repeat a request shape (same features, same packed lengths) with new ids: the second
    and later requests take the cached layout and its pooling plan, and every answer is still the
    forward's bits, including all-empty batches, OOV ids and the mean feature."""
    coll, artifact = full_model
    server = serve(artifact)
    client = connect(server)
    layouts = server.holder.current.bag_layouts
    for seed in range(3):
        lengths, values = bags(pattern, seed=seed)
        got = client.lookup_bags(NAMES, lengths.reshape(-1), values)
        np.testing.assert_array_equal(bits(got), bits(forward(coll, lengths, values)))
    assert len(layouts) == 1  # one shape, validated once
    (layout,) = layouts._layouts.values()
    assert layout.pool_plan is not None and layout.pool_plan[0] is server.holder.current.bag_pooler
    assert layout.pool_plan[1] is not None  # bags of at most one id: the per-shape plan, not _pool


def test_a_layout_plan_is_only_used_by_the_pooler_that_made_it(full_model):
    """A layout tagged by another pooler (as after a reload into the same cache) is re-planned."""
    coll, artifact = full_model
    first, second = load_model(str(artifact)), load_model(str(artifact))
    lengths, values = bags([1, 0, 1], seed=4)
    packed = lengths.astype("<i4").tobytes()
    positions = list(range(len(NAMES)))
    layout = first.bag_layouts.layout(positions, [], packed, values.size, Limits())
    pool_bags(first, positions, layout.lengths, values, lambda stage: None, layout=layout)
    made_by_first = layout.pool_plan
    got = pool_bags(second, positions, layout.lengths, values, lambda stage: None, layout=layout)
    assert layout.pool_plan[0] is second.bag_pooler and layout.pool_plan is not made_by_first
    np.testing.assert_array_equal(bits(got), bits(forward(coll, lengths, values)))
