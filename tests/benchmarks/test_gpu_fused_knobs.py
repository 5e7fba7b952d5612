"""gpu_fused_knobs.py's settings parser and knob switching (the timing itself needs a GPU; its CPU
smoke run needs Triton's interpreter and is skipped without it)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# benchmarks/ is a folder of scripts (they import each other by bare name), not a package.
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_fused_knobs  # noqa: E402

from tablezip.compress import fused_lookup, fused_train  # noqa: E402


def test_settings_parse_with_defaults_and_several_knobs():
    assert gpu_fused_knobs.parse_settings("vec=0; vec=1,bags=128 ;defaults") == [{"vec": 0}, {"vec": 1, "bags": 128}, {}]
    assert gpu_fused_knobs.label({"vec": 1, "rows": 16}) == "vec=1,rows=16" and gpu_fused_knobs.label({}) == "defaults"


@pytest.mark.parametrize(
    "text, message",
    [
        ("speed=1", "unknown knob 'speed'"),
        ("vec=2", "vec must be 0 or 1, got 2"),
        ("bags=100", "bags must be a power of two >= 16, got 100"),
        ("bags=8", "bags must be a power of two >= 16, got 8"),
        ("rows=x", "rows needs a non-negative integer"),
        (" ; ", "no setting given"),
    ],
)
def test_bad_settings_name_the_knob_and_the_allowed_values(text, message):
    with pytest.raises(ValueError, match=message):
        gpu_fused_knobs.parse_settings(text)


def test_a_setting_applies_its_knobs_and_restores_the_defaults():
    before = (fused_train.VECTOR_ATOMICS, fused_train.GRAD_BLOCK_BAGS, fused_lookup.NUM_WARPS, fused_train.UPDATE_WARPS)
    with gpu_fused_knobs.applied({"vec": 0, "bags": 256, "warps": 8, "uwarps": 2}):
        assert fused_train.VECTOR_ATOMICS is False and fused_train.GRAD_BLOCK_BAGS == 256
        assert fused_lookup.NUM_WARPS == 8 and fused_train.UPDATE_WARPS == 2
    assert (fused_train.VECTOR_ATOMICS, fused_train.GRAD_BLOCK_BAGS, fused_lookup.NUM_WARPS, fused_train.UPDATE_WARPS) == before


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CI: the TBE path only)")
def test_cpu_smoke_run_writes_its_tables(tmp_path):
    """The script end to end on a tiny workload in Triton's interpreter: tables allclose, files written."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_fused_knobs.py"), "--out", str(tmp_path), "--device", "cpu",
         "--rows", "300", "--batch", "16", "--tables", "3", "--variants", "qr-10x", "--settings", "vec=0;bags=32",
         "--repeats", "1", "--profile-steps", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "gpu_fused_knobs.md").read_text()
    assert "| qr-10x | vec=0 |" in table and "| qr-10x | bags=32 |" in table
    assert "| False |" not in table  # every setting's tables allclose, the fused step ran
