"""A receipt on every answer: decode, queue, compute, other and the total, the batches the request's
rows ran in, the model version and the trace id, over every protocol (gRPC trailing metadata, the
convserve.v1 body, the Open Inference Protocol's response parameters, HTTP `Server-Timing`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import grpc
import httpx
import numpy as np
import pytest

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.core.batch_settings import BatchingConfig
from serving.core.batching import DynamicBatcher
from serving.core.receipt import Receipt, batch_ran
from serving.protocols.receipts import parse_traceparent
from tests.conftest import encode, start_server, timing

STAGES = ("decode", "queue", "compute", "other")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def assert_adds_up(stages: dict[str, float]) -> None:
    """The named parts are each non-negative and add up to the server's total within 5 %."""
    assert all(stages[name] >= 0 for name in STAGES), stages
    parts = sum(stages[name] for name in STAGES)
    assert stages["total"] > 0
    assert abs(parts - stages["total"]) <= 0.05 * stages["total"] + 0.002, stages


# Units ------------------------------------------------------------------------------------------


def test_stages_are_consecutive_segments_that_add_up() -> None:
    receipt = Receipt(started=100.0, trace_id=TRACE_ID)
    receipt.decoded(100.001, 0.002)
    receipt.handed_over(100.004)
    receipt.batch_started(8, 100.010)
    receipt.batch_done(100.013)
    receipt.batch_started(3, 100.012)  # a second batch, in flight beside the first, ends later
    receipt.batch_done(100.016)
    receipt.total_s = 0.020
    stages = receipt.stages_ms()
    assert stages["decode"] == pytest.approx(2.0)
    assert stages["queue"] == pytest.approx(6.0)
    assert stages["compute"] == pytest.approx(6.0)
    assert stages["other"] == pytest.approx(6.0)
    assert receipt.batch_text() == "8,3"
    assert timing(receipt.server_timing())["batch"] == "8 3"
    assert timing(receipt.server_timing())["trace"] == TRACE_ID
    assert receipt.metadata() == (("server-timing", receipt.server_timing()),)  # one entry: see its cost


def test_a_sealed_receipt_records_no_later_batch() -> None:
    """A call cancelled or past its deadline ends (its receipt sent, its spans handed to the export
    thread) while a batch holding its rows may still finish: that batch must not change the receipt."""
    receipt = Receipt(started=100.0, trace_id=TRACE_ID)
    receipt.handed_over(100.001)
    receipt.batch_started(4, 100.002)
    receipt.batch_done(100.003)
    receipt.total_s = 0.005  # sealed: the call has ended
    sent = receipt.server_timing()
    batch_ran([receipt], 32, 100.004, 100.009)  # the batcher, after the call ended
    assert receipt.batch_sizes == [4] and receipt.batches == 1
    assert receipt.last_done == 100.003
    assert receipt.server_timing() == sent


def test_the_figures_sent_once_are_the_figures_of_every_later_reading() -> None:
    """The trailing `server-timing`, the body's receipt and the access log read one receipt one after
    the other: a decode that ends after the first reading must not make them disagree."""
    receipt = Receipt(started=100.0, trace_id=TRACE_ID)
    receipt.decoded(100.001, 0.002)
    receipt.total_s = 0.010
    sent = receipt.server_timing()
    receipt.decoded(100.004, 0.003)  # a worker's decode, finishing after the call ended
    assert receipt.stages_ms()["decode"] == pytest.approx(2.0)
    assert receipt.server_timing() == sent


def test_the_version_in_the_receipt_is_printable_ascii_whatever_the_model_is_named() -> None:
    """gRPC fails a call whose metadata is not printable ASCII, and a quote or comma would break the
    header's syntax: the model's folder name is percent-encoded in the `version` desc."""
    receipt = Receipt(started=0.0, trace_id=TRACE_ID)
    receipt.answered_by('dig"its,\\\nü%', 3)
    receipt.total_s = 0.001
    value = receipt.server_timing()
    assert all(0x20 <= ord(c) < 0x7F for c in value)
    assert timing(value)["version"] == "dig%22its%2C%5C%0A%C3%BC%25/3"
    assert unquote(timing(value)["version"]) == 'dig"its,\\\nü%/3'


