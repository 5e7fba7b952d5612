"""The server answers exactly what the trained model computes, for every registered method."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tablezip.compress import LearnedThreshold, Pruned
from tablezip.embeddings import CompressedEmbeddingBagCollection
from tablezip.serving.reader import TableRowReader
from tests.conftest import random_kjt
from tests.embeddings.test_conformance import DIM, EXAMPLES, FEATURES, KINDS, NAMES, build

# Variants the conformance examples do not reach: ids a pruned table drops (zero rows), and a
# learned threshold that actually masks rows.
EXTRA = ["pruned-zero", "learned_threshold-masking"]
IDS = [0, 1, 5, 11, 12, 13, 499, 500, 2999, 3000, 3001, 10**12, 2**62]


def trained(kind: str) -> CompressedEmbeddingBagCollection:
    if kind == "pruned-zero":
        methods = {f.name: Pruned(keep=max(1, f.num_embeddings // 3), missing="zero") for f in FEATURES}
        coll = CompressedEmbeddingBagCollection(FEATURES, DIM, methods, seed=3)
    elif kind == "learned_threshold-masking":
        coll = CompressedEmbeddingBagCollection(FEATURES, DIM, LearnedThreshold(), seed=3)
    else:
        coll = build(kind, seed=3)
    coll(random_kjt(NAMES, 16, 3000, seed=4)).values().sum().backward()  # one optimizer step
    if kind == "learned_threshold-masking":
        with torch.no_grad():  # the median row norm: about half of the ids read a masked (zero) row
            weights = coll.table_weights()
            for name, layout in coll.layouts.items():
                (table,) = coll.feature_tables(name)
                layout.threshold.fill_(float(weights[table].norm(dim=1).median()))
    return coll.eval()


def bits(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(array).view(np.uint32 if np.asarray(array).dtype == np.float32 else np.uint16)


@pytest.mark.parametrize("kind", KINDS + EXTRA)
def test_lookup_and_bags_match_the_trained_model(kind, tmp_path, serve, connect):
    assert set(KINDS) == set(EXAMPLES)
    coll = trained(kind)
    server = serve(coll.export(tmp_path / kind))
    client = connect(server)
    ids = torch.tensor(IDS)
    for name in NAMES:
        expected = coll.lookup(name, ids)
        got = client.lookup(name, IDS)
        assert got.dtype == np.float32 and got.shape == (len(IDS), DIM)
        np.testing.assert_array_equal(bits(got), bits(expected.numpy()))  # bit for bit
        half = client.lookup(name, IDS, dtype="float16", as_torch=True)
        assert half.dtype == torch.float16 and torch.equal(half, expected.to(torch.float16))
    # The fast per-id path really served these features (the fallback would be slower, not wrong).
    assert all(isinstance(r, TableRowReader) for r in server.holder.current.readers.values())

    kjt = random_kjt(NAMES, 24, 3000, max_len=4, seed=5)
    with torch.no_grad():
        expected_bags = coll(kjt).values().view(24, len(NAMES), DIM)
    got_bags = client.lookup_kjt(kjt, as_torch=True)
    assert got_bags.shape == (24, len(NAMES), DIM) and torch.equal(got_bags, expected_bags)

    # A subset of the features, in another order: the others are empty bags, the answer keeps
    # the request's order.
    lengths = kjt.lengths().view(len(NAMES), 24)
    per_feature = torch.split(kjt.values(), kjt.length_per_key())
    order = [2, 0]
    zeroed = torch.zeros_like(lengths)
    zeroed[order] = lengths[order]
    only = KeyedJaggedTensor(keys=NAMES, values=torch.cat([per_feature[i] for i in sorted(order)]), lengths=zeroed.view(-1))
    with torch.no_grad():
        expected_subset = coll(only).values().view(24, len(NAMES), DIM)[:, order]
    got_subset = client.lookup_bags([NAMES[i] for i in order], lengths[order].reshape(-1),
                                    torch.cat([per_feature[i] for i in order]))  # fmt: skip
    np.testing.assert_array_equal(got_subset, expected_subset.numpy())


def test_large_requests_are_chunked_without_changing_the_answer(tmp_path, serve, connect):
    """Requests over one chunk (65,536 ids) are computed piecewise; the vectors must not change."""
    coll = trained("hash")
    client = connect(serve(coll.export(tmp_path / "m")))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5000, 150_000)
    np.testing.assert_array_equal(client.lookup("large", ids), coll.lookup("large", torch.from_numpy(ids)).numpy())
    batch = 30_000  # 3 features x 30,000 bags of 0-3 ids: several bag chunks
    lengths = torch.from_numpy(rng.integers(0, 4, 3 * batch))
    values = torch.from_numpy(rng.integers(0, 3000, int(lengths.sum())))
    kjt = KeyedJaggedTensor(keys=NAMES, values=values, lengths=lengths)
    with torch.no_grad():
        expected = coll(kjt).values().view(batch, 3, DIM)
    assert torch.equal(client.lookup_kjt(kjt, as_torch=True), expected)


def test_stored_negative_zeros_come_back_as_the_model_gives_them(tmp_path, serve, connect):
    """TBE sums a bag into zeros, so a stored -0.0 reads as +0.0; the fast path must agree bit
    for bit (and a NaN row passes through unchanged)."""
    coll = trained("full")
    with torch.no_grad():
        table = coll.table_weights()[coll.feature_tables("large")[0]]
        table[7] = torch.tensor([-0.0, 0.0, float("nan"), -1.5, -0.0, 2.0, -0.0, 1e-40])
    server = serve(coll.export(tmp_path / "m"))
    assert server.holder.current.readers["large"].numpy_table is not None  # Full: the numpy path serves it
    client = connect(server)
    got = client.lookup("large", [7, 8])
    expected = coll.lookup("large", torch.tensor([7, 8])).numpy()
    np.testing.assert_array_equal(bits(got), bits(expected))
    assert not np.signbit(got[0, [0, 4, 6]]).any()
