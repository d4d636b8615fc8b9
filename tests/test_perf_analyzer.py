"""Triton's own load tool, perf_analyzer, runs against a convserve server process over gRPC and over HTTP
(binary tensor data, its default, and JSON) with the model's tensor input and with the BYTES input of
real PNG/JPEG files, and completes with no errors.

perf_analyzer asks for ModelMetadata and ModelConfig first, sends only the input it has data for
(both are optional in ModelConfig), and checks the server's statistics. Without --input-data it makes
up data for both inputs and sends them together: the server serves such a request from the tensor.
It comes from the tritonclient 2.41 wheel (bin/perf_analyzer), in an environment of its own: it needs
libcudart from
nvidia-cuda-runtime-cu12 (no GPU used) and Debian's libb64-0d (scripts/system-deps.sh).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.tools.launch import LaunchedServer
from tests.conftest import encode, start_server
from tests.venvs import missing, venv

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def perf_analyzer() -> tuple[Path, dict[str, str]]:
    if not glob.glob("/usr/lib/*/libb64.so.0d"):
        missing("libb64-0d is not installed: run scripts/system-deps.sh")
    env = venv("perf-analyzer", "tritonclient==2.41.0", "nvidia-cuda-runtime-cu12")
    cudart = next(env.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return env / "bin" / "perf_analyzer", {**os.environ, "LD_LIBRARY_PATH": str(cudart)}


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    launched = start_server(model_repo, tmp_path_factory.mktemp("perf"), "--max-delay-ms", "2", http=True)
    yield launched
    launched.stop()
    assert "Traceback" not in launched.log()


# (protocol, input and output tensor format): perf_analyzer's HTTP sends binary tensor data unless told.
TRANSPORTS = {"grpc": ("grpc", None), "http": ("http", None), "http-json": ("http", "json")}


def address_of(server: LaunchedServer, transport: str) -> str:
    return server.address if transport == "grpc" else server.http_address


def run(tool: tuple[Path, dict[str, str]], server: LaunchedServer, transport: str, data: Path) -> str:
    binary, env = tool
    protocol, tensor_format = TRANSPORTS[transport]
    command = [
        str(binary), "-m", "digits", "-u", address_of(server, transport), "-i", protocol,
        "--input-data", str(data),
        "--concurrency-range", "4", "--measurement-interval", "800", "-s", "1000", "-r", "6",
    ]  # fmt: skip
    if tensor_format:
        command += ["--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format]
    # -s 1000: on a shared machine latency swings; stability is not what this test checks.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Throughput:" in output and "p99 latency" in output, output[-3000:]
    assert "error" not in output.lower(), output[-3000:]
    return output


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_tensor_input(perf_analyzer, server: LaunchedServer, transport, digit_samples, tmp_path) -> None:
    rows = digit_samples[0][:4].astype(np.float32) / 255
    data = {"data": [{"image": {"content": row.ravel().tolist(), "shape": [1, 8, 8]}} for row in rows]}
    (tmp_path / "tensor.json").write_text(json.dumps(data))
    run(perf_analyzer, server, transport, tmp_path / "tensor.json")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_image_bytes_input(perf_analyzer, server: LaunchedServer, transport, digit_samples, tmp_path) -> None:
    steps = []
    for i, pixels in enumerate(digit_samples[0][:4]):
        path = tmp_path / f"digit{i}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(encode(pixels, "PNG" if i % 2 else "JPEG"))
        # perf_analyzer's b64 holds the serialized BYTES tensor: a 4-byte little-endian length, the bytes.
        serialized = struct.pack("<I", path.stat().st_size) + path.read_bytes()
        steps.append({"image_bytes": {"b64": base64.b64encode(serialized).decode(), "shape": [1]}})
    (tmp_path / "images.json").write_text(json.dumps({"data": steps}))
    run(perf_analyzer, server, transport, tmp_path / "images.json")


def test_default_random_data_run(perf_analyzer, server: LaunchedServer) -> None:
    """What a first-time user runs: no --input-data, so perf_analyzer makes up data for every input
    ModelMetadata lists, both at once (it does not skip the optional ones); the tensor serves."""
    binary, env = perf_analyzer
    command = [
        str(binary), "-m", "digits", "-u", server.address, "-i", "grpc",
        "--concurrency-range", "2", "--measurement-interval", "800", "-s", "1000", "-r", "6",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Throughput:" in output and "error" not in output.lower(), output[-3000:]