def test_a_long_list_of_batches_is_cut_and_says_how_many_are_left_off() -> None:
    receipt = Receipt()
    for _ in range(40):
        receipt.batch_started(4, time.perf_counter())
    assert receipt.batch_text().endswith(",+8")
    assert receipt.batch_text().count(",") == 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (TRACEPARENT, (TRACE_ID, "00f067aa0ba902b7")),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01", None),  # the forbidden version
        (TRACEPARENT.upper(), None),  # hex is lowercase
        (f"{TRACEPARENT}-extra", None),  # version 00 ends with its flags
        ("00-abc", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_is_continued_only_when_valid(text: str | None, expected) -> None:
    assert parse_traceparent(text) == expected


def test_two_requests_in_one_batch_see_the_same_batch_size() -> None:
    """The batch sizes on the receipts are the batches the batcher formed, the other callers' rows
    included: A runs alone while B (2 rows) and C (1 row) queue and then share one batch of 3."""
    gate = threading.Event()

    def run(batch: np.ndarray) -> np.ndarray:
        gate.wait(10)
        return batch * 2

    async def main() -> tuple[Receipt, Receipt, Receipt, DynamicBatcher]:
        config = BatchingConfig(max_batch_size=8, max_delay_s=0.0, max_inflight=1, inline_below_s=0.0)
        batcher = DynamicBatcher(run, config)
        a, b, c = Receipt(), Receipt(), Receipt()
        first = asyncio.create_task(batcher.submit(np.ones((1, 2), np.float32), receipt=a))
        await asyncio.sleep(0.05)  # A's batch is running (held by the gate)
        rest = asyncio.gather(
            batcher.submit(np.ones((2, 2), np.float32), receipt=b),
            batcher.submit(np.ones((1, 2), np.float32), receipt=c),
        )
        await asyncio.sleep(0.05)
        gate.set()
        await first
        await rest
        await batcher.close()
        return a, b, c, batcher

    a, b, c, batcher = asyncio.run(main())
    assert a.batch_sizes == [1]
    assert b.batch_sizes == c.batch_sizes == [3]
    assert sorted(batcher.stats.batch_sizes.elements()) == [1, 3]
    # B and C waited for A's batch: that is queue time, and A's held call is compute time.
    assert b.stages_ms()["queue"] >= 50 and a.stages_ms()["compute"] >= 50


def test_a_split_request_lists_each_of_its_batches() -> None:
    async def main() -> Receipt:
        batcher = DynamicBatcher(lambda x: x, BatchingConfig(max_batch_size=4, inline_below_s=0.0))
        receipt = Receipt()
        await batcher.submit(np.zeros((10, 1), np.float32), receipt=receipt)
        await batcher.close()
        return receipt

    receipt = asyncio.run(main())
    assert sum(receipt.batch_sizes) == 10 and receipt.batches == 3


# End to end over every protocol -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    launched = start_server(model_repo, tmp_path_factory.mktemp("receipts"), http=True)
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def batching_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """Batches always in a worker thread, so rows arriving meanwhile queue and share the next batch."""
    flags = ("--inline-below-ms", "0", "--max-delay-ms", "5")
    launched = start_server(model_repo, tmp_path_factory.mktemp("batching"), *flags)
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def pngs(digit_samples) -> list[bytes]:
    images, _ = digit_samples
    return [encode(images[i, 0]) for i in range(8)]


def classify_request(pngs: list[bytes], count: int = 4) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=png) for png in pngs[:count]])


def body_stages(receipt: pb.Receipt) -> dict[str, float]:
    return {name: getattr(receipt, f"{name}_ms") for name in (*STAGES, "total")}


def test_convserve_v1_unary_carries_the_receipt_in_trailing_metadata_and_body(server, pngs) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        started = time.perf_counter()
        response, call = stub.Classify.with_call(
            classify_request(pngs), metadata=[("traceparent", TRACEPARENT)]
        )
        round_trip_ms = (time.perf_counter() - started) * 1e3
    trailing = dict(call.trailing_metadata())
    stages = timing(trailing["server-timing"])
    assert_adds_up(stages)
    assert stages["total"] <= round_trip_ms
    assert stages["decode"] > 0 and stages["compute"] > 0  # four PNGs were decoded, and ran
    assert list(trailing) == ["server-timing"]  # the whole receipt in one entry
    assert int(stages["batch"]) >= 4
    assert stages["version"] == "digits/1"
    assert stages["trace"] == TRACE_ID
    # The body's receipt is the same one.
    assert response.receipt.trace_id == TRACE_ID
    assert list(response.receipt.batch_sizes) == [int(stages["batch"])]
    assert body_stages(response.receipt) == pytest.approx(
        {k: stages[k] for k in (*STAGES, "total")}, abs=1e-3
    )


