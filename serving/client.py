"""Python client of the tablezip lookup service.

Ids go out packed (``ids_le``: one ``tobytes``, 3.5 us for 4096 ids where filling the repeated
field takes 235 us) and vectors come back as a numpy view of the response bytes
(``np.frombuffer``: no copy, no per-float Python work). Failed calls raise ``grpc.RpcError``
with the server's status code and message.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .v1 import lookup_pb2 as pb
from .v1 import lookup_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}
_NUMPY = {pb.FLOAT32: np.dtype("<f4"), pb.DTYPE_UNSPECIFIED: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2")}


def _ints(values: Any, dtype: str) -> bytes:
    """Ids or lengths (list, numpy array or torch tensor) as packed little-endian bytes."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"expected integers, got an array of {array.dtype}")
    return np.ascontiguousarray(array.reshape(-1), dtype=dtype).tobytes()


def decode(tensor: pb.Tensor, as_torch: bool = False) -> "np.ndarray | torch.Tensor":
    """A ``Tensor`` message as a read-only numpy view of its bytes, or a torch tensor (a copy:
    torch wants writable memory)."""
    array = np.frombuffer(tensor.data, dtype=_NUMPY[tensor.dtype]).reshape(tuple(tensor.shape))
    if as_torch:
        import torch

        return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    return array


class Client:
    """``Client("127.0.0.1:50051", token=..., tls_root_cert="ca.pem")``; every method takes an
    optional ``timeout`` in seconds (a gRPC deadline)."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_root_cert: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_root_cert is not None:
            root = tls_root_cert if isinstance(tls_root_cert, bytes) else Path(tls_root_cert).read_bytes()
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = pb_grpc.EmbeddingLookupStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)

    def lookup(
        self, feature: str, ids: Any, dtype: str = "float32", as_torch: bool = False, timeout: float | None = None
    ) -> "np.ndarray | torch.Tensor":
        """Unpooled vectors [N, D] of one feature's ids (non-negative int64)."""
        request = pb.LookupRequest(feature=feature, ids_le=_ints(ids, "<i8"), dtype=_dtype(dtype))
        return decode(self._call(self._stub.Lookup, request, timeout).vectors, as_torch)

    def lookup_bags(
        self,
        features: Sequence[str],
        lengths: Any,
        ids: Any,
        dtype: str = "float32",
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> "np.ndarray | torch.Tensor":
        """Pooled vectors [B, F, D] of a batch in KeyedJaggedTensor layout: ``lengths`` holds F*B
        bag lengths, feature-major; ``features`` may be any subset of the model's, in any order."""
        request = pb.LookupBagsRequest(
            features=list(features), lengths_le=_ints(lengths, "<i4"), ids_le=_ints(ids, "<i8"), dtype=_dtype(dtype)
        )
        return decode(self._call(self._stub.LookupBags, request, timeout).vectors, as_torch)

    def lookup_kjt(self, kjt: "KeyedJaggedTensor", dtype: str = "float32", as_torch: bool = False,
                   timeout: float | None = None) -> "np.ndarray | torch.Tensor":
        """``lookup_bags`` of a torchrec KeyedJaggedTensor."""
        return self.lookup_bags(kjt.keys(), kjt.lengths(), kjt.values(), dtype=dtype, as_torch=as_torch, timeout=timeout)

    def model_info(self, timeout: float | None = None) -> dict[str, Any]:
        return info_dict(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        return stats_dict(self._call(self._stub.Stats, pb.StatsRequest(), timeout))

    def reload(self, source: str | Path = "", timeout: float | None = None) -> dict[str, Any]:
        """Ask the server to load ``source`` (empty: its current source again); returns the new
        model's info. FAILED_PRECONDITION: refused, the old model still serves."""
        return info_dict(self._call(self._stub.Reload, pb.ReloadRequest(source=str(source)), timeout).model)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The standard health check's status name, e.g. ``"SERVING"``."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout if timeout is None else timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dtype(name: str) -> int:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def info_dict(info: pb.ModelInfo) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return {
        "features": [
            {
                "name": f.name,
                "num_embeddings": f.num_embeddings,
                "pooling": f.pooling,
                "method": f.method,
                "params": _params(MessageToDict(f.method_params)),
            }
            for f in info.features
        ],
        **{
            key: getattr(info, key)
            for key in ("dim", "memory_bytes", "full_bytes", "dtype", "tablezip_version", "server_version", "checksum",
                        "source", "load_seconds", "loaded_at", "generation")
        },
    }


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """Struct carries numbers as doubles: integral ones back to int (rows=1000, not 1000.0)."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return [fix(x) for x in v] if isinstance(v, list) else v

    return {k: fix(v) for k, v in params.items()}


def stats_dict(stats: pb.StatsResponse) -> dict[str, Any]:
    return {
        "uptime_seconds": stats.uptime_seconds,
        "generation": stats.generation,
        "reloads": stats.reloads,
        "failed_reloads": stats.failed_reloads,
        "rpcs": {
            r.method: {"requests": r.requests, "errors": dict(r.errors), "ids": r.ids,
                       "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "max_ms": r.max_ms}
            for r in stats.rpcs
        },
    }
