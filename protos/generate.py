"""Generates the Python stubs from the `.proto` sources: `python -m protos.generate [OUT_ROOT]`.

Run from the repository root. The stubs are committed; `tests/test_protos.py` fails when they drift.

`protos/convserve/` is compiled from the repository root (`protos/convserve/v1/convserve.proto`).
`protos/inference/` holds the Open Inference Protocol exactly as Triton publishes it, compiled under
Triton's own file names (`grpc_service.proto`, `model_config.proto`): the descriptors are then
byte-identical to those in tritonclient's stubs, so both load into one process's descriptor pool
(the same symbols under other file names would collide). Only the imports are rewritten to
`protos.inference`.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
INFERENCE = ROOT / "protos" / "inference"
STUB = re.compile(r"^(from \S+ )?import (\w+_pb2)( as \w+)?$", re.MULTILINE)


def proto_sources() -> list[Path]:
    return sorted((ROOT / "protos").rglob("*.proto"))


def run_protoc(include: Path, sources: list[Path], out: Path) -> None:
    grpc_include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{include}",
        f"-I{grpc_include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(include)) for p in sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def generate(out_root: Path = ROOT) -> list[Path]:
    """Writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` under out_root, importable as `protos.…`."""
    own = [p for p in proto_sources() if INFERENCE not in p.parents]
    run_protoc(ROOT, own, out_root)
    inference = sorted(INFERENCE.glob("*.proto"))
    if inference:
        target = out_root / "protos" / "inference"
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            run_protoc(INFERENCE, inference, Path(tmp))
            local = {p.stem + "_pb2" for p in inference}
            for stub in sorted(Path(tmp).glob("*_pb2*.py*")):
                text = STUB.sub(
                    lambda m: f"from protos.inference import {m[2]}{m[3] or ''}" if m[2] in local else m[0],
                    stub.read_text(),
                )
                (target / stub.name).write_text(text)
    return sorted(out_root.joinpath("protos").rglob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path)
