"""The Open Inference Protocol over REST (`/v2/...`), as kserve/open-inference-protocol and Triton define it.

JSON ↔ the shared codec (`inference_codec`) ↔ data plane, nothing else; `http_edge` does auth, drain,
limits, deadlines, errors and counting. Inference takes the same two inputs the gRPC form takes: the
model's tensor (JSON numbers, flat or nested, or the binary tensor extension), or `image_bytes`, a
BYTES tensor of encoded images: with the binary extension (what tritonclient sends), or in JSON as
`{"b64": "..."}` elements or strings with the input parameter `"content_type": "base64"` (a plain
JSON string is its UTF-8 bytes, as the spec says). Outputs: the probabilities as JSON or binary
(`binary_data` per output, `binary_data_output` for all), or with the output parameter
`classification: k` the top k as "value:index:label" strings.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.core.errors import InvalidInput, shown
from serving.core.receipt import Receipt
from serving.core.types import PredictRequest, PredictResult
from serving.models.registry import VersionState
from serving.protocols.http_edge import Call, HttpEdge, parse_json
from serving.protocols.inference_codec import (
    ENCODED_INPUT,
    EXTENSIONS,
    IGNORED,
    OUTPUT,
    SERVER_NAME,
    SERVER_VERSION,
    InputTensor,
    abstain_parameters,
    classification_k,
    classification_strings,
    decode_input,
    files_of,
    join_bytes,
    model_config,
    model_metadata,
    model_statistics,
    parse_version,
    proto_json,
    receipt_parameters,
    served_input,
)

HEADER_LENGTH = "inference-header-content-length"
MODEL = "/v2/models/{model}"
VERSIONED = "/v2/models/{model}/versions/{version}"


def version_of(request: Request) -> int:
    return parse_version(request.path_params.get("version", ""))


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _parameters(value: dict[str, Any], what: str) -> dict[str, Any]:
    return _object(value.get("parameters") or {}, f"{what} 'parameters'")


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in value
    ):
        raise InvalidInput(f"input {shown(name)}: 'shape' must be a list of non-negative integers")
    return value


def _flatten(data: Any, name: str) -> list[Any]:
    """A JSON tensor's `data`, flat or nested (row-major), as one flat list."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {shown(name)}: 'data' must be a JSON array")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _bytes_element(item: Any, name: str, base64_strings: bool) -> bytes:
    try:
        if isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
            return base64.b64decode(item["b64"], validate=True)
        if isinstance(item, str):
            return base64.b64decode(item, validate=True) if base64_strings else item.encode()
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {shown(name)}: an element is not valid base64") from None
    raise InvalidInput(f'input {shown(name)}: a BYTES element must be a string or {{"b64": "..."}}')


def read_inputs(header: dict[str, Any], binary: bytes) -> list[InputTensor]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput("the request needs 'inputs', a list of tensors")
    tensors: list[InputTensor] = []
    offset = 0
    for value in inputs:
        spec = _object(value, "each input")
        name, datatype = spec.get("name"), spec.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput("each input needs a string 'name' and 'datatype'")
        shape = _shape(spec.get("shape"), name)
        parameters = _parameters(spec, f"input {shown(name)}")
        size = parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input {shown(name)}: 'binary_data_size' must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {shown(name)}: binary_data_size {size} is beyond the {len(binary) - offset} "
                    "bytes of binary data left in the body"
                )
            tensors.append(InputTensor(name, datatype, shape, raw=binary[offset : offset + size]))
            offset += size
            continue
        if "data" not in spec:
            raise InvalidInput(f"input {shown(name)}: needs 'data' or the parameter 'binary_data_size'")
        elements = _flatten(spec["data"], name)
        if datatype == "BYTES":
            base64_strings = parameters.get("content_type") == "base64"
            elements = [_bytes_element(item, name, base64_strings) for item in elements]
        elif any(isinstance(item, (str, dict, list)) or item is None for item in elements):
            raise InvalidInput(f"input {shown(name)}: 'data' must hold {shown(datatype)} numbers")
        tensors.append(InputTensor(name, datatype, shape, elements=elements))
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary)} bytes of binary data; the inputs' binary_data_size take {offset}"
        )
    return tensors


