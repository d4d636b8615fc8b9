"""Model lifecycle end to end, under load: a real server process polling a real repository while 16
clients classify real PNG images in a loop. Publishing a version, publishing a corrupt one and removing
one must cost zero failed calls; then explicit load and unload through unmodified tritonclient."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kserve_grpc
from serving.client import make_request
from tests.conftest import build_conv_model, encode

pytestmark = pytest.mark.slow
NAME = "tiny"
SIDE = 16
CLIENTS = 16  # unversioned calls
PINNED = 4  # calls naming version 1
OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND


def publish(repo: Path, version: int, data: bytes | None = None) -> None:
    """Writes the version under a hidden name, then renames it into place: the documented way."""
    staging = repo / NAME / f".tmp-{version}"
    if data is None:
        build_conv_model(staging / "model.onnx", side=SIDE, channels=2, seed=version)
    else:
        staging.mkdir(parents=True)
        (staging / "model.onnx").write_bytes(data)
    os.rename(staging, repo / NAME / str(version))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Waits for the server to get there; the bound only keeps a broken server from hanging the test."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


class Client(threading.Thread):
    """Calls Classify in a loop and keeps every outcome: (version answered or 0, status code, top class)."""

    def __init__(self, address: str, request: pb.ClassifyRequest, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(address)
        self.request = request
        self.stop = stop
        self.outcomes: list[tuple[int, grpc.StatusCode, float]] = []

    def run(self) -> None:
        stub = pb_grpc.ClassifierStub(self.channel)  # no retries: every outcome is seen
        while not self.stop.is_set():
            try:
                response = stub.Classify(self.request, timeout=30)
                self.outcomes.append((response.version, OK, response.results[0].probability[0]))
            except grpc.RpcError as exc:
                self.outcomes.append((0, exc.code(), 0.0))

    def versions_since(self, mark: int) -> list[int]:
        return [v for v, _, _ in self.outcomes[mark:]]

    def mark(self) -> int:
        """Where the calls sent from now on begin: past the one call that may be in flight."""
        return len(self.outcomes) + 1


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    (models / NAME).mkdir(parents=True)
    publish(models, 1)
    return models


def test_publish_corrupt_and_remove_versions_under_load_with_zero_failed_calls(repo, server_factory) -> None:
    server = server_factory(repo, "--model-control", "poll", "--poll-s", "0.1", "--max-delay-ms", "1")
    pixels = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    image = encode(pixels)
    # The pinned clients send a large image, decoded in the thread pool for milliseconds: their calls
    # spend most of their time between resolving version 1 and reaching its batcher, the window in
    # which removing version 1 must wait for them.
    ramp = np.linspace(0, 255, 1200, dtype=np.uint8)
    large = encode(np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[:, None]), axis=-1))
    channel = grpc.insecure_channel(server.address)
    stub, kserve = pb_grpc.ClassifierStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)
    info = lambda version=0: stub.GetModel(pb.GetModelRequest(name=NAME, version=version))  # noqa: E731

    def state(version: int) -> str:
        return {s.version: s.state for s in info().version_states}.get(version, "")

    stop = threading.Event()
    free = [Client(server.address, make_request([image], NAME, top_k=3), stop) for _ in range(CLIENTS)]
    pinned = [Client(server.address, make_request([large], NAME, 1, top_k=3), stop) for _ in range(PINNED)]
    clients = free + pinned
    for client in clients:
        client.start()
    try:
        wait_for(lambda: all(len(c.outcomes) >= 5 for c in clients), "every client to be answered")

        # 1. Version 2 appears: calls that name no version move to it once it is loaded and warmed.
        publish(repo, 2)
        wait_for(lambda: info().version == 2, "version 2 to serve")
        marks = [c.mark() for c in free]
        wait_for(lambda: all(len(c.outcomes) > m + 5 for c, m in zip(free, marks, strict=True)), "more calls")
        for client, mark in zip(free, marks, strict=True):
            assert set(client.versions_since(mark)) == {2}
        assert {s.version: s.state for s in info().version_states} == {1: "READY", 2: "READY"}

        # 2. A corrupt version 3: unavailable with its reason; version 2 keeps serving.
        publish(repo, 3, data=b"a half-copied file that is no ONNX model")
        wait_for(lambda: state(3) == "UNAVAILABLE", "version 3 to fail")
        assert "cannot serve tiny version 3" in info(3).reason
        index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10).models
        listed = {(m.name, m.version): (m.state, m.reason) for m in index}
        assert listed[(NAME, "3")][0] == "UNAVAILABLE" and "cannot serve" in listed[(NAME, "3")][1]
        assert listed[(NAME, "2")] == ("READY", "")
        marks = [c.mark() for c in free]
        wait_for(lambda: all(len(c.outcomes) > m + 5 for c, m in zip(free, marks, strict=True)), "more calls")
        assert info().version == 2
        for client, mark in zip(free, marks, strict=True):
            assert set(client.versions_since(mark)) == {2}

        # 3. Version 1 removed while clients name it: their calls finish, then NOT_FOUND.
        assert all(any(code == OK for _, code, _ in c.outcomes) for c in pinned)
        hidden = repo / NAME / ".removed-1"
        os.rename(repo / NAME / "1", hidden)
        shutil.rmtree(hidden)
        wait_for(lambda: all(c.outcomes[-1][1] == NOT_FOUND for c in pinned), "version 1 to be gone")
        wait_for(lambda: state(1) == "UNLOADED", "version 1 to unload")
        assert info(1).reason == "removed from the repository"
    finally:
        stop.set()
        for client in clients:
            client.join(30)
            client.channel.close()
        channel.close()

    for client in free:  # zero failed calls; each moved from version 1 to 2 once and never back
        codes = {code for _, code, _ in client.outcomes}
        assert codes == {OK}, codes
        versions = client.versions_since(0)
        assert versions == sorted(versions) and set(versions) == {1, 2}
    by_version = {v: p for client in free for v, _, p in client.outcomes}
    assert by_version[1] != by_version[2]  # the versions are different models, told apart in the answers
    assert min(len(c.outcomes) for c in pinned) > 1
    for client in pinned:  # answered by version 1 until it drained, then NOT_FOUND, nothing else
        codes = [code for _, code, _ in client.outcomes]
        first_gone = codes.index(NOT_FOUND)
        assert set(codes[:first_gone]) == {OK} and set(codes[first_gone:]) == {NOT_FOUND}
        assert {v for v, code, _ in client.outcomes if code == OK} == {1}
    server.stop()
    log = server.log()
    assert "Traceback" not in log
    assert "model tiny version 3 is unavailable" in log and "unloaded model tiny version 1" in log


def test_explicit_load_and_unload_through_tritonclient(repo, server_factory) -> None:
    triton = pytest.importorskip("tritonclient.grpc")
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonclient.utils import InferenceServerException

    server = server_factory(repo, "--model-control", "explicit")
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel).Check
    kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
    serving = lambda: health(health_pb2.HealthCheckRequest(), timeout=10).status  # noqa: E731
    image = encode(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))

    def index() -> dict[tuple[str, str], tuple[str, str]]:
        models = client.get_model_repository_index(as_json=True).get("models", [])
        return {(m["name"], m["version"]): (m.get("state", ""), m.get("reason", "")) for m in models}

    def infer(model: str = NAME) -> str:
        images = triton.InferInput("image_bytes", [1], "BYTES")
        images.set_data_from_numpy(np.array([image], dtype=np.object_))
        return client.infer(model, [images]).get_response().model_version

    def refused(call: Callable[[], object], status: str, words: str) -> None:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == f"StatusCode.{status}" and words in caught.value.message()

    with triton.InferenceServerClient(server.address) as client:
        assert "model_repository" in client.get_server_metadata().extensions
        assert index() == {(NAME, "1"): ("READY", "")} and infer() == "1"
        publish(repo, 2)
        assert (NAME, "2") not in index() and infer() == "1"  # nothing changes without a request
        client.load_model(NAME)
        assert index()[(NAME, "2")] == ("READY", "") and infer() == "2" and client.is_model_ready(NAME, "2")

        client.unload_model(NAME)
        assert not client.is_model_ready(NAME)
        refused(infer, "NOT_FOUND", "model tiny version 2 is")  # DRAINING, then UNLOADED
        assert serving() == health_pb2.HealthCheckResponse.NOT_SERVING  # no version is ready
        assert {s for s, _ in index().values()} <= {"DRAINING", "UNLOADED"}
        wait_for(lambda: {s for s, _ in index().values()} == {"UNLOADED"}, "the versions to unload")
        assert index()[(NAME, "1")] == ("UNLOADED", "unloaded on request")
        assert not kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True), timeout=10).models

        client.load_model(NAME)
        assert infer() == "2" and serving() == health_pb2.HealthCheckResponse.SERVING
        refused(lambda: client.load_model(NAME, config="{}"), "INVALID_ARGUMENT", "takes no parameters")
        refused(lambda: client.load_model("nothing-here"), "NOT_FOUND", "no model 'nothing-here'")
        refused(lambda: client.unload_model("nothing-here"), "NOT_FOUND", "unknown model")
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
        refused(lambda: client.load_model("broken"), "FAILED_PRECONDITION", "cannot serve broken version 1")
        assert index()[("broken", "1")][0] == "UNAVAILABLE" and infer() == "2"

    # Without --model-control explicit the repository is the server's to manage: refused, nothing changes.
    polling = server_factory(repo, "--model-control", "poll", "--poll-s", "60")
    with triton.InferenceServerClient(polling.address) as client:
        for call in (client.load_model, client.unload_model):
            refused(lambda call=call: call(NAME), "FAILED_PRECONDITION", "--model-control poll")
        refused(lambda: client.load_model(NAME, config="{}"), "FAILED_PRECONDITION", "--model-control poll")
        assert client.is_model_ready(NAME) and index()[(NAME, "2")] == ("READY", "")
    channel.close()
    for launched in (server, polling):
        launched.stop()
        assert "Traceback" not in launched.log()
