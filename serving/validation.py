"""Request decoding and limits: every malformed request becomes a ``ServingError`` with the gRPC
status and a message naming the problem, before any model work starts.

Ids arrive either as ``repeated int64`` or packed little-endian in ``*_le`` bytes; both decode
with one numpy call (no per-id Python work). The limits are checked on counts before any
array is built, so an oversized request costs the server nothing but its parse.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import grpc
import numpy as np

from .v1 import lookup_pb2 as pb

DEFAULT_MAX_IDS = 1_000_000
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_LITTLE_ENDIAN = {"int64": np.dtype("<i8"), "int32": np.dtype("<i4")}  # the packed *_le encodings
_NATIVE_LE = np.dtype("int64") == np.dtype("<i8")
_OUT_DTYPES = {pb.DTYPE_UNSPECIFIED: np.dtype("<f4"), pb.FLOAT32: np.dtype("<f4"), pb.FLOAT16: np.dtype("<f2")}


class ServingError(Exception):
    """A request the server refuses: ``code`` is the gRPC status the client receives."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Limits:
    """Per-request limits; ``max_ids`` bounds ids and, for LookupBags, bags (each bag is a row of
    output, so an empty-bag flood is as costly as an id flood)."""

    max_ids: int = DEFAULT_MAX_IDS

    def __post_init__(self) -> None:
        if self.max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {self.max_ids}")


def out_dtype(value: int) -> np.dtype:
    """The numpy dtype of the answer; unknown enum values (proto3 keeps them) are refused."""
    try:
        return _OUT_DTYPES[value]
    except KeyError:
        raise invalid(f"dtype {value} is not one of FLOAT32 (1), FLOAT16 (2)") from None


def _packed(data: bytes, dtype: str, width: int, count_limit: int, what: str, limits_name: str, copy: bool) -> np.ndarray:
    if len(data) % width:
        raise invalid(f"{what}_le has {len(data)} bytes, not a multiple of {width} (packed little-endian {dtype})")
    n = len(data) // width
    if n > count_limit:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{n} {what} exceed the server's {limits_name}={count_limit}")
    # On a little-endian host with copy=False this is a view of the request's bytes: no copy.
    array = np.frombuffer(data, dtype=_LITTLE_ENDIAN[dtype])
    if _NATIVE_LE:  # no astype call (it parses the dtype name each time): a few us per request on a cold core
        return array.copy() if copy else array
    return array.astype(dtype, copy=True)


def packed_has_negative(data: bytes, width: int) -> bool:
    """Whether packed little-endian signed integers of ``width`` bytes hold a negative value,
    read off their most significant bytes (``data[width-1::width]``, one strided byte copy) with
    ``bytes.isascii`` (is any high bit set). No numpy call: a numpy reduction over more than ~500
    values releases the GIL, and each call costs several us on a cold core (benchmarks/NOTES.md)."""
    return not data[width - 1 :: width].isascii()


def decode_ints(
    repeated: Sequence[int], packed: bytes, *, what: str, dtype: str, limit: int, limit_name: str = "--max-ids",
    copy: bool = True,
) -> np.ndarray:
    """One of ``repeated`` / ``packed`` (not both) as a native numpy array: writable, or with
    ``copy=False`` possibly a read-only view of ``packed`` (enough for the numpy paths, which
    only read ids; ``torch.from_numpy`` needs a writable array)."""
    width = _LITTLE_ENDIAN[dtype].itemsize
    if len(repeated) and len(packed):
        raise invalid(f"set either {what} or {what}_le, not both")
    if len(packed):
        return _packed(packed, dtype, width, limit, what, limit_name, copy)
    if len(repeated) > limit:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(repeated)} {what} exceed the server's {limit_name}={limit}")
    return np.array(repeated, dtype=dtype)


def check_ids(ids: np.ndarray, feature: str) -> None:
    """Negative ids are outside every feature's contract (ids >= num_embeddings are served by the
    method's OOV contract)."""
    if ids.size and ids.min() < 0:
        where = int(np.flatnonzero(ids < 0)[0])
        raise invalid(f"id {int(ids[where])} at position {where} of feature {feature!r} is negative; ids must be >= 0")


def check_bag_ids(ids: np.ndarray, lengths: np.ndarray, features: Sequence[str]) -> None:
    """``check_ids`` for a KeyedJaggedTensor batch: the message names the feature of the first
    negative id and its position among that feature's ids (``lengths`` is [F, B])."""
    if ids.size and ids.min() < 0:
        first = int(np.flatnonzero(ids < 0)[0])
        ends = np.cumsum(lengths.sum(axis=1, dtype=np.int64))
        f = int(np.searchsorted(ends, first, side="right"))
        start = int(ends[f - 1]) if f else 0
        raise invalid(f"id {int(ids[first])} at position {first - start} of feature {features[f]!r} is negative; ids must be >= 0")


@functools.lru_cache(maxsize=16)
def _feature_index(known: tuple[str, ...]) -> dict[str, int]:
    return {name: i for i, name in enumerate(known)}


