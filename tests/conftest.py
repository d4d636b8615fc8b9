"""Shared fixtures: a digits model trained and exported once per session, and real server processes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.datasets import load_digits
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(load_digits(seed=0), TrainConfig(epochs=12, seed=0), out)
    return out


@pytest.fixture(scope="session")
def model_repo(digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_run

    repo = tmp_path_factory.mktemp("models")
    export_run(digits_run, repo, "digits")
    return repo


@pytest.fixture(scope="session")
def digit_samples(digits_run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's held-out test images (uint8, N x 1 x 8 x 8) and labels."""
    data = np.load(digits_run / "test_split.npz")
    return data["images"], data["labels"]


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """Encodes (C, H, W) or (H, W) uint8 pixels as an image file's bytes."""
    array = pixels[0] if pixels.ndim == 3 and pixels.shape[0] == 1 else pixels
    image = Image.fromarray(np.ascontiguousarray(array))
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@dataclass
class ServerProcess:
    process: subprocess.Popen
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(
    models: Path, workdir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> ServerProcess:
    """Starts `python -m serving serve` on 127.0.0.1 with an ephemeral port; waits until it is SERVING."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"port-{time.monotonic_ns()}"
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    command = [
        sys.executable,
        "-m",
        "serving",
        "serve",
        "--models",
        str(models),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        *args,
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    time.sleep(0.01)
    return ServerProcess(process, f"127.0.0.1:{port_file.read_text().strip()}", log_path)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Starts servers on demand; every one of them is stopped when the test ends."""
    started: list[ServerProcess] = []

    def factory(models: Path, *args: str, **kwargs) -> ServerProcess:
        server = start_server(models, tmp_path / "servers", *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(timeout=15)


@pytest.fixture(scope="module")
def digits_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared server for tests that only read from it."""
    server = start_server(model_repo, tmp_path_factory.mktemp("server"), "--max-delay-ms", "5")
    yield server
    server.stop()
