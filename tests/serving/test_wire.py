"""The hand-written response bytes are exactly what protobuf would serialize."""
from __future__ import annotations

import numpy as np
import pytest

from tablezip.serving.v1 import lookup_pb2 as pb
from tablezip.serving.wire import vectors_response


@pytest.mark.parametrize("shape", [(0, 8), (1, 1), (3, 16), (200, 64), (5, 0), (7, 3, 16), (0, 2, 4), (20_000, 4)])
@pytest.mark.parametrize("dtype, kind", [("<f4", pb.FLOAT32), ("<f2", pb.FLOAT16)])
@pytest.mark.parametrize("checksum", ["", "ab" * 32])
def test_vectors_response_equals_protobuf_serialization(shape, dtype, kind, checksum):
    array = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    expected = pb.LookupResponse(vectors=pb.Tensor(data=array.tobytes(), shape=array.shape, dtype=kind), model_checksum=checksum)
    wire = vectors_response(array, kind, checksum)
    assert wire == expected.SerializeToString()
    for message in (pb.LookupResponse, pb.LookupBagsResponse):  # both responses share the layout
        parsed = message.FromString(wire)
        assert list(parsed.vectors.shape) == list(shape) and parsed.model_checksum == checksum
        np.testing.assert_array_equal(np.frombuffer(parsed.vectors.data, dtype=dtype).reshape(shape), array)


def test_non_contiguous_arrays_are_refused():
    with pytest.raises(ValueError, match="contiguous"):
        vectors_response(np.zeros((4, 4), dtype="<f4")[:, ::2], pb.FLOAT32, "")
