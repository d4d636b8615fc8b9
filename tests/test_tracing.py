"""OpenTelemetry spans from the receipts: a client's W3C trace context reaches the server's spans over
gRPC (both protocols) and HTTP; each request's span has its stages as children; a batch links to every
request it served; `--otlp-endpoint` sends them to a collector over OTLP/HTTP.

The in-process tests run the real server (`ThreadedServer`) with the SDK's in-memory exporter; the
client spans are real SDK spans, injected by OpenTelemetry's own W3C propagator."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import grpc
import httpx
import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from serving import tracing
from serving.core import receipt as receipt_module
from serving.protocols import receipts
from serving.span_export import SpanBatcher
from serving.tools.launch import free_port
from tests.conftest import build_conv_model, encode, start_server, timing

STAGES = ["receive", "decode", "queue", "compute", "respond"]
CLIENT = TracerProvider().get_tracer("test-client")  # the client's own spans, with their own ids


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this process, into memory; off again (and checked off) after the test."""
    exporter = InMemorySpanExporter()
    installed = tracing.install(SimpleSpanProcessor(exporter))
    yield exporter
    tracing.uninstall(installed)
    assert installed.ended not in receipts.listeners and receipt_module.observer is None


@pytest.fixture(scope="module")
def pngs(digit_samples) -> list[bytes]:
    images, _ = digit_samples
    return [encode(images[i, 0]) for i in range(4)]


def with_http(*flags: str) -> tuple[str, ...]:
    return ("--http-port", str(free_port("127.0.0.1")), *flags)


def client_span() -> tuple[trace.Span, dict[str, str]]:
    """A client span and the `traceparent` that carries it (OpenTelemetry's W3C propagator)."""
    span = CLIENT.start_span("client call", kind=SpanKind.CLIENT)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    return span, carrier


def request_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    found = [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda s: (s.start_time, STAGES.index(s.name)))


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def trace_id_of(call: grpc.Call) -> str:
    """The trace id in a gRPC answer's receipt (`trace;desc="..."` in its `server-timing`)."""
    return timing(dict(call.trailing_metadata())["server-timing"])["trace"]


def call_convserve_v1(server, pngs, headers: dict[str, str]) -> tuple[str, int]:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=png) for png in pngs[:2]])
        _, call = stub.Classify.with_call(request, metadata=list(headers.items()))
    return trace_id_of(call), 2


def call_kserve_v2(server, pngs, headers: dict[str, str]) -> tuple[str, int]:
    request = kpb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(pngs[0]).to_bytes(4, "little") + pngs[0])
    with grpc.insecure_channel(server.address) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request, metadata=list(headers.items()))
    return trace_id_of(call), 1


def call_rest(server, pngs, headers: dict[str, str]) -> tuple[str, int]:
    files = [("image", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:3])]
    answer = httpx.post(
        f"http://127.0.0.1:{server.server.http_port}/v1/models/digits:classify",
        files=files,
        headers=headers,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.headers["convserve-trace-id"], 3


CALLS = {
    "convserve_v1/Classify": call_convserve_v1,
    "kserve_v2/ModelInfer": call_kserve_v2,
    "POST /v1/models/{model}:classify": call_rest,
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_client_span_is_the_parent_of_the_request_span_and_its_stages(
    name: str, spans, threaded_server, model_repo: Path, pngs
) -> None:
    server = threaded_server(model_repo, *with_http())
    parent, headers = client_span()
    answered_trace, images = CALLS[name](server, pngs, headers)
    parent.end()
    client_trace = format(parent.get_span_context().trace_id, "032x")
    assert answered_trace == client_trace  # the receipt continues the client's trace

    (request,) = request_spans(spans)
    assert request.name == name
    assert hex_trace(request) == client_trace
    assert request.parent is not None and request.parent.is_remote
    assert request.parent.span_id == parent.get_span_context().span_id
    attributes = request.attributes or {}
    assert attributes["convserve.model"] == "digits" and attributes["convserve.model_version"] == 1
    assert attributes["convserve.images"] == images
    assert sum(attributes["convserve.batch_sizes"]) >= images  # its rows ran, maybe beside others
    assert attributes["convserve.status"] in ("OK", "200")
    assert request.status.status_code != StatusCode.ERROR

    stages = children(spans, request)
    assert [s.name for s in stages] == STAGES
    for stage in stages:
        assert hex_trace(stage) == client_trace
        assert request.start_time <= stage.start_time <= stage.end_time <= request.end_time
    for before, after in itertools.pairwise(stages):
        assert before.end_time <= after.start_time  # one after the other
    compute = stages[STAGES.index("compute")]
    assert (compute.attributes or {})["convserve.batch_sizes"] == attributes["convserve.batch_sizes"]
    # Every batch the request ran in links to it.
    batches = [s for s in spans.get_finished_spans() if s.name == "batch"]
    linked = [b for b in batches if any(link.context.span_id == request.context.span_id for link in b.links)]
    assert len(linked) == len(attributes["convserve.batch_sizes"]) >= 1
    assert all(b.parent is None and hex_trace(b) != client_trace for b in linked)  # a trace of its own
    # What every span carries besides (made by position, in ReadableSpan's order).
    for span in (request, *stages, *linked):
        assert span.resource.attributes["service.name"] == "convserve"
        assert (
            span.instrumentation_scope is not None and span.instrumentation_scope.name == "convserve.serving"
        )
        assert span.events == () and span.end_time is not None and span.start_time is not None
    assert all(s.kind == SpanKind.INTERNAL for s in (*stages, *linked))
    assert all(not s.links for s in stages)
    assert all(s.status.status_code == StatusCode.UNSET for s in (*stages, *linked))


def test_without_a_traceparent_the_request_span_is_a_root_in_the_receipts_trace(
    spans, threaded_server, model_repo: Path, pngs
) -> None:
    server = threaded_server(model_repo, *with_http())
    grpc_trace, _ = call_convserve_v1(server, pngs, {})
    http_trace, _ = call_rest(server, pngs, {"traceparent": "00-not-a-valid-header"})
    by_trace = {hex_trace(s): s for s in request_spans(spans)}
    assert set(by_trace) == {grpc_trace, http_trace} and grpc_trace != http_trace
    for span in by_trace.values():
        assert span.parent is None
        assert [s.name for s in children(spans, span)] == STAGES


def test_a_failed_request_has_an_error_span(spans, threaded_server, model_repo: Path, pngs) -> None:
    server = threaded_server(model_repo, *with_http())
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as failed:
        pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"not an image")])
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = httpx.post(
        f"http://127.0.0.1:{server.server.http_port}/v1/models/nonesuch:classify",
        files=[("image", ("a.png", pngs[0], "image/png"))],
        timeout=30,
    )
    assert missing.status_code == 404
    statuses = {(s.attributes or {})["convserve.status"]: s for s in request_spans(spans)}
    assert set(statuses) == {"INVALID_ARGUMENT", "404"}
    for status, span in statuses.items():
        assert span.status.status_code == StatusCode.ERROR and span.status.description == status
        stages = [s.name for s in children(spans, span)]
        assert stages[0] == "receive" and stages[-1] == "respond"
        assert "compute" not in stages  # nothing ran


