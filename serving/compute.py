"""The work behind Lookup and LookupBags, in chunks of about ``CHUNK_IDS`` ids.

Why chunks: a request near ``--max-ids`` runs for a second or more; between chunks the handler
checks its deadline (``check``), so a request whose client gave up stops within one chunk
instead of occupying a worker to the end. Requests up to one chunk (every latency-sensitive
one) run as a single call with no extra copy. Pooled bags are independent of each other, so
cutting a batch at bag boundaries gives the same vectors as one forward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .model import LoadedModel
from .reader import Reader
from .validation import BagLayout

CHUNK_IDS = 1 << 16

Check = Callable[[str], None]


def read_vectors(reader: Reader, ids: np.ndarray, check: Check, chunk: int = CHUNK_IDS) -> torch.Tensor | np.ndarray:
    """[N, D] unpooled vectors of ``ids`` (int64, validated): a numpy array from a reader's
    numpy path (one-table Full features, requests up to one chunk), else a tensor."""
    if ids.size <= chunk and getattr(reader, "numpy_table", None) is not None:
        check("the lookup")
        return reader.read_numpy(ids)  # type: ignore[attr-defined]
    all_ids = torch.from_numpy(ids)
    if ids.size <= chunk:
        check("the lookup")
        return reader(all_ids)
    out: torch.Tensor | None = None
    for start in range(0, ids.size, chunk):
        check(f"ids {start}..{min(start + chunk, ids.size) - 1} of {ids.size}")
        part = reader(all_ids[start : start + chunk])
        if out is None:
            out = torch.empty((ids.size, part.shape[1]), dtype=part.dtype)
        out[start : start + part.shape[0]] = part
    assert out is not None
    return out


def bag_chunks(lengths: np.ndarray, chunk: int = CHUNK_IDS) -> list[tuple[int, int]]:
    """Ranges of bags holding about ``chunk`` ids + bags each (a bag costs an output row even
    when empty); at least one bag per range."""
    batch = lengths.shape[1]
    per_bag = lengths.sum(axis=0, dtype=np.int64) + 1
    cost = np.cumsum(per_bag)
    if batch == 0 or cost[-1] <= chunk:
        return [(0, batch)]
    cuts = np.searchsorted(cost, np.arange(chunk, cost[-1], chunk), side="right")
    # A bag bigger than a chunk gets a range of its own; every other range then starts past the
    # previous grid line minus one bag, so it holds at most two chunks.
    big = np.flatnonzero(per_bag > chunk)
    bounds = np.unique(np.concatenate([[0], cuts, big, big + 1, [batch]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def pool_bags(
    model: LoadedModel, positions: Sequence[int], lengths: np.ndarray, ids: np.ndarray, check: Check, chunk: int = CHUNK_IDS,
    layout: BagLayout | None = None,
) -> torch.Tensor | np.ndarray:
    """[B, F_req, D] pooled vectors: the model's own forward, or ``model.bag_pooler`` (numpy,
    checked against that forward at load) when it covers every requested feature.

    ``lengths`` is [F_req, B] for the requested features (model positions ``positions``), ``ids``
    their ids feature-major. The model sees its features in its own order, the unrequested ones
    with empty bags; the answer holds the requested columns in request order. ``layout``: the
    request's cached shape (``lengths`` is its ``lengths``), which lets the pooler reuse its
    per-shape work."""
    num, batch = len(model.feature_names), lengths.shape[1]
    if batch == 0:
        check("the lookup")
        return torch.zeros(0, len(positions), model.dim)
    pooler = model.bag_pooler
    if pooler is not None and pooler.covers(positions) and ids.size + batch <= chunk:
        check("the lookup")  # the common case: one chunk, no copies of the ids
        return pooler.pool(positions, lengths, ids, layout)
    positions = list(positions)  # numpy and torch read a tuple index as one index per axis
    # Offsets of every (feature, bag) into ids: feature f's ids of bags [a, b) are ids[offsets[f, a]:offsets[f, b]].
    offsets = np.zeros((len(positions), batch + 1), dtype=np.int64)
    np.cumsum(lengths, axis=1, out=offsets[:, 1:])
    offsets += np.concatenate([[0], np.cumsum(offsets[:, -1])[:-1]])[:, None]
    if pooler is not None and pooler.covers(positions):
        parts = []
        for a, b in bag_chunks(lengths, chunk):
            check(f"bags {a}..{b - 1} of {batch}")
            values = np.concatenate([ids[offsets[i, a] : offsets[i, b]] for i in range(len(positions))])
            parts.append(pooler.pool(positions, lengths[:, a:b], values))
        return np.concatenate(parts)
    order = np.argsort(positions, kind="stable")  # request index of each feature, in model order
    keep_all = positions == list(range(num))
    out: torch.Tensor | None = None
    for a, b in bag_chunks(lengths, chunk):
        check("the lookup" if (a, b) == (0, batch) else f"bags {a}..{b - 1} of {batch}")
        full_lengths = np.zeros((num, b - a), dtype=np.int64)
        full_lengths[positions] = lengths[:, a:b]
        values = np.concatenate([ids[offsets[i, a] : offsets[i, b]] for i in order])
        kjt = KeyedJaggedTensor(
            keys=list(model.feature_names), values=torch.from_numpy(values), lengths=torch.from_numpy(full_lengths.reshape(-1))
        )
        with torch.no_grad():
            pooled = model.module(kjt).values().view(b - a, num, model.dim)
        part = pooled if keep_all else pooled[:, positions]
        if (a, b) == (0, batch):
            return part
        if out is None:
            out = torch.empty((batch, len(positions), model.dim), dtype=part.dtype)
        out[a:b] = part
    assert out is not None
    return out
