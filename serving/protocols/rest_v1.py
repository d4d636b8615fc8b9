"""Images by curl: `POST /v1/models/{model}[/versions/{version}]:classify` and `:explain`, answered as
`convserve.v1`.

The body is either one image's raw bytes (any format the gRPC edge decodes; `curl --data-binary
@cat.jpg`) or a `multipart/form-data` upload of several files (`curl -F image=@a.png -F image=@b.jpg`),
taken in the order sent. `?top_k=k` asks for k classes (the server's default otherwise). The answer is
`convserve.v1`'s ClassifyResponse as JSON (field names as in the .proto): per image its classes,
labels and probabilities, or its own `error`; only when every image is unusable does the request
fail as a whole (400).

`GET /v1/models` and `GET /v1/models/{model}[/versions/{version}]` answer `ListModels` and `GetModel`
as JSON: every model, its versions and their states, input, labels, metadata and explain methods.

`:explain` takes the same body and answers `ExplainResponse` as JSON; its options are query parameters
named as the message's fields: `method` (repeatable: cam, occlusion), `class_index`, `top_k`,
`activations`, `activation_grids` (true/false), `occlusion_patch`, `occlusion_stride`. Tensors'
`data` (heat maps, the model's input, block maps) and `grid_png` are base64, as protobuf's JSON has it.
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
from serving.protocols.convserve_v1 import model_info, to_explain_request, to_explain_response, to_response
from serving.protocols.http_edge import Call, HttpEdge
from serving.protocols.inference_codec import parse_version, proto_json

CLASSIFY = "/v1/models/{model}:classify"
CLASSIFY_VERSION = "/v1/models/{model}/versions/{version}:classify"
MODELS = "/v1/models"
MODEL = "/v1/models/{model}"
MODEL_VERSION = "/v1/models/{model}/versions/{version}"
EXPLAIN = "/v1/models/{model}:explain"
EXPLAIN_VERSION = "/v1/models/{model}/versions/{version}:explain"
EXPLAIN_FLAGS = ("activations", "activation_grids")
EXPLAIN_NUMBERS = ("class_index", "occlusion_patch", "occlusion_stride")


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
    return whole_number(request, "top_k", 1)


def whole_number(request: Request, name: str, least: int) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) < least:
        raise InvalidInput(f"{name} must be an integer of at least {least}, got {shown(text)}")
    return int(text)


def flag(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise InvalidInput(f"{name} must be true or false, got {shown(text)}")
    return text in ("true", "1")


def explain_message(request: Request, name: str, version: int) -> pb.ExplainRequest:
    """The query's options as the gRPC method's request message (without its images)."""
    message = pb.ExplainRequest(model=name, version=version, methods=request.query_params.getlist("method"))
    top_k = top_k_of(request)
    if top_k is not None:
        message.top_k = top_k
    for field in EXPLAIN_NUMBERS:
        value = whole_number(request, field, 0 if field == "class_index" else 1)
        if value is not None:
            setattr(message, field, value)
    for field in EXPLAIN_FLAGS:
        setattr(message, field, flag(request, field))
    return message


def routes(edge: HttpEdge) -> list[Route]:
    async def classify(request: Request, call: Call) -> Response:
        name = request.path_params["model"]
        version = parse_version(request.path_params.get("version", ""))
        call.asked = (name, version)
        top_k = top_k_of(request)
        body = await edge.body(request)
        images = await images_of(request, body, edge.dataplane.limits.max_images)
        classify = ClassifyRequest(images, name, version, top_k, call.deadline, call.receipt)
        result = await edge.dataplane.classify(classify)
        call.answered = (result.model, str(result.version), result.count)
        message = pb.ClassifyRequest(model=name, version=version)
        # Only the fields set, as protobuf's JSON mapping writes them: an image's error has no empty lists.
        return JSONResponse(proto_json(to_response(message, result), defaults=False))

    async def explain(request: Request, call: Call) -> Response:
        name = request.path_params["model"]
        version = parse_version(request.path_params.get("version", ""))
        call.asked = (name, version)
        message = explain_message(request, name, version)
        body = await edge.body(request)
        images = await images_of(request, body, edge.dataplane.limits.max_images)
        result = await edge.dataplane.explain(to_explain_request(message, call.deadline, list(images)))
        call.answered = (result.model, str(result.version), result.count)
        response = to_explain_response(message, result)
        return JSONResponse(proto_json(response, defaults=False, base64_bytes=True))

    async def list_models(request: Request, call: Call) -> Response:
        registry = edge.registry
        infos = [model_info(registry, registry.entry(name, 0), edge.calls) for name in registry.names()]
        return JSONResponse(proto_json(pb.ListModelsResponse(models=infos), defaults=False))

    async def get_model(request: Request, call: Call) -> Response:
        version = parse_version(request.path_params.get("version", ""))
        entry = edge.registry.entry(request.path_params["model"], version)
        return JSONResponse(proto_json(model_info(edge.registry, entry, edge.calls), defaults=False))

    endpoint = edge.route(classify, data=True)
    explain_endpoint = edge.route(explain, data=True)
    return [
        Route(MODELS, edge.route(list_models), methods=["GET"]),
        Route(MODEL, edge.route(get_model), methods=["GET"]),
        Route(MODEL_VERSION, edge.route(get_model), methods=["GET"]),
        Route(CLASSIFY, endpoint, methods=["POST"]),
        Route(CLASSIFY_VERSION, endpoint, methods=["POST"]),
        Route(EXPLAIN, explain_endpoint, methods=["POST"]),
        Route(EXPLAIN_VERSION, explain_endpoint, methods=["POST"]),
    ]
