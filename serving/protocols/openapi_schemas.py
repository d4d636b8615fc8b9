"""The OpenAPI document's schemas (`components/schemas`): the Open Inference Protocol's, as its spec
(kserve/open-inference-protocol `open_inference_rest.yaml`) writes them and under the same names, then
Triton's extensions and convserve's own."""

from __future__ import annotations

from typing import Any

JSON = "application/json"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Any] = {
    # The Open Inference Protocol's, as its spec writes them.
    "metadata_server_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "metadata_model_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": ref("metadata_tensor")},
            "outputs": {"type": "array", "items": ref("metadata_tensor")},
        },
        "required": ["name", "platform"],
    },
    "metadata_tensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["name", "datatype", "shape"],
    },
    "inference_request": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "parameters": ref("parameters"),
            "inputs": {"type": "array", "items": ref("request_input")},
            "outputs": {"type": "array", "items": ref("request_output")},
        },
        "required": ["inputs"],
    },
    "parameters": {"type": "object"},
    "request_input": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": ref("parameters"),
            "data": ref("tensor_data"),
        },
        "required": ["name", "shape", "datatype", "data"],
    },
    "tensor_data": {
        "type": "array",
        "items": {
            "anyOf": [
                ref("tensor_data"),
                {"type": "number"},
                {"type": "string"},
                {"type": "boolean"},
                {"type": "object", "properties": {"b64": {"type": "string"}}, "required": ["b64"]},
            ]
        },
    },
    "request_output": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "parameters": ref("parameters")},
        "required": ["name"],
    },
    "response_output": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": ref("parameters"),
            "data": ref("tensor_data"),
        },
        "required": ["name", "shape", "datatype", "data"],
    },
    "inference_response": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": ref("parameters"),
            "outputs": {"type": "array", "items": ref("response_output")},
        },
        "required": ["model_name", "outputs"],
    },
    "error_response": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    # Triton's extensions and convserve's own.
    "model_config": {"type": "object", "description": "Triton's ModelConfig as JSON (model_config.proto)"},
    "model_statistics": {
        "type": "object",
        "properties": {"model_stats": {"type": "array", "items": {"type": "object"}}},
        "required": ["model_stats"],
        "description": "Triton's statistics extension: ModelStatisticsResponse as JSON",
    },
    "repository_index": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string"},
                "reason": {"type": "string"},
            },
            "required": ["name", "version", "state"],
        },
    },
    "classify_response": {
        "type": "object",
        "description": "convserve.v1 ClassifyResponse as JSON: one result per image, in order",
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "class_index": {"type": "array", "items": {"type": "integer"}},
                        "label": {"type": "array", "items": {"type": "string"}},
                        "probability": {"type": "array", "items": {"type": "number"}},
                        "error": {
                            "type": "object",
                            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
                        },
                    },
                },
            },
        },
        "required": ["model", "version", "results"],
    },
    "model_info": {
        "type": "object",
        "description": "convserve.v1 ModelInfo as JSON: state and reason, input, labels, metadata, "
        "explain_methods, batching and statistics (fields as in the .proto; unset ones left out)",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "integer"},
            "state": {"type": "string"},
            "reason": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}},
            "explain_methods": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["name", "version", "state"],
    },
    "models": {
        "type": "object",
        "properties": {"models": {"type": "array", "items": ref("model_info")}},
    },
    "tensor": {
        "type": "object",
        "properties": {
            "shape": {"type": "array", "items": {"type": "integer"}},
            "dtype": {"type": "string"},
            "data": {"type": "string", "format": "byte", "description": "base64, C order, little-endian"},
        },
    },
    "explain_response": {
        "type": "object",
        "description": "convserve.v1 ExplainResponse as JSON: one explanation per image, in order",
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "integer"},
            "methods": {"type": "array", "items": {"type": "string"}},
            "occlusion": {
                "type": "object",
                "properties": {k: {"type": "integer"} for k in ("patch", "stride", "copies")},
            },
            "images": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "result": {"type": "object", "description": "as a result of :classify"},
                        "class_index": {"type": "integer"},
                        "label": {"type": "string"},
                        "maps": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"method": {"type": "string"}, "map": ref("tensor")},
                            },
                        },
                        "model_input": ref("tensor"),
                        "blocks": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "block": {"type": "integer"},
                                    "maps": ref("tensor"),
                                    "caption": {"type": "string"},
                                    "grid_png": {"type": "string", "format": "byte"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "required": ["model", "version", "images"],
    },
}
