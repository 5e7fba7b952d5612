"""prepare_criteo cut into tasks, in-process and on a real local Ray: the output must not change by a byte.

Inputs: the first 12,000 lines of the bundled Criteo sample in three files (plain with planted
malformed lines, gzip, plain with more malformed lines), cut further into line-aligned byte
ranges, with shards small enough that most of them span several tasks and must be stitched.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pytest
import ray

from tablezip.pipelines import criteo, criteo_steps
from tablezip.pipelines.cli import main
from tablezip.pipelines.criteo import SPARSE, PrepareConfig, load_counts, prepare_criteo
from tablezip.pipelines.prepare_ray import SerialExecutor

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "criteo_sample_110k.tsv.gz"
LINES_PER_FILE = 4000
RANGE_BYTES = 300_000  # ~1 MB plain files -> 4 ranges each
CONFIGS = {
    "random": PrepareConfig(seed=3, shard_rows=1500, chunk_lines=1000),
    "ordered": PrepareConfig(split="ordered", fractions=(0.7, 0.2, 0.1), shard_rows=1500, chunk_lines=1000, min_count=2),
}

# 0-based line index within its file -> the bad line put there
BAD_A = {
    0: b"garbage",
    6: b"2" + b"\t1" * 13 + b"\tx" * 26,
    499: b"0\t1.5" + b"\t1" * 12 + b"\tx" * 26,
    1199: b"0" + b"\t1" * 13 + b"\tx" * 25,
    2221: b"",
    2999: b"1" + b"\t1" * 13 + b"\tab\xffcd" + b"\tx" * 25,
    3998: b"0\tabc" + b"\t1" * 12 + b"\tx" * 26,
    3999: b"junk\tjunk",
}
BAD_C = {100: b"nope", 2600: b"0" + b"\t1" * 13 + b"\tx" * 27, 3900: b"also bad"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("criteo-parallel")
    with gzip.open(SAMPLE, "rb") as src:
        lines = [src.readline().rstrip(b"\n") for _ in range(3 * LINES_PER_FILE)]
    a, b, c = (lines[i * LINES_PER_FILE : (i + 1) * LINES_PER_FILE] for i in range(3))
    for part, bad in ((a, BAD_A), (c, BAD_C)):
        for index, line in bad.items():
            part[index] = line
    paths = [root / "a.tsv", root / "b.tsv.gz", root / "c.tsv"]
    paths[0].write_bytes(b"\n".join(a) + b"\n")
    paths[1].write_bytes(gzip.compress(b"\n".join(b) + b"\n", mtime=0))
    paths[2].write_bytes(b"\n".join(c))  # no newline after the last line
    return paths


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def manifest_without_time(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("created")
    return manifest


def expected_malformed(inputs: list[Path]) -> list[tuple[str, int]]:
    every = [(str(inputs[0]), i + 1) for i in sorted(BAD_A)] + [(str(inputs[2]), i + 1) for i in sorted(BAD_C)]
    return every[:10]


def assert_same_output(serial: Path, parallel: Path) -> None:
    serial_files, parallel_files = output_bytes(serial), output_bytes(parallel)
    assert list(parallel_files) == list(serial_files)
    for name in serial_files:
        assert parallel_files[name] == serial_files[name], f"{name} differs"
    assert manifest_without_time(parallel) == manifest_without_time(serial)


# --------------------------------------------------------------------------- planning (no Ray)


def test_byte_ranges_start_at_line_starts_and_cover_the_file(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    data = b"a\nbb\n" + b"x" * 50 + b"\nc\n\nlast"
    path.write_bytes(data)
    gz = tmp_path / "in.tsv.gz"
    gz.write_bytes(gzip.compress(data * 100))

    units = criteo._plan_units([path, gz], parallelism=2, range_bytes=4)
    ranges = [(u.start, u.end) for u in units if u.path == str(path.resolve())]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(data[start - 1 : start] == b"\n" for start, _ in ranges[1:])  # every range starts a line
    assert ranges[-1] == (56, len(data))  # "c", "", and "last" without a newline: cuts at 60 fell inside "last"
    one_byte = [(u.start, u.end) for u in criteo._plan_units([path], parallelism=2, range_bytes=1)]
    assert one_byte == [(0, 2), (2, 5), (5, 56), (56, 58), (58, 59), (59, len(data))]  # a range per line
    assert [(u.start, u.end) for u in units if u.path == str(gz.resolve())] == [(0, None)]  # gzip is never cut
    assert [u.index for u in units] == list(range(len(units)))


def test_groups_are_contiguous_and_balanced() -> None:
    shards = [criteo_steps.ShardRef(f"s{i}", rows, 0, 0) for i, rows in enumerate([10, 10, 100, 5, 5, 5, 5, 60])]
    groups = criteo._groups(shards, parallelism=2)
    assert [s for g in groups for s in g] == shards
    assert 2 <= len(groups) <= 4 and all(groups)
    assert criteo._groups(shards, parallelism=1) == [shards]
    assert criteo._groups([], parallelism=4) == []


@pytest.mark.parametrize("split", sorted(CONFIGS))
def test_any_cut_gives_the_serial_output(inputs: list[Path], tmp_path: Path, split: str) -> None:
    """The whole decomposition (ranges, groups, pieces, stitching) in-process, without Ray's cost."""
    config = CONFIGS[split]
    serial = prepare_criteo(inputs, tmp_path / "serial", config, progress=False)
    for parallelism, range_bytes in ((2, RANGE_BYTES), (5, 100_000)):
        out = tmp_path / f"cut-{parallelism}"
        out.mkdir()
        parsed, rows, _ = criteo._prepare(inputs, out, config, SerialExecutor(parallelism), False, range_bytes)
        assert_same_output(tmp_path / "serial", out)
        assert rows == serial.rows_per_split and parsed.first_malformed == serial.first_malformed


