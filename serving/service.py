"""The ``tablezip.v1.EmbeddingLookup`` handlers.

Every handler reads the current model once (``holder.current``), validates the request, checks
its deadline before the lookup, and answers packed little-endian bytes. Each RPC goes through
``_rpc``: it times the request, turns a ``ServingError`` into its status and anything
unexpected into INTERNAL (logged and counted), so no input can take the server down.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import grpc
import numpy as np
import torch

from tablezip.embeddings import ArtifactError

from .compute import CHUNK_IDS, pool_bags, read_vectors
from .metrics import Metrics
from .model import LoadedModel, ModelHolder, server_version
from .v1 import lookup_pb2 as pb
from .v1 import lookup_pb2_grpc as pb_grpc
from .validation import (
    Limits, ServingError, check_bag_ids, check_features, check_ids, decode_ints, out_dtype,
    packed_has_negative,
)
from .wire import framed, vectors_response

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingLookup"].full_name
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")


def _rpc(name: str) -> Callable:
    """Wrap a handler returning ``(response, ids_served)`` with timing, counting and errors."""

    def wrap(fn: Callable[..., tuple[Any, int]]) -> Callable:
        @functools.wraps(fn)
        def handler(self: "EmbeddingLookupService", request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response, ids = fn(self, request, context)
            except ServingError as err:
                self.metrics.record(name, time.perf_counter() - start, err.code)
                context.abort(err.code, err.message)
            except Exception as err:  # a bug or an unforeseen input: answer, count, keep serving
                log.exception("%s failed", name)
                self.metrics.record(name, time.perf_counter() - start, grpc.StatusCode.INTERNAL)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(err).__name__}: {err}")
            self.metrics.record(name, time.perf_counter() - start, grpc.StatusCode.OK, ids)
            return response

        return handler

    return wrap


def _check_deadline(context: grpc.ServicerContext, stage: str) -> None:
    """Skip work nobody waits for: the client has already seen DEADLINE_EXCEEDED. (grpc itself
    drops a call whose deadline passed before its handler started; this catches the ones that
    expire while a large request is decoded or computed.)"""
    if context.time_remaining() <= 0:
        raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline expired before {stage}")


def _encode(values: torch.Tensor | np.ndarray, dtype: np.dtype, checksum: str) -> bytes:
    """Vectors (computed under no_grad) as serialized response bytes: one copy of their memory."""
    array = values if isinstance(values, np.ndarray) else values.numpy()
    if dtype == _F16:
        return vectors_response(np.ascontiguousarray(array, dtype=_F16), pb.FLOAT16, checksum)
    return vectors_response(np.ascontiguousarray(array, dtype=_F32), pb.FLOAT32, checksum)


def model_info(model: LoadedModel) -> pb.ModelInfo:
    info = pb.ModelInfo(
        dim=model.dim,
        memory_bytes=int(model.module.memory_bytes()),
        full_bytes=int(model.manifest.get("full_bytes", 0)),
        dtype=model.dtype,
        tablezip_version=str(model.manifest.get("tablezip_version", "")),
        server_version=server_version(),
        checksum=model.checksum,
        source=model.source,
        load_seconds=model.load_seconds,
        loaded_at=model.loaded_at,
        generation=model.generation,
    )
    for feature in model.manifest["features"]:
        params = dict(feature["method"])
        kind = str(params.pop("type"))
        entry = info.features.add(
            name=feature["name"], num_embeddings=int(feature["num_embeddings"]), pooling=str(feature["pooling"]), method=kind
        )
        entry.method_params.update(params)
    return info


class EmbeddingLookupService(pb_grpc.EmbeddingLookupServicer):
    """Handlers over a ``ModelHolder``; ``allow_reload`` is False for servers without a token
    (anyone who can connect could make them load any path); SIGHUP reloads either way."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, limits: Limits, allow_reload: bool) -> None:
        self.holder = holder
        self.metrics = metrics
        self.limits = limits
        self.allow_reload = allow_reload

    @_rpc("Lookup")
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> tuple[bytes, int]:
        model = self.holder.current
        reader = model.readers.get(request.feature)
        if reader is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"unknown feature {request.feature!r}; the model has {list(model.feature_names)}")
        dtype = out_dtype(request.dtype)
        numpy_path = getattr(reader, "numpy_table", None) is not None
        packed = request.ids_le  # each read of a bytes field copies it out of the message: read once
        ids = decode_ints(request.ids, packed, what="ids", dtype="int64", limit=self.limits.max_ids, copy=not numpy_path)
        if not packed or packed_has_negative(packed, 8):  # packed: no numpy call unless one is negative
            check_ids(ids, request.feature)
        if numpy_path and ids.size <= CHUNK_IDS:  # the common case: three numpy calls in all
            _check_deadline(context, "the lookup")
            vectors = reader.read_numpy(ids, nonnegative=True)
            if dtype is _F32:  # take's result is a fresh C-contiguous float32 array: no conversion call
                return framed(vectors, pb.FLOAT32, model.checksum), ids.size
            return _encode(vectors, dtype, model.checksum), ids.size
        if not ids.flags.writeable:
            ids = ids.copy()  # torch.from_numpy needs a writable array
        vectors = read_vectors(reader, ids, functools.partial(_check_deadline, context))
        return _encode(vectors, dtype, model.checksum), ids.size

    @_rpc("LookupBags")
    def LookupBags(self, request: pb.LookupBagsRequest, context: grpc.ServicerContext) -> tuple[bytes, int]:
        model = self.holder.current
        positions = check_features(request.features, model.feature_names)
        dtype = out_dtype(request.dtype)
        # Read-only views are enough: pool_bags hands torch only copies (concatenated ids, lengths
        # scattered into the model's feature order).
        packed = request.ids_le  # read once: each read copies the bytes out of the message
        ids = decode_ints(request.ids, packed, what="ids", dtype="int64", limit=self.limits.max_ids, copy=False)
        # read lengths_le once, as ids_le; a request shape seen before is not validated again
        layout = model.bag_layouts.layout(positions, request.lengths, request.lengths_le, ids.size, self.limits)
        if not packed or packed_has_negative(packed, 8):  # as in Lookup: no numpy call unless one is negative
            check_bag_ids(ids, layout.lengths, request.features)
        pooled = pool_bags(model, positions, layout.lengths, ids, functools.partial(_check_deadline, context), layout=layout)
        return _encode(pooled, dtype, model.checksum), ids.size

    @_rpc("GetModelInfo")
    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> tuple[pb.ModelInfo, int]:
        return model_info(self.holder.current), 0

    @_rpc("Stats")
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> tuple[pb.StatsResponse, int]:
        model = self.holder.current
        response = pb.StatsResponse(
            uptime_seconds=self.metrics.uptime(),
            generation=model.generation,
            reloads=self.holder.reloads,
            failed_reloads=self.holder.failed_reloads,
        )
        for method, c in self.metrics.snapshot().items():
            response.rpcs.add(
                method=method, requests=c.requests, errors=c.errors, ids=c.ids,
                p50_ms=c.percentile(50) * 1e3, p99_ms=c.percentile(99) * 1e3, max_ms=c.max_seconds * 1e3,
            )
        return response, 0

    @_rpc("Reload")
    def Reload(self, request: pb.ReloadRequest, context: grpc.ServicerContext) -> tuple[pb.ReloadResponse, int]:
        if not self.allow_reload:
            raise ServingError(
                grpc.StatusCode.PERMISSION_DENIED,
                "Reload is disabled: this server runs without a token (--token); send it SIGHUP to reload its source",
            )
        old = self.holder.current
        try:
            new = self.holder.reload(request.source or None)
        except ArtifactError as err:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"reload refused, still serving generation {old.generation} ({old.source}): {err}",
            ) from None
        return pb.ReloadResponse(model=model_info(new)), 0


def _passthrough(response: bytes) -> bytes:
    return response


def method_handlers(service: EmbeddingLookupService) -> dict[str, grpc.RpcMethodHandler]:
    """The generated registration, except that Lookup and LookupBags answer bytes already
    serialized by ``wire.vectors_response`` (the generated one would serialize a message)."""
    def unary(fn: Callable, request: Any, serialize: Callable[[Any], bytes]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=request.FromString, response_serializer=serialize)

    return {
        "Lookup": unary(service.Lookup, pb.LookupRequest, _passthrough),
        "LookupBags": unary(service.LookupBags, pb.LookupBagsRequest, _passthrough),
        "GetModelInfo": unary(service.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo.SerializeToString),
        "Stats": unary(service.Stats, pb.StatsRequest, pb.StatsResponse.SerializeToString),
        "Reload": unary(service.Reload, pb.ReloadRequest, pb.ReloadResponse.SerializeToString),
    }
