"""Images by curl: `POST /v1/models/{model}[/versions/{version}]:classify`, answered as `convserve.v1`.

The body is either one image's raw bytes (any format the gRPC edge decodes; `curl --data-binary
@cat.jpg`) or a `multipart/form-data` upload of several files (`curl -F image=@a.png -F image=@b.jpg`),
taken in the order sent. `?top_k=k` asks for k classes (the server's default otherwise). The answer is
`convserve.v1`'s ClassifyResponse as JSON (field names as in the .proto): per image its classes,
labels and probabilities, or its own `error`; only when every image is unusable does the request
fail as a whole (400).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protos.convserve.v1 import convserve_pb2 as pb
from serving.core.errors import InvalidInput, shown
from serving.core.types import ClassifyRequest
from serving.protocols.convserve_v1 import to_response
from serving.protocols.http_edge import Call, HttpEdge
from serving.protocols.inference_codec import parse_version, proto_json

CLASSIFY = "/v1/models/{model}:classify"
CLASSIFY_VERSION = "/v1/models/{model}/versions/{version}:classify"


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def images_of(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """The raw body as one image, or every file of a multipart form, in order."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            raise InvalidInput("the body is empty: send an image's bytes, or a multipart/form-data upload")
        return [body]
    parser = MultiPartParser(
        request.headers, _once(body), max_files=max_images, max_fields=max_images, max_part_size=len(body)
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise InvalidInput(f"the multipart/form-data body cannot be read: {error.message}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise InvalidInput("the multipart/form-data body holds no file")
        return [await file.read() for file in files]
    finally:
        await form.close()


def top_k_of(request: Request) -> int | None:
    text = request.query_params.get("top_k")
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"top_k must be a positive integer, got {shown(text)}")
    return int(text)


def routes(edge: HttpEdge) -> list[Route]:
    async def classify(request: Request, call: Call) -> Response:
        name = request.path_params["model"]
        version = parse_version(request.path_params.get("version", ""))
        call.asked = (name, version)
        top_k = top_k_of(request)
        body = await edge.body(request)
        images = await images_of(request, body, edge.dataplane.limits.max_images)
        result = await edge.dataplane.classify(ClassifyRequest(images, name, version, top_k, call.deadline))
        call.answered = (result.model, str(result.version), result.count)
        message = pb.ClassifyRequest(model=name, version=version)
        # Only the fields set, as protobuf's JSON mapping writes them: an image's error has no empty lists.
        return JSONResponse(proto_json(to_response(message, result), defaults=False))

    endpoint = edge.route(classify, data=True)
    return [
        Route(CLASSIFY, endpoint, methods=["POST"]),
        Route(CLASSIFY_VERSION, endpoint, methods=["POST"]),
    ]