def test_small_inputs_run_serially_by_default(inputs: list[Path], tmp_path: Path) -> None:
    report = prepare_criteo(inputs, tmp_path / "out", progress=False, workers=None)
    assert report.execution == "serial"


@pytest.mark.parametrize("workers", [-1, 1.5])
def test_invalid_workers(inputs: list[Path], tmp_path: Path, workers: object) -> None:
    with pytest.raises(ValueError, match="workers"):
        prepare_criteo(inputs, tmp_path / "out", workers=workers)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real Ray


@pytest.mark.parametrize("split", sorted(CONFIGS))
def test_ray_output_is_identical_to_serial(
    inputs: list[Path], tmp_path: Path, ray_local: None, split: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = CONFIGS[split]
    serial = prepare_criteo(inputs, tmp_path / "serial", config, progress=False, workers=1)
    with caplog.at_level(logging.WARNING, logger="tablezip.pipelines.criteo"):
        parallel = prepare_criteo(inputs, tmp_path / "ray", config, progress=False, workers=2, range_bytes=RANGE_BYTES)

    assert parallel.execution.startswith("ray, 2 workers")
    assert_same_output(tmp_path / "serial", tmp_path / "ray")
    # malformed lines: the same counts, and the first ten named by file and line within that file
    assert (parallel.rows_read, parallel.rows_kept, parallel.rows_malformed) == (12_000, 12_000 - 11, 11)
    assert [(m.file, m.line) for m in parallel.first_malformed] == expected_malformed(inputs)
    assert parallel.first_malformed == serial.first_malformed
    assert parallel.first_malformed[1].reason == "label: '2' is not 0 or 1"
    assert parallel.first_malformed[5].reason == "line is not valid UTF-8"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{inputs[2]}:2601: expected 40 fields, got 41" in warnings[-1]
    # the vocabularies come from per-task counts merged: the same counts, the same ids
    assert parallel.rows_per_split == serial.rows_per_split and parallel.cardinalities == serial.cardinalities
    for name in SPARSE:
        counts = load_counts(tmp_path / "ray", name)
        assert counts.tolist() == load_counts(tmp_path / "serial", name).tolist()
    c1 = next(f for f in manifest_without_time(tmp_path / "ray")["features"] if f["name"] == "C1")
    assert int(load_counts(tmp_path / "ray", "C1").sum()) + c1["oov_train_count"] == parallel.rows_per_split["train"]


def test_ray_single_gzip_file(inputs: list[Path], tmp_path: Path, ray_local: None) -> None:
    """One gzip file parses as one task (no seek points); count/encode still run per raw shard group."""
    config = CONFIGS["random"]
    prepare_criteo([inputs[1]], tmp_path / "serial", config, progress=False)
    report = prepare_criteo([inputs[1]], tmp_path / "ray", config, progress=False, workers=2)
    assert report.execution.startswith("ray")
    assert_same_output(tmp_path / "serial", tmp_path / "ray")


def test_cli_workers_with_relative_paths(
    inputs: list[Path], tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative inputs and --out, as typed by a user; tasks get absolute paths, reports keep the typed ones."""
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p, tmp_path) for p in inputs]
    args = [*relative, "--split", "ordered", "--seed", "1", "--no-progress"]
    assert main(["prepare", *args, "--out", "serial", "--workers", "0"]) == 0
    assert "(serial)" in capsys.readouterr().out
    assert main(["prepare", *args, "--out", "ray", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "(ray, 2 workers" in out and f"\n  {relative[0]}:7: label: '2' is not 0 or 1" in out
    assert_same_output(tmp_path / "serial", tmp_path / "ray")


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError("disk full")


def test_failed_ray_task_leaves_nothing(
    inputs: list[Path], tmp_path: Path, ray_local: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(criteo_steps, "stitch_shard", _disk_full)  # runs in a Ray worker, after parse/count/encode
    with pytest.raises(OSError, match="disk full"):
        prepare_criteo(inputs, tmp_path / "out", CONFIGS["random"], progress=False, workers=2)
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(criteo.NotPreparedError):
        criteo.read_manifest(tmp_path / "out")
