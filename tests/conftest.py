"""Shared fixtures: a digits model trained and exported once per session, and real server processes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.tools.launch import LaunchedServer, launch_server

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


def start_server(models: Path, workdir: Path, *args: str, **kwargs) -> LaunchedServer:
    """A real `python -m serving serve` on 127.0.0.1, an ephemeral port, its output kept in a log file."""
    return launch_server(models, workdir, *args, log=True, timeout=60, **kwargs)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Starts servers on demand; every one of them is stopped when the test ends."""
    started: list[LaunchedServer] = []

    def factory(models: Path, *args: str, **kwargs) -> LaunchedServer:
        server = start_server(models, tmp_path / "servers", *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(timeout=15)


@pytest.fixture(scope="module")
def digits_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    """One shared server for tests that only read from it."""
    server = start_server(model_repo, tmp_path_factory.mktemp("server"), "--max-delay-ms", "5")
    yield server
    server.stop()