def test_one_batch_span_links_to_every_request_it_served(spans, threaded_server, tmp_path: Path) -> None:
    """An 8-row request keeps a slow model busy; a gRPC call and an HTTP request of one row each arrive
    meanwhile, wait, and run together: a batch of 2 is one of each, and its span links to both."""
    repo = tmp_path / "slow-models"
    build_conv_model(repo / "slow" / "1" / "model.onnx", side=320, channels=32, stride=1, depth=8)
    flags = ("--max-batch-size", "8", "--max-delay-ms", "5000", "--inline-below-ms", "0")
    server = threaded_server(repo, *with_http(*flags))
    rng = np.random.default_rng(0)
    big, one = (rng.random((n, 3, 320, 320), dtype=np.float32) for n in (8, 1))
    tensor = {"name": "image", "shape": [1, 3, 320, 320], "datatype": "FP32"}
    body = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": one.nbytes}}]}).encode()

    def grpc_infer(rows: np.ndarray, headers: dict[str, str]) -> None:
        request = kpb.ModelInferRequest(model_name="slow")
        request.inputs.add(name="image", datatype="FP32", shape=rows.shape)
        request.raw_input_contents.append(rows.tobytes())
        with grpc.insecure_channel(server.address) as channel:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=list(headers.items()))

    batcher = server.server.registry.resolve("slow", 0).batcher

    async def big_batch_running(before: int) -> None:
        """Waits until the 8-row request has left the queue for its batch (a fixed sleep is too short
        on a loaded machine: the one-row requests then arrive first and run alone)."""
        for _ in range(1000):
            if batcher.stats.submitted > before and batcher.queued_rows == 0:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the 8-row request never reached the batcher")

    async def round_trip() -> tuple[int, int]:
        """Span ids of the gRPC and the HTTP client spans."""
        grpc_parent, grpc_headers = client_span()
        http_parent, http_headers = client_span()
        async with httpx.AsyncClient(timeout=60) as client:
            before = batcher.stats.submitted
            busy = asyncio.create_task(asyncio.to_thread(grpc_infer, big, {}))
            await big_batch_running(before)
            over_http = client.post(
                f"http://127.0.0.1:{server.server.http_port}/v2/models/slow/infer",
                content=body + one.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(body)), **http_headers},
            )
            answers = await asyncio.gather(busy, over_http, asyncio.to_thread(grpc_infer, one, grpc_headers))
        assert answers[1].status_code == 200, answers[1].text
        return grpc_parent.get_span_context().span_id, http_parent.get_span_context().span_id

    for _ in range(5):
        spans.clear()
        parents = set(asyncio.run(round_trip()))
        shared = [
            s
            for s in spans.get_finished_spans()
            if s.name == "batch" and s.attributes["convserve.batch_size"] == 2
        ]
        if shared:
            break
    (batch,) = shared
    assert batch.attributes["convserve.requests"] == 2 and batch.attributes["convserve.model"] == "slow"
    served = {s.context.span_id: s for s in request_spans(spans) if s.parent and s.parent.span_id in parents}
    assert {s.attributes["convserve.protocol"] for s in served.values()} == {"kserve_v2", "http"}
    assert {link.context.span_id for link in batch.links} == set(served)
    for span in served.values():  # both ran in that batch of 2, and say so
        assert span.attributes["convserve.batch_sizes"] == (2,)
        compute = next(s for s in children(spans, span) if s.name == "compute")
        assert (compute.start_time, compute.end_time) == (batch.start_time, batch.end_time)


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps every POST /v1/traces body (protobuf), answers 200."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        if self.path == "/v1/traces":
            self.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


