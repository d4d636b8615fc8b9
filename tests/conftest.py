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


def build_conv_model(
    path: Path,
    side: int = 320,
    classes: int = 10,
    seed: int = 0,
    channels: int = 8,
    stride: int = 2,
    depth: int = 1,
) -> Path:
    """A real ONNX CNN of about a millisecond per 3 x side x side image (more with more `channels`, a
    smaller `stride` or a larger `depth`): `depth` times conv -> ReLU, then global average pooling ->
    fully connected -> softmax, with random weights and the convserve contract."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from serving.core.contract import Fit, ModelContract

    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (channels, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 1.0, (channels, classes)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["c"], strides=[stride, stride], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r0"]),
    ]
    for layer in range(1, depth):  # channels -> channels, same size: compute without new inputs
        name = f"conv{layer}_w"
        weights.append(
            numpy_helper.from_array(rng.normal(0, 0.1, (channels, channels, 3, 3)).astype(np.float32), name)
        )
        nodes.append(helper.make_node("Conv", [f"r{layer - 1}", name], [f"c{layer}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"]))
    nodes += [
        helper.make_node("GlobalAveragePool", [f"r{depth - 1}"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    contract = ModelContract(labels=tuple(f"c{i}" for i in range(classes)), fit=Fit("RGB", side, side))
    helper.set_model_props(model, contract.to_metadata())
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def conv_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding `conv320`, a 3x320x320 model (1.2 MB of float input per image)."""
    repo = tmp_path_factory.mktemp("conv-models")
    build_conv_model(repo / "conv320" / "1" / "model.onnx")
    return repo


def bomb_png(side: int) -> bytes:
    """A real, valid greyscale PNG of side x side black pixels: tiny on disk, huge when decoded."""
    import struct
    import zlib

    compressor = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


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


class ThreadedServer:
    """The real server (`serving.server.Server`: registry, data plane, servicers, call gate) on its own
    event loop in a thread of the test process, on 127.0.0.1 and a free port."""

    def __init__(self, models: Path, *flags: str, registry=None) -> None:
        import argparse
        import asyncio
        import threading

        from serving.config import add_config_arguments, config_from_args
        from serving.server import Server

        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        config = config_from_args(
            parser.parse_args(
                [
                    "--models",
                    str(models),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                    "--http-port",
                    "0",
                    *flags,
                ]
            )
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def build() -> Server:
            return Server(config, registry)

        self.server = self.run(build())
        self.address = f"127.0.0.1:{self.run(self.server.start())}"

    def run(self, coroutine, timeout: float = 60):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.shut_down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def threaded_server() -> Iterator:
    """Starts in-process servers on demand; every one is shut down when the test ends."""
    started: list[ThreadedServer] = []

    def factory(models: Path, *flags: str, registry=None) -> ThreadedServer:
        started.append(ThreadedServer(models, *flags, registry=registry))
        return started[-1]

    yield factory
    for server in started:
        server.close()


def timing(text: str) -> dict[str, float]:
    """A receipt's `Server-Timing` (the HTTP header, or the gRPC trailing entry) as {name: dur}, or
    {name: desc} for batch, version and trace."""
    out: dict[str, float | str] = {}
    for part in text.split(","):
        name, _, rest = part.strip().partition(";")
        key, _, value = rest.partition("=")
        out[name] = float(value) if key == "dur" else value.strip('"')
    return out  # type: ignore[return-value]