@functools.lru_cache(maxsize=1024)  # bounded: feature lists come from clients
def _valid_positions(requested: tuple[str, ...], known: tuple[str, ...]) -> tuple[int, ...] | None:
    """Positions of a valid feature list (every name known, none twice), else None. Cached: clients
    send the same list request after request, and for 26 features the comprehension and the
    duplicate check were ~9 us of a ~30 us LookupBags handler (benchmarks/NOTES.md)."""
    index = _feature_index(known)
    positions = tuple(index.get(name, -1) for name in requested)
    if -1 in positions or len(set(positions)) != len(positions):
        return None
    return positions


def check_features(requested: Sequence[str], known: Sequence[str]) -> tuple[int, ...]:
    """Model positions of the requested features: NOT_FOUND names an unknown one. A tuple (the
    cached one in the common case): the pooler and the layout cache key on it as it is."""
    if not requested:
        raise invalid("features is empty; name at least one feature")
    valid = _valid_positions(tuple(requested), tuple(known))
    if valid is not None:
        return valid  # the common case; the loop below finds what is wrong
    index = _feature_index(tuple(known))
    positions = []
    seen: set[str] = set()
    for name in requested:
        if name not in index:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"unknown feature {name!r}; the model has {list(known)}")
        if name in seen:
            raise invalid(f"feature {name!r} appears twice in features")
        seen.add(name)
        positions.append(index[name])
    return tuple(positions)


@dataclass
class BagLayout:
    """The validated lengths of one LookupBags request shape: ``lengths`` [F, B] (read-only),
    ``batch`` B and ``total`` ids. ``pool_plan`` is the model's pooler's per-shape work (see
    ``NumpyBagPooler``), filled on first use: a layout lives in its model's ``LayoutCache``, so
    the plan never outlives the model it was made for."""

    lengths: np.ndarray
    batch: int
    total: int
    pool_plan: Any = None


class LayoutCache:
    """Validated layouts by (feature positions, packed lengths bytes).

    Why: clients send the same request shape over and over (Criteo-style batches: one id per
    feature and example, a fixed batch size), and re-validating and re-deriving it per request
    (the lengths' sign, sum, longest bag, the empty bags' places) was ~10 numpy calls, each
    several times its loop cost on a cold core in the server (benchmarks/NOTES.md, "LookupBags
    layout cache"). Same bytes and same features give the same layout, so the lookup is exact; only
    packed lengths are cached (``repeated`` ones are decoded as before), only valid ones, bounded
    in entries and bytes per key (keys come from clients)."""

    def __init__(self, max_entries: int = 256, max_key_bytes: int = 1 << 16) -> None:
        self.max_entries = max_entries
        self.max_key_bytes = max_key_bytes
        self._layouts: dict[tuple[tuple[int, ...], bytes], BagLayout] = {}

    def __len__(self) -> int:
        return len(self._layouts)

    def layout(self, positions: Sequence[int], repeated: Sequence[int], packed: bytes, num_ids: int, limits: Limits) -> BagLayout:
        """The request's validated layout (a cached one when ``packed`` was seen before with these
        features); raises ``ServingError`` as ``decode_ints`` / ``check_lengths`` do."""
        key = (tuple(positions), packed)
        cached = self._layouts.get(key) if packed else None
        if cached is not None and not len(repeated):
            if cached.total != num_ids:
                raise invalid(f"lengths sum to {cached.total} but {num_ids} ids were sent")
            return cached
        lengths = decode_ints(
            repeated, packed, what="lengths", dtype="int32", limit=limits.max_ids,
            limit_name="--max-ids (one length per bag)", copy=False,
        )
        batch = check_lengths(lengths, len(positions), num_ids, packed)
        layout = BagLayout(lengths.reshape(len(positions), batch), batch, num_ids)
        if packed and len(packed) <= self.max_key_bytes:
            if len(self._layouts) >= self.max_entries:
                self._layouts.clear()  # simple and bounded; a steady client refills it at once
            self._layouts[key] = layout
        return layout


def check_lengths(lengths: np.ndarray, num_features: int, num_ids: int, packed: bytes = b"") -> int:
    """Validate KeyedJaggedTensor lengths (F*B, feature-major); returns B. ``packed``: the request's
    packed little-endian int32 lengths, when they came that way: their sign bytes are checked
    without a numpy call (``packed_has_negative``)."""
    if lengths.size % num_features:
        raise invalid(f"{lengths.size} lengths for {num_features} features: expected a multiple of {num_features} (F*B)")
    if lengths.size and (not packed or packed_has_negative(packed, 4)) and lengths.min() < 0:
        where = int(np.flatnonzero(lengths < 0)[0])
        raise invalid(f"length {int(lengths[where])} at position {where} is negative")
    total = int(lengths.sum(dtype=np.int64))
    if total != num_ids:
        raise invalid(f"lengths sum to {total} but {num_ids} ids were sent")
    return lengths.size // num_features
