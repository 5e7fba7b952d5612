"""The benchmark suite in one command: CPU grid, training throughput, serving, quality, GPU.

    .venv/bin/python benchmarks/suite.py                    # every case (~45 min on 2 cores)
    .venv/bin/python benchmarks/suite.py --quick            # smoke version, a few minutes
    .venv/bin/python benchmarks/suite.py --only cpu_grid,train_throughput
    .venv/bin/python benchmarks/suite.py --lock /tmp/tablezip-bench.lock   # on a shared machine
    make bench [BENCH_ARGS=--quick]

Each case is its own script run as a subprocess (a crash or a leak in one cannot take the others
down), in order, its output streamed with a prefix and kept in ``<out-dir>/suite_logs/``. A case
that exits non-zero, or exits 0 without writing its table, is recorded as failed with the tail
of its output, and the suite goes on; the GPU case is skipped, not failed, without CUDA.
``<out-dir>/suite.md`` (``suite_quick.md`` with ``--quick``) and ``suite.json`` are rewritten
after every case, so an interrupted suite still says what ran. Exit status: 1 if any case failed.

This module imports nothing heavy (no torch) so that its own machinery starts instantly.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
TAIL_LINES = 30  # lines of a failed case's output kept in suite.json / suite.md


@dataclass(frozen=True)
class Case:
    """One benchmark: the command of the full run and of the ``--quick`` run, and the markdown
    table each writes (a path; None: the case writes no table the suite should check)."""

    name: str
    description: str
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...] | None = None  # None: same as argv
    result: Path | None = None
    quick_result: Path | None = None
    needs_cuda: bool = False

    def command(self, quick: bool) -> tuple[str, ...]:
        return self.quick_argv if quick and self.quick_argv is not None else self.argv

    def table(self, quick: bool) -> Path | None:
        return self.quick_result if quick and self.quick_result is not None else self.result


def default_cases(python: str = sys.executable) -> list[Case]:
    """The suite, in the order it runs: cheapest-to-interpret numbers first, GPU last."""
    script = lambda name: str(BENCH_DIR / name)  # noqa: E731
    r = lambda name: RESULTS_DIR / name  # noqa: E731
    return [
        Case("cpu_grid", "lookup speed on CPU: every method vs Full, torchrec EBC and its dlrm-style build",
             (python, script("cpu_grid.py")), (python, script("cpu_grid.py"), "--quick"),
             r("cpu_grid.md"), r("cpu_grid_quick.md")),
        Case("train_throughput", "DLRM training examples/s per method vs Full, Criteo sample",
             (python, script("train_throughput.py")), (python, script("train_throughput.py"), "--quick"),
             r("train_throughput.md"), r("train_throughput_quick.md")),
        Case("serving", "gRPC serving QPS and latency vs a bare-gRPC ceiling",
             (python, script("serving.py")), (python, script("serving.py"), "--quick"),
             r("serving.md"), r("serving_quick.md")),
        Case("quality", "test AUC per method and byte budget (DLRM, Criteo sample)",
             (python, script("quality.py"), "--seeds", "0,1,2"),
             (python, script("quality.py"), "--methods", "full,hash", "--ratios", "10", "--seeds", "0", "--name", "quality_quick"),
             r("quality.md"), r("quality_quick.md")),
        Case("gpu", "GPU: Full and every method vs torchrec, vs the copy bandwidth (only with CUDA)",
             (python, script("gpu_collection.py"), "--out", str(RESULTS_DIR)),
             (python, script("gpu_collection.py"), "--rows", "100000", "--batch", "8192", "--bag-lens", "1",
              "--out", str(RESULTS_DIR / "gpu_quick")),
             r("gpu_collection.md"), r("gpu_quick") / "gpu_collection.md", needs_cuda=True),
    ]  # fmt: skip


def cuda_available(python: str = sys.executable) -> bool:
    """Asked of a child interpreter: the suite itself never imports torch."""
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("True")


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[None]:
    """An exclusive flock on ``lock`` for the duration of one case (None: no lock), so timing
    runs of other sessions on a shared machine never overlap ours, yet can run between cases."""
    if lock is None:
        yield
        return
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[suite] waiting for {lock} ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Outcome:
    """What one case did; ``status`` is ok, failed, skipped or interrupted."""

    name: str
    status: str
    seconds: float = 0.0
    returncode: int | None = None
    command: str = ""
    log: str | None = None
    table: str | None = None
    reason: str = ""
    tail: list[str] = field(default_factory=list)


def run_case(case: Case, quick: bool, log_dir: Path, prefix_width: int) -> Outcome:
    """Run one case to the end, streaming its output; never raises for the case's own failure."""
    argv = case.command(quick)
    table = case.table(quick)
    log = log_dir / f"{case.name}{'_quick' if quick else ''}.log"
    outcome = Outcome(case.name, "failed", command=shown(argv), log=str(log))
    started = time.time()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, env=env, errors="replace")  # fmt: skip
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    fh.write(line)
                    print(f"  {case.name:<{prefix_width}} | {line}", end="", flush=True)
                    tail.append(line.rstrip("\n"))
                outcome.returncode = proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
    except KeyboardInterrupt:  # the child got the same SIGINT; it was terminated above
        outcome.status, outcome.reason = "interrupted", "interrupted by the user"
        outcome.seconds, outcome.tail = time.time() - started, list(tail)
        return outcome
    except OSError as err:  # the command could not start at all
        outcome.reason = f"{type(err).__name__}: {err}"
        outcome.seconds, outcome.tail = time.time() - started, list(tail)
        return outcome
    outcome.seconds, outcome.tail = time.time() - started, list(tail)
    fresh = table is not None and table.exists() and table.stat().st_mtime >= started - 1
    if fresh:  # a table left by an earlier run is not this run's result: never linked
        outcome.table = str(table)
    if outcome.returncode != 0:
        outcome.reason = f"exit status {outcome.returncode}"
    elif table is not None and not fresh:
        outcome.reason = f"exited 0 but did not write {table}"
    else:
        outcome.status, outcome.tail = "ok", []
    return outcome


