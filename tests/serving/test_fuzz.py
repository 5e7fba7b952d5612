"""Malformed requests, generated: the server always answers with a status, never INTERNAL for a
parseable request (that would be a validation gap), and keeps serving good requests."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tablezip.serving import Server, ServerConfig
from tablezip.serving.v1 import lookup_pb2 as pb
from tablezip.serving.v1 import lookup_pb2_grpc as pb_grpc

from .conftest import DIM, NAMES, expected_lookup

MAX_IDS = 200
ANSWERED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def server(model_a):
    s = Server(str(model_a[1]), ServerConfig(port=0, max_ids=MAX_IDS, max_message_bytes=16 * 1024)).start()
    yield s
    s.stop(grace=0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingLookupStub(channel)


int64s = st.integers(-(2**63), 2**63 - 1)
small_ids = st.integers(-3, 1200)
names = st.sampled_from(NAMES) | st.text(max_size=5)
ids_lists = st.lists(st.one_of(small_ids, int64s), max_size=MAX_IDS + 20)
raw = st.binary(max_size=400)
dtypes = st.sampled_from([0, 1, 2]) | st.integers(-(2**31), 2**31 - 1)


@st.composite
def lookup_requests(draw) -> pb.LookupRequest:
    request = pb.LookupRequest(feature=draw(names), dtype=draw(dtypes))
    form = draw(st.sampled_from(["ids", "ids_le", "both", "raw"]))
    ids = draw(ids_lists)
    if form in ("ids", "both"):
        request.ids.extend(ids)
    if form in ("ids_le", "both"):
        request.ids_le = np.array(ids, dtype="<i8").tobytes()
    if form == "raw":
        request.ids_le = draw(raw)
    return request


@st.composite
def bags_requests(draw) -> pb.LookupBagsRequest:
    request = pb.LookupBagsRequest(features=draw(st.lists(names, max_size=4)), dtype=draw(dtypes))
    lengths = draw(st.lists(st.integers(-2, 4) | st.integers(-(2**31), 2**31 - 1), max_size=40))
    ids = draw(ids_lists)
    if draw(st.booleans()):
        request.lengths.extend(lengths)
    else:
        request.lengths_le = draw(raw) if draw(st.booleans()) else np.array(lengths, dtype="<i4").tobytes()
    if draw(st.booleans()):
        request.ids.extend(ids)
    else:
        request.ids_le = np.array(ids, dtype="<i8").tobytes()
    return request


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=lookup_requests())
def test_fuzzed_lookups_get_a_status_or_the_right_vectors(stub, model_a, request):
    try:
        answer = stub.Lookup(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in ANSWERED, (err.code(), err.details())
        assert err.details()
        return
    ids = list(request.ids) or np.frombuffer(request.ids_le, dtype="<i8").tolist()
    kind = np.float16 if request.dtype == pb.FLOAT16 else np.float32
    got = np.frombuffer(answer.vectors.data, dtype=kind).reshape(tuple(answer.vectors.shape))
    expected = expected_lookup(model_a[0], request.feature, ids)
    np.testing.assert_array_equal(got, expected.to(torch.float16 if kind == np.float16 else torch.float32).numpy())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=bags_requests())
def test_fuzzed_bags_get_a_status_or_a_well_formed_answer(stub, request):
    try:
        answer = stub.LookupBags(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in ANSWERED, (err.code(), err.details())
        assert err.details()
        return
    lengths = list(request.lengths) or np.frombuffer(request.lengths_le, dtype="<i4").tolist()
    assert list(answer.vectors.shape) == [len(lengths) // len(request.features), len(request.features), DIM]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300), method=st.sampled_from(["Lookup", "LookupBags", "GetModelInfo", "Stats"]))
def test_unparseable_bytes_get_a_status(server, payload, method):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(f"/tablezip.v1.EmbeddingLookup/{method}")
        try:
            call(payload, timeout=30)
        except grpc.RpcError as err:
            # grpc's own answer to a request its deserializer rejects
            assert err.code() in ANSWERED | {grpc.StatusCode.INTERNAL}, err.code()


def test_the_server_still_serves_after_the_fuzzing(server, model_a, connect):
    client = connect(server)
    assert client.health() == "SERVING"
    np.testing.assert_array_equal(client.lookup("c", [1, 2]), expected_lookup(model_a[0], "c", [1, 2]).numpy())
    assert "INTERNAL" not in client.stats()["rpcs"].get("Lookup", {"errors": {}})["errors"]
