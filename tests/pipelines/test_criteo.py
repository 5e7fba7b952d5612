"""Tests for tablezip.pipelines.criteo: parsing, validation, splits, vocabularies, output layout."""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tablezip.pipelines import criteo, criteo_steps
from tablezip.pipelines.criteo import (
    DENSE,
    SPARSE,
    SPLITS,
    MalformedLine,
    NotPreparedError,
    PrepareConfig,
    load_counts,
    prepare_criteo,
    read_manifest,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "criteo_sample_110k.tsv.gz"
ALL_TRAIN = PrepareConfig(fractions=(1.0, 0.0, 0.0))


# --------------------------------------------------------------------------- helpers


def make_line(label: str = "0", dense: dict[str, str] | None = None, cats: dict[str, str] | None = None) -> str:
    """A Criteo line; unspecified dense values are '1', unspecified categoricals 'aaaaaaaa'."""
    dense = dense or {}
    cats = cats or {}
    fields = [label, *(dense.get(d, "1") for d in DENSE), *(cats.get(c, "aaaaaaaa") for c in SPARSE)]
    return "\t".join(fields)


def write_lines(path: Path, lines: list[str], *, gz: bool = False, newline: str = "\n") -> Path:
    data = "".join(line + newline for line in lines).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def prepare(paths: list[Path] | Path, out: Path, config: PrepareConfig = PrepareConfig()) -> criteo.PrepareReport:
    paths = paths if isinstance(paths, list) else [paths]
    return prepare_criteo(paths, out, config, progress=False)


def read_split(out: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / split).glob("part-*.parquet")))


def read_all(out: Path) -> pl.DataFrame:
    return pl.concat([read_split(out, s) for s in SPLITS])


def row_numbers(frame: pl.DataFrame) -> list[int]:
    """Rows in these tests carry their own index in I1; undo the log1p transform to get it back."""
    return [round(math.expm1(v)) for v in frame["I1"].to_list()]


def output_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def numbered_lines(n: int, seed: int = 0) -> list[str]:
    """n good lines, I1 = row index, C1 drawn from a skewed pool so vocabularies are non-trivial."""
    rng = random.Random(seed)
    pool = [f"{i:08x}" for i in range(20)]
    return [
        make_line(
            label=str(rng.randint(0, 1)),
            dense={"I1": str(i), "I2": str(rng.randint(-5, 100))},
            cats={"C1": pool[min(int(rng.expovariate(0.3)), 19)], "C2": rng.choice(["", "x", "y"])},
        )
        for i in range(n)
    ]


# lines 3, 5, 6, 7, 8 are malformed
MIXED = [
    make_line("0", {"I1": "0"}),
    make_line("1", {"I1": "1"}),
    "\t".join(make_line("0").split("\t")[:39]),
    make_line("1", {"I1": "3"}),
    make_line("0", {"I5": "1.5"}),
    make_line("0", {"I2": "abc"}),
    make_line("2"),
    "",
    make_line("0", {"I1": "8"}),
]
MIXED_BAD = [
    (3, "expected 40 fields, got 39"),
    (5, "I5: '1.5' is not an integer"),
    (6, "I2: 'abc' is not an integer"),
    (7, "label: '2' is not 0 or 1"),
    (8, "expected 40 fields, got 1"),
]


# --------------------------------------------------------------------------- malformed lines


