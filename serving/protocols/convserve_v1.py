"""The `convserve.v1.Classifier` service: protobuf ↔ data plane, nothing else.

Failures are domain errors raised by the data plane; the call gate maps them to status codes
through the one table in `status`. On a stream each request gets exactly one response: a request
that fails carries its status in `ClassifyResponse.error`, mapped through the same table.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.core.dataplane import DataPlane
from serving.core.receipt import Receipt
from serving.core.types import (
    ClassifyRequest,
    ClassifyResult,
    ExplainRequest,
    ExplainResult,
    ImageInput,
    RawTensor,
)
from serving.models.registry import ModelRegistry, ModelVersion
from serving.protocols.admission import Admission
from serving.protocols.calls import CallStats, Reading
from serving.protocols.receipts import current
from serving.protocols.streams import answer_stream

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
BENCH_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Bench"].full_name
DATA_METHODS = (f"/{SERVICE_NAME}/Classify", f"/{SERVICE_NAME}/ClassifyStream", f"/{SERVICE_NAME}/Explain")
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PROTOCOL = "convserve_v1"  # the metrics' protocol label


def asked(request: pb.ClassifyRequest | pb.ExplainRequest) -> tuple[str, int]:
    return request.model, request.version


def answered(response: pb.ClassifyResponse) -> tuple[str, str, int]:
    """(model, version, images) of an answer."""
    return response.model, str(response.version), len(response.results)


def answered_explain(response: pb.ExplainResponse) -> tuple[str, str, int]:
    return response.model, str(response.version), len(response.images)


def answered_stream(response: pb.ClassifyResponse) -> tuple[str, str, int] | None:
    return None if response.HasField("error") else answered(response)


# How the metrics read this protocol's requests and answers (the call gate, `gate.CallGate`).
COUNTED = {
    DATA_METHODS[0]: Reading(PROTOCOL, pb.ClassifyRequest.FromString, asked, answered),
    DATA_METHODS[1]: Reading(PROTOCOL, pb.ClassifyRequest.FromString, asked, answered_stream),
    DATA_METHODS[2]: Reading(PROTOCOL, pb.ExplainRequest.FromString, asked, answered_explain),
}


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the data plane's clock (time.monotonic)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def image_input(image: pb.Image) -> ImageInput:
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return image.encoded
    if kind == "tensor":
        t = image.tensor
        return RawTensor(t.shape, t.dtype, t.data)
    return None


def to_request(message: pb.ClassifyRequest, deadline: float | None) -> ClassifyRequest:
    return ClassifyRequest(
        images=[image_input(image) for image in message.images],
        model=message.model,
        version=message.version,
        top_k=message.top_k if message.HasField("top_k") else None,
        deadline=deadline,
        receipt=current(),
    )


def error_response(message: pb.ClassifyRequest, code: grpc.StatusCode, text: str) -> pb.ClassifyResponse:
    """A stream request that failed as a whole: its id, the model asked for, and the status."""
    return pb.ClassifyResponse(
        id=message.id,
        model=message.model,
        version=message.version,
        error=pb.Error(code=code.value[0], message=text),
    )


def to_response(message: pb.ClassifyRequest, result: ClassifyResult) -> pb.ClassifyResponse:
    response = pb.ClassifyResponse(id=message.id, model=result.model, version=result.version)
    labels = result.labels
    index_rows = result.indices.tolist()
    probability_rows = result.probabilities.tolist()
    scores, flags = result.scores.tolist(), result.abstain.tolist()
    row = 0
    for image in range(result.count):
        if image in result.errors:
            response.results.add(
                error=pb.Error(code=INVALID, message=f"image {image}: {result.errors[image]}")
            )
            continue
        indices = index_rows[row]
        response.results.add(
            class_index=indices,
            label=[labels[i] for i in indices],
            probability=probability_rows[row],
            abstain=flags[row],
            score=scores[row],
        )
        row += 1
    receipt = current()
    if receipt is not None:
        write_receipt(response.receipt, receipt)
    return response


def to_explain_request(
    message: pb.ExplainRequest, deadline: float | None, images: list[ImageInput] | None = None
) -> ExplainRequest:
    """`images`: already taken from elsewhere (a REST body) instead of the message's."""
    return ExplainRequest(
        images=[image_input(image) for image in message.images] if images is None else images,
        model=message.model,
        version=message.version,
        methods=tuple(message.methods),
        target=message.class_index if message.HasField("class_index") else None,
        top_k=message.top_k if message.HasField("top_k") else None,
        deadline=deadline,
        activations=message.activations or message.activation_grids,
        activation_grids=message.activation_grids,
        patch=message.occlusion_patch if message.HasField("occlusion_patch") else None,
        stride=message.occlusion_stride if message.HasField("occlusion_stride") else None,
        receipt=current(),
    )


def write_receipt(message: pb.Receipt, receipt: Receipt) -> None:
    """The receipt into the answer's `receipt` field, sealed now: its total ends as the answer is built.
    Field by field into the answer's own message: a `pb.Receipt` built and copied in cost 2.5× as much."""
    (
        message.decode_ms,
        message.queue_ms,
        message.compute_ms,
        message.other_ms,
        message.total_ms,
    ) = receipt.seal().figures_ms()
    message.batch_sizes.extend(receipt.batch_sizes)
    message.batches = receipt.batches
    message.trace_id = receipt.trace_id


def tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=array.shape, dtype=array.dtype.name, data=array.tobytes())


def to_explain_response(message: pb.ExplainRequest, result: ExplainResult) -> pb.ExplainResponse:
    response = pb.ExplainResponse(
        id=message.id, model=result.model, version=result.version, methods=result.methods
    )
    if result.occlusion is not None:
        o = result.occlusion
        response.occlusion.CopyFrom(pb.OcclusionSettings(patch=o.patch, stride=o.stride, copies=o.copies))
    for image, (explanation, error) in enumerate(result.per_image()):
        if explanation is None:
            response.images.add(
                result=pb.ImageResult(error=pb.Error(code=INVALID, message=f"image {image}: {error}"))
            )
            continue
        predictions = explanation.predictions
        response.images.add(
            result=pb.ImageResult(
                class_index=[p.index for p in predictions],
                label=[p.label for p in predictions],
                probability=[p.probability for p in predictions],
                abstain=explanation.abstain,
                score=explanation.score,
            ),
            class_index=explanation.target,
            label=explanation.target_label,
            maps=[pb.HeatMap(method=method, map=tensor(heat)) for method, heat in explanation.maps.items()],
            model_input=tensor(explanation.model_input),
            blocks=[
                pb.BlockActivations(
                    block=b.block, maps=tensor(b.maps), caption=b.caption, grid_png=b.grid_png
                )
                for b in explanation.blocks
            ],
        )
    receipt = current()
    if receipt is not None:
        write_receipt(response.receipt, receipt)
    return response


def model_info(registry: ModelRegistry, entry: ModelVersion, calls: CallStats) -> pb.ModelInfo:
    """One version as `GetModel` and `ListModels` (and the REST model routes) describe it; its request
    counts from the request ledger, `calls`."""
    versions = registry.versions(entry.name)
    info = pb.ModelInfo(
        name=entry.name,
        version=entry.version,
        versions=sorted(versions),
        state=entry.state.value,
        reason=entry.reason,
        version_states=[
            pb.VersionState(version=v, state=e.state.value, reason=e.reason)
            for v, e in sorted(versions.items())
        ],
    )
    model = entry.model
    if model is None:
        return info
    info.model_sha256, info.loaded_at = entry.sha256, entry.loaded_at_text
    c, stats, batching = model.contract, model.stats, model.batcher.config
    info.input.CopyFrom(
        pb.InputSpec(
            name=model.runtime.input_name,
            layout=c.layout,
            color_mode=c.color_mode,
            height=c.height,
            width=c.width,
            dtype=model.input_dtype.name,
            scale=c.scale,
            mean=c.mean,
            std=c.std,
            shape=c.image_shape,
            channel_order=c.fit.channel_order,
            resize=c.fit.resize,
        )
    )
    info.labels.extend(c.labels)
    info.output_kind = c.output_kind
    info.batching.CopyFrom(
        pb.BatchingSettings(
            max_batch_size=batching.max_batch_size,
            max_delay_ms=batching.max_delay_s * 1000,
            max_queue_size=batching.max_queue_rows,
        )
    )
    requests = calls.of_version(entry.name, entry.version)
    info.stats.CopyFrom(
        pb.ModelStats(
            requests=requests.ok,
            failed=requests.failed,
            submitted=stats.submitted,
            items=stats.items,
            batches=stats.batches,
            batch_sizes=dict(stats.batch_sizes),
            rejected=stats.rejected,
            expired=stats.expired,
            dropped_rows=stats.dropped_rows,
        )
    )
    info.provider = model.runtime.provider
    info.explain_methods.extend(model.explain_methods)
    info.metadata.update(c.extra)
    if c.score_output is not None:  # the graph output the abstain score comes from
        info.metadata["score_output"] = c.score_output
        info.metadata.setdefault("abstain_score", f"output {c.score_output}")  # a model.json's
    if c.abstain_threshold is not None:
        info.abstain_threshold = c.abstain_threshold
    info.preprocessing = model.preprocessing
    return info


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(
        self, dataplane: DataPlane, registry: ModelRegistry, admission: Admission, calls: CallStats
    ) -> None:
        self.dataplane = dataplane
        self.registry = registry
        self.admission = admission
        self.calls = calls  # the request ledger, which GetModel reports

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        result = await self.dataplane.classify(to_request(request, deadline_of(context)))
        return to_response(request, result)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        result = await self.dataplane.explain(to_explain_request(request, deadline_of(context)))
        return to_explain_response(request, result)

    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Up to streams.STREAM_INFLIGHT requests at once; each response carries its request's id."""
        deadline = deadline_of(context)
        async for response in answer_stream(
            requests,
            lambda r: self._classify(r, deadline),
            error_response,
            self.admission,
            f"/{SERVICE_NAME}/ClassifyStream",
            peer=context.peer(),
        ):
            yield response

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        return to_response(request, await self.dataplane.classify(to_request(request, deadline)))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        registry = self.registry
        return pb.ListModelsResponse(
            models=[model_info(registry, registry.entry(name, 0), self.calls) for name in registry.names()]
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return model_info(self.registry, self.registry.entry(request.name, request.version), self.calls)


class BenchServicer(pb_grpc.BenchServicer):
    """Benchmark-only (`--bench-service`): the transport's own ceiling, no model involved."""

    async def Echo(self, request: pb.EchoMessage, context: grpc.aio.ServicerContext) -> pb.EchoMessage:
        return request
