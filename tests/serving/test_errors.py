"""Every refused request gets its gRPC status and a message naming the problem; the server keeps
serving and counts each error by code."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tablezip.compress import QR
from tablezip.embeddings import CompressedEmbeddingBagCollection, FeatureSpec
from tablezip.serving import Server, ServerConfig
from tablezip.serving.model import load_model
from tablezip.serving.v1 import lookup_pb2 as pb
from tablezip.serving.v1 import lookup_pb2_grpc as pb_grpc

from .conftest import NAMES, TOKEN, expected_lookup

MAX_IDS = 1000
MAX_MESSAGE = 64 * 1024
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(model_a):
    s = Server(str(model_a[1]), ServerConfig(port=0, token=TOKEN, max_ids=MAX_IDS, max_message_bytes=MAX_MESSAGE)).start()
    yield s
    s.stop(grace=0)


@pytest.fixture(scope="module")
def stub(server):
    """A raw stub: requests exactly as written here, not as the Client would build them."""
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EmbeddingLookupStub(channel)


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def refused(call, request, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=metadata, timeout=30)
    return info.value


def packed(ids) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def lengths_le(lengths) -> bytes:
    return np.asarray(lengths, dtype="<i4").tobytes()


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (pb.LookupRequest(feature="nope", ids=[1]), Code.NOT_FOUND, "unknown feature 'nope'"),
        (pb.LookupRequest(feature="a", ids=[3, -7]), Code.INVALID_ARGUMENT, "id -7 at position 1 of feature 'a' is negative"),
        (pb.LookupRequest(feature="a", ids_le=packed([1, -(2**63)])), Code.INVALID_ARGUMENT, "is negative"),
        (pb.LookupRequest(feature="a", ids=[1], ids_le=packed([1])), Code.INVALID_ARGUMENT, "either ids or ids_le"),
        (pb.LookupRequest(feature="a", ids_le=b"\x01" * 12), Code.INVALID_ARGUMENT, "not a multiple of 8"),
        (pb.LookupRequest(feature="a", ids=[1], dtype=7), Code.INVALID_ARGUMENT, "dtype 7"),
        (pb.LookupRequest(feature="a", ids=list(range(MAX_IDS + 1))), Code.RESOURCE_EXHAUSTED, "1001 ids exceed the server's --max-ids=1000"),
        (pb.LookupRequest(feature="a", ids_le=packed(range(MAX_IDS + 1))), Code.RESOURCE_EXHAUSTED, "--max-ids=1000"),
    ],
    ids=["unknown-feature", "negative-id", "negative-packed-id", "both-id-forms", "ragged-packed-ids", "bad-dtype",
         "max-ids", "max-ids-packed"],  # fmt: skip
)
def test_lookup_errors(stub, request_, code, message):
    err = refused(stub.Lookup, request_)
    assert err.code() == code and message in err.details(), err.details()


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (pb.LookupBagsRequest(features=["a", "zz"], lengths=[1, 1], ids=[1, 2]), Code.NOT_FOUND, "unknown feature 'zz'"),
        (pb.LookupBagsRequest(features=[], lengths=[], ids=[]), Code.INVALID_ARGUMENT, "features is empty"),
        (pb.LookupBagsRequest(features=["a", "a"], lengths=[1, 1], ids=[1, 2]), Code.INVALID_ARGUMENT, "appears twice"),
        (pb.LookupBagsRequest(features=["a", "b"], lengths=[1, 1, 1], ids=[1, 2, 3]), Code.INVALID_ARGUMENT, "3 lengths for 2 features"),
        (pb.LookupBagsRequest(features=["a", "b"], lengths=[2, 1], ids=[1, 2]), Code.INVALID_ARGUMENT, "lengths sum to 3 but 2 ids"),
        (pb.LookupBagsRequest(features=["a", "b"], lengths=[2, -1], ids=[1]), Code.INVALID_ARGUMENT, "length -1 at position 1 is negative"),
        (pb.LookupBagsRequest(features=["a", "b"], lengths_le=lengths_le([1, 1]) + b"\x00", ids=[1, 2]), Code.INVALID_ARGUMENT, "not a multiple of 4"),
        (pb.LookupBagsRequest(features=["a", "b"], lengths_le=lengths_le([2, -1]), ids=[1]), Code.INVALID_ARGUMENT, "length -1 at position 1 is negative"),
        (pb.LookupBagsRequest(features=["a", "c"], lengths=[1, 2], ids=[4, 5, -1]), Code.INVALID_ARGUMENT, "id -1 at position 1 of feature 'c' is negative"),
        (pb.LookupBagsRequest(features=["a", "c"], lengths=[1, 2], ids_le=packed([4, -(2**40), 6])), Code.INVALID_ARGUMENT,
         f"id {-(2**40)} at position 0 of feature 'c' is negative"),
        (pb.LookupBagsRequest(features=["a"], lengths=[0] * (MAX_IDS + 1)), Code.RESOURCE_EXHAUSTED, "1001 lengths exceed"),
        (pb.LookupBagsRequest(features=["a"], lengths=[MAX_IDS + 1], ids_le=packed(range(MAX_IDS + 1))), Code.RESOURCE_EXHAUSTED, "1001 ids"),
    ],
    ids=["unknown-feature", "no-features", "duplicate-feature", "lengths-not-F-times-B", "lengths-sum", "negative-length",
         "ragged-packed-lengths", "negative-packed-length", "negative-id", "negative-packed-id", "max-bags", "max-ids"],  # fmt: skip
)
def test_lookup_bags_errors(stub, request_, code, message):
    err = refused(stub.LookupBags, request_)
    assert err.code() == code and message in err.details(), err.details()


def test_message_over_the_size_limit_is_resource_exhausted(stub):
    # 9,000 packed ids = 72,000 bytes > 64 KiB: refused by grpc before any handler runs.
    err = refused(stub.Lookup, pb.LookupRequest(feature="a", ids_le=packed(range(9000))))
    assert err.code() == Code.RESOURCE_EXHAUSTED and "larger than max" in err.details()


def test_token_is_required_except_for_health_and_reflection(server, model_a, connect):
    for client, reason in ((connect(server), "missing bearer token"), (connect(server, token="wrong"), "wrong bearer token")):
        for call in (lambda: client.lookup("a", [1]), client.model_info, client.stats, lambda: client.reload("")):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == Code.UNAUTHENTICATED and reason in info.value.details()
        assert client.health() == "SERVING"
    with grpc.insecure_channel(server.address) as channel:  # what `grpcurl list` / `describe` do, without a token
        reflected = ProtoReflectionDescriptorDatabase(channel)
        assert {"tablezip.v1.EmbeddingLookup", "grpc.health.v1.Health"} <= set(reflected.get_services())
        proto = reflected.FindFileContainingSymbol("tablezip.v1.EmbeddingLookup")
    assert [m.name for m in proto.service[0].method] == ["Lookup", "LookupBags", "GetModelInfo", "Stats", "Reload"]
    np.testing.assert_array_equal(connect(server, token=TOKEN).lookup("a", [1, 2]), expected_lookup(model_a[0], "a", [1, 2]).numpy())


def test_errors_are_counted_by_code_and_the_server_keeps_serving(server, stub, model_a, connect):
    client = connect(server, token=TOKEN)
    before = client.stats()["rpcs"]
    refused(stub.Lookup, pb.LookupRequest(feature="nope", ids=[1]))
    refused(stub.Lookup, pb.LookupRequest(feature="a", ids=[-1]))
    refused(stub.Lookup, pb.LookupRequest(feature="a", ids=[1]), metadata=None)
    ok = client.lookup("a", [7, 8, 9])
    after = client.stats()["rpcs"]["Lookup"]
    counted_before = before.get("Lookup", {"errors": {}})["errors"]
    errors = {k: v - counted_before.get(k, 0) for k, v in after["errors"].items() if v != counted_before.get(k, 0)}
    assert errors == {"NOT_FOUND": 1, "INVALID_ARGUMENT": 1, "UNAUTHENTICATED": 1}
    assert after["ids"] - before.get("Lookup", {"ids": 0})["ids"] == 3
    assert after["p99_ms"] >= after["p50_ms"] > 0
    np.testing.assert_array_equal(ok, expected_lookup(model_a[0], "a", [7, 8, 9]).numpy())


def test_reload_needs_a_token_server(model_a, serve, connect):
    client = connect(serve(model_a[1]))
    with pytest.raises(grpc.RpcError) as info:
        client.reload(str(model_a[1]))
    assert info.value.code() == Code.PERMISSION_DENIED and "SIGHUP" in info.value.details()


def test_a_failing_handler_is_internal_counted_and_survived(model_a, serve, connect):
    """A reader that raises stands in for any bug below the handler: the client gets INTERNAL
    with the message, the error is counted, and other requests are still served."""
    model = load_model(str(model_a[1]))

    def broken(ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("disk on fire")

    model.readers["b"] = broken
    server = Server("", ServerConfig(port=0), model=model).start()
    try:
        client = connect(server)
        with pytest.raises(grpc.RpcError) as info:
            client.lookup("b", [1])
        assert info.value.code() == Code.INTERNAL and "RuntimeError: disk on fire" in info.value.details()
        np.testing.assert_array_equal(client.lookup("a", [1]), expected_lookup(model_a[0], "a", [1]).numpy())
        assert client.stats()["rpcs"]["Lookup"]["errors"] == {"INTERNAL": 1}
    finally:
        server.stop(grace=0)


def test_a_request_whose_deadline_expires_midway_stops_with_deadline_exceeded(tmp_path, serve, connect):
    """A real slow request: 2M ids in 4,000 large bags of a QR-mult model at D=512 (pooled after the
    product: per-id work, tiny answer), computed in ~30 chunks. Three runs without deadline give
    the client's total time T and the handler's time H (medians); the next run gets the deadline
    T - H + H/3, a third into the handler. The client sees DEADLINE_EXCEEDED and the server counts
    DEADLINE_EXCEEDED itself: grpc never calls a handler whose deadline passed before it started,
    so only the handler's own check between chunks can produce that count."""
    coll = CompressedEmbeddingBagCollection([FeatureSpec("x", 100), FeatureSpec("y", 100)], 512, QR(collisions=4, op="mult"))
    server = serve(coll.export(tmp_path / "m"), max_ids=3_000_000)
    client = connect(server)
    ids = np.random.default_rng(0).integers(0, 100, 2_000_000)
    request = pb.LookupBagsRequest(features=["x", "y"], lengths=[500] * 4000, ids=ids.tolist())
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = pb_grpc.EmbeddingLookupStub(channel).LookupBags
        totals = []
        for _ in range(3):
            start = time.perf_counter()
            call(request, timeout=60)
            totals.append(time.perf_counter() - start)
        total, handler = float(np.median(totals)), client.stats()["rpcs"]["LookupBags"]["p50_ms"] / 1e3
        assert handler > 0.05, f"the request must be slow enough to interrupt (handler {handler:.3f} s)"
        timeout = (total - handler) + handler / 3
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=timeout)
    assert info.value.code() == Code.DEADLINE_EXCEEDED, (totals, handler, timeout)
    waited = time.perf_counter() + 30
    while time.perf_counter() < waited and not client.stats()["rpcs"]["LookupBags"]["errors"]:
        time.sleep(0.05)
    bags = client.stats()["rpcs"]["LookupBags"]
    assert bags["requests"] == 4 and bags["errors"] == {"DEADLINE_EXCEEDED": 1} and bags["ids"] == 3 * 2_000_000
    np.testing.assert_array_equal(client.lookup("x", [3]), coll.lookup("x", torch.tensor([3])).numpy())


