"""The HTTP edge keeps the gRPC edge's rules: bad input of every kind gets its status and a JSON error body
and loses nothing else; tokens, TLS and mTLS; metrics with protocol="http"; one error table for both
transports. Real server processes, real sockets, the real curl binary."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.tools.launch import LaunchedServer
from tests.conftest import encode
from tests.pki import make_pki

pytestmark = pytest.mark.slow
MODEL = "digits"
CURL = shutil.which("curl")
TOKEN = "http-token-5d0e7b21"
OTHER_TOKEN = "another-http-token-c0ffee"


def raw_request(server: LaunchedServer, data: bytes, read_timeout: float = 20.0) -> tuple[int, dict, bytes]:
    """Sends bytes on a fresh connection; returns (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=read_timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the server may answer and close before everything is sent
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {buffer!r}"
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def post(server: LaunchedServer, path: str, body: bytes, *headers: str) -> tuple[int, dict, bytes]:
    head = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *headers]
    return raw_request(server, ("\r\n".join(head) + "\r\n\r\n").encode() + body)


def error_of(body: bytes) -> str:
    answer = json.loads(body)
    assert set(answer) == {"error"} and isinstance(answer["error"], str)
    return answer["error"]


def assert_still_serving(server: LaunchedServer, digit_samples) -> None:
    pixels, _ = digit_samples
    status, _, body = post(server, f"/v1/models/{MODEL}:classify", encode(pixels[0], "PNG"))
    assert status == 200 and len(json.loads(body)["results"]) == 1
    assert server.process.poll() is None


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import start_server

    launched = start_server(
        model_repo,
        tmp_path_factory.mktemp("http-rules"),
        "--max-message-mb",
        "1",
        "--http-header-timeout-s",
        "1",
        http=True,
        metrics=True,
    )
    yield launched
    assert launched.stop() == 0
    log = launched.log()
    assert "Traceback" not in log and "Exception" not in log


INFER = f"/v2/models/{MODEL}/infer"


def tensor_request(shape: list[int], values: int, **extra) -> bytes:
    inputs = [{"name": "image", "shape": shape, "datatype": "FP32", "data": [0.5] * values}]
    return json.dumps({"inputs": inputs, **extra}).encode()


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b'{"inputs": [', (), 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, (), 400, "not valid JSON"),
        (b'{"inputs": 3}', (), 400, "'inputs'"),
        (tensor_request([2, 1, 8, 8], 64), (), 400, "input 'image'"),  # the shape lies about the data
        (tensor_request([1, 1, 8, 8], 64, parameters={"timeout": -1}), (), 400, "timeout"),
        (
            b'{"inputs": []}',
            ("Inference-Header-Content-Length: 999",),
            400,
            "Inference-Header-Content-Length",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1, 1, 8, 8],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": 4096},
                        }
                    ]
                }
            ).encode(),
            (),
            400,
            "binary_data_size",
        ),
        (tensor_request([1, 1, 8, 8], 64), ("Timeout-Ms: soon",), 400, "Timeout-Ms"),
        (tensor_request([1, 1, 8, 8], 64), ("Authorization: Bearer x",), 200, ""),  # no tokens: ignored
    ],
    ids=[
        "truncated",
        "deep",
        "not-a-list",
        "lying-shape",
        "bad-timeout",
        "header-length",
        "binary-size",
        "bad-deadline-header",
        "ok",
    ],
)
def test_bad_inference_bodies_get_400_and_a_json_error(
    server: LaunchedServer, digit_samples, body: bytes, headers: tuple[str, ...], status: int, words: str
) -> None:
    got, _, answer = post(server, INFER, body, *headers)
    assert got == status, answer
    if status != 200:
        assert words in error_of(answer)
    assert_still_serving(server, digit_samples)


