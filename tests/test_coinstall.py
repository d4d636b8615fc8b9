"""convserve installs and works in one fresh environment with tritonclient[grpc], and its committed
stubs import under protobuf 6 (what tritonclient resolves) and protobuf 7 alike."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT
from tests.venvs import venv

pytestmark = [pytest.mark.slow, pytest.mark.network]

IMPORTS = """
import google.protobuf, sys
import protos.convserve.v1.convserve_pb2, protos.convserve.v1.convserve_pb2_grpc
import protos.inference.grpc_service_pb2_grpc
print(google.protobuf.__version__)
"""

# Server and client side by side: our stubs and tritonclient's share one descriptor pool.
WITH_TRITON = (
    IMPORTS
    + """
import tritonclient.grpc, tritonclient.grpc.aio
import serving.server, serving.client.grpc_client
from protos.inference import grpc_service_pb2
assert grpc_service_pb2.DESCRIPTOR is tritonclient.grpc.service_pb2.DESCRIPTOR
"""
)


def run(python: str, code: str, **kwargs) -> str:
    done = subprocess.run([python, "-W", "error", "-c", code], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_convserve_installs_beside_tritonclient() -> None:
    key = (ROOT / "pyproject.toml").read_text()
    env = venv("coinstall", f"{ROOT}[serve]", "tritonclient[grpc]==2.73.0", key=key, must_install=True)
    # Run outside the work tree, so the installed convserve is imported, not the sources.
    version = run(str(env / "bin" / "python"), WITH_TRITON, cwd="/")
    assert version.startswith("6."), version


def test_stubs_import_under_protobuf_7() -> None:
    env = venv("protobuf7", "protobuf>=7.35.1,<8", "grpcio>=1.81.1", must_install=True)
    version = run(str(env / "bin" / "python"), IMPORTS, cwd=ROOT)
    assert version.startswith("7."), version
