"""convserve's Python client: talks to a server through `protos` and gRPC only."""

from serving.client.connection import Connection, add_connection_arguments, connection_from_args
from serving.client.grpc_client import (
    DEFAULT_SERVER,
    ClassifierClient,
    ImageInput,
    ImageResult,
    Prediction,
    make_request,
    read_results,
    to_image,
)
from serving.client.tensors import pixels_to_tensor, tensor_to_array

__all__ = [
    "DEFAULT_SERVER",
    "ClassifierClient",
    "Connection",
    "ImageInput",
    "ImageResult",
    "Prediction",
    "add_connection_arguments",
    "connection_from_args",
    "make_request",
    "pixels_to_tensor",
    "read_results",
    "tensor_to_array",
    "to_image",
]
