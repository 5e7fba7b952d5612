"""Read raw Criteo TSV files and prepare them for training, serially or as Ray tasks.

Raw Criteo (Kaggle ``train.txt`` layout: tab separated, no header,
``label, I1..I13, C1..C26``) is too slow to parse on every epoch and its
categorical values are opaque hex strings. ``prepare_criteo`` parses it once,
splits it, builds per-feature vocabularies from the train split and writes
integer ids to parquet, so that training only has to read dense tensors.

Prepared directory layout::

    out_dir/
      manifest.json                  # written last: its presence marks a complete dir
      train/part-00000.parquet ...   # label int8, I1..I13 float32, C1..C26 int32
      valid/part-00000.parquet ...
      test/part-00000.parquet ...
      vocab/C1.parquet ...           # value str, id int32, count int64 (train counts)

Parsing is vectorised with polars over chunks of ``chunk_lines`` lines, so
memory stays bounded however large the inputs are.

This module is the driver. The work itself is four steps in `criteo_steps` (parse units of
input, count train values, encode, stitch shards), run in-process or as Ray tasks by an
executor from `prepare_ray`. Between steps the driver turns per-task results into global
offsets (lines, kept rows, split positions) and merges the per-task train counts into the
vocabularies; because every decision is keyed on those global offsets, the output does not
depend on the executor or on how the input was cut.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from . import criteo_steps as steps
from .criteo_format import (
    DENSE,
    FORMAT,
    LABEL,
    MANIFEST,
    SPARSE,
    SPLITS,
    VERSION,
    MalformedLine,
    NotPreparedError,
    PrepareConfig,
    load_counts,
    read_manifest,
)
from .prepare_ray import RayExecutor, SerialExecutor, ray_executor

__all__ = [
    "AUTO_SERIAL_BYTES",
    "DENSE",
    "FORMAT",
    "LABEL",
    "SPARSE",
    "SPLITS",
    "VERSION",
    "MalformedLine",
    "NotPreparedError",
    "PrepareConfig",
    "PrepareReport",
    "load_counts",
    "prepare_criteo",
    "read_manifest",
]

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".prepare-tmp-"

# With workers=None (the CLI default) inputs smaller than this are prepared serially: below it,
# starting Ray and its workers costs more than the parallel steps save (see the README numbers).
AUTO_SERIAL_BYTES = 256 * 2**20
# A plain file is cut into line-aligned byte ranges of about total / (4 * workers) bytes, never
# smaller than this: finer cuts only add tasks and raw shards.
MIN_RANGE_BYTES = 8 * 2**20

Executor = SerialExecutor | RayExecutor


# --------------------------------------------------------------------------- report


@dataclass
class PrepareReport:
    """What happened during a prepare; malformed lines are skipped, so the counts are the evidence."""

    rows_read: int
    rows_kept: int
    rows_malformed: int
    rows_per_split: dict[str, int]
    first_malformed: list[MalformedLine]
    cardinalities: dict[str, int]  # num_embeddings per sparse feature (OOV id == this value)
    seconds: float
    out_dir: str
    execution: str = "serial"  # how it ran; never affects the output, so it is not in the manifest

    def summary(self) -> str:
        """A few human readable lines for the CLI."""
        splits = ", ".join(f"{name} {n:,}" for name, n in self.rows_per_split.items())
        lines = [
            f"prepared {self.out_dir} in {self.seconds:.1f}s ({self.execution})",
            f"rows: read {self.rows_read:,}, kept {self.rows_kept:,}, malformed {self.rows_malformed:,}",
            f"splits: {splits}",
            "num_embeddings: " + ", ".join(f"{k}={v:,}" for k, v in self.cardinalities.items()),
        ]
        if self.first_malformed:
            shown = len(self.first_malformed)
            lines.append(f"first {shown} malformed line(s):")
            lines += [f"  {m.file}:{m.line}: {m.reason}" for m in self.first_malformed]
        return "\n".join(lines)


# --------------------------------------------------------------------------- checks


def _check_inputs(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    resolved = [Path(p) for p in paths]
    if not resolved:
        raise ValueError("prepare_criteo needs at least one input path")
    missing = [str(p) for p in resolved if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Criteo input file(s) not found: {', '.join(missing)}")
    return resolved


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to mix a new prepare with an old one; stale temp dirs of crashed runs are ignored."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise NotADirectoryError(f"out_dir {out_dir} exists and is not a directory")
        leftovers = [p.name for p in out_dir.iterdir() if not p.name.startswith(_TMP_PREFIX)]
        if leftovers:
            shown = ", ".join(sorted(leftovers)[:5])
            raise FileExistsError(f"out_dir {out_dir} is not empty ({shown}); remove it first")
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_execution(workers: int | None, range_bytes: int | None) -> None:
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be None (all CPUs) or an int >= 0 (0 and 1 mean serial), got {workers!r}")
    if range_bytes is not None and (not isinstance(range_bytes, int) or range_bytes < 1):
        raise ValueError(f"range_bytes must be None or an int >= 1, got {range_bytes!r}")


@contextmanager
def _executor(inputs: list[Path], workers: int | None, address: str | None) -> Iterator[Executor]:
    """Serial for workers 0/1, and for small inputs when workers is None; Ray otherwise."""
    if workers is not None and workers <= 1:
        if address:
            logger.warning("workers=%d runs serially; ignoring the Ray address %s", workers, address)
        yield SerialExecutor()
        return
    total = sum(p.stat().st_size for p in inputs)
    if workers is None and address is None and total < AUTO_SERIAL_BYTES:
        logger.info("inputs are %.1f MiB (< %d MiB): preparing serially, faster than starting Ray",
                    total / 2**20, AUTO_SERIAL_BYTES // 2**20)
        yield SerialExecutor()
        return
    with ray_executor(workers, address) as executor:
        yield executor


# --------------------------------------------------------------------------- planning


def _plan_units(inputs: list[Path], parallelism: int, range_bytes: int | None) -> list[steps.Unit]:
    """Cut the inputs into units of whole lines: a gzip file is one unit (a deflate stream has no
    seek points); a plain file larger than ``range_bytes`` is cut at line starts.

    Serially (parallelism 1, no ``range_bytes``) every file is one unit, as it always was.
    Units carry absolute paths: a Ray worker need not share the driver's working directory.
    """
    if range_bytes is None and parallelism > 1:
        plain = sum(p.stat().st_size for p in inputs if not steps.is_gzip(p))
        range_bytes = max(MIN_RANGE_BYTES, math.ceil(plain / (4 * parallelism)))
    units: list[steps.Unit] = []
    for file_index, path in enumerate(p.resolve() for p in inputs):
        size = path.stat().st_size
        if range_bytes is None or size <= range_bytes or steps.is_gzip(path):
            units.append(steps.Unit(len(units), file_index, str(path)))
            continue
        cuts = {steps.line_start(path, k * range_bytes) for k in range(1, math.ceil(size / range_bytes))}
        bounds = [0, *sorted(c for c in cuts if 0 < c < size), size]
        for start, end in zip(bounds, bounds[1:]):
            units.append(steps.Unit(len(units), file_index, str(path), start, end))
    return units


def _unit_bytes(unit: steps.Unit) -> int:
    end = unit.end if unit.end is not None else Path(unit.path).stat().st_size
    return end - unit.start


@dataclass
class _Parsed:
    """The parse step's results put in global terms."""

    rows_read: int
    rows_kept: int
    rows_malformed: int
    first_malformed: list[MalformedLine]
    shards: list[steps.ShardRef]


