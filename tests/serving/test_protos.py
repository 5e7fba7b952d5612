"""The committed stubs are what protos/ generates, and they import inside the installed package."""
from __future__ import annotations

import subprocess
import sys

from tablezip.serving import gen_protos


def test_committed_stubs_are_current():
    assert gen_protos.stale() == [], "run: python -m tablezip.serving.gen_protos"


def test_stubs_use_package_relative_imports():
    grpc_stub = (gen_protos.STUB_DIR / "lookup_pb2_grpc.py").read_text()
    assert "from . import lookup_pb2" in grpc_stub and "from tablezip.v1" not in grpc_stub
    # A fresh interpreter (no test path tricks) imports the stubs and finds the service.
    code = "from tablezip.serving.v1 import lookup_pb2_grpc, lookup_pb2; print(lookup_pb2.DESCRIPTOR.services_by_name['EmbeddingLookup'].full_name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "tablezip.v1.EmbeddingLookup"


def test_check_mode_reports_drift(tmp_path):
    gen_protos.generate(tmp_path)
    assert gen_protos.stale(tmp_path) == []
    (tmp_path / "lookup_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "extra_pb2.py").write_text("")
    assert gen_protos.stale(tmp_path) == ["extra_pb2.py", "lookup_pb2.py"]
