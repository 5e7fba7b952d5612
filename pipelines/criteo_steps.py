"""The units of work of a Criteo prepare: parse a run of lines, count train values, encode, stitch.

Every step here is a plain function of picklable arguments that reads and writes files only
under the stage directory the driver (`tablezip.pipelines.criteo.prepare_criteo`) created, so
the very same function runs in-process on the serial path and as a Ray task on the parallel
one. Whatever decides the output (the split of a row, the ids, where shards are cut) is keyed
on *global* indices that the driver computes between steps, never on how the input was cut
into tasks: that is why the parallel output is byte-identical to the serial one.

The steps, in order:

1. `parse_unit`: one `Unit` (a whole file, or a line-aligned byte range of a plain file) ->
   typed raw shards holding the unit-local line and kept-row index of every valid line.
2. `count_group`: raw shards + their global offsets -> split sizes per shard and train
   (value, count) frames per sparse feature; the driver merges them into vocabularies.
3. `encode_group`: raw shards -> ids, cut at the global shard boundaries of each split;
   a shard the group holds completely is written in place, the others as pieces.
4. `stitch_shard`: the pieces of one shard, in global order -> that shard.
"""

from __future__ import annotations

import gzip
import io
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import polars as pl

from .criteo_format import COLUMNS, DENSE, LABEL, N_FIELDS, SPARSE, SPLITS, PrepareConfig, final_schema

Progress = Callable[[int], object] | None

GZIP_MAGIC = b"\x1f\x8b"
_SPLIT = "__split"
_LINE = "__line"  # 0-based line index, malformed lines included (unit-local in raw shards)
_ROW = "__row"  # 0-based index over kept rows (unit-local in raw shards)

RAW_DIR = "raw"
VOCAB_DIR = "vocab"
PIECES_DIR = "pieces"


# --------------------------------------------------------------------------- units of input


@dataclass(frozen=True)
class Unit:
    """A run of whole lines of one input: the file, or the byte range [start, end) of a plain file.

    ``start`` and ``end`` always sit at line starts (see `line_start`), so a unit never holds
    part of a line and every line belongs to exactly one unit.
    """

    index: int  # position among all units, in input order
    file: int  # position of its file among the inputs (a file may be given twice)
    path: str
    start: int = 0
    end: int | None = None  # exclusive; None = to the end of the file

    @property
    def is_range(self) -> bool:
        return self.start != 0 or self.end is not None


def is_gzip(path: Path) -> bool:
    """By magic bytes: suffixes lie."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def line_start(path: Path, offset: int) -> int:
    """The first line start at or after ``offset``: the line straddling it belongs to the range before."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        f.readline()  # reads exactly one byte when offset - 1 is a '\n'
        return f.tell()


class _ByteRange(io.RawIOBase):
    """Reads at most ``length`` bytes of ``raw`` from its current position."""

    def __init__(self, raw: IO[bytes], length: int) -> None:
        self._raw = raw
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._left)
        if n <= 0:
            return 0
        got = self._raw.readinto(memoryview(buffer)[:n]) or 0
        self._left -= got
        return got


@contextmanager
def _open_text(unit: Unit) -> Iterator[tuple[IO[str], Callable[[], int]]]:
    """Open a unit as text split on '\\n' only, with a function giving the bytes consumed so far.

    Consumed bytes are compressed bytes for gzip; they drive the progress bar. Splitting only
    on '\\n' keeps line numbers aligned with `wc -l`; a stray '\\r' stays inside its line. A
    byte range can be decoded on its own because it starts right after a '\\n', and 0x0A never
    occurs inside a multi-byte UTF-8 sequence.
    """
    with open(unit.path, "rb") as raw:
        gz = raw.read(2) == GZIP_MAGIC
        raw.seek(unit.start)
        if gz and unit.is_range:
            raise ValueError(f"{unit.path}: a gzip stream cannot be read from a byte offset")
        binary: IO[bytes]
        if gz:
            binary = gzip.GzipFile(fileobj=raw, mode="rb")
        elif unit.is_range:
            end = unit.end if unit.end is not None else Path(unit.path).stat().st_size
            binary = io.BufferedReader(_ByteRange(raw, end - unit.start))
        else:
            binary = raw
        text = io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline="\n")
        try:
            yield text, lambda: raw.tell() - unit.start
        finally:
            text.detach()
            if binary is not raw:
                binary.close()