def shown(argv: Sequence[str]) -> str:
    """A command as one would type it in the repository root (paths under it made relative)."""
    root = str(REPO_ROOT) + os.sep
    return " ".join(a[len(root):] if a.startswith(root) else a for a in argv)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _link(path: str | None, out_dir: Path) -> str:
    if not path:
        return ""
    rel = os.path.relpath(path, out_dir)
    return f"[{Path(path).name}]({rel})"


def write_report(outcomes: Sequence[Outcome], pending: Sequence[Case], out_dir: Path, name: str,
                 meta: dict[str, Any], wall_seconds: float = 0.0) -> Path:
    """``<name>.md`` and ``<name>.json`` under ``out_dir``: every case so far, then the pending
    ones. Case times exclude waiting for the lock; ``wall_seconds`` includes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(o.seconds for o in outcomes)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "wall_seconds": wall_seconds, "cases": [o.__dict__ for o in outcomes],
                                                      "pending": [c.name for c in pending]}, indent=2) + "\n")
    lines = [
        f"# Benchmark suite{' (quick)' if meta['quick'] else ''}",
        "",
        f"`{meta['command']}`, started {meta['started']} on {meta['platform']} ({meta['cpu_count']} CPUs), "
        f"load average at start {meta['loadavg_1_5_15']}; cases {'so far ' if pending else ''}took {duration(total)} "
        f"({duration(wall_seconds)} wall clock, waits for the lock included). Each case's table records its own machine, "
        "versions, commit and load.",
        "",
        "| case | status | time | table | command |",
        "|---|---|---:|---|---|",
    ]
    for o in outcomes:
        status = o.status + (f" ({o.reason})" if o.reason else "")
        lines.append(f"| {o.name} | {status} | {duration(o.seconds) if o.status != 'skipped' else ''} | "
                     f"{_link(o.table, out_dir)} | `{o.command}` |")
    for c in pending:
        lines.append(f"| {c.name} | pending | | | `{shown(c.command(meta['quick']))}` |")
    for o in outcomes:
        if o.status != "ok" and o.tail:
            lines += ["", f"## {o.name}: last lines of its output (full log: {_link(o.log, out_dir)})", "", "```",
                      *o.tail, "```"]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_suite(cases: Sequence[Case], out_dir: Path = RESULTS_DIR, quick: bool = False, lock: Path | None = None,
              name: str | None = None, has_cuda: bool | None = None) -> list[Outcome]:
    """Run ``cases`` in order, each under ``lock``; the report is rewritten after every case."""
    name = name or ("suite_quick" if quick else "suite")
    log_dir = out_dir / "suite_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.orig_argv), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "quick": quick,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    width = max((len(c.name) for c in cases), default=0)
    wall_start = time.time()
    outcomes: list[Outcome] = []
    write_report(outcomes, cases, out_dir, name, meta)
    for i, case in enumerate(cases):
        head = f"[suite {i + 1}/{len(cases)}] {case.name}"
        if case.needs_cuda:
            if has_cuda is None:
                has_cuda = cuda_available()
            if not has_cuda:
                print(f"{head}: skipped (no CUDA device)", flush=True)
                outcomes.append(Outcome(case.name, "skipped", command=shown(case.command(quick)), reason="no CUDA device"))
                write_report(outcomes, cases[i + 1:], out_dir, name, meta, time.time() - wall_start)
                continue
        print(f"{head}: {case.description}\n  $ {shown(case.command(quick))}", flush=True)
        with held(lock):
            outcome = run_case(case, quick, log_dir, width)
        outcomes.append(outcome)
        write_report(outcomes, cases[i + 1:], out_dir, name, meta, time.time() - wall_start)
        detail = f" ({outcome.reason})" if outcome.reason else ""
        print(f"{head}: {outcome.status}{detail} in {outcome.seconds:.0f} s", flush=True)
        if outcome.status == "interrupted":
            break
    total = sum(o.seconds for o in outcomes)
    print(f"[suite] {sum(o.status == 'ok' for o in outcomes)} ok, {sum(o.status == 'failed' for o in outcomes)} failed, "
          f"{sum(o.status == 'skipped' for o in outcomes)} skipped in {total / 60:.1f} min; report: {out_dir / (name + '.md')}",
          flush=True)  # fmt: skip
    return outcomes


def main(argv: Sequence[str] | None = None, cases: Sequence[Case] | None = None) -> int:
    """CLI; ``cases`` replaces the default list (tests). Returns the exit status."""
    cases = list(cases) if cases is not None else default_cases()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="cases, in order: " + ", ".join(c.name for c in cases))
    p.add_argument("--quick", action="store_true", help="every case's smoke version (results named *_quick)")
    p.add_argument("--only", default="", help="comma-separated case names to run (in the suite's order)")
    p.add_argument("--lock", type=Path, default=None, help="flock this file around each case (shared machines)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where suite.md, suite.json and suite_logs/ go")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    if args.list:
        for c in cases:
            print(f"{c.name:<18} {c.description}\n{'':<18} $ {shown(c.command(args.quick))}")
        return 0
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cases})
        if unknown:
            p.error(f"--only: unknown case(s) {unknown}; known: {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    outcomes = run_suite(cases, args.out_dir, args.quick, args.lock)
    if any(o.status == "interrupted" for o in outcomes):
        return 130
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