def _globalise(
    inputs: list[Path], units: list[steps.Unit], parsed: list[steps.ParsedUnit], max_reported: int
) -> _Parsed:
    """Prefix sums over units in input order give every unit its global line and kept-row offset,
    and every reported line its number within its file (named as the caller gave it)."""
    result = _Parsed(rows_read=0, rows_kept=0, rows_malformed=0, first_malformed=[], shards=[])
    lines_in_file: dict[int, int] = {}
    for unit, done in zip(units, parsed):
        before = lines_in_file.get(unit.file, 0)
        name = str(inputs[unit.file])
        result.first_malformed += [MalformedLine(name, before + local + 1, why) for local, why in done.reported]
        result.shards += [steps.ShardRef(s.path, s.rows, result.rows_read, result.rows_kept) for s in done.shards]
        lines_in_file[unit.file] = before + done.lines
        result.rows_read += done.lines
        result.rows_kept += done.rows_kept
        result.rows_malformed += done.rows_malformed
    del result.first_malformed[max_reported:]
    return result


def _groups(shards: list[steps.ShardRef], parallelism: int) -> list[list[steps.ShardRef]]:
    """Contiguous runs of raw shards, about 2 per worker and balanced by rows, as count/encode tasks.

    Contiguous so that each group's rows occupy one contiguous range of every split.
    """
    if not shards:
        return []
    n = 1 if parallelism == 1 else min(len(shards), 2 * parallelism)
    total = sum(s.rows for s in shards)
    groups: list[list[steps.ShardRef]] = [[]]
    done, target = 0, 1
    for shard in shards:
        if groups[-1] and done >= total * target / n:
            groups.append([])
            while done >= total * target / n:
                target += 1
        groups[-1].append(shard)
        done += shard.rows
    return groups