def test_unknown_model_and_route_are_404_json(server: LaunchedServer) -> None:
    status, _, body = post(server, "/v2/models/" + "m" * 5000 + "/infer", b"{}")
    assert status == 404 and len(error_of(body)) < 200  # the name is cut in the message
    status, _, body = raw_request(server, b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 404 and "/nowhere" in error_of(body)


@pytest.mark.parametrize("version", ["1" * 5000, "\u00b2", "\u0661", "0", "-1", "1e3"])
def test_unreadable_versions_are_400(server: LaunchedServer, version: str) -> None:
    from urllib.parse import quote

    status, _, body = raw_request(
        server, f"GET /v2/models/{MODEL}/versions/{quote(version)} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    )
    assert status == 400 and "positive integer" in error_of(body) and len(error_of(body)) < 200


def test_a_request_with_both_inputs_is_served_from_the_tensor(server: LaunchedServer, digit_samples) -> None:
    pixels, _ = digit_samples
    rows = (pixels[:1].astype(np.float32) / 255).ravel().tolist()
    png = __import__("base64").b64encode(encode(pixels[1], "PNG")).decode()
    inputs = [
        {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [{"b64": png}]},
        {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": rows},
    ]
    status, _, both = post(server, INFER, json.dumps({"inputs": inputs}).encode())
    status_one, _, one = post(server, INFER, json.dumps({"inputs": inputs[1:]}).encode())
    assert status == status_one == 200
    answer = json.loads(both)
    assert answer["parameters"]["ignored_inputs"] == "image_bytes"
    assert len(json.loads(answer["parameters"]["abstain"])) == 1  # beside it, not instead of it
    assert answer["outputs"] == json.loads(one)["outputs"]


def test_a_body_over_the_limit_is_refused_from_content_length_before_it_is_read(
    server: LaunchedServer, digit_samples
) -> None:
    head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Length: {64 * 1024 * 1024}\r\n\r\n".encode()
    started = time.monotonic()
    status, headers, body = raw_request(server, head + b"{")  # 64 MiB announced, one byte sent
    assert status == 413 and "limit" in error_of(body) and headers.get("connection") == "close"
    assert time.monotonic() - started < 10
    assert_still_serving(server, digit_samples)


def test_json_past_an_eighth_of_the_body_limit_is_413(
    model_repo: Path, server_factory, digit_samples
) -> None:
    """--max-message-mb 16: 2 MiB of JSON at most (parsed numbers cost ~30x their bytes in memory)."""
    server = server_factory(model_repo, "--max-message-mb", "16", http=True)
    big_json = tensor_request([1, 1, 8, 8], 64, id="x" * (3 * 1024 * 1024))
    status, headers, body = post(server, INFER, big_json)
    assert (
        status == 413 and "binary tensor extension" in error_of(body) and headers.get("connection") == "close"
    )
    status, _, body = post(server, INFER, tensor_request([1, 1, 8, 8], 64, id="x" * (1024 * 1024)))
    assert status == 200 and json.loads(body)["id"].startswith("xxx")
    assert_still_serving(server, digit_samples)


def test_a_chunked_body_is_cut_off_when_it_passes_the_limit(server: LaunchedServer, digit_samples) -> None:
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(64):  # 4 MiB, four times the limit, never finished
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(sock)
    assert status == 413 and "limit" in error_of(body)
    assert_still_serving(server, digit_samples)


def test_a_compressed_body_is_not_inflated_past_the_limit(server: LaunchedServer, digit_samples) -> None:
    import gzip

    bomb = gzip.compress(b"[" + b" " * (8 * 1024 * 1024) + b"]")  # 8 MiB inflated, a few KiB sent
    assert len(bomb) < 64 * 1024
    status, _, body = post(server, INFER, bomb, "Content-Encoding: gzip")
    assert status == 413 and "inflates" in error_of(body)
    status, _, body = post(server, INFER, b"not gzip at all", "Content-Encoding: gzip")
    assert status == 400 and "gzip" in error_of(body)
    status, _, body = post(server, INFER, b"{}", "Content-Encoding: br")
    assert status == 400 and "not supported" in error_of(body)
    assert_still_serving(server, digit_samples)


def test_garbage_bytes_get_400_and_do_not_flood_the_log(server: LaunchedServer, digit_samples) -> None:
    before = server.log().count("Invalid HTTP request")
    for _ in range(20):
        status, _, _ = raw_request(server, b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        assert status == 400
    assert_still_serving(server, digit_samples)
    assert server.log().count("Invalid HTTP request") - before <= 1


def test_a_client_trickling_headers_is_timed_out(server: LaunchedServer, digit_samples) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        status = None
        try:
            for i in range(20):  # one header every 0.3 s: never done within --http-header-timeout-s 1
                sock.sendall(f"X-Slow-{i}: 1\r\n".encode())
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(sock)
    assert status == 408 and "headers" in error_of(body)
    assert time.monotonic() - started < 5
    assert_still_serving(server, digit_samples)


def test_ten_thousand_headers_get_431(server: LaunchedServer, digit_samples) -> None:
    headers = "".join(f"X-H{i}: v\r\n" for i in range(10_000))
    status, headers_back, body = raw_request(
        server, f"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode()
    )
    assert status == 431 and "headers" in error_of(body) and headers_back.get("connection") == "close"
    assert_still_serving(server, digit_samples)


def test_a_deadline_that_passes_is_504(server: LaunchedServer) -> None:
    """Triton's `timeout` parameter in microseconds: 1 µs has passed before the images are decoded."""
    pixels = np.zeros((8, 8), np.uint8)
    images = [{"b64": __import__("base64").b64encode(encode(pixels, "PNG")).decode()}] * 64
    body = json.dumps(
        {
            "inputs": [{"name": "image_bytes", "shape": [64], "datatype": "BYTES", "data": images}],
            "parameters": {"timeout": 1},
        }
    ).encode()
    status, _, answer = post(server, INFER, body)
    assert status == 504 and "deadline" in error_of(answer)
    status, _, answer = post(server, INFER, body.replace(b'"timeout": 1', b'"timeout": 30000000'))
    assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [64, 10]


def test_metrics_count_http_requests_by_model_and_code(server: LaunchedServer, digit_samples) -> None:
    pixels, _ = digit_samples
    for _ in range(2):
        post(server, f"/v1/models/{MODEL}:classify", encode(pixels[0], "PNG"))
    post(server, INFER, b"{not json")
    post(server, "/v2/models/nope/infer", b"{}")
    text = urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("convserve_requests_total{")]

    def count(model: str, version: str, code: str) -> float:
        labels = (f'code="{code}"', f'model="{model}"', 'protocol="http"', f'version="{version}"')
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(label in line for label in labels))

    assert count("digits", "1", "OK") >= 2
    assert count("digits", "1", "INVALID_ARGUMENT") >= 1
    assert count("", "", "NOT_FOUND") >= 1
    assert 'convserve_images_total{model="digits",protocol="http",version="1"}' in text


# -- tokens, TLS, mTLS ----------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, str]:
    assert CURL, "curl is needed for these tests"
    done = subprocess.run(
        [CURL, "-sS", "-o", "-", "-w", "\n%{http_code}", *args], capture_output=True, timeout=60
    )
    body, _, status = done.stdout.decode().rpartition("\n")
    return int(status or 0), body


def test_tokens_with_curl_health_open(
    model_repo: Path, server_factory, tmp_path: Path, digit_samples
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# accepted\n{TOKEN}\n{OTHER_TOKEN}\n")
    server = server_factory(model_repo, "--auth-token-file", str(tokens), http=True)
    image = tmp_path / "a.png"
    image.write_bytes(encode(digit_samples[0][0], "PNG"))
    url = f"{server.http_url}/v1/models/{MODEL}:classify"
    status, body = curl("--data-binary", f"@{image}", url)
    assert status == 401 and "Bearer" in json.loads(body)["error"]
    status, body = curl("-H", "Authorization: Bearer wrong", "--data-binary", f"@{image}", url)
    assert status == 403 and "not accepted" in json.loads(body)["error"]
    for token in (TOKEN, OTHER_TOKEN):
        status, body = curl("-H", f"Authorization: Bearer {token}", "--data-binary", f"@{image}", url)
        assert status == 200 and json.loads(body)["results"][0]["label"]
    for path in (
        "/v2",
        f"/v2/models/{MODEL}",
        f"/v2/models/{MODEL}/config",
        "/openapi.json",
        "/v2/repository/index",
    ):
        assert curl(f"{server.http_url}{path}")[0] == 401, path
    assert curl(f"{server.http_url}/v2/health/live")[0] == 200
    assert curl(f"{server.http_url}/v2/health/ready")[0] == 200
    assert "Traceback" not in server.log()


def test_tls_and_mtls_over_http(model_repo: Path, server_factory, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    server = server_factory(model_repo, *tls, http=True)
    assert server.http_url.startswith("https://")
    ready = f"{server.http_url}/v2/health/ready"
    assert curl("--cacert", str(pki.ca), ready)[0] == 200
    assert curl("--cacert", str(pki.other_ca), ready)[0] == 0  # the server's certificate is not trusted
    assert curl(ready.replace("https://", "http://"))[0] != 200  # no plaintext on the TLS port

    mutual = server_factory(model_repo, *tls, "--tls-client-ca", str(pki.ca), http=True)
    ready = f"{mutual.http_url}/v2/health/ready"
    good = ("--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key))
    assert curl(*good, ready)[0] == 200
    assert curl("--cacert", str(pki.ca), ready)[0] == 0  # no client certificate
    stranger = (
        "--cacert",
        str(pki.ca),
        "--cert",
        str(pki.other_client_cert),
        "--key",
        str(pki.other_client_key),
    )
    assert curl(*stranger, ready)[0] == 0
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with urllib.request.urlopen(
        f"{mutual.http_url}/v2/models/{MODEL}", context=context, timeout=10
    ) as answer:
        assert json.loads(answer.read())["name"] == MODEL
    assert "Traceback" not in server.log() + mutual.log()


def test_sigterm_drains_http_admitted_requests_finish_new_ones_get_503_and_close(
    model_repo: Path, server_factory
) -> None:
    """A request admitted before SIGTERM (its body still arriving) finishes with 200; health is 503 at
    once; a new data request is parked and, once the listener is closed, refused 503 with
    Connection: close; a new connection is then refused; the server exits 0."""
    server = server_factory(model_repo, "--grace-s", "8", http=True)
    body = tensor_request([1, 1, 8, 8], 64)
    head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with (
        socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as admitted,
        socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as late,
    ):
        admitted.sendall(head + body[:10])
        time.sleep(0.3)  # the handler runs and waits for the rest of the body
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, _, _ = raw_request(server, b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 503
        late.sendall(head + body)  # parked while the admitted request is still working
        time.sleep(0.3)
        admitted.sendall(body[10:])
        status, headers, answer = read_response(admitted)
        assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [1, 10]
        assert headers.get("connection") == "close"  # the server is stopping: no keep-alive
        status, headers, answer = read_response(late)
        assert status == 503 and headers.get("connection") == "close" and "shutting down" in error_of(answer)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.http_port), timeout=5).close()
    assert server.process.wait(10) == 0
    assert "Traceback" not in server.log()


# -- the one error table ---------------------------------------------------------------------------


def test_every_domain_error_has_a_grpc_code_and_an_http_status() -> None:
    from serving.core import errors
    from serving.protocols.status import STATUS_OF, http_status_of, status_of

    domain = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ServingError) and cls is not errors.ServingError
    ]
    assert set(domain) == set(STATUS_OF)
    statuses = {STATUS_OF[cls][1] for cls in domain}
    assert statuses == {400, 401, 403, 404, 413, 429, 501, 503, 504}
    for cls in domain:
        code, message = status_of(cls("the reason"))
        status, code_name, http_message = http_status_of(cls("the reason"))
        assert code not in (grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        assert code_name == code.name and message == http_message == "the reason"
        assert 400 <= status < 600 and status != 500
    assert http_status_of(errors.NotFound("x"))[0] == 404
    assert status_of(errors.Overloaded("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, code_name, message = http_status_of(KeyError("secret detail"))
    assert (status, code_name) == (500, "INTERNAL") and "secret" not in message