def test_concurrent_bad_and_good_requests(server, stub, model_a, connect):
    """Bad requests from several threads at once never disturb good ones."""
    client = connect(server, token=TOKEN)
    expected = expected_lookup(model_a[0], "c", [1, 2, 3]).numpy()
    failures: list[str] = []

    def bad() -> None:
        for _ in range(20):
            try:
                stub.LookupBags(pb.LookupBagsRequest(features=["a"], lengths=[5], ids=[1]), metadata=AUTH, timeout=30)
                failures.append("bad request answered")
            except grpc.RpcError as err:
                if err.code() != Code.INVALID_ARGUMENT:
                    failures.append(str(err.code()))

    def good() -> None:
        for _ in range(20):
            if not np.array_equal(client.lookup("c", [1, 2, 3]), expected):
                failures.append("wrong vectors")

    threads = [threading.Thread(target=f) for f in (bad, good, bad, good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert NAMES == [f["name"] for f in client.model_info()["features"]]


def test_a_taken_port_is_an_error_not_a_shared_port(server, model_a):
    second = Server(str(model_a[1]), ServerConfig(port=server.port))
    with pytest.raises(OSError, match="cannot bind"):
        second.start()


def test_reuse_port_servers_share_one_port_and_both_answer(model_a, serve, connect):
    """SO_REUSEPORT: two servers (as two processes would) bind one port; the kernel hands each new
    connection to one of them, and both answer correctly."""
    coll, path = model_a
    first = serve(path, reuse_port=True)
    second = Server(str(path), ServerConfig(port=first.port, reuse_port=True)).start()
    try:
        assert second.port == first.port
        ids = {"a": [0, 7, 999, 1000, 10**9], "b": [0, 49, 50, 51, 10**9]}  # Hash, and Full (numpy path)
        expected = {name: expected_lookup(coll, name, i).numpy() for name, i in ids.items()}
        for _ in range(64):  # fresh connections until each server has answered one
            client = connect(first.address)
            for name in ids:
                np.testing.assert_array_equal(client.lookup(name, ids[name]), expected[name])
            client.close()
            served = [s.metrics.snapshot().get("Lookup") for s in (first, second)]
            if all(c is not None and c.requests for c in served):
                break
        assert all(c is not None and c.requests for c in served), "the kernel gave every connection to one server"
    finally:
        second.stop(grace=0)


def test_reuse_port_does_not_share_with_a_server_without_it(server, model_a):
    second = Server(str(model_a[1]), ServerConfig(port=server.port, reuse_port=True))
    with pytest.raises(OSError, match="cannot bind"):
        second.start()
