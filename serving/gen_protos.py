"""Regenerate the committed gRPC stubs in ``serving/v1/`` from ``protos/tablezip/v1/*.proto``.

    python -m tablezip.serving.gen_protos           # rewrite the stubs
    python -m tablezip.serving.gen_protos --check   # exit 1 if the committed stubs are stale

Why committed stubs instead of generating at build time: the wheel then needs no protoc and
no build hook, an editable checkout works without a build step, and a test
(tests/serving/test_protos.py) regenerates into a temp dir and fails when the committed files
drift from the .proto. grpc_tools pins the generated code to its protobuf version, so the
output depends only on the pinned grpcio-tools.

protoc names imports after the proto's path (``from tablezip.v1 import lookup_pb2``), a
package that does not exist here: the stubs live in ``tablezip.serving.v1``. Those imports are
rewritten to relative ones, so the stubs work wherever the package is installed.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_PACKAGE = "tablezip/v1"
STUB_DIR = Path(__file__).resolve().parent / "v1"
_INIT = '"""Generated gRPC stubs of protos/tablezip/v1 (python -m tablezip.serving.gen_protos)."""\n'


def _protos() -> list[Path]:
    protos = sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE} (gen_protos runs from a source checkout)")
    return protos


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``, ``__init__.py``) into
    ``out_dir``; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *[str(p.relative_to(PROTO_ROOT)) for p in _protos()],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(raw) / PROTO_PACKAGE).iterdir()):
            dst = out_dir / src.name
            dst.write_text(_relative_imports(src.read_text()))
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(_INIT)
    return [init, *written]


def _relative_imports(source: str) -> str:
    """``from tablezip.v1 import x_pb2 as y`` -> ``from . import x_pb2 as y``."""
    dotted = PROTO_PACKAGE.replace("/", ".")
    return re.sub(rf"^from {re.escape(dotted)} import ", "from . import ", source, flags=re.MULTILINE)


def stale(stub_dir: Path = STUB_DIR) -> list[str]:
    """Names of the stub files that differ from a fresh generation (missing or extra included)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    committed = {p.name: p.read_text() for p in stub_dir.glob("*.py*")} if stub_dir.is_dir() else {}
    return sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        if names:
            print(f"stale stubs in {STUB_DIR}: {', '.join(names)}; run python -m tablezip.serving.gen_protos", file=sys.stderr)
            return 1
        print(f"stubs in {STUB_DIR} are current")
        return 0
    for path in generate(STUB_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
