"""Chunked computation: bag ranges cover the batch, and chunked answers equal one-shot ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tablezip.serving.compute import bag_chunks, pool_bags, read_vectors
from tablezip.serving.model import load_model
from tablezip.serving.validation import ServingError

from .conftest import DIM, NAMES


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), max_size=60), features=st.integers(1, 3), chunk=st.integers(1, 40))
@example(lengths=[0, 9, 0], features=1, chunk=5)  # a bag over a chunk right after a small one (CI found it)
def test_bag_chunks_cover_the_batch_in_bounded_pieces(lengths, features, chunk):
    batch = len(lengths) // features
    array = np.array(lengths[: batch * features], dtype=np.int32).reshape(features, batch)
    ranges = bag_chunks(array, chunk)
    assert ranges[0][0] == 0 and ranges[-1][1] == batch
    assert all(a < b for a, b in ranges) or batch == 0
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    cost = array.sum(axis=0) + 1
    assert all(b - a == 1 or cost[a:b].sum() <= 2 * chunk for a, b in ranges)


def no_deadline(stage: str) -> None:
    pass


@pytest.fixture(scope="module")
def model(model_a):
    return load_model(str(model_a[1]))


def test_chunked_reads_and_bags_equal_one_shot(model, model_a):
    coll = model_a[0]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1200, 100)
    one = read_vectors(model.readers["c"], ids, no_deadline)
    assert torch.equal(read_vectors(model.readers["c"], ids, no_deadline, chunk=7), one)
    assert torch.equal(one, coll.lookup("c", torch.from_numpy(ids)))
    lengths = rng.integers(0, 4, (2, 40)).astype(np.int32)
    bag_ids = rng.integers(0, 1000, int(lengths.sum()))
    positions = [NAMES.index("c"), NAMES.index("a")]
    whole = pool_bags(model, positions, lengths, bag_ids, no_deadline)
    assert whole.shape == (40, 2, DIM)
    assert torch.equal(pool_bags(model, positions, lengths, bag_ids, no_deadline, chunk=9), whole)


def test_the_deadline_check_runs_between_chunks(model):
    stages: list[str] = []

    def expire_after_two(stage: str) -> None:
        stages.append(stage)
        if len(stages) == 3:
            raise ServingError(None, "expired")  # type: ignore[arg-type]

    with pytest.raises(ServingError):
        read_vectors(model.readers["a"], np.arange(100), expire_after_two, chunk=10)
    assert stages == ["ids 0..9 of 100", "ids 10..19 of 100", "ids 20..29 of 100"]
