"""Wall time of `tablezip prepare`, serial vs Ray workers, on the bundled Criteo sample.

Each measurement is a whole `tablezip prepare` process, as a user runs it: Python start, Ray
start (for the Ray runs) and the prepare. A third column runs `prepare_criteo` on a Ray that is
already up (started once per input set, first prepare discarded): the parallel work alone. Serial and Ray runs alternate, so a machine whose
load changes during the benchmark hurts both alike; the median over repeats is reported, with
the prepare's own seconds (its summary line) beside it. Every Ray output is checked to be
byte-identical to the serial one, so the benchmark is also an end-to-end equality test.

    .venv/bin/python benchmarks/prepare_speed.py [--repeats 3] [--workers 2] [--scale 1]

``--scale K`` repeats the sample K times (K x 110k lines) to see where Ray starts paying off.
Results: benchmarks/results/prepare_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "criteo_sample_110k.tsv.gz"
TABLEZIP = Path(sys.executable).parent / "tablezip"
RESULTS = REPO / "benchmarks" / "results"


def make_inputs(root: Path, scale: int) -> dict[str, list[Path]]:
    """The sample (repeated ``scale`` times) as one gzip file, one plain file, 4 gzip and 4 plain files."""
    with gzip.open(SAMPLE, "rb") as src:
        lines = src.read().splitlines(keepends=True) * scale
    data = b"".join(lines)
    quarter = len(lines) // 4
    parts = [b"".join(lines[i * quarter : (i + 1) * quarter if i < 3 else len(lines)]) for i in range(4)]
    sets: dict[str, list[Path]] = {"1 gzip file": [root / "all.tsv.gz"], "1 plain file": [root / "all.tsv"]}
    sets["1 gzip file"][0].write_bytes(gzip.compress(data, compresslevel=6, mtime=0) if scale > 1 else SAMPLE.read_bytes())
    sets["1 plain file"][0].write_bytes(data)
    sets["4 gzip files"] = [root / f"part{i}.tsv.gz" for i in range(4)]
    sets["4 plain files"] = [root / f"part{i}.tsv" for i in range(4)]
    for i, part in enumerate(parts):
        sets["4 gzip files"][i].write_bytes(gzip.compress(part, compresslevel=6, mtime=0))
        sets["4 plain files"][i].write_bytes(part)
    return sets


def run(files: list[Path], out: Path, workers: int) -> tuple[float, float, str]:
    """(process wall seconds, prepare's own seconds, how it ran) of one `tablezip prepare`."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(
        [str(TABLEZIP), "prepare", *map(str, files), "--out", str(out), "--workers", str(workers), "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    wall = time.perf_counter() - start
    match = re.search(r"prepared .* in ([\d.]+)s \((.*)\)", done.stdout)
    assert match, done.stdout
    return wall, float(match.group(1)), match.group(2)


def warm(files: list[Path], root: Path, workers: int, repeats: int) -> float:
    """Median seconds of prepare_criteo on an already running Ray (in a child process, so each set starts fresh)."""
    code = f"""
import json, shutil, statistics, sys, ray
from tablezip.pipelines.criteo import prepare_criteo
files = {[str(f) for f in files]!r}
ray.init(num_cpus={workers}, include_dashboard=False, logging_level="ERROR")
times = []
for i in range({repeats} + 1):
    shutil.rmtree({str(root / "warm")!r}, ignore_errors=True)
    times.append(prepare_criteo(files, {str(root / "warm")!r}, progress=False, workers={workers}).seconds)
print(json.dumps(statistics.median(times[1:])))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def parquet_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--sets", default="1 gzip file,1 plain file,4 gzip files,4 plain files")
    args = parser.parse_args()

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = make_inputs(root, args.scale)
        for name in args.sets.split(","):
            files = sets[name]
            times: dict[int, list[tuple[float, float]]] = {1: [], args.workers: []}
            how = ""
            for _ in range(args.repeats):
                for workers in times:
                    wall, inner, described = run(files, root / f"out-{workers}", workers)
                    times[workers].append((wall, inner))
                    how = described if workers > 1 else how
            assert parquet_bytes(root / "out-1") == parquet_bytes(root / f"out-{args.workers}"), f"{name}: outputs differ"
            warm_s = warm(files, root, args.workers, args.repeats)
            serial = [statistics.median(x) for x in zip(*times[1])]
            parallel = [statistics.median(x) for x in zip(*times[args.workers])]
            record = {
                "inputs": name, "lines": 110_000 * args.scale, "bytes": sum(f.stat().st_size for f in files),
                "serial_wall_s": serial[0], "serial_prepare_s": serial[1],
                "ray_wall_s": parallel[0], "ray_prepare_s": parallel[1], "ray": how, "ray_warm_prepare_s": warm_s,
                "speedup_wall": serial[0] / parallel[0],
            }
            records.append(record)
            print(json.dumps(record), flush=True)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"
    lines = [
        f"# tablezip prepare: serial vs {args.workers} Ray workers",
        "",
        f"`.venv/bin/python benchmarks/prepare_speed.py --repeats {args.repeats} --workers {args.workers} --scale {args.scale}`;"
        f" {machine}; median of {args.repeats} alternating runs; wall = whole process (Python + Ray start), prepare ="
        " prepare_criteo's own time (Ray start included). Ray outputs checked byte-identical to serial.",
        "",
        "| inputs | lines | MB | serial wall s (prepare) | Ray wall s (prepare) | Ray tasks | serial / Ray | Ray already up: prepare s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['inputs']} | {r['lines']:,} | {r['bytes'] / 1e6:.1f} | {r['serial_wall_s']:.1f} ({r['serial_prepare_s']:.1f})"
            f" | {r['ray_wall_s']:.1f} ({r['ray_prepare_s']:.1f}) | {r['ray']} | {r['speedup_wall']:.2f}x"
            f" | {r['ray_warm_prepare_s']:.1f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    stem = "prepare_speed" if args.scale == 1 else f"prepare_speed_x{args.scale}"
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": machine, "args": vars(args), "records": records}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
