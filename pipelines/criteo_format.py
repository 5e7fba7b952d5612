"""What a prepared Criteo directory is: its columns, the config that made it, and how to read it back.

Kept apart from the prepare code so that the worker-side steps (`criteo_steps`), the driver
(`criteo`) and the readers (`dataset`, `train`) share one definition without importing each
other. `tablezip.pipelines.criteo` re-exports everything public from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = [LABEL, *DENSE, *SPARSE]
N_FIELDS = len(COLUMNS)
SPLITS = ("train", "valid", "test")

FORMAT = "tablezip-criteo-prepared"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PrepareConfig:
    """Everything that determines the prepared output (it is recorded in the manifest).

    ``split="random"`` assigns each line to a split by a seeded hash of its
    global line number (counted over all input lines in the given file order,
    malformed lines included), so the assignment does not depend on
    ``chunk_lines`` and a row keeps its split when other lines turn out to be
    malformed. ``split="ordered"`` keeps file order: the first
    ``fractions[0]`` of the kept rows are train, the next ``fractions[1]``
    valid, the rest test (boundaries rounded half up), which is what a
    temporal evaluation needs.

    How the work is executed (serially or as Ray tasks, how many) is deliberately not part of
    the config: it never changes the output, so it is not recorded either.
    """

    seed: int = 0
    split: str = "random"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_count: int = 1
    shard_rows: int = 1_000_000
    chunk_lines: int = 200_000
    max_reported: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if not isinstance(self.seed, int):
            raise ValueError(f"PrepareConfig.seed must be an int, got {self.seed!r}")
        if self.split not in ("random", "ordered"):
            raise ValueError(f"PrepareConfig.split must be 'random' or 'ordered', got {self.split!r}")
        self._check_fractions()
        for name, low in (("min_count", 1), ("shard_rows", 1), ("chunk_lines", 1), ("max_reported", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"PrepareConfig.{name} must be an int >= {low}, got {value!r}")

    def _check_fractions(self) -> None:
        fr = self.fractions
        if len(fr) != 3:
            raise ValueError(f"PrepareConfig.fractions must have 3 entries (train, valid, test), got {fr!r}")
        if any(not 0.0 <= f <= 1.0 for f in fr):
            raise ValueError(f"PrepareConfig.fractions must each be in [0, 1], got {fr!r}")
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"PrepareConfig.fractions must sum to 1 (within 1e-6), got {fr!r} (sum {sum(fr)})")
        if fr[0] <= 0.0:
            raise ValueError(f"PrepareConfig.fractions[0] (train) must be > 0, got {fr!r}")


@dataclass
class MalformedLine:
    """Where a skipped line is, so that a user can look at it in the raw file."""

    file: str
    line: int  # 1-based, within `file`
    reason: str


class NotPreparedError(ValueError):
    """Raised when a directory is not (or not completely) the output of `prepare_criteo`."""


def final_schema() -> pl.Schema:
    """Column types of the split shards: small ints for ids and labels keep the shards compact."""
    return pl.Schema({LABEL: pl.Int8, **{d: pl.Float32 for d in DENSE}, **{c: pl.Int32 for c in SPARSE}})


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dir; fails loudly (naming the path) on anything else, incl. a half-written dir."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise NotPreparedError(
            f"{prepared_dir} is not a prepared Criteo dir: {path} not found (run prepare_criteo to create one)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise NotPreparedError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NotPreparedError(f"{path} is not a {FORMAT!r} manifest")
    if manifest.get("version") != VERSION:
        raise NotPreparedError(f"{path} has version {manifest.get('version')!r}, this code reads version {VERSION}")
    return manifest


def load_counts(prepared_dir: str | Path, feature: str) -> np.ndarray:
    """Train count per id (int64, length num_embeddings); frequency-aware compression methods start from this."""
    manifest = read_manifest(prepared_dir)
    known = {f["name"]: f["num_embeddings"] for f in manifest["features"]}
    if feature not in known:
        raise KeyError(f"unknown feature {feature!r}; {prepared_dir} has {', '.join(known)}")
    vocab = pl.read_parquet(Path(prepared_dir) / "vocab" / f"{feature}.parquet", columns=["id", "count"])
    counts = np.zeros(known[feature], dtype=np.int64)
    counts[vocab["id"].to_numpy()] = vocab["count"].to_numpy()
    return counts