# --------------------------------------------------------------------------- parsing


@dataclass
class _ParsedChunk:
    good: pl.DataFrame  # local line index + typed columns of the valid lines
    n_bad: int
    reported: list[tuple[int, str]]  # (0-based local line index, reason), at most the asked budget


def _field_exprs() -> list[pl.Expr]:
    fields = pl.col("__fields")
    return [fields.list.get(i, null_on_oob=True).alias(name) for i, name in enumerate(COLUMNS)]


def _dense_bad(name: str) -> pl.Expr:
    col = pl.col(name)
    return (col != "") & col.cast(pl.Int64, strict=False).is_null()


def _bad_conditions() -> list[tuple[pl.Expr, pl.Expr]]:
    """(is-bad, reason) pairs in the order they are reported; the first true one wins."""
    n_fields = pl.col("__n_fields")
    checks = [
        (pl.col("__text").str.contains("\ufffd", literal=True), pl.lit("line is not valid UTF-8")),
        (n_fields != N_FIELDS, pl.format(f"expected {N_FIELDS} fields, got {{}}", n_fields)),
        (~pl.col(LABEL).is_in(["0", "1"]), pl.format("label: '{}' is not 0 or 1", pl.col(LABEL))),
    ]
    checks += [(_dense_bad(d), pl.format(f"{d}: '{{}}' is not an integer", pl.col(d))) for d in DENSE]
    return checks


def _reason_expr(checks: list[tuple[pl.Expr, pl.Expr]]) -> pl.Expr:
    (first_cond, first_reason), *rest = checks
    expr = pl.when(first_cond).then(first_reason)
    for cond, reason in rest:
        expr = expr.when(cond).then(reason)
    return expr.otherwise(pl.lit(None, dtype=pl.String))


def _dense_transform(name: str) -> pl.Expr:
    """log(1 + max(x, 0)): squashes the heavy-tailed counts; empty (missing) becomes 0."""
    x = pl.col(name).cast(pl.Int64, strict=False).clip(lower_bound=0).cast(pl.Float64)
    return x.log1p().fill_null(0.0).cast(pl.Float32).alias(name)


def _parse_chunk(lines: list[str], report_budget: int) -> _ParsedChunk:
    """Validate and type one chunk of raw lines, all column-wise in polars."""
    checks = _bad_conditions()
    frame = (
        pl.DataFrame({"__text": pl.Series(lines, dtype=pl.String)})
        .with_row_index("__local")
        .with_columns(pl.col("__text").str.strip_chars_end("\r\n"))
        .with_columns(pl.col("__text").str.split("\t").alias("__fields"))
        .with_columns(pl.col("__fields").list.len().alias("__n_fields"), *_field_exprs())
        .with_columns(pl.any_horizontal(cond for cond, _ in checks).fill_null(True).alias("__bad"))
    )
    bad = frame.filter(pl.col("__bad"))
    reported = bad.head(report_budget).select("__local", _reason_expr(checks).alias("reason"))
    good = frame.filter(~pl.col("__bad")).select(
        pl.col("__local").cast(pl.Int64),
        pl.col(LABEL).cast(pl.Int8),
        *(_dense_transform(d) for d in DENSE),
        *SPARSE,
    )
    return _ParsedChunk(good=good, n_bad=bad.height, reported=list(reported.iter_rows()))


@dataclass(frozen=True)
class RawShard:
    """One parsed chunk of a unit on disk; its index columns are unit-local."""

    path: str
    rows: int


@dataclass
class ParsedUnit:
    """What parsing one unit found; line numbers are unit-local until the driver adds offsets."""

    lines: int  # lines read, malformed included
    rows_kept: int
    rows_malformed: int
    reported: list[tuple[int, str]]  # (0-based line within the unit, reason), the first max_reported
    shards: list[RawShard]


