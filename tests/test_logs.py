"""`--log-format json` and `--access-log`, on real server processes under a mixed load of good and bad
requests over both gRPC protocols and REST: every line of the log is one JSON object, each request has
one access event with its fields, no token appears, and a name with a newline or a quote stays on its
line (escaped) in JSON and in text."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import pytest

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.logs import JsonFormatter
from tests.conftest import encode, start_server

TOKEN = "tok-7c1e5a0b93d24f68"
WRONG = "wrong-d05e4b1a77c2"
ODD_MODEL = 'dig"its\nforged=line'  # a served model named with a quote and a newline
ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "message",
    "protocol",
    "method",
    "model",
    "version",
    "status",
    "images",
    "decode_ms",
    "queue_ms",
    "compute_ms",
    "other_ms",
    "total_ms",
    "batch_sizes",
    "trace_id",
    "peer",
}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits, and the same model again under an odd name."""
    root = tmp_path_factory.mktemp("odd-models")
    shutil.copytree(model_repo / "digits", root / "digits")
    shutil.copytree(model_repo / "digits", root / ODD_MODEL)
    return root


@pytest.fixture(scope="module")
def pngs(digit_samples) -> list[bytes]:
    images, _ = digit_samples
    return [encode(images[i, 0]) for i in range(3)]


