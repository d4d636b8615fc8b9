"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`): protobuf ↔ data plane.

What Triton, KServe, MLServer and Seldon speak, so `tritonclient` and `perf_analyzer` work unmodified.
Every model takes one of two inputs, both listed by ModelMetadata:
  * its own input tensor, `[N, *image shape]` in the model's dtype (`raw_input_contents` or the typed
    `contents`), taken as one raw batch;
  * `ENCODED_INPUT`, a BYTES tensor `[N]` or `[N, 1]` of encoded images, decoded exactly as
    `convserve.v1` decodes them.
It returns `OUTPUT`, the class probabilities `FP32 [N, classes]`, in `raw_output_contents`; asked with
`parameters["classification"]` = k (Triton's classification extension) it is `BYTES [N, min(k, classes)]`
of "value:index:label" instead. The model repository extension maps onto the registry's states:
`RepositoryIndex` lists every version with its state and reason; `RepositoryModelLoad`/`Unload` work
with `--model-control explicit` and are refused with FAILED_PRECONDITION otherwise.
The protocol has no per-item errors: one unusable image fails the whole request (INVALID_ARGUMENT
naming the input and the image); `convserve.v1` has per-image errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import json_format

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from serving.core.dataplane import DataPlane
from serving.core.errors import InvalidInput, Unimplemented, shown
from serving.core.model import ServedModel
from serving.core.types import PredictRequest, PredictResult, RawBatch
from serving.models.lifecycle import ModelLifecycle
from serving.models.registry import ModelRegistry, VersionState
from serving.protocols.admission import Admission
from serving.protocols.calls import CallStats, Reading
from serving.protocols.convserve_v1 import deadline_of
from serving.protocols.inference_codec import (
    DTYPES,
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
    receipt_parameters,
    served_input,
)
from serving.protocols.receipts import current
from serving.protocols.streams import answer_stream

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
DATA_METHODS = (f"/{SERVICE_NAME}/ModelInfer", f"/{SERVICE_NAME}/ModelStreamInfer")
PROTOCOL = "kserve_v2"  # the metrics' protocol label


def asked(request: pb.ModelInferRequest) -> tuple[str, int]:
    return request.model_name, parse_version(request.model_version)


def answered(response: pb.ModelInferResponse) -> tuple[str, str, int]:
    """(model, version, images) of an answer."""
    outputs = response.outputs
    images = outputs[0].shape[0] if outputs and outputs[0].shape else 0
    return response.model_name, response.model_version, images


def answered_stream(response: pb.ModelStreamInferResponse) -> tuple[str, str, int] | None:
    return None if response.error_message else answered(response.infer_response)


def stream_error(
    request: pb.ModelInferRequest, code: grpc.StatusCode, message: str
) -> pb.ModelStreamInferResponse:
    """A stream request that failed: the message, and (as Triton fills it) the request's id, model and
    version, so that a client matches the error to its request (answers come back as they are ready)."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            id=request.id, model_name=request.model_name, model_version=request.model_version
        ),
    )


def not_offered(rpc: str, why: str) -> Callable[..., Awaitable[None]]:
    """A servicer method for an RPC of the protocol this server does not offer: UNIMPLEMENTED, saying so."""

    async def method(self: object, request: object, context: grpc.aio.ServicerContext) -> None:
        raise Unimplemented(f"{rpc} is not implemented by this server: {why}")

    method.__name__ = rpc
    return method


SHARED_MEMORY = "send tensors in the request (raw_input_contents or contents)"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        registry: ModelRegistry,
        admission: Admission,
        lifecycle: ModelLifecycle,
        calls: CallStats,
    ) -> None:
        self.dataplane = dataplane
        self.registry = registry
        self.admission = admission
        self.lifecycle = lifecycle
        self.calls = calls  # the request ledger, which ModelStatistics reports

    # Health and metadata -------------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.registry.ready()) and not self.admission.draining)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        entry = self.registry.entry(request.name, parse_version(request.version))
        ready = entry.state is VersionState.READY and not self.admission.draining
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.registry.resolve(request.name, parse_version(request.version))
        return json_format.ParseDict(model_metadata(model, self.registry), pb.ModelMetadataResponse())

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self.registry.resolve(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=model_config(model, *files_of(self.registry, model)))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            entries = [self.registry.entry(request.name, parse_version(request.version))]
        else:
            entries = self.registry.entries()
        return pb.ModelStatisticsResponse(
            model_stats=[self._statistics(e.model) for e in entries if e.model is not None]
        )

    def _statistics(self, model: ServedModel) -> pb.ModelStatistics:
        return model_statistics(model, self.calls)

    # Model repository extension ---------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every version the registry knows, with its state and reason; `ready` keeps the READY ones.
        There is one repository, so `repository_name` is not looked at."""
        Index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                Index(name=e.name, version=str(e.version), state=e.state.value, reason=e.reason)
                for e in self.registry.entries()
                if not request.ready or e.state is VersionState.READY
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Loads or reloads a model's versions from the repository (--model-control explicit)."""
        self.lifecycle.require_explicit("load")  # outside explicit mode: FAILED_PRECONDITION first
        if request.parameters:
            raise InvalidInput("RepositoryModelLoad takes no parameters; put the files in the repository")
        await self.lifecycle.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Drains and unloads every version of a model (--model-control explicit); returns once no new
        call can reach it, while the calls already admitted finish."""
        await self.lifecycle.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # Inference ----------------------------------------------------------------------------------

    # Extensions not offered (Triton's base class would answer them INTERNAL) ---------------------

    SystemSharedMemoryStatus = not_offered("SystemSharedMemoryStatus", SHARED_MEMORY)
    SystemSharedMemoryRegister = not_offered("SystemSharedMemoryRegister", SHARED_MEMORY)
    SystemSharedMemoryUnregister = not_offered("SystemSharedMemoryUnregister", SHARED_MEMORY)
    CudaSharedMemoryStatus = not_offered("CudaSharedMemoryStatus", SHARED_MEMORY)
    CudaSharedMemoryRegister = not_offered("CudaSharedMemoryRegister", SHARED_MEMORY)
    CudaSharedMemoryUnregister = not_offered("CudaSharedMemoryUnregister", SHARED_MEMORY)
    TraceSetting = not_offered("TraceSetting", "there is no request tracing")
    LogSettings = not_offered("LogSettings", "logging is set by the server's command line")

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Up to streams.STREAM_INFLIGHT requests at once; one response each (errors in error_message)."""
        deadline = deadline_of(context)
        async for response in answer_stream(
            requests,
            lambda r: self._stream_infer(r, deadline),
            stream_error,
            self.admission,
            f"/{SERVICE_NAME}/ModelStreamInfer",
            peer=context.peer(),
        ):
            yield response

    async def _stream_infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        model = self.registry.resolve(request.model_name, parse_version(request.model_version))
        classify = requested_outputs(request)
        index = served_input([tensor.name for tensor in request.inputs], model)
        predict = PredictRequest(
            to_inputs(request, model, index),
            model.name,
            model.version,
            deadline,
            request.inputs[index].name,
            current(),
        )
        result = await self.dataplane.predict(predict)
        response = to_response(request, result, classify)
        if len(request.inputs) > 1:
            response.parameters[IGNORED].string_param = ENCODED_INPUT
        return response


def requested_outputs(request: pb.ModelInferRequest) -> int | None:
    """None for the probabilities, or k for the classification extension's top-k strings."""
    if not request.outputs:
        return None
    if len(request.outputs) > 1:
        raise InvalidInput(f"this model has one output, {OUTPUT!r}; {len(request.outputs)} were requested")
    output = request.outputs[0]
    k: object = None
    if "classification" in output.parameters:
        parameter = output.parameters["classification"]
        kind = parameter.WhichOneof("parameter_choice")
        k = getattr(parameter, kind) if kind in ("int64_param", "uint64_param") else 0
    return classification_k(output.name, k)


def to_inputs(request: pb.ModelInferRequest, model: ServedModel, index: int = 0) -> RawBatch | list[bytes]:
    tensor = request.inputs[index]
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(
            f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} input(s)"
        )
    raw = request.raw_input_contents[index] if request.raw_input_contents else None
    if raw is not None and tensor.contents.ListFields():
        raise InvalidInput(
            f"input {shown(tensor.name)}: send the data in raw_input_contents or in contents, not in both"
        )
    elements = None
    if raw is None:
        if tensor.datatype == "BYTES":
            elements = tensor.contents.bytes_contents
        elif tensor.datatype in DTYPES:
            elements = getattr(tensor.contents, DTYPES[tensor.datatype][1])
    return decode_input(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), raw, elements), model)


