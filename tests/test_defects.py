"""Defects found by trying the server as a new user and as an attacker would, each against a real server
process: versions in non-ASCII digits, RPCs of the protocol the server does not offer, error messages
that echo a client's unbounded value, stream errors a client cannot match to its request, a bad
message mid-stream, memory and metrics labels spent on calls without a token, quiet ends of calls whose
client has gone, and a version folder the server cannot read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.convserve.v1 import convserve_pb2 as cpb
from protos.convserve.v1 import convserve_pb2_grpc as cpb_grpc
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.tools.launch import LaunchedServer
from tests.conftest import start_server
from tests.test_metrics import Scrape
from tests.test_overload import rss

pytestmark = pytest.mark.slow
MODEL = "digits"
TENSOR = "image"
SERVICE = "/inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedServer]:
    launched = start_server(model_repo, tmp_path_factory.mktemp("defects"), "--max-delay-ms", "2")
    yield launched
    launched.stop()
    assert "Traceback" not in launched.log(), launched.log()[-3000:]


@pytest.fixture(scope="module")
def stub(server: LaunchedServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def tensor_request(rows: np.ndarray, request_id: str = "", **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id, **fields)
    request.inputs.add(name=TENSOR, datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


def rows_of(digit_samples, count: int = 1) -> np.ndarray:
    return digit_samples[0][:count].astype(np.float32) / 255


def failure(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=30, **kwargs)
    return caught.value


# -- 6: only ASCII digits are versions ------------------------------------------------------------


@pytest.mark.parametrize("version", ["²", "١", "1²", "٣"])
def test_a_version_in_other_digits_is_invalid_not_internal_nor_read(stub, digit_samples, version) -> None:
    error = failure(stub.ModelInfer, tensor_request(rows_of(digit_samples), model_version=version))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert "positive integer" in error.details()
    for call, request in (
        (stub.ModelReady, pb.ModelReadyRequest(name=MODEL, version=version)),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL, version=version)),
    ):
        assert failure(call, request).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_version_folder_in_other_digits_is_not_a_version(model_repo: Path, tmp_path: Path) -> None:
    from serving.models.repository import scan

    for name in ("1", "²", "١"):
        shutil.copytree(model_repo / MODEL / "1", tmp_path / MODEL / name)
    assert {name: sorted(versions) for name, versions in scan(tmp_path).items()} == {MODEL: [1]}


def test_a_device_index_in_other_digits_is_refused_with_the_usage() -> None:
    from serving.core.runtime import parse_device

    assert parse_device("cuda:1") == ("cuda", 1)
    for device in ("cuda:²", "cuda:١"):
        with pytest.raises(ValueError, match="cuda:N"):
            parse_device(device)


# -- 7: RPCs not offered ---------------------------------------------------------------------------

NOT_OFFERED = {
    "SystemSharedMemoryStatus": pb.SystemSharedMemoryStatusRequest(),
    "SystemSharedMemoryRegister": pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8),
    "SystemSharedMemoryUnregister": pb.SystemSharedMemoryUnregisterRequest(name="r"),
    "CudaSharedMemoryStatus": pb.CudaSharedMemoryStatusRequest(),
    "CudaSharedMemoryRegister": pb.CudaSharedMemoryRegisterRequest(name="r", byte_size=8),
    "CudaSharedMemoryUnregister": pb.CudaSharedMemoryUnregisterRequest(name="r"),
    "TraceSetting": pb.TraceSettingRequest(),
    "LogSettings": pb.LogSettingsRequest(),
}


@pytest.mark.parametrize("rpc", sorted(NOT_OFFERED))
def test_rpcs_not_offered_are_unimplemented_with_a_message(server, stub, rpc: str) -> None:
    error = failure(getattr(stub, rpc), NOT_OFFERED[rpc])
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, (error.code(), error.details())
    assert f"{rpc} is not implemented" in error.details()
    assert "Traceback" not in server.log()


# -- 8: error messages cut what they repeat --------------------------------------------------------

LONG = 20_000  # past gRPC's 16 KiB limit on what a status message may carry back


def test_errors_cut_every_value_they_repeat(server, stub, digit_samples) -> None:
    rows = rows_of(digit_samples)
    long_name = "m" * LONG
    cases = [
        (stub.ModelInfer, pb.ModelInferRequest(model_name=long_name), grpc.StatusCode.NOT_FOUND),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=long_name), grpc.StatusCode.NOT_FOUND),
        (stub.ModelInfer, tensor_request(rows, model_version="9" * LONG), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    shapes = tensor_request(rows)
    shapes.inputs[0].shape[:] = [1] * (LONG // 2)
    datatype = tensor_request(rows)
    datatype.inputs[0].datatype = "F" * LONG
    input_name = tensor_request(rows)
    input_name.inputs[0].name = "i" * LONG
    output = tensor_request(rows)
    output.outputs.add(name="o" * LONG)
    encoded = pb.ModelInferRequest(model_name=MODEL)
    encoded.inputs.add(name="image_bytes", datatype="BYTES", shape=[1, *[1] * (LONG // 2)])
    cases += [(stub.ModelInfer, r, grpc.StatusCode.INVALID_ARGUMENT) for r in (shapes, datatype, input_name)]
    cases += [(stub.ModelInfer, r, grpc.StatusCode.INVALID_ARGUMENT) for r in (output, encoded)]
    with grpc.insecure_channel(server.address) as channel:
        classifier = cpb_grpc.ClassifierStub(channel)
        tensor = cpb.Image(tensor=cpb.Tensor(shape=[1] * (LONG // 2), dtype="float32", data=b"\0" * 4))
        bad_dtype = cpb.Image(tensor=cpb.Tensor(shape=[1, 8, 8], dtype="f" * LONG, data=b"\0" * 256))
        cases += [
            (classifier.Classify, cpb.ClassifyRequest(model=long_name), grpc.StatusCode.NOT_FOUND),
            (classifier.GetModel, cpb.GetModelRequest(name=long_name), grpc.StatusCode.NOT_FOUND),
            (classifier.Classify, cpb.ClassifyRequest(images=[tensor]), grpc.StatusCode.INVALID_ARGUMENT),
            (classifier.Classify, cpb.ClassifyRequest(images=[bad_dtype]), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, request, code in cases:
            error = failure(call, request)
            assert error.code() == code, (error.code(), error.details()[:300])
            assert len(error.details()) < 1000, error.details()[:300]


# -- 9 and 10: streams -----------------------------------------------------------------------------


def test_stream_errors_name_their_request(stub, digit_samples) -> None:
    rows = rows_of(digit_samples)
    requests = [tensor_request(rows, f"ok-{i}") for i in range(6)]
    requests += [
        tensor_request(rows, "no-such-version", model_version="7"),
        pb.ModelInferRequest(model_name="nothing", model_version="2", id="no-such-model"),
    ]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(responses) == len(requests)
    errors = {r.infer_response.id: r for r in responses if r.error_message}
    assert set(errors) == {"no-such-version", "no-such-model"}
    assert (
        errors["no-such-version"].infer_response.model_name,
        errors["no-such-version"].infer_response.model_version,
    ) == (MODEL, "7")
    assert (
        errors["no-such-model"].infer_response.model_name,
        errors["no-such-model"].infer_response.model_version,
    ) == ("nothing", "2")
    assert {r.infer_response.id for r in responses if not r.error_message} == {f"ok-{i}" for i in range(6)}


def test_a_bad_message_mid_stream_keeps_the_answers_owed(server, digit_samples) -> None:
    rows = rows_of(digit_samples)
    sent = [tensor_request(rows, f"r{i}").SerializeToString() for i in range(20)]
    with grpc.insecure_channel(server.address) as channel:
        stream = channel.stream_stream(f"{SERVICE}/ModelStreamInfer")  # bytes in, bytes out
        call = stream(iter([*sent, b"\xff\xff\xff not a message"]), timeout=30)
        answers = []
        with pytest.raises(grpc.RpcError) as caught:
            for raw in call:
                answers.append(pb.ModelStreamInferResponse.FromString(raw))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(a.infer_response.id for a in answers) == sorted(f"r{i}" for i in range(20))
    assert not any(a.error_message for a in answers)


def test_typed_contents_with_raw_contents_are_refused(stub, digit_samples) -> None:
    rows = rows_of(digit_samples)
    both = tensor_request(rows)
    both.inputs[0].contents.fp32_contents.extend(rows.ravel().tolist())
    error = failure(stub.ModelInfer, both)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not in both" in error.details()
    answer = stub.ModelInfer(tensor_request(rows), timeout=30)  # raw alone still serves
    assert answer.outputs[0].shape == [1, 10]


# -- 2: calls without a token cost nothing that stays ----------------------------------------------

TOKEN = "defects-token-7d1e"


def unique_calls(address: str, count: int, start: int, metadata=None) -> dict[grpc.StatusCode, int]:
    """`count` unary calls, each to a method name never used before, many at once on one channel."""

    async def run() -> dict[grpc.StatusCode, int]:
        codes: dict[grpc.StatusCode, int] = {}
        async with grpc.aio.insecure_channel(address) as channel:
            names = iter(range(start, start + count))

            async def worker() -> None:
                for i in names:
                    method = channel.unary_unary(f"/x.Y/{i:08d}{'n' * 1000}")
                    try:
                        await method(b"", timeout=30, metadata=metadata)
                    except grpc.aio.AioRpcError as error:
                        codes[error.code()] = codes.get(error.code(), 0) + 1

            await asyncio.gather(*(worker() for _ in range(200)))
        return codes

    return asyncio.run(run())


def test_calls_without_a_token_to_unique_methods_leave_memory_flat(
    model_repo, server_factory, tmp_path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    server = server_factory(model_repo, "--auth-token-file", str(tokens), metrics=True)
    pid = server.process.pid
    assert unique_calls(server.address, 5_000, 0) == {grpc.StatusCode.UNAUTHENTICATED: 5_000}
    before = rss(pid)
    assert unique_calls(server.address, 50_000, 5_000) == {grpc.StatusCode.UNAUTHENTICATED: 50_000}
    grown = rss(pid) - before
    assert grown < 20 * 2**20, f"the server grew by {grown / 2**20:.1f} MiB over 50,000 refused calls"
    # Unique names with a wrong token too (PERMISSION_DENIED): the same handful of refusals.
    wrong = (("authorization", "Bearer not-it"),)
    assert unique_calls(server.address, 2_000, 60_000, wrong) == {grpc.StatusCode.PERMISSION_DENIED: 2_000}
    assert "Traceback" not in server.log()


def test_a_large_request_without_a_token_is_refused_unread(model_repo, server_factory, tmp_path) -> None:
    """A 60 MB ModelInfer without a token: refused before gRPC takes the message in (the peak RSS
    grew by 176 MiB when it was received whole, copied and parsed for the metrics' labels)."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    server = server_factory(
        model_repo, "--auth-token-file", str(tokens), "--max-message-mb", "100", metrics=True
    )
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=TENSOR, datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(60 * 2**20))
    peak = rss(server.process.pid, "VmHWM")
    options = [("grpc.max_send_message_length", 2**30)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert failure(stub.ModelInfer, request).code() == grpc.StatusCode.UNAUTHENTICATED
    grown = rss(server.process.pid, "VmHWM") - peak
    assert grown < 20 * 2**20, f"the peak RSS grew by {grown / 2**20:.1f} MiB"


def test_a_refused_call_is_counted_without_the_model_it_names(
    model_repo, server_factory, tmp_path, digit_samples
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    server = server_factory(model_repo, "--auth-token-file", str(tokens), metrics=True)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = tensor_request(rows_of(digit_samples), model_version="1")
        assert failure(stub.ModelInfer, request).code() == grpc.StatusCode.UNAUTHENTICATED
        stub.ModelInfer(request, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
    scrape = Scrape(server.metrics_address)
    refused = scrape.by_labels("convserve_requests_total", code="UNAUTHENTICATED")
    assert refused == {
        (("code", "UNAUTHENTICATED"), ("model", ""), ("protocol", "kserve_v2"), ("version", "")): 1.0
    }
    assert (
        scrape.get("convserve_requests_total", protocol="kserve_v2", model=MODEL, version="1", code="OK") == 1
    )


# -- 1: an unreadable version folder costs that version only ---------------------------------------

# Root keeps its uid (so it reads the checkout wherever it was cloned) but loses the two capabilities
# that let it ignore permission bits; `chmod 000` then denies it as it denies any user.
WITHOUT_DAC = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)


def unprivileged() -> tuple[str, ...]:
    """A prefix under which `chmod 000` denies reads (root ignores permission bits otherwise)."""
    if os.geteuid() != 0:
        return ()  # already unprivileged: chmod 000 denies this user too
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux) is not installed")
    probe = subprocess.run([*WITHOUT_DAC, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        missing(f"cannot drop CAP_DAC_OVERRIDE here: {probe.stderr.strip()}")
    return WITHOUT_DAC


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def version_states(address: str, name: str) -> dict[int, tuple[str, str]]:
    with grpc.insecure_channel(address) as channel:
        info = cpb_grpc.ClassifierStub(channel).GetModel(cpb.GetModelRequest(name=name), timeout=10)
    return {s.version: (s.state, s.reason) for s in info.version_states}


def serving_status(address: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_an_unreadable_version_folder_is_that_version_unavailable(
    model_repo, server_factory, digit_samples
) -> None:
    from grpc_health.v1 import health_pb2

    prefix = unprivileged()
    place = Path(tempfile.mkdtemp(prefix="convserve-unreadable-"))
    started = []
    try:
        place.chmod(0o755)
        repo, workdir = place / "models", place / "work"
        for version in ("1", "2"):
            shutil.copytree(model_repo / MODEL / "1", repo / MODEL / version)
        shutil.copytree(model_repo / MODEL / "1", repo / "spare" / "1")  # serves whatever happens to digits
        (repo / MODEL / "3").mkdir()
        (repo / MODEL / "3").chmod(0o000)  # unreadable from the start
        workdir.mkdir()
        for folder in [repo, *repo.rglob("*")]:
            if folder.name != "3":
                folder.chmod(0o755 if folder.is_dir() else 0o644)
        server = start_server(repo, workdir, "--model-control", "poll", "--poll-s", "0.2", prefix=prefix)
        started.append(server)
        unreadable = "cannot read version folder {}: permission denied"
        assert version_states(server.address, MODEL) == {
            1: ("READY", ""),
            2: ("READY", ""),
            3: ("UNAVAILABLE", unreadable.format("digits/3")),
        }
        # While serving: a new version folder nobody can read.
        (repo / MODEL / "7").mkdir()
        (repo / MODEL / "7").chmod(0o000)
        request = tensor_request(rows_of(digit_samples))
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(server.address) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while version_states(server.address, MODEL).get(7) is None and time.monotonic() < deadline:
                assert serving_status(server.address) == health_pb2.HealthCheckResponse.SERVING
                assert infer(request, timeout=10).model_version == "2"
            for _ in range(10):  # several polls later, still the same
                time.sleep(0.1)
                assert serving_status(server.address) == health_pb2.HealthCheckResponse.SERVING
                assert infer(request, timeout=10).model_version == "2"
        states = version_states(server.address, MODEL)
        assert states[7] == ("UNAVAILABLE", unreadable.format("digits/7"))
        assert states[1] == states[2] == ("READY", "")
        log = server.log()
        assert log.count(unreadable.format("digits/7")) == 1, log[-3000:]
        assert str(place) not in unreadable and "Traceback" not in log
    finally:
        for launched in started:
            launched.stop(timeout=15)
        for folder in (place / "models" / MODEL / "3", place / "models" / MODEL / "7"):
            if folder.exists():
                folder.chmod(0o755)
        shutil.rmtree(place, ignore_errors=True)


# -- 11: a call whose client has gone ends quietly -------------------------------------------------


def test_client_deadlines_and_cancellations_write_no_traceback(conv_repo, server_factory) -> None:
    server = server_factory(conv_repo, "--max-delay-ms", "5")
    rows = np.random.default_rng(0).random((4, 3, 320, 320), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="conv320")
    request.inputs.add(name="image", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())

    async def run() -> dict[str, int]:
        outcomes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def deadline(i: int) -> None:
                try:
                    await stub.ModelInfer(request, timeout=0.002 + (i % 20) * 0.002)
                    outcome = "OK"
                except grpc.aio.AioRpcError as error:
                    outcome = error.code().name
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

            async def cancel(i: int) -> None:
                call = stub.ModelInfer(request, timeout=30)
                await asyncio.sleep((i % 10) * 0.003)
                call.cancel()
                outcomes["cancelled"] = outcomes.get("cancelled", 0) + 1

            async def cancel_stream(i: int) -> None:
                call = stub.ModelStreamInfer(iter([request] * 4), timeout=30)
                await asyncio.sleep((i % 10) * 0.003)
                call.cancel()

            for _ in range(6):
                await asyncio.gather(
                    *(deadline(i) for i in range(30)),
                    *(cancel(i) for i in range(10)),
                    *(cancel_stream(i) for i in range(5)),
                )
            await stub.ModelInfer(request, timeout=30)  # the server still serves
        return outcomes

    outcomes = asyncio.run(run())
    assert outcomes.get("DEADLINE_EXCEEDED", 0) > 0, outcomes
    time.sleep(0.5)
    log = server.log()
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-4000:]


def test_grpc_s_traceback_for_a_departed_client_is_replaced_by_a_quiet_line(caplog) -> None:
    """What gRPC's asyncio server logs when a response cannot be sent because the client has gone
    (seen about once in 2,400 calls at their deadline): the record is dropped, other records pass."""
    import logging

    from serving.protocols.grpc_logs import GRPC_LOGGER, quiet_client_gone

    quiet_client_gone()
    grpc_log = logging.getLogger(GRPC_LOGGER)
    caplog.set_level(logging.INFO)
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/x.Y/Z")
    grpc_log.error("something else in gRPC")
    assert [r.getMessage() for r in caplog.records] == ["something else in gRPC"]


def test_failed_tls_handshakes_write_no_line_each(model_repo, server_factory, tmp_path) -> None:
    import socket

    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    server = server_factory(model_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    host, port = server.address.rsplit(":", 1)
    for _ in range(200):  # plaintext HTTP to the TLS port: a failed handshake each
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(OSError):
                connection.recv(100)
    time.sleep(0.5)
    log = server.log()
    assert log.count("Handshake failed") == 0, log[-2000:]
    assert len(log.splitlines()) < 20  # the server's own start-up lines only


# -- 5: both inputs at once (perf_analyzer's random-data run) --------------------------------------


def test_a_request_with_both_inputs_is_served_from_the_tensor(stub, digit_samples) -> None:
    rows = rows_of(digit_samples, 2)
    request = tensor_request(rows)
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[2, 1])
    request.raw_input_contents.append(b"\x03\0\0\0abc\x03\0\0\0xyz")  # not images: never read
    both = stub.ModelInfer(request, timeout=30)
    alone = stub.ModelInfer(tensor_request(rows), timeout=30)
    assert both.raw_output_contents == alone.raw_output_contents
    assert both.parameters["ignored_inputs"].string_param == "image_bytes"
    assert "ignored_inputs" not in alone.parameters
    twice = tensor_request(rows)
    twice.inputs.add(name=TENSOR, datatype="FP32", shape=list(rows.shape))
    twice.raw_input_contents.append(rows.astype("<f4").tobytes())
    assert failure(stub.ModelInfer, twice).code() == grpc.StatusCode.INVALID_ARGUMENT


# -- 12: paths relative to the repository; which files a version was loaded from -------------------


def test_reasons_show_paths_relative_to_the_repository(model_repo, tmp_path) -> None:
    from serving.core.batch_settings import BatchingConfig
    from serving.core.runtime import RuntimeOptions
    from serving.models.registry import ModelRegistry

    shutil.copytree(model_repo / MODEL / "1", tmp_path / MODEL / "1")
    (tmp_path / MODEL / "2").mkdir()
    (tmp_path / MODEL / "2" / "model.onnx").write_bytes(b"not an onnx file")
    registry = ModelRegistry()
    registry.add_repository(tmp_path)
    registry.load_all(RuntimeOptions(), BatchingConfig())
    try:
        entry = registry.entry(MODEL, 2)
        assert entry.state == "UNAVAILABLE" and entry.reason
        assert str(tmp_path) not in entry.reason and "digits/2/model.onnx" in entry.reason, entry.reason
    finally:
        asyncio.run(registry.close())


def test_an_overwritten_model_file_shows_a_new_checksum_and_load_time(
    model_repo, server_factory, tmp_path
) -> None:
    import hashlib

    repo = tmp_path / "models"
    shutil.copytree(model_repo / MODEL / "1", repo / MODEL / "1")
    server = server_factory(repo, "--model-control", "poll", "--poll-s", "0.2")
    model_file = repo / MODEL / "1" / "model.onnx"

    def published() -> tuple[str, str, str, str]:
        with grpc.insecure_channel(server.address) as channel:
            info = cpb_grpc.ClassifierStub(channel).GetModel(cpb.GetModelRequest(name=MODEL), timeout=10)
            config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
                pb.ModelConfigRequest(name=MODEL), timeout=10
            )
        parameters = config.config.parameters
        return (
            info.model_sha256,
            info.loaded_at,
            parameters["model_sha256"].string_value,
            parameters["loaded_at"].string_value,
        )

    sha, loaded_at, config_sha, config_loaded_at = published()
    assert sha == config_sha == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert (
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", loaded_at) and config_loaded_at == loaded_at
    )
    # The same weights written again in place, with different bytes (a metadata entry added).
    import onnx

    model = onnx.load(str(model_file))
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, "note": "retrained"}
    )
    onnx.save(model, str(model_file))
    expected = hashlib.sha256(model_file.read_bytes()).hexdigest()
    deadline = time.monotonic() + 30
    while published()[0] != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    sha2, loaded_at2, config_sha2, _ = published()
    assert sha2 == config_sha2 == expected != sha
    assert loaded_at2 > loaded_at