def test_otlp_endpoint_exports_the_spans_to_a_collector(model_repo: Path, tmp_path: Path, pngs) -> None:
    """A real server process with --otlp-endpoint, and a collector that decodes what arrives."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    Collector.bodies = []
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    server = start_server(model_repo, tmp_path, "--otlp-endpoint", endpoint)
    try:
        parent, headers = client_span()
        answered_trace, _ = call_convserve_v1(server, pngs, headers)
    finally:
        assert server.stop() == 0  # the shutdown sends what is still queued
        collector.shutdown()
    names = {}
    for body in Collector.bodies:
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
            assert service == "convserve"
            for scope in resource.scope_spans:
                for span in scope.spans:
                    names[span.name] = span
    assert set(names) >= {"convserve_v1/Classify", "batch", *STAGES}
    request = names["convserve_v1/Classify"]
    assert request.trace_id.hex() == answered_trace == format(parent.get_span_context().trace_id, "032x")
    assert request.parent_span_id == parent.get_span_context().span_id.to_bytes(8, "big")
    assert "tracing: OTLP spans to" in server.log()


# The span batcher (the server's processor) --------------------------------------------------------


def finished_spans(count: int) -> list[ReadableSpan]:
    with_ids = [CLIENT.start_span(f"s{i}") for i in range(count)]
    for span in with_ids:
        span.end()
    return with_ids  # SDK spans are ReadableSpans


class FailingOnce(InMemorySpanExporter):
    """Raises on its first export (a collector's hiccup), then keeps spans as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def export(self, spans):
        if not self.failed:
            self.failed = True
            raise ConnectionError("collector down")
        return super().export(spans)


def test_the_span_batcher_exports_every_request_in_batches_and_the_rest_at_shutdown() -> None:
    exporter = InMemorySpanExporter()
    batcher = SpanBatcher(exporter, delay_s=60, batch_size=4, wake_after=1000)  # only flushes export
    requests = [finished_spans(3) for _ in range(5)]
    for spans_of_request in requests[:3]:
        batcher.on_end_many(spans_of_request)
    assert exporter.get_finished_spans() == ()  # nothing exported before a wake
    assert batcher.force_flush(5000)
    assert [s.name for s in exporter.get_finished_spans()] == [s.name for r in requests[:3] for s in r]
    batcher.on_end_many(requests[3])
    batcher.on_end(requests[4][0])  # the SDK's one-at-a-time interface still works
    batcher.shutdown()  # what is queued goes out before the thread ends
    assert len(exporter.get_finished_spans()) == 9 + 3 + 1
    batcher.on_end_many(requests[4])  # after shutdown: dropped, counted
    assert batcher.dropped == 1


def test_the_span_batcher_builds_handed_spans_on_its_own_thread_and_survives_a_failing_build() -> None:
    exporter = InMemorySpanExporter()
    batcher = SpanBatcher(exporter, delay_s=60, wake_after=3)  # the third hand-over wakes the thread
    built_on: list[str] = []

    def build(count: int) -> list:
        built_on.append(threading.current_thread().name)
        if count == 0:
            raise ValueError("a receipt it cannot read")
        return finished_spans(count)

    for count in (2, 0, 3):
        batcher.on_end_later(build, count)
    deadline = time.monotonic() + 10
    while len(exporter.get_finished_spans()) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.shutdown()
    assert built_on == ["span-export"] * 3  # never on the caller's (the event loop's) thread
    assert len(exporter.get_finished_spans()) == 5  # the failing build lost its own spans only


def test_the_span_batcher_drops_past_its_bound_and_survives_a_failing_exporter() -> None:
    exporter = FailingOnce()
    batcher = SpanBatcher(exporter, delay_s=60, wake_after=1000, max_requests=2)
    for _ in range(4):
        batcher.on_end_many(finished_spans(2))
    assert batcher.dropped == 2  # two requests past the bound, never a wait
    assert batcher.force_flush(5000)  # this export raises: logged, the thread goes on
    batcher.on_end_many(finished_spans(2))
    assert batcher.force_flush(5000)
    batcher.shutdown()
    assert exporter.failed and len(exporter.get_finished_spans()) == 2
