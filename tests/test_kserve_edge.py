"""The Open Inference Protocol edge in process: `DataPlane.predict` with the real digits model, and
generated ModelInfer requests through the real server (registry, data plane, servicer, call gate)
that must never crash it, reach the client as UNKNOWN/INTERNAL, or log a traceback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.core.errors import InvalidInput
from serving.core.runtime import RuntimeOptions
from serving.core.types import ClassifyRequest, PredictRequest, RawBatch, RawTensor
from serving.models.local import open_local
from tests.conftest import encode


@pytest.fixture(scope="module")
def local(model_repo: Path):
    opened = open_local(model_repo / "digits" / "1", RuntimeOptions(device="cpu"))
    yield opened
    asyncio.run(opened.close())


def test_predict_gives_the_rows_classify_ranks(local, digit_samples) -> None:
    rows = digit_samples[0][:5].astype(np.float32) * np.float32(1 / 255)
    little = RawBatch(rows.shape, "<f4", rows.astype("<f4").tobytes())
    big = RawBatch(rows.shape, ">f4", rows.astype(">f4").tobytes())
    got = [
        asyncio.run(local.dataplane.predict(PredictRequest(batch))).probabilities for batch in (little, big)
    ]
    np.testing.assert_array_equal(got[0], got[1])
    tensors = [RawTensor([1, 8, 8], "<f4", r.tobytes()) for r in rows]
    ranked = asyncio.run(local.dataplane.classify(ClassifyRequest(tensors, top_k=10)))
    np.testing.assert_array_equal(np.argsort(-got[0], axis=1, kind="stable"), ranked.indices)
    images = asyncio.run(local.dataplane.predict(PredictRequest([encode(p) for p in digit_samples[0][:5]])))
    assert images.probabilities.shape == (5, 10)


def test_predict_fails_whole_naming_input_and_image(local, digit_samples) -> None:
    rows = digit_samples[0][:3].astype(np.float32) / 255
    rows[2, 0, 1, 1] = np.inf
    with pytest.raises(InvalidInput, match="input 'x': image 2 holds NaN or infinite"):
        asyncio.run(
            local.dataplane.predict(
                PredictRequest(RawBatch(rows.shape, "<f4", rows.tobytes()), input_name="x")
            )
        )
    images = [encode(digit_samples[0][0]), b"junk", b"more junk"]
    with pytest.raises(InvalidInput, match=r"input 'images' image 1: .*\(1 more unusable\)"):
        asyncio.run(local.dataplane.predict(PredictRequest(images)))
    with pytest.raises(InvalidInput, match="does not match the model's input"):
        asyncio.run(local.dataplane.predict(PredictRequest(RawBatch([3, 64], "<f4", rows.tobytes()))))


def tensor_of(name: str, datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


names = st.sampled_from(["image", "image_bytes", "other", ""])
datatypes = st.sampled_from(["FP32", "FP64", "BYTES", "UINT8", "", "FP16"])
shapes = st.lists(st.integers(-2, 70), max_size=5)
requests = st.builds(
    lambda model, version, inputs, raw, outputs, k: pb.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=inputs,
        raw_input_contents=raw,
        outputs=[
            pb.ModelInferRequest.InferRequestedOutputTensor(
                name=o, parameters={} if k is None else {"classification": pb.InferParameter(int64_param=k)}
            )
            for o in outputs
        ],
    ),
    st.sampled_from(["", "digits", "nope"]),
    st.sampled_from(["", "1", "2", "x", "-1"]),
    st.lists(st.builds(tensor_of, names, datatypes, shapes), max_size=2),
    st.lists(st.one_of(st.binary(max_size=300), st.just(b"\x00" * 256)), max_size=2),
    st.lists(st.sampled_from(["probabilities", "nope"]), max_size=2),
    st.one_of(st.none(), st.integers(-2, 20)),
)


def test_generated_requests_never_crash_or_reach_the_client_as_unknown(
    model_repo: Path, threaded_server, caplog
) -> None:
    server = threaded_server(model_repo)
    seen: set[grpc.StatusCode] = set()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        good = pb.ModelInferRequest(model_name="digits", inputs=[tensor_of("image", "FP32", [1, 1, 8, 8])])
        good.raw_input_contents.append(np.zeros(64, "<f4").tobytes())
        stub.ModelInfer(good, timeout=10)
        seen.add(grpc.StatusCode.OK)

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(request=requests)
        def one(request: pb.ModelInferRequest) -> None:
            try:
                stub.ModelInfer(request, timeout=10)
                seen.add(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                seen.add(exc.code())
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                    exc.code(),
                    exc.details(),
                )

        with caplog.at_level(logging.WARNING):
            one()
        for method in ("ModelInfer", "ModelMetadata", "ModelStatistics"):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as caught:
                call(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= seen
