"""A thin Python client for convserve: mirrors the RPCs, with helpers for building inputs.

Images may be paths, encoded bytes, PIL images (sent as PNG) or numpy arrays (sent as raw tensors in
the model's input layout and dtype). Retries on UNAVAILABLE / RESOURCE_EXHAUSTED with exponential
backoff are gRPC's own (a retry policy in the channel's service config); several targets, or a DNS
name with several addresses, are balanced round-robin by gRPC. Pass a `Connection` for TLS, mTLS
and a bearer token (or bare `credentials` for TLS).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.client.connection import PLAINTEXT, Connection

ImageInput = str | Path | bytes | np.ndarray | Any  # Any: a PIL.Image.Image
SERVICE = "convserve.v1.Classifier"
DEFAULT_SERVER = os.environ.get("CONVSERVE_SERVER", "127.0.0.1:8500")
RETRYABLE = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class ImageResult:
    predictions: list[Prediction]
    error: str | None = None
    abstain: bool = False  # the score is below the model's abstain_threshold
    score: float | None = None  # the abstain score: top probability or energy (None: an older server)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


def service_config(retries: int) -> str:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": RETRYABLE,
                },
            }
        ]
    return json.dumps(config)


def channel_target(servers: str | Sequence[str]) -> str:
    """One `host:port`, a `dns:///name:port`, or several addresses balanced round-robin."""
    if isinstance(servers, str):
        servers = [servers]
    if len(servers) == 1:
        return servers[0]
    return "ipv4:" + ",".join(servers)


def to_image(image: ImageInput) -> pb.Image:
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, str | Path):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        array = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))  # the wire is little-endian
        return pb.Image(tensor=pb.Tensor(shape=array.shape, dtype=array.dtype.name, data=array.tobytes()))
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return pb.Image(encoded=buffer.getvalue())
    raise TypeError(
        f"cannot send {type(image).__name__} as an image: use a path, bytes, a PIL image or an array"
    )


def make_request(
    images: Iterable[ImageInput],
    model: str = "",
    version: int = 0,
    top_k: int | None = None,
    request_id: str = "",
) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(
        model=model, version=version, id=request_id, images=[to_image(i) for i in images]
    )
    if top_k is not None:
        request.top_k = top_k
    return request


def read_results(response: pb.ClassifyResponse) -> list[ImageResult]:
    results = []
    for r in response.results:
        if r.HasField("error"):
            results.append(ImageResult([], r.error.message))
        else:
            results.append(
                ImageResult(
                    [
                        Prediction(i, label, p)
                        for i, label, p in zip(r.class_index, r.label, r.probability, strict=True)
                    ],
                    abstain=r.abstain,
                    score=r.score if r.HasField("score") else None,
                )
            )
    return results


class ClassifierClient:
    """Synchronous client; use as a context manager or call `close`."""

    def __init__(
        self,
        servers: str | Sequence[str] = DEFAULT_SERVER,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        credentials: grpc.ChannelCredentials | None = None,
        connection: Connection | None = None,
        max_message_mb: int = 64,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        size = max_message_mb * 1024 * 1024
        channel_options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.service_config", service_config(retries)),
            ("grpc.enable_retries", int(retries > 0)),
            *options,
        ]
        target = channel_target(servers)
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, channel_options)
        else:
            self.channel = (connection or PLAINTEXT).channel(target, channel_options)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def classify(
        self,
        images: Iterable[ImageInput],
        model: str = "",
        version: int = 0,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> list[ImageResult]:
        """Top-k per image, in order; a bad image has its own error and does not affect the others."""
        return read_results(self.classify_request(make_request(images, model, version, top_k), timeout))

    def classify_request(
        self, request: pb.ClassifyRequest, timeout: float | None = None
    ) -> pb.ClassifyResponse:
        return self.stub.Classify(request, timeout=timeout or self.timeout, wait_for_ready=True)

    def explain(
        self,
        images: Iterable[ImageInput],
        model: str = "",
        version: int = 0,
        *,
        methods: Sequence[str] = (),
        class_index: int | None = None,
        top_k: int | None = None,
        activations: bool = False,
        activation_grids: bool = False,
        occlusion_patch: int | None = None,
        occlusion_stride: int | None = None,
        timeout: float | None = None,
    ) -> pb.ExplainResponse:
        """Heat maps of why each image gets its class, its top-k and the image as the model saw it
        (read the `Tensor` messages with `tensor_to_array`)."""
        request = pb.ExplainRequest(
            model=model,
            version=version,
            images=[to_image(i) for i in images],
            methods=list(methods),
            activations=activations,
            activation_grids=activation_grids,
        )
        for name, value in (
            ("class_index", class_index),
            ("top_k", top_k),
            ("occlusion_patch", occlusion_patch),
            ("occlusion_stride", occlusion_stride),
        ):
            if value is not None:
                setattr(request, name, value)
        return self.stub.Explain(request, timeout=timeout or self.timeout, wait_for_ready=True)

    def stream(
        self, requests: Iterator[pb.ClassifyRequest], timeout: float | None = None
    ) -> Iterator[pb.ClassifyResponse]:
        """ClassifyStream: responses carry their request's id and may arrive out of order."""
        return self.stub.ClassifyStream(requests, timeout=timeout)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(
            self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, wait_for_ready=True).models
        )

    def get_model(self, name: str = "", version: int = 0) -> pb.ModelInfo:
        if not name:
            return self.list_models()[0]
        return self.stub.GetModel(
            pb.GetModelRequest(name=name, version=version), timeout=self.timeout, wait_for_ready=True
        )

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING or UNKNOWN, from the standard health service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # types-grpcio-health-checking's HealthStub lists no methods; the generated stub has Check.
        response = health_pb2_grpc.HealthStub(self.channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