def token_file(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text(f"{TOKEN}\n")
    return path


def bearer(token: str = TOKEN) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def mixed_load(server, pngs: list[bytes]) -> Counter:
    """Good and bad requests over convserve.v1, the Open Inference Protocol (gRPC) and REST; returns
    the access events each should make, as (protocol, method, status) -> count."""
    expected: Counter = Counter()
    images = [pb.Image(encoded=png) for png in pngs[:2]]
    with grpc.insecure_channel(server.address) as channel:
        v1 = pb_grpc.ClassifierStub(channel)
        v2 = kpb_grpc.GRPCInferenceServiceStub(channel)

        def v1_call(request: pb.ClassifyRequest, status: str, token: str = TOKEN) -> None:
            metadata = [*bearer(token), ("traceparent", TRACEPARENT)]
            try:
                v1.Classify(request, metadata=metadata, timeout=30)
                assert status == "OK"
            except grpc.RpcError as error:
                assert error.code().name == status, error.details()
            expected["convserve_v1", "Classify", status] += 1

        v1_call(pb.ClassifyRequest(model="digits", images=images), "OK")
        v1_call(pb.ClassifyRequest(model=ODD_MODEL, images=images), "OK")
        v1_call(
            pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"\x89PNG broken")]),
            "INVALID_ARGUMENT",
        )
        v1_call(pb.ClassifyRequest(model='no\nsuch "model"', images=images), "NOT_FOUND")
        # A stream: one event per message, each with its own status.
        messages = [
            pb.ClassifyRequest(model="digits", images=images),
            pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=b"garbage")]),
            pb.ClassifyRequest(model=ODD_MODEL, images=images[:1]),
        ]
        assert len(list(v1.ClassifyStream(iter(messages), metadata=bearer(), timeout=30))) == 3
        expected["convserve_v1", "ClassifyStream", "OK"] += 2
        expected["convserve_v1", "ClassifyStream", "INVALID_ARGUMENT"] += 1

        def v2_call(request: kpb.ModelInferRequest, status: str) -> None:
            try:
                v2.ModelInfer(request, metadata=bearer(), timeout=30)
                assert status == "OK"
            except grpc.RpcError as error:
                assert error.code().name == status, error.details()
            expected["kserve_v2", "ModelInfer", status] += 1

        good = kpb.ModelInferRequest(model_name="digits")
        good.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
        good.raw_input_contents.append(len(pngs[0]).to_bytes(4, "little") + pngs[0])
        v2_call(good, "OK")
        garbage = kpb.ModelInferRequest(model_name="digits")
        garbage.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
        garbage.raw_input_contents.append(b"\x00\xff" * 7)  # not 64 floats
        v2_call(garbage, "INVALID_ARGUMENT")

    base = server.http_url
    files = [("image", ("a.png", pngs[0], "image/png"))]
    with httpx.Client(base_url=base, timeout=30, headers={"authorization": f"Bearer {TOKEN}"}) as client:

        def rest(path: str, status: int, **kwargs) -> None:
            answer = client.post(path, **kwargs)
            assert answer.status_code == status, answer.text
            route = "/v2/models/{model}/infer" if path.startswith("/v2/") else "/v1/models/{model}:classify"
            expected["http", f"POST {route}", str(status)] += 1

        rest("/v1/models/digits:classify", 200, files=files)
        rest(f"/v1/models/{quote(ODD_MODEL, safe='')}:classify", 200, files=files)
        rest(
            "/v1/models/digits:classify",
            400,
            files=[("image", ("b.png", b"\x89PNG\r\n broken", "image/png"))],
        )
        rest("/v1/models/nonesuch:classify", 404, files=files)
        rest("/v2/models/digits/infer", 400, content=b"\x00\x01 garbage {")
        rest("/v1/models/digits:classify", 403, files=files, headers={"authorization": f"Bearer {WRONG}"})
    # Bytes that are no protocol at all, to both ports: no request, no access event, only what the
    # server says about it (if anything), as JSON.
    for port in (int(server.address.rsplit(":", 1)[1]), server.http_port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01 not HTTP, not HTTP/2\r\n\r\n\x00\xff")
            raw.settimeout(2)
            with contextlib.suppress(OSError):
                raw.recv(1024)
    return expected


def access_key(event: dict) -> tuple[str, str, str]:
    return event["protocol"], event["method"], event["status"]


def test_every_line_is_json_with_one_access_event_per_request_and_no_token(
    repo: Path, tmp_path: Path, pngs
) -> None:
    flags = ("--log-format", "json", "--access-log", "--auth-token-file", str(token_file(tmp_path)))
    server = start_server(repo, tmp_path / "json", *flags, "--max-delay-ms", "2", http=True)
    try:
        expected = mixed_load(server, pngs)
    finally:
        assert server.stop() == 0
    text = server.log()
    assert TOKEN not in text and WRONG not in text
    lines = text.splitlines()
    assert len(lines) > sum(expected.values())
    events = []
    for line in lines:
        event = json.loads(line)  # every line, whoever wrote it
        assert {"time", "level", "logger", "message"} <= set(event), line
        events.append(event)
    assert any(e["logger"] == "serving.server" and "SERVING" in e["message"] for e in events)
    access = [e for e in events if e["logger"] == "convserve.access"]
    assert Counter(map(access_key, access)) == expected
    for event in access:
        assert set(event) == ACCESS_FIELDS, event
        assert event["level"] == "INFO" and event["message"] == "access"
        assert len(event["trace_id"]) == 32 and event["peer"]
        if event["status"] in ("OK", "200"):
            assert event["model"] in ("digits", ODD_MODEL) and event["version"] == 1
            assert event["images"] >= 1 and event["batch_sizes"]
            assert event["compute_ms"] > 0
            parts = sum(event[f"{stage}_ms"] for stage in ("decode", "queue", "compute", "other"))
            assert parts == pytest.approx(event["total_ms"], rel=0.05, abs=0.01)
    assert sum(e["model"] == ODD_MODEL for e in access) == 3  # unary, stream message, REST
    traced = [e for e in access if e["protocol"] == "convserve_v1" and e["method"] == "Classify"]
    assert all(e["trace_id"] == TRACE_ID for e in traced)  # the client's trace continued


def test_text_access_lines_escape_what_a_client_or_a_name_could_break(
    repo: Path, tmp_path: Path, pngs
) -> None:
    server = start_server(repo, tmp_path / "text", "--access-log", "--max-delay-ms", "2", http=True)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            stub.Classify(pb.ClassifyRequest(model=ODD_MODEL, images=[pb.Image(encoded=pngs[0])]), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Classify(
                    pb.ClassifyRequest(model="x\ny", images=[pb.Image(encoded=b"\n\n")]), timeout=30
                )
        httpx.post(
            f"{server.http_url}/v1/models/{quote(ODD_MODEL, safe='')}:classify",
            files=[("image", ("a.png", pngs[0], "image/png"))],
            timeout=30,
        ).raise_for_status()
    finally:
        assert server.stop() == 0
    lines = server.log().splitlines()
    access = [line for line in lines if " convserve.access: " in line]
    assert len(access) == 3
    odd = [line for line in access if repr(ODD_MODEL) in line]
    assert len(odd) == 2 and all("status='OK'" in line or "status='200'" in line for line in odd)
    # The name's newline is `\n` inside the line: nothing after it became a line of its own.
    assert all(
        line.rstrip().endswith("'") and "forged=line" not in line.split(repr(ODD_MODEL))[-1] for line in odd
    )
    assert "method='Classify'" in access[0] and "images=1" in access[0] and "trace_id='" in access[0]


def test_a_grpc_call_refused_for_its_token_has_an_access_event(repo: Path, tmp_path: Path, pngs) -> None:
    flags = ("--log-format", "json", "--access-log", "--auth-token-file", str(token_file(tmp_path)))
    server = start_server(repo, tmp_path / "refused", *flags)
    try:
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as raised:
            pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(model="digits", images=[pb.Image(encoded=pngs[0])]),
                metadata=bearer(WRONG),
                timeout=30,
            )
    finally:
        server.stop()
    refusal = raised.value
    assert refusal.code() == grpc.StatusCode.PERMISSION_DENIED
    trailing = dict(refusal.trailing_metadata())  # the refusal's receipt, as any failed call has one
    events = [json.loads(line) for line in server.log().splitlines()]
    access = [e for e in events if e["logger"] == "convserve.access"]
    assert [access_key(e) for e in access] == [("convserve_v1", "Classify", "PERMISSION_DENIED")]
    assert f'trace;desc="{access[0]["trace_id"]}"' in trailing["server-timing"]
    assert "total;dur=" in trailing["server-timing"]
    assert TOKEN not in server.log() and WRONG not in server.log()


def test_a_json_record_keeps_its_traceback_and_extras_on_one_line() -> None:
    """The formatter on its own: an exception becomes a field, extras become fields."""
    record = logging.LogRecord("convserve.x", logging.ERROR, __file__, 1, "failed on %r", ("a\nb",), None)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    record.model = 'm"\n'
    line = JsonFormatter({"worker": 2}).format(record)
    assert "\n" not in line
    event = json.loads(line)
    assert event["message"] == "failed on 'a\\nb'" and event["level"] == "ERROR" and event["worker"] == 2
    assert event["model"] == 'm"\n'
    assert event["exception"].startswith("Traceback") and "ValueError: bad\nvalue" in event["exception"]
    assert event["time"].endswith("+00:00")
