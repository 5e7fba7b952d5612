"""Serialized ``LookupResponse`` / ``LookupBagsResponse`` bytes straight from the vectors' memory.

Building the messages costs three copies of the vector bytes (``tobytes``, the ``Tensor``
field, the nested ``vectors`` field) before protobuf copies them once more to serialize; at
4096 ids x D=64 (1 MiB) that is most of a lookup's time. Both responses are
``{1: Tensor vectors, 2: string model_checksum}`` with ``Tensor = {1: bytes data, 2: packed
int64 shape, 3: DType dtype}``, simple enough to write directly: one ``bytes.join`` copies the
array's memory once; only the two length prefixes around the data are written by hand, the
other fields are protobuf's own serialization (cached: shapes and checksums recur), and
serialized fields concatenate. The output is byte-identical to ``SerializeToString`` (proto3
omits default-valued fields, fields in number order); tests/serving/test_wire.py checks it.
"""
from __future__ import annotations

import functools

import numpy as np

from .v1 import lookup_pb2 as pb

_LEN = 2  # wire type of length-delimited fields


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"only non-negative varints are written here, got {value}")
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


@functools.lru_cache(maxsize=4096)
def _framing(shape: tuple[int, ...], dtype: int, itemsize: int, checksum: str) -> tuple[bytes, bytes]:
    """The bytes before and after the vector data of a response, serialized once per (shape,
    dtype, model): few distinct shapes recur, and a request then costs one cache lookup and one
    join instead of a dozen small serializations. The fields after the data are protobuf's own
    serialization (``Tensor`` fields 2 and 3, then the response's checksum, field 2)."""
    nbytes = itemsize
    for size in shape:
        nbytes *= size
    head = _key(1, _LEN) + _varint(nbytes) if nbytes else b""
    rest = pb.Tensor(shape=shape, dtype=dtype).SerializeToString()
    outer = _key(1, _LEN) + _varint(len(head) + nbytes + len(rest))  # a set message field is written even when empty
    return outer + head, rest + pb.LookupResponse(model_checksum=checksum).SerializeToString()


def vectors_response(array: np.ndarray, dtype: int, checksum: str) -> bytes:
    """The serialized response holding ``array`` (C-contiguous, little-endian float32 or
    float16 matching ``dtype``) and the answering model's checksum."""
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    return framed(array, dtype, checksum)


def framed(array: np.ndarray, dtype: int, checksum: str) -> bytes:
    """``vectors_response`` without its contiguity check, for arrays fresh from a numpy call
    that allocates a C-contiguous result (``take``)."""
    head, tail = _framing(array.shape, dtype, array.itemsize, checksum)
    return b"".join((head, array, tail))  # a C-contiguous array is a bytes-like object: one copy