def parse_unit(unit: Unit, config: PrepareConfig, stage: str, progress: Progress = None) -> ParsedUnit:
    """Step 1: validate a unit chunk by chunk and write its valid rows, typed, as raw shards.

    Indices stay unit-local because the unit's global offsets are only known once every unit
    before it has been parsed; the driver supplies them to the later steps.
    """
    raw_dir = Path(stage) / RAW_DIR
    result = ParsedUnit(lines=0, rows_kept=0, rows_malformed=0, reported=[], shards=[])
    with _open_text(unit) as (text, consumed):
        position = 0
        while lines := list(itertools.islice(text, config.chunk_lines)):
            chunk = _parse_chunk(lines, config.max_reported - len(result.reported))
            result.reported += [(result.lines + local, reason) for local, reason in chunk.reported]
            good = chunk.good.with_columns(
                (pl.col("__local") + result.lines).alias(_LINE),
                pl.int_range(result.rows_kept, result.rows_kept + chunk.good.height, dtype=pl.Int64).alias(_ROW),
            ).drop("__local")
            if good.height:
                shard = raw_dir / f"raw-{unit.index:05d}-{len(result.shards):06d}.parquet"
                good.write_parquet(shard, compression="lz4")
                result.shards.append(RawShard(str(shard), good.height))
            result.lines += len(lines)
            result.rows_kept += good.height
            result.rows_malformed += chunk.n_bad
            if progress is not None:
                progress(consumed() - position)
                position = consumed()
    return result


# --------------------------------------------------------------------------- splitting


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed, well-mixed 64-bit hash; unlike polars' hash it cannot change between library versions."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit_hash(index: np.ndarray, seed: int) -> np.ndarray:
    """Map (seed, index) to a uniform float in [0, 1): counter-based, so any subset of rows can be split alone."""
    seed_key = _splitmix64(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))
    h = _splitmix64(_splitmix64(index.astype(np.uint64)) ^ seed_key)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _ordered_bounds(fractions: tuple[float, float, float], n_rows: int) -> np.ndarray:
    cumulative = np.cumsum(fractions)[:2]
    return np.floor(cumulative * n_rows + 0.5).astype(np.int64)