def requested_output(header: dict[str, Any]) -> tuple[int | None, bool]:
    """(k of the classification extension or None, whether the output goes as binary data)."""
    binary = _parameters(header, "the request").get("binary_data_output", False)
    outputs = header.get("outputs")
    if outputs is None or outputs == []:
        return None, bool(binary)
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list")
    if len(outputs) > 1:
        raise InvalidInput(f"this model has one output, {OUTPUT!r}; {len(outputs)} were requested")
    output = _object(outputs[0], "each output")
    name = output.get("name")
    parameters = _parameters(output, "the output")
    k = classification_k(name if isinstance(name, str) else shown(name), parameters.get("classification"))
    return k, bool(parameters.get("binary_data", binary))


def infer_response(
    header: dict[str, Any],
    result: PredictResult,
    k: int | None,
    binary: bool,
    ignored: bool = False,
    receipt: Receipt | None = None,
) -> Response:
    answer: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if isinstance(header.get("id"), str):
        answer["id"] = header["id"]
    if ignored:
        answer["parameters"] = {IGNORED: ENCODED_INPUT}
    if k is None:
        probabilities = result.probabilities.astype("<f4", copy=False)
        output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
        raw = probabilities.tobytes()
        data: list[Any] = probabilities.ravel().tolist()
    else:
        shape, elements = classification_strings(result, k)
        output = {"name": OUTPUT, "datatype": "BYTES", "shape": shape}
        raw = join_bytes(elements)
        data = [e.decode() for e in elements]
    # On the response, not the output: perf_analyzer reads an output's parameters as the binary data
    # extension's and fails on any without binary_data_size.
    parameters: dict[str, Any] = abstain_parameters(result) | receipt_parameters(receipt)
    if parameters:
        answer.setdefault("parameters", {}).update(parameters)
    if not binary:
        output["data"] = data
        answer["outputs"] = [output]
        return JSONResponse(answer)
    output["parameters"] = {"binary_data_size": len(raw)}
    answer["outputs"] = [output]
    text = json.dumps(answer, separators=(",", ":")).encode()
    return Response(
        text + raw,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )


def split_body(body: bytes, length_text: str | None) -> tuple[bytes, bytes]:
    """An inference request's JSON and its binary tensor data: the binary data extension puts the
    JSON's length in `Inference-Header-Content-Length` and the tensors' bytes after it."""
    if length_text is None:
        return body, b""
    if not length_text.isdigit() or int(length_text) > len(body):
        raise InvalidInput(
            f"header Inference-Header-Content-Length {shown(length_text)} is not a length within "
            f"the body's {len(body)} bytes"
        )
    return body[: int(length_text)], body[int(length_text) :]


