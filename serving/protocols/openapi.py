"""`/openapi.json` (OpenAPI 3.0) describing every HTTP route, and `/docs`, Swagger UI served from the
`swagger-ui-bundle` package's own files (nothing is fetched from the internet).

The Open Inference Protocol's schemas are the spec's (kserve/open-inference-protocol
`open_inference_rest.yaml`), under the same names; the binary tensor extension and the image route
are described beside them. The schemas are in `openapi_schemas`; this module assembles the paths, the
document and the routes that serve it.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serving.protocols.http_edge import Call, HttpEdge
from serving.protocols.inference_codec import SERVER_VERSION
from serving.protocols.openapi_schemas import JSON, SCHEMAS, ref


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref("error_response")}}}


ERRORS = {
    "400": _error("Bad request: the message says what is wrong"),
    "401": _error("No bearer token (the server runs with --auth-token-file)"),
    "403": _error("The bearer token is not accepted"),
    "404": _error("No such model or version"),
    "503": _error("Not ready, or shutting down"),
}
DATA_ERRORS = {
    **ERRORS,
    "413": _error("The body is over --max-message-mb"),
    "429": _error("Overloaded: the queue or input budget is full; retry later"),
    "504": _error("The request's deadline (Timeout-Ms, or the `timeout` parameter) passed"),
}
TIMEOUT = {
    "name": "Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
    "description": "deadline in milliseconds; past it the request gets 504",
}
MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def _get(summary: str, schema: str | None, errors: dict[str, Any] = ERRORS, **extra: Any) -> dict:
    ok: dict[str, Any] = {"description": "OK"}
    if schema is not None:
        ok["content"] = {JSON: {"schema": ref(schema)}}
    return {"get": {"summary": summary, "responses": {"200": ok, **errors}, **extra}}


def _model_paths(base: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    binary = {
        "schema": {"type": "string", "format": "binary"},
        "description": "binary tensor extension: the JSON header (its length in the header "
        "Inference-Header-Content-Length), then the inputs' bytes",
    }
    infer = {
        "post": {
            "summary": "Inference",
            "description": "Inputs: the model's tensor, or `image_bytes` (BYTES, encoded images). Output "
            "`probabilities`; with the output parameter `classification: k`, the top k as "
            '"value:index:label". Deadline: the `timeout` parameter (microseconds) or Timeout-Ms.',
            "parameters": [*parameters, TIMEOUT],
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": ref("inference_request")}, "application/octet-stream": binary},
            },
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        JSON: {"schema": ref("inference_response")},
                        "application/octet-stream": binary,
                    },
                },
                **DATA_ERRORS,
            },
        }
    }
    return {
        base: {**_get("Model Metadata", "metadata_model_response"), "parameters": parameters},
        f"{base}/ready": {**_get("Model Ready", None), "parameters": parameters},
        f"{base}/config": {**_get("Model Configuration", "model_config"), "parameters": parameters},
        f"{base}/stats": {**_get("Model Statistics", "model_statistics"), "parameters": parameters},
        f"{base}/infer": infer,
    }


def _classify(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Classify images",
            "description": "One image's raw bytes as the body, or a multipart/form-data upload of "
            "several files; one unusable image gets its own error, the others their classes.",
            "parameters": [
                *parameters,
                {
                    "name": "top_k",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                },
                TIMEOUT,
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "image": {"type": "array", "items": {"type": "string", "format": "binary"}}
                            },
                        }
                    },
                },
            },
            "responses": {
                "200": {"description": "OK", "content": {JSON: {"schema": ref("classify_response")}}},
                **DATA_ERRORS,
            },
        }
    }


def _page(summary: str, *media_types: str) -> dict[str, Any]:
    """A file of the web page: open (no token), text."""
    ok = {"description": "OK", "content": {t: {"schema": {"type": "string"}} for t in media_types}}
    return {"get": {"summary": summary, "security": [], "responses": {"200": ok, "404": ERRORS["404"]}}}


def _explain(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    operation = _classify(parameters)["post"]
    return {
        "post": {
            **operation,
            "summary": "Explain images",
            "description": "The same body as :classify. Per image: the top-k, heat maps of the evidence "
            "for a class at the model's input resolution (float32 tensors, data in base64), the image as "
            "the model saw it, and optionally each conv block's activation maps.",
            "parameters": [
                *operation["parameters"],
                query(
                    "method",
                    {"type": "array", "items": {"type": "string", "enum": ["cam", "occlusion"]}},
                    "repeatable; default: cam where the version has an explain graph, else occlusion",
                ),
                query("class_index", {"type": "integer", "minimum": 0}, "default: each image's top-1"),
                query("activations", {"type": "boolean"}, "each conv block's maps (explain graph only)"),
                query("activation_grids", {"type": "boolean"}, "… and each block as a PNG grid"),
                query("occlusion_patch", {"type": "integer", "minimum": 1}, "patch side in input pixels"),
                query("occlusion_stride", {"type": "integer", "minimum": 1}, "default: half the patch"),
            ],
            "responses": {
                "200": {"description": "OK", "content": {JSON: {"schema": ref("explain_response")}}},
                **DATA_ERRORS,
            },
        }
    }


def _repository() -> dict[str, Any]:
    index = {
        "summary": "Repository Index",
        "responses": {
            "200": {"description": "OK", "content": {JSON: {"schema": ref("repository_index")}}},
            **ERRORS,
        },
    }
    action: dict[str, Any] = {
        "parameters": [MODEL],
        "post": {
            "summary": "",
            "description": "only with --model-control explicit (400 otherwise)",
            "responses": {"200": {"description": "OK"}, **ERRORS},
        },
    }
    load = {**action, "post": {**action["post"], "summary": "Load a model"}}
    unload = {**action, "post": {**action["post"], "summary": "Unload a model"}}
    return {
        "/v2/repository/index": {
            "get": index,
            "post": {
                **index,
                "requestBody": {
                    "content": {
                        JSON: {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}
                    }
                },
            },
        },
        "/v2/repository/models/{model}/load": load,
        "/v2/repository/models/{model}/unload": unload,
    }


def openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v2": _get("Server Metadata", "metadata_server_response"),
        "/v2/": _get("Server Metadata (the spec's spelling)", "metadata_server_response"),
        "/v2/health/live": _get("Server Live", None, {}, security=[]),
        "/v2/health/ready": _get("Server Ready", None, {"503": {"description": "Not ready"}}, security=[]),
        "/v2/models/stats": _get("Statistics of every model", "model_statistics"),
        **_model_paths("/v2/models/{model}", [MODEL]),
        **_model_paths("/v2/models/{model}/versions/{version}", [MODEL, VERSION]),
        **_repository(),
        "/v1/models/{model}:classify": _classify([MODEL]),
        "/v1/models/{model}/versions/{version}:classify": _classify([MODEL, VERSION]),
        "/v1/models": _get(
            "List models (convserve.v1 ListModels as JSON): versions, states, inputs", "models"
        ),
        "/v1/models/{model}": {
            **_get("A model's newest version (convserve.v1 GetModel as JSON)", "model_info"),
            "parameters": [MODEL],
        },
        "/v1/models/{model}/versions/{version}": {
            **_get("One version (convserve.v1 GetModel as JSON)", "model_info"),
            "parameters": [MODEL, VERSION],
        },
        "/": _page("The web page: drop an image, see the top-k and what the network saw", "text/html"),
        "/web/{name}": {
            **_page("The web page's script and style sheet", "text/javascript", "text/css"),
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        },
        "/v1/models/{model}:explain": _explain([MODEL]),
        "/v1/models/{model}/versions/{version}:explain": _explain([MODEL, VERSION]),
        "/openapi.json": _get("This document", None),
        "/docs": _get("This document, as a page", None),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "convserve",
            "version": SERVER_VERSION,
            "description": "Open Inference Protocol REST (with Triton's binary tensor, classification, "
            "model configuration, statistics and model repository extensions) and image classification.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8"><title>convserve HTTP API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
window.onload = () => {
  window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", validatorUrl: null});
};
</script>
</body>
</html>
"""


def routes(edge: HttpEdge) -> list[Route | Mount]:
    import swagger_ui_bundle  # the package's Swagger UI files

    document = openapi()

    async def spec(request: Request, call: Call) -> Response:
        return JSONResponse(document)

    async def page(request: Request, call: Call) -> Response:
        return HTMLResponse(PAGE)

    return [
        Route("/openapi.json", edge.route(spec), methods=["GET"]),
        Route("/docs", edge.route(page), methods=["GET"]),
        Mount("/docs/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui"),
    ]