@pytest.mark.parametrize("kind", ["plain", "gzip", "gzip-without-suffix"])
def test_malformed_lines_are_reported_and_skipped(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    name = {"plain": "in.tsv", "gzip": "in.tsv.gz", "gzip-without-suffix": "in.tsv"}[kind]
    path = write_lines(tmp_path / name, MIXED, gz=kind != "plain")
    with caplog.at_level(logging.WARNING, logger="tablezip.pipelines.criteo"):
        report = prepare(path, tmp_path / "out", ALL_TRAIN)

    assert (report.rows_read, report.rows_kept, report.rows_malformed) == (9, 4, 5)
    assert report.first_malformed == [MalformedLine(str(path), line, reason) for line, reason in MIXED_BAD]
    assert report.rows_per_split == {"train": 4, "valid": 0, "test": 0}
    assert row_numbers(read_split(tmp_path / "out", "train")) == [0, 1, 3, 8]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5 and f"{path}:5: I5: '1.5' is not an integer" in warnings[1]

    manifest = read_manifest(tmp_path / "out")
    assert manifest["rows_malformed"] == 5
    assert [(m["line"], m["reason"]) for m in manifest["first_malformed"]] == MIXED_BAD


def test_max_reported_limits_the_report_not_the_count(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.tsv", MIXED)
    report = prepare(path, tmp_path / "out", PrepareConfig(fractions=(1.0, 0.0, 0.0), max_reported=2))
    assert report.rows_malformed == 5
    assert [m.line for m in report.first_malformed] == [3, 5]


def test_line_numbers_are_per_file_and_chunk_independent(tmp_path: Path) -> None:
    first = write_lines(tmp_path / "a.tsv", MIXED)
    second = write_lines(tmp_path / "b.tsv.gz", [make_line(), "bad", make_line(), make_line("x")], gz=True)
    config = PrepareConfig(fractions=(1.0, 0.0, 0.0), chunk_lines=2, max_reported=100)
    report = prepare([first, second], tmp_path / "out", config)
    expected = [(str(first), line) for line, _ in MIXED_BAD] + [(str(second), 2), (str(second), 4)]
    assert [(m.file, m.line) for m in report.first_malformed] == expected
    assert (report.rows_read, report.rows_kept, report.rows_malformed) == (13, 6, 7)
    inputs = read_manifest(tmp_path / "out")["inputs"]
    assert [i["path"] for i in inputs] == [str(first.resolve()), str(second.resolve())]


def test_crlf_lines_parse_like_lf(tmp_path: Path) -> None:
    lines = numbered_lines(30)
    lf = write_lines(tmp_path / "lf.tsv", lines)
    crlf = write_lines(tmp_path / "crlf.tsv", lines, newline="\r\n")
    report = prepare(crlf, tmp_path / "out_crlf")
    prepare(lf, tmp_path / "out_lf")
    assert report.rows_malformed == 0 and report.rows_kept == 30
    assert output_bytes(tmp_path / "out_crlf") == output_bytes(tmp_path / "out_lf")


def test_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    path.write_text(make_line() + "\n" + make_line())
    assert prepare(path, tmp_path / "out").rows_kept == 2


def test_invalid_utf8_line_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    path.write_bytes((make_line() + "\n").encode() + make_line(cats={"C3": "ab\xffcd"}).encode("latin-1") + b"\n")
    report = prepare(path, tmp_path / "out", ALL_TRAIN)
    assert report.rows_kept == 1
    assert report.first_malformed == [MalformedLine(str(path), 2, "line is not valid UTF-8")]


# --------------------------------------------------------------------------- values


def test_values_round_trip(tmp_path: Path) -> None:
    lines = [
        make_line("1", {"I1": "5", "I2": "-3", "I3": "", "I4": "0"}, {"C1": "cafe0001", "C2": ""}),
        make_line("0", {"I1": "", "I13": "1000000"}, {"C1": "cafe0002", "C2": "beef0001"}),
        make_line("0", cats={"C1": "cafe0001", "C2": ""}),
    ]
    prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out", ALL_TRAIN)
    rows = read_split(tmp_path / "out", "train")

    schema = {"label": pl.Int8, **{d: pl.Float32 for d in DENSE}, **{c: pl.Int32 for c in SPARSE}}
    assert rows.schema == pl.Schema(schema)
    first, second = rows.row(0, named=True), rows.row(1, named=True)
    assert first["label"] == 1 and second["label"] == 0
    assert first["I1"] == pytest.approx(math.log1p(5), rel=1e-6)
    assert first["I2"] == 0.0  # negative clipped to 0
    assert first["I3"] == 0.0  # empty -> 0
    assert first["I4"] == 0.0
    assert first["I5"] == pytest.approx(math.log(2), rel=1e-6)
    assert second["I1"] == 0.0
    assert second["I13"] == pytest.approx(math.log1p(1_000_000), rel=1e-6)
    # C1: cafe0001 x2 -> 0, cafe0002 -> 1; C2: "" x2 -> 0, beef0001 -> 1; C3: one value seen 3 times -> 0
    assert rows["C1"].to_list() == [0, 1, 0]
    assert rows["C2"].to_list() == [0, 1, 0]
    assert rows["C3"].to_list() == [0, 0, 0]
    vocab = pl.read_parquet(tmp_path / "out" / "vocab" / "C2.parquet")
    assert vocab.rows() == [("", 0, 2), ("beef0001", 1, 1)]


def test_every_good_row_is_kept_once(tmp_path: Path) -> None:
    lines = numbered_lines(500)
    lines[10] = lines[10] + "\textra"
    report = prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out")
    assert report.rows_kept == 499 and sum(report.rows_per_split.values()) == 499
    assert sorted(row_numbers(read_all(tmp_path / "out"))) == [i for i in range(500) if i != 10]
    assert report.first_malformed[0].reason == "expected 40 fields, got 41"


# --------------------------------------------------------------------------- vocabulary


def test_vocab_order_is_descending_train_count_ties_by_value(tmp_path: Path) -> None:
    values = ["d", "b", "c", "b", "a", "c", "b", "a"]  # b:3, a:2, c:2, d:1
    lines = [make_line(cats={"C1": v}) for v in values]
    report = prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out", ALL_TRAIN)
    vocab = pl.read_parquet(tmp_path / "out" / "vocab" / "C1.parquet")
    assert vocab.schema == pl.Schema({"value": pl.String, "id": pl.Int32, "count": pl.Int64})
    assert vocab.rows() == [("b", 0, 3), ("a", 1, 2), ("c", 2, 2), ("d", 3, 1)]
    assert load_counts(tmp_path / "out", "C1").tolist() == [3, 2, 2, 1]
    assert load_counts(tmp_path / "out", "C1").dtype == np.int64
    assert report.cardinalities["C1"] == 4
    assert read_split(tmp_path / "out", "train")["C1"].to_list() == [3, 0, 2, 0, 1, 2, 0, 1]


def test_min_count_sends_rare_values_to_oov(tmp_path: Path) -> None:
    values = ["d", "b", "c", "b", "a", "c", "b", "a", "e"]
    lines = [make_line(cats={"C1": v}) for v in values]
    config = PrepareConfig(fractions=(1.0, 0.0, 0.0), min_count=2)
    report = prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out", config)
    assert report.cardinalities["C1"] == 3
    assert read_split(tmp_path / "out", "train")["C1"].to_list() == [3, 0, 2, 0, 1, 2, 0, 1, 3]
    feature = next(f for f in read_manifest(tmp_path / "out")["features"] if f["name"] == "C1")
    assert feature == {"name": "C1", "num_embeddings": 3, "oov_train_count": 2}
    assert load_counts(tmp_path / "out", "C1").tolist() == [3, 2, 2]


def test_min_count_above_every_count_gives_an_empty_vocab(tmp_path: Path) -> None:
    lines = [make_line(cats={"C1": v}) for v in "aab"]
    config = PrepareConfig(fractions=(1.0, 0.0, 0.0), min_count=10)
    report = prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out", config)
    assert set(report.cardinalities.values()) == {0}
    assert read_split(tmp_path / "out", "train")["C1"].to_list() == [0, 0, 0]  # all OOV (id == num_embeddings == 0)
    assert load_counts(tmp_path / "out", "C1").tolist() == []


def test_values_unseen_in_train_map_to_oov(tmp_path: Path) -> None:
    values = ["a", "a", "b", "c", "a", "zzz", "b", "yyy"]  # ordered: 4 train, 2 valid, 2 test
    lines = [make_line(dense={"I1": str(i)}, cats={"C1": v}) for i, v in enumerate(values)]
    config = PrepareConfig(split="ordered", fractions=(0.5, 0.25, 0.25))
    report = prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out", config)
    assert report.cardinalities["C1"] == 3  # a, b, c from train only
    assert read_split(tmp_path / "out", "valid")["C1"].to_list() == [0, 3]
    assert read_split(tmp_path / "out", "test")["C1"].to_list() == [1, 3]


# --------------------------------------------------------------------------- splits


def test_ordered_split_boundaries(tmp_path: Path) -> None:
    lines = numbered_lines(11)
    lines.insert(4, "broken")  # not counted: boundaries are over kept rows
    config = PrepareConfig(split="ordered", fractions=(0.7, 0.2, 0.1), chunk_lines=4)
    report = prepare(write_lines(tmp_path / "in.tsv", lines), tmp_path / "out", config)
    # 11 kept rows: train round(7.7) = 8, valid round(9.9) - 8 = 2, test 1
    assert report.rows_per_split == {"train": 8, "valid": 2, "test": 1}
    out = tmp_path / "out"
    assert row_numbers(read_split(out, "train")) == list(range(8))
    assert row_numbers(read_split(out, "valid")) == [8, 9]
    assert row_numbers(read_split(out, "test")) == [10]


def test_random_split_fractions_and_determinism(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.tsv", numbered_lines(3000))
    first = prepare(path, tmp_path / "a", PrepareConfig(seed=7))
    prepare(path, tmp_path / "b", PrepareConfig(seed=7))
    other = prepare(path, tmp_path / "c", PrepareConfig(seed=8))

    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")
    manifests = [read_manifest(tmp_path / d) for d in "ab"]
    for m in manifests:
        m.pop("created")
    assert manifests[0] == manifests[1]

    assert abs(first.rows_per_split["train"] - 2400) < 120
    assert abs(first.rows_per_split["valid"] - 300) < 60
    train_a = set(row_numbers(read_split(tmp_path / "a", "train")))
    train_c = set(row_numbers(read_split(tmp_path / "c", "train")))
    assert train_a != train_c
    assert sum(other.rows_per_split.values()) == 3000


def test_output_does_not_depend_on_chunk_size(tmp_path: Path) -> None:
    lines = numbered_lines(100)
    lines[17] = "junk"
    path = write_lines(tmp_path / "in.tsv", lines)
    small = prepare(path, tmp_path / "small", PrepareConfig(chunk_lines=3, shard_rows=16, min_count=2))
    big = prepare(path, tmp_path / "big", PrepareConfig(chunk_lines=100_000, shard_rows=16, min_count=2))
    assert output_bytes(tmp_path / "small") == output_bytes(tmp_path / "big")
    assert small.rows_per_split == big.rows_per_split
    train_shards = sorted((tmp_path / "small" / "train").glob("*.parquet"))
    assert [p.name for p in train_shards[:2]] == ["part-00000.parquet", "part-00001.parquet"]
    sizes = [pl.read_parquet(p).height for p in train_shards]
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16 and sum(sizes) == small.rows_per_split["train"]


# --------------------------------------------------------------------------- config, layout, errors


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": "time"}, "split"),
        ({"fractions": (0.8, 0.1, 0.2)}, "fractions"),
        ({"fractions": (1.2, -0.1, -0.1)}, "fractions"),
        ({"fractions": (0.0, 0.5, 0.5)}, "fractions"),
        ({"fractions": (0.5, 0.5)}, "fractions"),
        ({"min_count": 0}, "min_count"),
        ({"shard_rows": 0}, "shard_rows"),
        ({"chunk_lines": 0}, "chunk_lines"),
        ({"max_reported": -1}, "max_reported"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PrepareConfig(**kwargs)


def test_layout_and_manifest(tmp_path: Path) -> None:
    report = prepare(write_lines(tmp_path / "in.tsv", numbered_lines(50)), tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test", "train", "valid", "vocab"]
    assert sorted(p.name for p in (out / "vocab").iterdir()) == sorted(f"{c}.parquet" for c in SPARSE)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "tablezip-criteo-prepared" and manifest["version"] == 1
    assert manifest["dense"] == DENSE
    assert [f["name"] for f in manifest["features"]] == SPARSE
    assert {f["name"]: f["num_embeddings"] for f in manifest["features"]} == report.cardinalities
    assert manifest["rows_per_split"] == report.rows_per_split
    assert manifest["config"]["fractions"] == [0.8, 0.1, 0.1]
    assert manifest["inputs"][0]["bytes"] == (tmp_path / "in.tsv").stat().st_size
    for split in SPLITS:
        ids = read_split(out, split).select(SPARSE)
        for name in SPARSE:
            assert ids[name].max() is None or ids[name].max() <= report.cardinalities[name]
    assert "malformed 0" in report.summary()


def test_empty_split_still_has_a_schema(tmp_path: Path) -> None:
    prepare(write_lines(tmp_path / "in.tsv", numbered_lines(5)), tmp_path / "out", ALL_TRAIN)
    valid = read_split(tmp_path / "out", "valid")
    assert valid.height == 0 and valid.columns == ["label", *DENSE, *SPARSE]


def test_not_a_prepared_dir(tmp_path: Path) -> None:
    with pytest.raises(NotPreparedError, match=str(tmp_path)):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NotPreparedError, match="manifest"):
        read_manifest(tmp_path)
    with pytest.raises(NotPreparedError):
        load_counts(tmp_path, "C1")


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.tsv", numbered_lines(5))
    prepare(path, tmp_path / "out")
    with pytest.raises(FileExistsError):
        prepare(path, tmp_path / "out")


def test_failed_prepare_leaves_nothing_that_looks_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(criteo_steps, "encode_group", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(write_lines(tmp_path / "in.tsv", numbered_lines(5)), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(NotPreparedError):
        read_manifest(tmp_path / "out")


def test_missing_input_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        prepare(tmp_path / "nope.tsv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real data


def test_real_sample_head(tmp_path: Path) -> None:
    with gzip.open(SAMPLE, "rt") as src:
        head = [next(src) for _ in range(5000)]
    path = tmp_path / "head.tsv.gz"
    path.write_bytes(gzip.compress("".join(head).encode(), mtime=0))

    report = prepare(path, tmp_path / "out")
    assert report.rows_malformed == 0 and report.rows_kept == 5000
    assert sum(report.rows_per_split.values()) == 5000
    cards = report.cardinalities
    assert all(1 <= n <= report.rows_per_split["train"] for n in cards.values())
    assert min(cards.values()) <= 10 and max(cards.values()) >= 1000  # low- and high-cardinality features both exist
    rows = read_all(tmp_path / "out")
    dense = rows.select(DENSE).to_numpy()
    assert np.isfinite(dense).all() and (dense >= 0).all()
    assert set(rows["label"].unique().to_list()) <= {0, 1}
    counts = load_counts(tmp_path / "out", "C6")
    assert len(counts) == cards["C6"] and (np.diff(counts) <= 0).all()