@dataclass(frozen=True)
class SplitAssigner:
    """Split ids (0 train, 1 valid, 2 test) from global line / kept-row indices.

    Both rules depend on a row's global index alone (plus the total kept rows for 'ordered'),
    so every task can split its own rows without seeing the others.
    """

    config: PrepareConfig
    rows_kept: int

    def assign(self, lines: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self.config.split == "random":
            bounds = np.cumsum(self.config.fractions)[:2]
            return np.searchsorted(bounds, _unit_hash(lines, self.config.seed), side="right").astype(np.uint8)
        bounds = _ordered_bounds(self.config.fractions, self.rows_kept)
        return np.searchsorted(bounds, rows, side="right").astype(np.uint8)

    def with_split(self, frame: pl.DataFrame) -> pl.DataFrame:
        split = self.assign(frame[_LINE].to_numpy(), frame[_ROW].to_numpy())
        return frame.with_columns(pl.Series(_SPLIT, split, dtype=pl.UInt8))


@dataclass(frozen=True)
class ShardRef:
    """A raw shard together with the global offsets of its unit, known once all units are parsed."""

    path: str
    rows: int
    line_base: int  # global index of the unit's first line
    row_base: int  # global index of the unit's first kept row

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        frame = pl.read_parquet(self.path, columns=columns)
        return frame.with_columns(pl.col(_LINE) + self.line_base, pl.col(_ROW) + self.row_base)


# --------------------------------------------------------------------------- vocabulary


class CountMerger:
    """Sums (value, count) frames, compacting geometrically so total work stays ~linear."""

    def __init__(self) -> None:
        self._merged = pl.DataFrame(schema={"value": pl.String, "count": pl.Int64})
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    def add(self, counts: pl.DataFrame) -> None:
        self._pending.append(counts)
        self._pending_rows += counts.height
        if self._pending_rows > max(self._merged.height, 1_000_000):
            self._compact()

    def _compact(self) -> None:
        if self._pending:
            both = pl.concat([self._merged, *self._pending])
            self._merged = both.group_by("value").agg(pl.col("count").sum())
            self._pending, self._pending_rows = [], 0

    def result(self) -> pl.DataFrame:
        self._compact()
        return self._merged


def _chunk_counts(train: pl.DataFrame) -> list[pl.DataFrame]:
    """One (value, count) frame per sparse feature, computed in parallel."""
    queries = [
        train.lazy().group_by(name).agg(pl.len().cast(pl.Int64).alias("count")).rename({name: "value"})
        for name in SPARSE
    ]
    return pl.collect_all(queries)


def build_vocab(counts: pl.DataFrame, min_count: int) -> pl.DataFrame:
    """Frequent values get ids 0..n-1 by descending train count, ties by value ascending.

    Id 0 is the most frequent value: frequency-aware compression methods rely on this order.
    The order is total (values are unique), so the merge order of the counts cannot show.
    """
    return (
        counts.filter(pl.col("count") >= min_count)
        .sort(["count", "value"], descending=[True, False])
        .with_row_index("id")
        .select("value", pl.col("id").cast(pl.Int32), pl.col("count").cast(pl.Int64))
    )


def _map_ids(frame: pl.DataFrame, vocabs: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Raw strings -> ids; anything outside the vocabulary gets the OOV id n (== num_embeddings)."""
    return frame.with_columns(
        pl.col(name).replace_strict(v["value"], v["id"], default=v.height, return_dtype=pl.Int32)
        for name, v in vocabs.items()
    )


@dataclass
class GroupCounts:
    """What `count_group` found: per-shard split sizes and train counts merged over the group."""

    split_rows: list[tuple[int, int, int]]  # (train, valid, test) rows of each shard, in order
    counts: dict[str, pl.DataFrame]  # per sparse feature: value str, count int64 (train rows only)


def count_group(
    shards: Sequence[ShardRef], config: PrepareConfig, rows_kept: int, progress: Progress = None
) -> GroupCounts:
    """Step 2: split each row by its global index, count the train values of every sparse feature."""
    assigner = SplitAssigner(config, rows_kept)
    mergers = {name: CountMerger() for name in SPARSE}
    split_rows = []
    for ref in shards:
        frame = assigner.with_split(ref.read([_LINE, _ROW, *SPARSE]))
        per_split = np.bincount(frame[_SPLIT].to_numpy(), minlength=len(SPLITS))
        split_rows.append((int(per_split[0]), int(per_split[1]), int(per_split[2])))
        for name, counts in zip(SPARSE, _chunk_counts(frame.filter(pl.col(_SPLIT) == 0))):
            mergers[name].add(counts)
        if progress is not None:
            progress(ref.rows)
    return GroupCounts(split_rows=split_rows, counts={name: m.result() for name, m in mergers.items()})


def read_vocabs(stage: str) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(Path(stage) / VOCAB_DIR / f"{name}.parquet") for name in SPARSE}


# --------------------------------------------------------------------------- writing


def part_path(stage: str | Path, split: str, shard: int) -> Path:
    return Path(stage) / split / f"part-{shard:05d}.parquet"


def write_part(frame: pl.DataFrame, path: Path, shard_rows: int) -> None:
    """The one place a final shard is written, so in-place and stitched shards get the same bytes."""
    frame.rechunk().write_parquet(path, compression="zstd", row_group_size=shard_rows)


def _piece_glob(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}-*.parquet"


class ShardWriter:
    """Cuts one split's rows into shards of exactly ``shard_rows`` (the last shorter) at *global* positions.

    The writer receives the rows of its split from global position ``start`` on; shard k
    holds positions [k * shard_rows, min((k + 1) * shard_rows, total)). A shard whose rows all
    pass through this writer is written in place; the part of a shard shared with another task
    becomes a piece named by its global start position, for `stitch_shard`. Boundaries thus
    depend only on the data, never on chunk_lines or on the task decomposition; the serial
    path is the special case of one writer from 0 to ``total``, which never makes a piece.
    """

    def __init__(self, stage: Path, split: str, shard_rows: int, start: int, total: int) -> None:
        self._stage = stage
        self._split = split
        self._shard_rows = shard_rows
        self._total = total
        self._position = start  # global position of the first buffered row
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        self.pieces: list[int] = []  # shards this writer left pieces of

    def _until_boundary(self) -> int:
        shard_end = min((self._position // self._shard_rows + 1) * self._shard_rows, self._total)
        if shard_end <= self._position:
            raise RuntimeError(f"{self._split}: more rows than the {self._total} counted for this split")
        return shard_end - self._position

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            return
        self._buffer.append(frame)
        self._buffered += frame.height
        while self._buffered and self._buffered >= (need := self._until_boundary()):
            data = pl.concat(self._buffer)
            self._emit(data.head(need))
            rest = data.slice(need)
            self._buffer, self._buffered = [rest], rest.height

    def close(self) -> list[int]:
        """Flush what is left (always part of a shard that continues in the next task)."""
        if self._buffered:
            self._emit(pl.concat(self._buffer))
        self._buffer, self._buffered = [], 0
        return self.pieces

    def _emit(self, frame: pl.DataFrame) -> None:
        shard = self._position // self._shard_rows
        shard_start = shard * self._shard_rows
        shard_end = min(shard_start + self._shard_rows, self._total)
        if self._position == shard_start and self._position + frame.height == shard_end:
            write_part(frame, part_path(self._stage, self._split, shard), self._shard_rows)
        else:
            piece = self._stage / PIECES_DIR / f"{self._split}-{shard:05d}-{self._position:012d}.parquet"
            frame.write_parquet(piece, compression="lz4")
            if shard not in self.pieces:
                self.pieces.append(shard)
        self._position += frame.height


def encode_group(
    shards: Sequence[ShardRef],
    config: PrepareConfig,
    rows_kept: int,
    stage: str,
    starts: tuple[int, int, int],
    totals: tuple[int, int, int],
    progress: Progress = None,
) -> list[tuple[str, int]]:
    """Step 3: map values to ids with the merged vocabularies and write the group's rows per split.

    ``starts`` are the global positions of the group's first row in each split, ``totals``
    the split sizes. Returns the (split, shard) pairs this group left pieces of.
    """
    assigner = SplitAssigner(config, rows_kept)
    vocabs = read_vocabs(stage)
    schema = final_schema()
    writers = {
        name: ShardWriter(Path(stage), name, config.shard_rows, start, total)
        for name, start, total in zip(SPLITS, starts, totals)
    }
    for ref in shards:
        frame = _map_ids(assigner.with_split(ref.read()), vocabs)
        for split_id, name in enumerate(SPLITS):
            writers[name].add(frame.filter(pl.col(_SPLIT) == split_id).select(schema.names()))
        if progress is not None:
            progress(ref.rows)
    return [(name, shard) for name, writer in writers.items() for shard in writer.close()]


def stitch_shard(stage: str, split: str, shard: int, rows: int, shard_rows: int, progress: Progress = None) -> None:
    """Step 4: concatenate the pieces of one shard in global order and write it like any other shard."""
    pieces = sorted((Path(stage) / PIECES_DIR).glob(_piece_glob(split, shard)))  # zero-padded start: name order
    frame = pl.concat([pl.read_parquet(p) for p in pieces])
    if frame.height != rows:
        raise RuntimeError(f"{split} shard {shard}: pieces hold {frame.height} rows, expected {rows}")
    write_part(frame, part_path(stage, split, shard), shard_rows)
    if progress is not None:
        progress(rows)


def write_empty_part(stage: str | Path, split: str, shard_rows: int) -> None:
    """An empty split still gets one empty shard, so readers see the schema."""
    write_part(pl.DataFrame(schema=final_schema()), part_path(stage, split, 0), shard_rows)
