"""Generates the Python stubs from the `.proto` sources: `python -m protos.generate [OUT_ROOT]`.

Run from the repository root. The stubs are committed; `tests/test_protos.py` fails when they drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def proto_sources() -> list[Path]:
    return sorted((ROOT / "protos").rglob("*.proto"))


def generate(out_root: Path = ROOT) -> list[Path]:
    """Writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` under out_root, importable as `protos.…`."""
    sources = [str(p.relative_to(ROOT)) for p in proto_sources()]
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(out_root.joinpath("protos").rglob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path)