def to_response(request: pb.ModelInferRequest, result: PredictResult, k: int | None) -> pb.ModelInferResponse:
    probabilities = result.probabilities
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request.id
    )
    if k is None:
        response.outputs.add(name=OUTPUT, datatype="FP32", shape=probabilities.shape)
        response.raw_output_contents.append(probabilities.astype("<f4", copy=False).tobytes())
    else:
        shape, elements = classification_strings(result, k)
        response.outputs.add(name=OUTPUT, datatype="BYTES", shape=shape)
        response.raw_output_contents.append(join_bytes(elements))
    # On the response, not the output: readers such as perf_analyzer take an output's parameters for
    # the binary data extension's.
    for key, text in abstain_parameters(result).items():
        response.parameters[key].string_param = text
    for key, value in receipt_parameters(current()).items():
        if isinstance(value, str):
            response.parameters[key].string_param = value
        else:
            response.parameters[key].double_param = value
    return response


# How the metrics read this protocol's requests and answers (the call gate, `gate.CallGate`).
COUNTED = {
    DATA_METHODS[0]: Reading(PROTOCOL, pb.ModelInferRequest.FromString, asked, answered),
    DATA_METHODS[1]: Reading(PROTOCOL, pb.ModelInferRequest.FromString, asked, answered_stream),
}