# --------------------------------------------------------------------------- steps between tasks


def _merge_counts(counted: list[steps.GroupCounts]) -> dict[str, pl.DataFrame]:
    """Sum the groups' train counts per feature: the vocabularies see all of train, whatever the cut."""
    mergers = {name: steps.CountMerger() for name in SPARSE}
    for group in counted:
        for name in SPARSE:
            mergers[name].add(group.counts[name])
    return {name: merger.result() for name, merger in mergers.items()}


def _split_starts(counted: list[steps.GroupCounts]) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Each group's first global position in every split, and the split sizes."""
    starts = []
    position = [0, 0, 0]
    for group in counted:
        starts.append((position[0], position[1], position[2]))
        for rows in group.split_rows:
            position = [p + r for p, r in zip(position, rows)]
    return starts, (position[0], position[1], position[2])


def _write_vocabs(vocabs: dict[str, pl.DataFrame], vocab_dir: Path) -> None:
    for name, vocab in vocabs.items():
        vocab.write_parquet(vocab_dir / f"{name}.parquet", compression="zstd")


def _write_shards(
    executor: Executor,
    groups: list[list[steps.ShardRef]],
    counted: list[steps.GroupCounts],
    config: PrepareConfig,
    rows_kept: int,
    stage: Path,
    progress: bool,
) -> dict[str, int]:
    """Encode every group, stitch the shards that span groups, give empty splits their empty shard."""
    starts, totals = _split_starts(counted)
    calls = [(group, config, rows_kept, str(stage), start, totals) for group, start in zip(groups, starts)]
    left = executor.map("criteo: encode", steps.encode_group, calls, [sum(s.rows for s in g) for g in groups],
                        progress=progress)
    to_stitch = sorted({piece for pieces in left for piece in pieces}, key=lambda p: (SPLITS.index(p[0]), p[1]))
    size = dict(zip(SPLITS, totals))
    rows = [min(config.shard_rows, size[split] - shard * config.shard_rows) for split, shard in to_stitch]
    if to_stitch:
        calls = [(str(stage), split, shard, n, config.shard_rows) for (split, shard), n in zip(to_stitch, rows)]
        executor.map("criteo: stitch", steps.stitch_shard, calls, rows, progress=progress)
    for split, n in size.items():
        if n == 0:
            steps.write_empty_part(stage, split, config.shard_rows)
    return size


# --------------------------------------------------------------------------- manifest / publish


def _input_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    mtime = datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc).isoformat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime": mtime}


def _manifest(
    paths: list[Path],
    config: PrepareConfig,
    parsed: _Parsed,
    rows_per_split: dict[str, int],
    vocabs: dict[str, pl.DataFrame],
    train_counts: dict[str, pl.DataFrame],
) -> dict[str, Any]:
    features = []
    for name, vocab in vocabs.items():
        train_total = int(train_counts[name]["count"].sum())
        in_vocab = int(vocab["count"].sum())
        features.append({"name": name, "num_embeddings": vocab.height, "oov_train_count": train_total - in_vocab})
    return {
        "format": FORMAT,
        "version": VERSION,
        "inputs": [_input_record(p) for p in paths],
        "config": dataclasses.asdict(config),
        "split_key": "random: hash(seed, global 0-based line index incl. malformed); ordered: kept-row index",
        "rows_read": parsed.rows_read,
        "rows_kept": parsed.rows_kept,
        "rows_per_split": rows_per_split,
        "rows_malformed": parsed.rows_malformed,
        "first_malformed": [dataclasses.asdict(m) for m in parsed.first_malformed],
        "label": LABEL,
        "dense": DENSE,
        "dense_transform": "log1p(max(x, 0)), empty -> 0",
        "features": features,
        "created": datetime.now(tz=timezone.utc).isoformat(timespec="seconds"),
    }


