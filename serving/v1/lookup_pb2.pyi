from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("feature", "ids", "ids_le", "dtype")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    IDS_LE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    feature: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    ids_le: bytes
    dtype: DType
    def __init__(self, feature: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., ids_le: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("vectors", "model_checksum")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    vectors: Tensor
    model_checksum: str
    def __init__(self, vectors: _Optional[_Union[Tensor, _Mapping]] = ..., model_checksum: _Optional[str] = ...) -> None: ...

class LookupBagsRequest(_message.Message):
    __slots__ = ("features", "lengths", "lengths_le", "ids", "ids_le", "dtype")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_LE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    IDS_LE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedScalarFieldContainer[str]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    lengths_le: bytes
    ids: _containers.RepeatedScalarFieldContainer[int]
    ids_le: bytes
    dtype: DType
    def __init__(self, features: _Optional[_Iterable[str]] = ..., lengths: _Optional[_Iterable[int]] = ..., lengths_le: _Optional[bytes] = ..., ids: _Optional[_Iterable[int]] = ..., ids_le: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LookupBagsResponse(_message.Message):
    __slots__ = ("vectors", "model_checksum")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    vectors: Tensor
    model_checksum: str
    def __init__(self, vectors: _Optional[_Union[Tensor, _Mapping]] = ..., model_checksum: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeatureInfo(_message.Message):
    __slots__ = ("name", "num_embeddings", "pooling", "method", "method_params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_embeddings: int
    pooling: str
    method: str
    method_params: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., num_embeddings: _Optional[int] = ..., pooling: _Optional[str] = ..., method: _Optional[str] = ..., method_params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("features", "dim", "memory_bytes", "full_bytes", "dtype", "tablezip_version", "server_version", "checksum", "source", "load_seconds", "loaded_at", "generation")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TABLEZIP_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureInfo]
    dim: int
    memory_bytes: int
    full_bytes: int
    dtype: str
    tablezip_version: str
    server_version: str
    checksum: str
    source: str
    load_seconds: float
    loaded_at: str
    generation: int
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureInfo, _Mapping]]] = ..., dim: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., full_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., tablezip_version: _Optional[str] = ..., server_version: _Optional[str] = ..., checksum: _Optional[str] = ..., source: _Optional[str] = ..., load_seconds: _Optional[float] = ..., loaded_at: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RpcStats(_message.Message):
    __slots__ = ("method", "requests", "errors", "ids", "p50_ms", "p99_ms", "max_ms")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    method: str
    requests: int
    errors: _containers.ScalarMap[str, int]
    ids: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    def __init__(self, method: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[_Mapping[str, int]] = ..., ids: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., max_ms: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("rpcs", "uptime_seconds", "generation", "reloads", "failed_reloads")
    RPCS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RELOADS_FIELD_NUMBER: _ClassVar[int]
    rpcs: _containers.RepeatedCompositeFieldContainer[RpcStats]
    uptime_seconds: float
    generation: int
    reloads: int
    failed_reloads: int
    def __init__(self, rpcs: _Optional[_Iterable[_Union[RpcStats, _Mapping]]] = ..., uptime_seconds: _Optional[float] = ..., generation: _Optional[int] = ..., reloads: _Optional[int] = ..., failed_reloads: _Optional[int] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("source",)
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    source: str
    def __init__(self, source: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...