def routes(edge: HttpEdge) -> list[Route]:
    registry = edge.registry

    async def server_metadata(request: Request, call: Call) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})

    async def live(request: Request, call: Call) -> Response:
        return Response(status_code=200)

    async def ready(request: Request, call: Call) -> Response:
        ready = bool(registry.ready()) and not edge.admission.draining
        return Response(status_code=200 if ready else 503)

    async def model_ready(request: Request, call: Call) -> Response:
        entry = registry.entry(request.path_params["model"], version_of(request))
        ready = entry.state is VersionState.READY and not edge.admission.draining
        return Response(status_code=200 if ready else 503)

    async def metadata(request: Request, call: Call) -> Response:
        model = registry.resolve(request.path_params["model"], version_of(request))
        return JSONResponse(model_metadata(model, registry))

    async def config(request: Request, call: Call) -> Response:
        model = registry.resolve(request.path_params["model"], version_of(request))
        return JSONResponse(proto_json(model_config(model, *files_of(registry, model))))

    async def stats(request: Request, call: Call) -> Response:
        name = request.path_params.get("model")
        entries = [registry.entry(name, version_of(request))] if name else registry.entries()
        models = [model_statistics(e.model, edge.calls) for e in entries if e.model is not None]
        return JSONResponse({"model_stats": [proto_json(m) for m in models]})

    async def infer(request: Request, call: Call) -> Response:
        name, version = request.path_params["model"], version_of(request)
        call.asked = (name, version)
        json_part, binary = split_body(await edge.body(request), request.headers.get(HEADER_LENGTH))
        header = _object(parse_json(json_part, edge.max_json_bytes), "the inference request")
        call.deadline_from_us(_parameters(header, "the request").get("timeout"))
        model = registry.resolve(name, version)
        tensors = read_inputs(header, binary)
        tensor = tensors[served_input([t.name for t in tensors], model)]
        k, binary_output = requested_output(header)
        inputs = decode_input(tensor, model)
        predict = PredictRequest(inputs, model.name, model.version, call.deadline, tensor.name, call.receipt)
        result = await edge.dataplane.predict(predict)
        call.answered = (result.model, str(result.version), int(np.shape(result.probabilities)[0]))
        return infer_response(header, result, k, binary_output, len(tensors) > 1, call.receipt)

    r = edge.route
    model_routes: list[Route] = []
    for base in (MODEL, VERSIONED):
        model_routes += [
            Route(base, r(metadata), methods=["GET"]),
            Route(f"{base}/ready", r(model_ready), methods=["GET"]),
            Route(f"{base}/config", r(config), methods=["GET"]),
            Route(f"{base}/stats", r(stats), methods=["GET"]),
            Route(f"{base}/infer", r(infer, data=True), methods=["POST"]),
        ]
    return [
        Route("/v2", r(server_metadata), methods=["GET"]),
        Route("/v2/", r(server_metadata), methods=["GET"]),  # as the spec writes it
        Route("/v2/health/live", r(live, open_route=True), methods=["GET"]),
        Route("/v2/health/ready", r(ready, open_route=True), methods=["GET"]),
        Route("/v2/models/stats", r(stats), methods=["GET"]),
        *model_routes,
        *repository_routes(edge),
    ]


def repository_routes(edge: HttpEdge) -> list[Route]:
    """The model repository extension: the index, and load and unload (`--model-control explicit`)."""
    registry, lifecycle = edge.registry, edge.lifecycle

    async def repository_index(request: Request, call: Call) -> Response:
        body = await edge.body(request) if request.method == "POST" else b""
        only_ready = bool(body.strip()) and bool(
            _object(parse_json(body, edge.max_json_bytes), "the request body").get("ready", False)
        )
        return JSONResponse(
            [
                {"name": e.name, "version": str(e.version), "state": e.state.value, "reason": e.reason}
                for e in registry.entries()
                if not only_ready or e.state is VersionState.READY
            ]
        )

    async def load(request: Request, call: Call) -> Response:
        lifecycle.require_explicit("load")  # outside explicit mode: refused before anything else
        body = await edge.body(request)
        if body.strip() and _parameters(
            _object(parse_json(body, edge.max_json_bytes), "the request body"), "the request"
        ):
            raise InvalidInput("load takes no parameters; put the files in the repository")
        await lifecycle.load(request.path_params["model"])
        return Response(status_code=200)

    async def unload(request: Request, call: Call) -> Response:
        await lifecycle.unload(request.path_params["model"])
        return Response(status_code=200)

    r = edge.route
    return [
        Route("/v2/repository/index", r(repository_index), methods=["GET", "POST"]),
        Route("/v2/repository/models/{model}/load", r(load), methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", r(unload), methods=["POST"]),
    ]
