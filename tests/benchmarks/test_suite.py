"""The suite's machinery on trivial cases: real subprocesses, no benchmark workload.

What matters for a long benchmark run: a failing case is recorded with its output and the rest
still run, a case that "succeeds" without writing its table counts as failed, the report is
there at the end, and the exit status says something failed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# benchmarks/ is a folder of scripts (they import each other by bare name), not a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import suite  # noqa: E402


def py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def trivial_cases(tmp_path: Path) -> list[suite.Case]:
    table = tmp_path / "writes.md"
    return [
        suite.Case("first", "prints", py("print('hello from first')")),
        suite.Case("broken", "fails", py("import sys; print('about to fail'); sys.exit(3)")),
        suite.Case("writes", "writes its table", py(f"open({str(table)!r}, 'w').write('# table')"), result=table),
        suite.Case("silent", "exits 0 without its table", py("pass"), result=tmp_path / "never.md"),
        suite.Case("gpu", "needs CUDA", py("raise SystemExit('must not run')"), needs_cuda=True),
    ]


def test_failure_is_recorded_and_the_rest_still_run(tmp_path: Path) -> None:
    out = tmp_path / "results"
    outcomes = suite.run_suite(trivial_cases(tmp_path), out_dir=out, has_cuda=False)
    status = {o.name: o.status for o in outcomes}
    assert status == {"first": "ok", "broken": "failed", "writes": "ok", "silent": "failed", "gpu": "skipped"}
    broken = next(o for o in outcomes if o.name == "broken")
    assert broken.returncode == 3 and "about to fail" in broken.tail
    assert "hello from first" in (out / "suite_logs" / "first.log").read_text()
    report = (out / "suite.md").read_text()
    assert "| broken | failed (exit status 3)" in report
    assert "[writes.md](../writes.md)" in report
    assert "did not write" in report and "no CUDA device" in report
    recorded = json.loads((out / "suite.json").read_text())
    assert [c["name"] for c in recorded["cases"]] == ["first", "broken", "writes", "silent", "gpu"]
    assert recorded["pending"] == []


def test_cli_only_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = trivial_cases(tmp_path)
    out = tmp_path / "results"
    assert suite.main(["--only", "first,writes", "--quick", "--out-dir", str(out)], cases=cases) == 0
    recorded = json.loads((out / "suite_quick.json").read_text())
    assert [c["name"] for c in recorded["cases"]] == ["first", "writes"]
    assert "[suite 2/2] writes: ok" in capsys.readouterr().out
    assert suite.main(["--only", "broken", "--out-dir", str(out)], cases=cases) == 1
    with pytest.raises(SystemExit):
        suite.main(["--only", "nope", "--out-dir", str(out)], cases=cases)


def test_lock_is_taken_per_case(tmp_path: Path) -> None:
    lock = tmp_path / "bench.lock"
    check = py(
        "import fcntl, sys\n"
        f"fh = open({str(lock)!r}, 'a')\n"
        "try:\n    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(0)\n"
        "sys.exit('the suite did not hold the lock')"
    )
    (outcome,) = suite.run_suite([suite.Case("locked", "checks the lock", check)], out_dir=tmp_path, lock=lock)
    assert outcome.status == "ok", outcome.tail


def test_default_cases_are_well_formed() -> None:
    cases = suite.default_cases()
    assert [c.name for c in cases] == ["cpu_grid", "train_throughput", "serving", "quality", "gpu"]
    for c in cases:
        assert Path(c.argv[1]).exists(), c.argv
        assert c.table(quick=True) != c.table(quick=False)  # a smoke run never overwrites a real table
    assert [c.name for c in cases if c.needs_cuda] == ["gpu"]
