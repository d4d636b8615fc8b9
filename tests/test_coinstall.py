"""convserve installs and works in one fresh environment with tritonclient[grpc], and its committed
stubs import under protobuf 6 (what tritonclient resolves) and protobuf 7 alike."""

from __future__ import annotations

import subprocess
from pathlib import Path

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


CLIENT_CALLS = """
import importlib.util, sys
from serving.client import ClassifierClient, tensor_to_array
absent = [m for m in ("onnxruntime", "PIL", "torch") if importlib.util.find_spec(m) is not None]
assert not absent, absent
with ClassifierClient(sys.argv[1]) as client:
    image = open(sys.argv[2], "rb").read()
    (result,) = client.classify([image], "digits", top_k=1)
    answer = client.explain([image], "digits", methods=["occlusion"])
print(result.top.label, tensor_to_array(answer.images[0].maps[0].map).shape)
"""


def test_the_client_extra_works_without_onnxruntime_pillow_or_torch(
    model_repo: Path, server_factory, digit_samples, tmp_path: Path
) -> None:
    """`pip install convserve[client]` classifies and explains through a real server, in an environment
    where none of the server's or the trainer's heavy packages exist; its answer is the dev client's."""
    from serving.client import ClassifierClient
    from tests.conftest import encode

    key = (ROOT / "pyproject.toml").read_text()
    env = venv("client", f"{ROOT}[client]", key=key, must_install=True)
    server = server_factory(model_repo)
    picture = tmp_path / "digit.png"
    picture.write_bytes(encode(digit_samples[0][0, 0]))
    done = subprocess.run(
        [str(env / "bin" / "python"), "-c", CLIENT_CALLS, server.address, str(picture)],
        capture_output=True,
        text=True,
        cwd="/",  # the installed convserve, not the sources
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with ClassifierClient(server.address) as client:
        expected = client.classify([picture], "digits", top_k=1)[0].top.label
    assert done.stdout.split()[0] == expected and "(8, 8)" in done.stdout
