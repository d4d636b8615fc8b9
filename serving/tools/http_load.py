"""The load generator's HTTP requests: the same images `loadgen` sends over gRPC, as HTTP clients send them.

Three forms, each built (and serialized) before the clock starts, so the measure is the server's work:
  `http`          the Open Inference Protocol's infer with Triton's binary tensor data extension, as
                  tritonclient.http sends it: a JSON header (`Inference-Header-Content-Length` bytes),
                  then the raw input (`tensor`: the model's own FP32 input; `png`: `image_bytes`, BYTES
                  framed as 4-byte little-endian lengths), the output asked for in binary too;
  `http-json`     the same infer with the tensor as JSON numbers, answered in JSON;
  `http-classify` one encoded image per request as the raw body of `POST /v1/models/{m}:classify`, as curl
                  sends a file (`curl --data-binary @cat.png`).
Requests go through one aiohttp session per scenario: keep-alive connections, at most one per caller.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from protos.convserve.v1 import convserve_pb2 as pb
from serving.client.connection import Connection, read_token

HTTP_KINDS = ("http", "http-json", "http-classify")
# The Open Inference Protocol's names of the input types our models take (fp32, fp16 exports, uint8).
KSERVE_DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg"}


@dataclass(frozen=True)
class HttpRequest:
    path: str
    body: bytes
    headers: dict[str, str]
    images: int


def binary_body(header: dict, raw: bytes) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor data extension: the JSON header, then the tensors' bytes."""
    encoded = json.dumps(header, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(encoded)),
    }
    return encoded + raw, headers


def infer_request(info: pb.ModelInfo, chosen: list[pb.Image], payload: str, binary: bool, output: str):
    """One infer request for `chosen` images: (body, headers)."""
    count = len(chosen)
    if payload == "png":
        raw = b"".join(len(x.encoded).to_bytes(4, "little") + x.encoded for x in chosen)
        spec = {"name": "image_bytes", "datatype": "BYTES", "shape": [count, 1]}
    else:
        raw = b"".join(x.tensor.data for x in chosen)
        spec = {
            "name": info.input.name,
            "datatype": KSERVE_DATATYPES[info.input.dtype],
            "shape": [count, *info.input.shape],
        }
    if binary:
        header = {
            "inputs": [{**spec, "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
        return binary_body(header, raw)
    if payload == "png":
        raise ValueError("http-json sends tensors only: images go as binary data or to :classify")
    import numpy as np

    values = np.frombuffer(raw, dtype=np.dtype(info.input.dtype).newbyteorder("<"))
    body = {"inputs": [{**spec, "data": values.tolist()}], "outputs": [{"name": output}]}
    return json.dumps(body, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def http_requests_of(
    kind: str, info: pb.ModelInfo, images: list[pb.Image], per_request: int, payload: str, output: str
) -> list[HttpRequest]:
    """The requests of one HTTP scenario, over the same images (and in the same order) as gRPC's."""
    model = f"/v2/models/{info.name}/versions/{info.version}"
    requests = []
    for i in range(len(images)):
        chosen = [images[(i + j) % len(images)] for j in range(per_request)]
        if kind == "http-classify":
            if payload != "png" or per_request != 1:
                raise ValueError("http-classify sends one encoded image per request")
            encoded = chosen[0].encoded
            kind_of = next((t for magic, t in IMAGE_TYPES.items() if encoded.startswith(magic)), None)
            headers = {"Content-Type": kind_of or "application/octet-stream"}
            path = f"/v1/models/{info.name}/versions/{info.version}:classify"
            requests.append(HttpRequest(path, encoded, headers, 1))
            continue
        body, headers = infer_request(info, chosen, payload, kind == "http", output)
        requests.append(HttpRequest(f"{model}/infer", body, headers, per_request))
    return requests


def http_session(connection: Connection, concurrency: int) -> aiohttp.ClientSession:
    """Keep-alive connections, one per caller at most; TLS and the bearer token as `connection` says."""
    context: ssl.SSLContext | bool = False
    if connection.secure:
        context = ssl.create_default_context(cafile=str(connection.tls_ca) if connection.tls_ca else None)
        if connection.tls_cert and connection.tls_key:
            context.load_cert_chain(connection.tls_cert, connection.tls_key)
    headers = {}
    if connection.token_file is not None:
        headers["Authorization"] = f"Bearer {read_token(connection.token_file)}"
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context, keepalive_timeout=60)
    return aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    )


def base_url(target: str, connection: Connection) -> str:
    return f"{'https' if connection.secure else 'http'}://{target}"


async def output_name(session: aiohttp.ClientSession, url: str, model: str) -> str:
    """The model's output, from its metadata (`GET /v2/models/{m}`)."""
    async with session.get(f"{url}/v2/models/{model}") as response:
        response.raise_for_status()
        return (await response.json())["outputs"][0]["name"]


def http_call(session: aiohttp.ClientSession, url: str) -> Callable[..., Awaitable[None]]:
    """A call for `loadgen.unary`: sends one request, reads the whole answer, raises unless 200."""

    async def call(request: HttpRequest, timeout: float) -> None:
        async with session.post(url + request.path, data=request.body, headers=request.headers) as answer:
            await answer.read()
            if answer.status != 200:
                raise HttpFailure(answer.status)

    return call


class HttpFailure(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
