"""The protocol edge in process: the real server (registry, data plane, servicer, call gate) on a thread
of this process, real gRPC on 127.0.0.1, the real digits model. The error table, bad bytes on the wire,
streams that keep answering, models that fail to load, and generated requests that must never crash."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.core.errors import DeadlineExceeded, InvalidInput, NotFound, Overloaded, Unavailable
from serving.models.registry import ModelRegistry
from serving.protocols.status import INTERNAL_MESSAGE, status_of
from tests.conftest import encode

GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, with a length far past the end


def test_one_table_maps_domain_errors_and_hides_everything_else(caplog) -> None:
    expected = {
        InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
        NotFound: grpc.StatusCode.NOT_FOUND,
        Unavailable: grpc.StatusCode.UNAVAILABLE,
        Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
        DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    for kind, code in expected.items():
        assert status_of(kind("what went wrong")) == (code, "what went wrong")
    with caplog.at_level(logging.ERROR):
        try:
            raise KeyError("secret internals")
        except KeyError as exc:
            assert status_of(exc, "/x/Y") == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert any("secret internals" in r.getMessage() and r.exc_info for r in caplog.records)


class ExplodingRegistry(ModelRegistry):
    """A registry with a model whose lookup fails with an error no table knows: a stand-in for a bug."""

    def resolve(self, name: str, version: int):
        if name == "explode":
            raise RuntimeError("secret detail of a bug")
        return super().resolve(name, version)


@pytest.fixture
def served(model_repo: Path, threaded_server):
    registry = ExplodingRegistry()
    registry.add_repository(model_repo)
    server = threaded_server(model_repo, "--bench-service", registry=registry)
    channel = grpc.insecure_channel(server.address)
    yield server, channel
    channel.close()


def test_an_unexpected_error_is_internal_and_a_stream_answers_every_request(served, digit_samples) -> None:
    _, channel = served
    stub = pb_grpc.ClassifierStub(channel)
    png = encode(digit_samples[0][0])
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(model="explode", images=[pb.Image(encoded=png)]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL and info.value.details() == INTERNAL_MESSAGE
    requests = [
        pb.ClassifyRequest(id=str(i), model=name, images=[pb.Image(encoded=png)])
        for i, name in enumerate(["digits", "explode", "digits", "nope", "explode", "digits"])
    ]
    responses = {r.id: r for r in stub.ClassifyStream(iter(requests), timeout=10)}
    assert sorted(responses) == [str(i) for i in range(6)]
    for i in ("0", "2", "5"):
        assert not responses[i].HasField("error") and len(responses[i].results) == 1
    for i in ("1", "4"):
        assert responses[i].error.code == grpc.StatusCode.INTERNAL.value[0]
        assert responses[i].error.message == INTERNAL_MESSAGE
    assert responses["3"].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_bytes_that_are_no_message_are_invalid_argument_on_every_method(served, caplog) -> None:
    _, channel = served
    methods = {
        "/convserve.v1.Classifier/Classify": channel.unary_unary,
        "/convserve.v1.Classifier/ListModels": channel.unary_unary,
        "/convserve.v1.Classifier/GetModel": channel.unary_unary,
        "/convserve.v1.Bench/Echo": channel.unary_unary,
        "/grpc.health.v1.Health/Check": channel.unary_unary,
        "/grpc.health.v1.Health/Watch": channel.unary_stream,
        "/convserve.v1.Classifier/ClassifyStream": channel.stream_stream,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": channel.stream_stream,
    }
    with caplog.at_level(logging.INFO):
        for method, kind in methods.items():
            call = kind(method)  # no serializers: the bytes go out as they are
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as info:
                    if kind == channel.unary_unary:
                        call(GARBAGE, timeout=10)
                    elif kind == channel.unary_stream:
                        list(call(GARBAGE, timeout=10))
                    else:
                        list(call(iter([GARBAGE]), timeout=10))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
                assert "not a valid protobuf message" in info.value.details()
                assert "Error" not in info.value.details() and "Traceback" not in info.value.details()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    refused = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert 1 <= len(refused) <= len(methods), "160 bad calls must not write 160 log lines"
    health = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    assert (
        health(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    )


def test_a_model_that_fails_to_load_does_not_stop_the_others(model_repo, tmp_path, threaded_server) -> None:
    repo = tmp_path / "models"
    shutil.copytree(model_repo / "digits", repo / "digits")
    (repo / "digits" / "2").mkdir()
    (repo / "digits" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"\x08\x07")
    server = threaded_server(repo)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert listed["digits"].version == 1 and listed["digits"].state == "READY"
        states = {v.version: (v.state, v.reason) for v in listed["digits"].version_states}
        assert states[1] == ("READY", "") and states[2][0] == "UNAVAILABLE"
        assert "cannot serve digits version 2" in states[2][1]
        assert (
            listed["broken"].state == "UNAVAILABLE"
            and "cannot serve broken version 1" in listed["broken"].reason
        )
        tensor = pb.Image(tensor=pb.Tensor(shape=[1, 8, 8], dtype="float32", data=bytes(256)))
        ok = stub.Classify(pb.ClassifyRequest(model="digits", images=[tensor]), timeout=10)
        assert ok.version == 1 and len(ok.results[0].class_index) == 5
        for model, version in (("broken", 0), ("digits", 2)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(model=model, version=version, images=[tensor]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"{model} version {version or 1} is UNAVAILABLE: cannot serve" in info.value.details()


# -- generated requests ---------------------------------------------------------------------------

dtypes = st.sampled_from(
    ["float32", "<f4", ">f4", "float64", "uint8", "f4", "floaty", "", "S4", "(2,)f4", "O"]
)
tensors = st.builds(
    lambda shape, dtype, data: pb.Image(tensor=pb.Tensor(shape=shape, dtype=dtype, data=data)),
    st.one_of(st.just([1, 8, 8]), st.lists(st.integers(-(2**40), 2**40), max_size=5)),
    dtypes,
    st.one_of(st.binary(max_size=300), st.just(np.full(64, np.nan, np.float32).tobytes())),
)
encoded = st.one_of(
    st.binary(max_size=200),
    st.just(b"\x89PNG\r\n\x1a\n").map(lambda head: head + b"\0" * 30),
    st.sampled_from([b"GIF89a", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00"]).flatmap(
        lambda head: st.binary(max_size=100).map(lambda tail: head + tail)
    ),
)
VALID_TENSOR = pb.Image(
    tensor=pb.Tensor(shape=[1, 8, 8], dtype="float32", data=np.zeros(64, np.float32).tobytes())
)
VALID_PNG = pb.Image(encoded=encode(np.arange(64, dtype=np.uint8).reshape(1, 8, 8)))
images = st.lists(
    st.one_of(
        tensors,
        encoded.map(lambda data: pb.Image(encoded=data)),
        st.just(pb.Image()),
        st.sampled_from([VALID_TENSOR, VALID_PNG]),
    ),
    max_size=6,
)


def request_of(model: str, version: int, top_k: int, imgs: list[pb.Image]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, version=version, top_k=top_k, images=imgs)


requests = st.one_of(
    st.builds(
        request_of,
        st.sampled_from(["", "digits", "other", "\x00", "d" * 300]),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(-(2**31), 2**31 - 1),
        images,
    ),
    st.builds(
        request_of, st.sampled_from(["", "digits"]), st.sampled_from([0, 1]), st.integers(1, 20), images
    ),
)


def test_generated_requests_never_crash_or_reach_the_client_as_unknown(served, caplog) -> None:
    _, channel = served
    stub = pb_grpc.ClassifierStub(channel)
    seen: set[grpc.StatusCode] = set()

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=requests)
    def one(request: pb.ClassifyRequest) -> None:
        try:
            response = stub.Classify(request, timeout=10)
            seen.add(grpc.StatusCode.OK)
            assert len(response.results) == len(request.images)
        except grpc.RpcError as exc:
            seen.add(exc.code())
            assert exc.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            ), (exc.code(), exc.details())
            assert "Traceback" not in exc.details()

    with caplog.at_level(logging.WARNING):
        one()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= seen