def _publish(stage: Path, out_dir: Path) -> None:
    """Move the finished pieces into out_dir, manifest last: without it the dir never reads as prepared."""
    for name in (*SPLITS, steps.VOCAB_DIR):
        (stage / name).rename(out_dir / name)
    (stage / MANIFEST).rename(out_dir / MANIFEST)


# --------------------------------------------------------------------------- prepare


def _prepare(
    inputs: list[Path],
    out: Path,
    config: PrepareConfig,
    executor: Executor,
    progress: bool,
    range_bytes: int | None,
) -> tuple[_Parsed, dict[str, int], dict[str, pl.DataFrame]]:
    """All steps inside a stage dir that is published at the end and removed whatever happens."""
    stage = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out.resolve()))  # absolute: tasks may run elsewhere
    try:
        # Tasks only ever create files, never directories: a task that outlives a failed prepare
        # then fails instead of re-creating the stage dir that was just removed.
        for name in (steps.RAW_DIR, steps.PIECES_DIR, steps.VOCAB_DIR, *SPLITS):
            (stage / name).mkdir()
        units = _plan_units(inputs, executor.parallelism, range_bytes)
        parsed_units = executor.map("criteo: parse", steps.parse_unit, [(u, config, str(stage)) for u in units],
                                    [_unit_bytes(u) for u in units], unit="B", progress=progress)
        parsed = _globalise(inputs, units, parsed_units, config.max_reported)
        for bad in parsed.first_malformed:
            logger.warning("skipping malformed line %s:%d: %s", bad.file, bad.line, bad.reason)

        groups = _groups(parsed.shards, executor.parallelism)
        counted = executor.map("criteo: count", steps.count_group, [(g, config, parsed.rows_kept) for g in groups],
                               [sum(s.rows for s in g) for g in groups], progress=progress)
        train_counts = _merge_counts(counted)
        vocabs = {name: steps.build_vocab(train_counts[name], config.min_count) for name in SPARSE}
        _write_vocabs(vocabs, stage / steps.VOCAB_DIR)
        rows_per_split = _write_shards(executor, groups, counted, config, parsed.rows_kept, stage, progress)

        shutil.rmtree(stage / steps.RAW_DIR)
        shutil.rmtree(stage / steps.PIECES_DIR)
        manifest = _manifest(inputs, config, parsed, rows_per_split, vocabs, train_counts)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return parsed, rows_per_split, vocabs


def prepare_criteo(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    config: PrepareConfig = PrepareConfig(),
    progress: bool = True,
    *,
    workers: int | None = 1,
    address: str | None = None,
    range_bytes: int | None = None,
) -> PrepareReport:
    """Parse, validate, split, build train vocabularies and write id-encoded parquet shards.

    Work happens in a temp dir inside ``out_dir`` that is moved into place at
    the end (and removed on failure), so an interrupted prepare never leaves a
    directory that `read_manifest` would accept. Malformed lines are skipped
    and counted, never fatal.

    Execution (never changes a byte of the output): ``workers`` 0 or 1 runs everything in this
    process; ``workers`` > 1 runs the steps as Ray tasks, at most ``workers`` at a time;
    ``workers=None`` uses all CPUs of the Ray in use, but prepares inputs smaller than
    `AUTO_SERIAL_BYTES` serially. An initialised Ray is reused; otherwise one is started on
    ``address`` or locally, and shut down at the end. ``range_bytes`` overrides the size of the
    byte ranges plain files are cut into (by default only with Ray: about a quarter of the
    plain bytes per worker, at least 8 MiB); gzip files are always one task each.
    """
    start = time.perf_counter()
    inputs = _check_inputs(paths)
    _check_execution(workers, range_bytes)
    out = Path(out_dir)
    _check_out_dir(out)
    with _executor(inputs, workers, address) as executor:
        parsed, rows_per_split, vocabs = _prepare(inputs, out, config, executor, progress, range_bytes)
    report = PrepareReport(
        rows_read=parsed.rows_read,
        rows_kept=parsed.rows_kept,
        rows_malformed=parsed.rows_malformed,
        rows_per_split=rows_per_split,
        first_malformed=parsed.first_malformed,
        cardinalities={name: vocab.height for name, vocab in vocabs.items()},
        seconds=time.perf_counter() - start,
        out_dir=str(out),
        execution=executor.describe(),
    )
    logger.info("prepared %s: %d rows kept, %d malformed", out, report.rows_kept, report.rows_malformed)
    return report