def test_a_failed_call_gets_its_receipt_too(server, pngs) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Classify(pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"not an image")]))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(failed.value.trailing_metadata())
    assert "total" in timing(trailing["server-timing"])
    assert len(timing(trailing["server-timing"])["trace"]) == 32


def test_stream_messages_each_carry_a_receipt_and_batch_sizes_match_the_batches_run(
    batching_server, pngs
) -> None:
    """64 one-image messages at once: each receipt names the size of the batch its image ran in, so
    the sum of 1/size over the messages is the number of batches the server ran for them."""
    with grpc.insecure_channel(batching_server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        before = stub.GetModel(pb.GetModelRequest(name="digits"))
        requests = [
            pb.ClassifyRequest(model="digits", id=str(i), images=[pb.Image(encoded=pngs[i % 8])])
            for i in range(64)
        ]
        responses = list(stub.ClassifyStream(iter(requests), metadata=[("traceparent", TRACEPARENT)]))
        after = stub.GetModel(pb.GetModelRequest(name="digits"))
    assert len(responses) == 64
    sizes = []
    for response in responses:
        assert not response.HasField("error")
        assert response.receipt.trace_id == TRACE_ID
        assert_adds_up(body_stages(response.receipt))
        (size,) = response.receipt.batch_sizes
        sizes.append(size)
    batches = after.stats.batches - before.stats.batches
    assert sum(1 / s for s in sizes) == pytest.approx(batches)
    print(f"64 stream messages ran in {batches} batches; sizes seen: {sorted(set(sizes))}")
    assert max(sizes) > 1  # the check above means something only when batches were shared


def test_open_inference_protocol_grpc_has_response_parameters_and_trailing_metadata(
    server, digit_samples
) -> None:
    images, _ = digit_samples
    batch = images[:3].astype(np.float32)
    request = kpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="FP32", shape=batch.shape)
    request.raw_input_contents.append(batch.tobytes())
    with grpc.insecure_channel(server.address) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request)
        streamed = list(stub.ModelStreamInfer(iter([request])))
    parameters = response.parameters
    stages = {name: parameters[f"{name}_ms"].double_param for name in (*STAGES, "total")}
    assert_adds_up(stages)
    assert stages["compute"] > 0
    assert parameters["batch_sizes"].string_param == "3"
    assert len(parameters["trace_id"].string_param) == 32
    trailing = dict(call.trailing_metadata())
    assert timing(trailing["server-timing"])["trace"] == parameters["trace_id"].string_param
    assert timing(trailing["server-timing"])["total"] == pytest.approx(stages["total"], abs=1e-3)
    (message,) = streamed
    assert message.infer_response.parameters["batch_sizes"].string_param == "3"


def test_rest_answers_carry_server_timing_and_the_receipt(server, pngs, digit_samples) -> None:
    base = server.http_url
    files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:2])]
    with httpx.Client(base_url=base, timeout=30) as client:
        answer = client.post("/v1/models/digits:classify", files=files, headers={"traceparent": TRACEPARENT})
        images, _ = digit_samples
        body = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [1, *images.shape[1:]],
                    "data": images[:1].astype(np.float32).ravel().tolist(),
                }
            ]
        }
        v2 = client.post("/v2/models/digits/infer", content=json.dumps(body))
        refused = client.post("/v1/models/nonesuch:classify", files=files)
    assert answer.status_code == 200, answer.text
    stages = timing(answer.headers["server-timing"])
    assert_adds_up(stages)
    assert stages["decode"] > 0
    assert answer.headers["convserve-trace-id"] == TRACE_ID
    receipt = answer.json()["receipt"]
    assert receipt["trace_id"] == TRACE_ID and receipt["batch_sizes"] == [int(stages["batch"])]
    # Only what is set, as protobuf's JSON mapping writes it: a stage of 0 ms is left out.
    assert_adds_up({name: receipt.get(f"{name}_ms", 0.0) for name in (*STAGES, "total")})
    assert v2.status_code == 200, v2.text
    parameters = v2.json()["parameters"]
    assert_adds_up({name: parameters[f"{name}_ms"] for name in (*STAGES, "total")})
    assert parameters["batch_sizes"] == "1"
    assert timing(v2.headers["server-timing"])["total"] == pytest.approx(parameters["total_ms"], abs=1e-3)
    assert refused.status_code == 404 and "total" in timing(refused.headers["server-timing"])
