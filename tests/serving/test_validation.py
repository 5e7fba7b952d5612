"""``LayoutCache``: a LookupBags request shape is validated once and then reused, without ever
accepting what a fresh validation would refuse."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from tablezip.serving.validation import LayoutCache, Limits, ServingError


def packed(lengths: list[int]) -> bytes:
    return np.asarray(lengths, dtype="<i4").tobytes()


def test_the_same_shape_returns_the_cached_layout():
    cache = LayoutCache()
    first = cache.layout([0, 1], [], packed([1, 0, 2, 1]), 4, Limits())
    assert first.batch == 2 and first.total == 4
    np.testing.assert_array_equal(first.lengths, [[1, 0], [2, 1]])
    again = cache.layout([0, 1], [], packed([1, 0, 2, 1]), 4, Limits())
    assert again is first and len(cache) == 1
    other_features = cache.layout([1, 0], [], packed([1, 0, 2, 1]), 4, Limits())
    assert other_features is not first and len(cache) == 2


def test_a_cached_shape_with_another_number_of_ids_is_refused():
    cache = LayoutCache()
    cache.layout([0, 1], [], packed([1, 1, 1, 1]), 4, Limits())
    with pytest.raises(ServingError) as err:
        cache.layout([0, 1], [], packed([1, 1, 1, 1]), 5, Limits())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "lengths sum to 4 but 5 ids were sent" in err.value.message


@pytest.mark.parametrize(
    "lengths, features, ids, message",
    [([1, -1, 1, 1], 2, 2, "is negative"), ([1, 1, 1], 2, 3, "expected a multiple of 2"), ([1, 1], 1, 3, "lengths sum to 2")],
)
def test_invalid_shapes_are_refused_every_time_and_never_cached(lengths, features, ids, message):
    cache = LayoutCache()
    for _ in range(2):
        with pytest.raises(ServingError, match=message) as err:
            cache.layout(list(range(features)), [], packed(lengths), ids, Limits())
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(cache) == 0


def test_repeated_lengths_are_validated_and_not_cached():
    cache = LayoutCache()
    layout = cache.layout([0], [2, 0, 1], b"", 3, Limits())
    assert layout.batch == 3 and len(cache) == 0
    with pytest.raises(ServingError, match="set either lengths or lengths_le"):
        cache.layout([0], [1], packed([1]), 1, Limits())


def test_a_cached_packed_shape_still_refuses_repeated_lengths_beside_it():
    cache = LayoutCache()
    cache.layout([0], [], packed([1]), 1, Limits())
    with pytest.raises(ServingError, match="set either lengths or lengths_le"):
        cache.layout([0], [1], packed([1]), 1, Limits())


def test_the_limit_applies_before_anything_is_cached():
    cache = LayoutCache()
    with pytest.raises(ServingError) as err:
        cache.layout([0], [], packed([1] * 5), 5, Limits(max_ids=4))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(cache) == 0


def test_the_cache_is_bounded_in_entries_and_key_size():
    cache = LayoutCache(max_entries=3, max_key_bytes=16)
    for n in range(1, 5):
        cache.layout([0], [], packed([1] * n), n, Limits())
    assert len(cache) <= 3
    cache.layout([0], [], packed([1] * 5), 5, Limits())  # 20 bytes: validated, not kept
    assert (tuple([0]), packed([1] * 5)) not in cache._layouts
