"""benchmarks/distributed_gpu.py on its CPU path: 2 gloo processes, the same replication code the
nccl run uses, tiny sizes. The GPU run itself needs 2 GPUs (results/distributed_gpu.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed_gpu.py"


def test_two_gloo_replicas_stay_identical_and_match_one_process(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--tables", "3", "--rows", "500",
                    "--dim", "8", "--batch", "97", "--steps", "4"], check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "distributed_gpu.json").read_text())
    assert result["backend"] == "gloo" and result["world"] == 2
    assert result["replicas_identical_at_start"] and result["replicas_identical_at_end"]
    assert len(set(result["end_digests"])) == 1 and len(result["end_digests"]) == 2
    # The odd global batch (97) splits 49 / 48: same sums as one process up to float reassociation.
    assert result["max_abs_diff_all_vs_one_process"] < 1e-5
    assert result["max_rel_loss_diff"] < 1e-5
    assert (tmp_path / "distributed_gpu.md").exists() and not (tmp_path / "replica_state.npz").exists()
