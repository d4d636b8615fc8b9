"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`): protobuf ↔ data plane.

What Triton, KServe, MLServer and Seldon speak, so `tritonclient` and `perf_analyzer` work unmodified.
Every model takes one of two inputs, both listed by ModelMetadata:
  * its own input tensor, `[N, *image shape]` in the model's dtype (`raw_input_contents` or the typed
    `contents`), taken as one raw batch;
  * `ENCODED_INPUT`, a BYTES tensor `[N]` or `[N, 1]` of encoded images, decoded exactly as
    `convserve.v1` decodes them.
A request carrying both (perf_analyzer's default run sends every input listed) is served from the
tensor, and its response's parameter `ignored_inputs` names `ENCODED_INPUT`.
It returns `OUTPUT`, the class probabilities `FP32 [N, classes]`, in `raw_output_contents`; asked with
`parameters["classification"]` = k (Triton's classification extension) it is `BYTES [N, min(k, classes)]`
of "value:index:label" instead. The model repository extension maps onto the registry's states:
`RepositoryIndex` lists every version with its state and reason; `RepositoryModelLoad`/`Unload` work
with `--model-control explicit` and are refused with FAILED_PRECONDITION otherwise.
The protocol has no per-item errors: one unusable image fails the whole request (INVALID_ARGUMENT
naming the input and the image); `convserve.v1` has per-image errors.
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from serving.core.dataplane import DataPlane
from serving.core.errors import InvalidInput, Unimplemented, shown
from serving.core.model import ServedModel
from serving.core.postprocess import top_k
from serving.core.types import PredictRequest, PredictResult, RawBatch
from serving.models.lifecycle import ModelLifecycle
from serving.models.registry import ModelRegistry, VersionState
from serving.protocols.admission import Admission
from serving.protocols.calls import Reading
from serving.protocols.convserve_v1 import deadline_of
from serving.protocols.streams import answer_stream

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
DATA_METHODS = (f"/{SERVICE_NAME}/ModelInfer", f"/{SERVICE_NAME}/ModelStreamInfer")
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
SERVER_NAME = "convserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
ENCODED_INPUT = "image_bytes"
OUTPUT = "probabilities"
IGNORED = "ignored_inputs"  # a response parameter: the inputs of the request that were not read
LENGTH = struct.Struct("<I")
MAX_VERSION_DIGITS = 18  # an int64 (and `int` refuses strings of over 4,300 digits)

PROTOCOL = "kserve_v2"  # the metrics' protocol label

# KServe datatype ↔ numpy, and which typed `contents` field holds it.
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), "fp32_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
KSERVE_NAME = {dtype.newbyteorder("="): name for name, (dtype, _) in DTYPES.items()}


def kserve_dtype(dtype: np.dtype) -> str:
    return KSERVE_NAME.get(dtype.newbyteorder("="), "BYTES")


def config_dtype(name: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


def parse_version(version: str) -> int:
    """'' is the newest ready version; otherwise a positive integer in ASCII digits that fits int64
    ("²" and "١" are digits to `str.isdigit`: `int` refuses the first and reads the second as 1)."""
    if not version:
        return 0
    if (
        not (len(version) <= MAX_VERSION_DIGITS and version.isascii() and version.isdigit())
        or int(version) < 1
    ):
        raise InvalidInput(f"model version must be a positive integer, got {shown(version)}")
    return int(version)


def asked(request: pb.ModelInferRequest) -> tuple[str, int]:
    return request.model_name, parse_version(request.model_version)


def answered(response: pb.ModelInferResponse) -> tuple[str, str, int]:
    """(model, version, images) of an answer."""
    outputs = response.outputs
    images = outputs[0].shape[0] if outputs and outputs[0].shape else 0
    return response.model_name, response.model_version, images


def answered_stream(response: pb.ModelStreamInferResponse) -> tuple[str, str, int] | None:
    return None if response.error_message else answered(response.infer_response)


def split_bytes(data: bytes, count: int, name: str) -> list[bytes]:
    """tritonclient's serialized BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    offset, size = 0, len(data)
    while offset < size:
        if offset + 4 > size:
            raise InvalidInput(f"input {shown(name)}: element {len(elements)} has a truncated length prefix")
        (length,) = LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(
                f"input {shown(name)}: element {len(elements)} claims {length} bytes; {size - offset} remain"
            )
        elements.append(data[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise InvalidInput(
            f"input {shown(name)}: shape says {count} elements, the data holds {len(elements)}"
        )
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(e)) + e for e in elements)


@dataclass(slots=True)
class Counter:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class RequestStats:
    """Per model version: the requests this protocol answered (Triton's success and fail)."""

    success: Counter
    fail: Counter
    last_inference_ms: int = 0


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
    ) -> None:
        self.dataplane = dataplane
        self.registry = registry
        self.admission = admission
        self.lifecycle = lifecycle
        self.requests: dict[tuple[str, int], RequestStats] = {}

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
        Tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v, e in sorted(self.registry.versions(model.name).items()) if not e.gone],
            platform=PLATFORM,
            inputs=[
                Tensor(
                    name=model.runtime.input_name,
                    datatype=kserve_dtype(model.input_dtype),
                    shape=[-1, *model.contract.image_shape],
                ),
                Tensor(name=ENCODED_INPUT, datatype="BYTES", shape=[-1, 1]),
            ],
            outputs=[Tensor(name=OUTPUT, datatype="FP32", shape=[-1, model.num_classes])],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        entry = self.registry.entry(request.name, parse_version(request.version))
        model = self.registry.resolve(entry.name, entry.version)
        batching = model.batcher.config
        config = mc.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=batching.max_batch_size,
            input=[
                mc.ModelInput(
                    name=model.runtime.input_name,
                    data_type=config_dtype(kserve_dtype(model.input_dtype)),
                    dims=list(model.contract.image_shape),
                    optional=True,
                ),
                # Either input, not both: optional, so perf_analyzer sends only the one it has data for.
                mc.ModelInput(name=ENCODED_INPUT, data_type=mc.TYPE_STRING, dims=[1], optional=True),
            ],
            output=[mc.ModelOutput(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[model.num_classes])],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=int(batching.max_delay_s * 1e6)
            ),
            # The files this version was loaded from, as GetModel shows them: a model.onnx replaced
            # under the same version (and reloaded) changes both.
            parameters={
                "model_sha256": mc.ModelParameter(string_value=entry.sha256),
                "loaded_at": mc.ModelParameter(string_value=entry.loaded_at_text),
            },
        )
        return pb.ModelConfigResponse(config=config)

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
        stats = model.stats
        requests = self.requests.get((model.name, model.version)) or RequestStats(Counter(), Counter())
        Duration = pb.StatisticDuration
        return pb.ModelStatistics(
            name=model.name,
            version=str(model.version),
            last_inference=requests.last_inference_ms,
            inference_count=stats.items,
            execution_count=stats.batches,
            inference_stats=pb.InferStatistics(
                success=Duration(count=requests.success.count, ns=requests.success.ns),
                fail=Duration(count=requests.fail.count, ns=requests.fail.ns),
                queue=Duration(count=stats.queued, ns=stats.queue_ns),
                # Stacking and the model call are timed together, as compute_infer; input and output
                # carry the same count (perf_analyzer requires it) and no time of their own.
                compute_input=Duration(count=stats.batches),
                compute_infer=Duration(count=stats.batches, ns=stats.compute_ns),
                compute_output=Duration(count=stats.batches),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=Duration(count=count),
                    compute_infer=Duration(count=count, ns=stats.batch_compute_ns[size]),
                    compute_output=Duration(count=count),
                )
                for size, count in sorted(stats.batch_sizes.items())
            ],
        )

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

    # Extensions not offered (Triton's base class would answer them INTERNAL) ---------------------

    SystemSharedMemoryStatus = not_offered("SystemSharedMemoryStatus", SHARED_MEMORY)
    SystemSharedMemoryRegister = not_offered("SystemSharedMemoryRegister", SHARED_MEMORY)
    SystemSharedMemoryUnregister = not_offered("SystemSharedMemoryUnregister", SHARED_MEMORY)
    CudaSharedMemoryStatus = not_offered("CudaSharedMemoryStatus", SHARED_MEMORY)
    CudaSharedMemoryRegister = not_offered("CudaSharedMemoryRegister", SHARED_MEMORY)
    CudaSharedMemoryUnregister = not_offered("CudaSharedMemoryUnregister", SHARED_MEMORY)
    TraceSetting = not_offered("TraceSetting", "there is no request tracing")
    LogSettings = not_offered("LogSettings", "logging is set by the server's command line")

    # Inference ----------------------------------------------------------------------------------

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
        ):
            yield response

    async def _stream_infer(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        key: tuple[str, int] | None = None
        try:
            model = self.registry.resolve(request.model_name, parse_version(request.model_version))
            key = (model.name, model.version)
            classify = requested_outputs(request)
            index = served_input(request, model)
            predict = PredictRequest(
                to_inputs(request, model, index),
                model.name,
                model.version,
                deadline,
                request.inputs[index].name,
            )
            result = await self.dataplane.predict(predict)
            response = to_response(request, result, classify)
            if len(request.inputs) > 1:
                response.parameters[IGNORED].string_param = ENCODED_INPUT
        except Exception:
            if key is not None:
                self._stats(key).fail.add(time.perf_counter_ns() - started)
            raise
        stats = self._stats(key)
        stats.success.add(time.perf_counter_ns() - started)
        stats.last_inference_ms = int(time.time() * 1000)
        return response

    def _stats(self, key: tuple[str, int]) -> RequestStats:
        stats = self.requests.get(key)
        if stats is None:
            stats = self.requests[key] = RequestStats(Counter(), Counter())
        return stats


def requested_outputs(request: pb.ModelInferRequest) -> int | None:
    """None for the probabilities, or k for the classification extension's top-k strings."""
    if not request.outputs:
        return None
    if len(request.outputs) > 1:
        raise InvalidInput(f"this model has one output, {OUTPUT!r}; {len(request.outputs)} were requested")
    output = request.outputs[0]
    if output.name != OUTPUT:
        raise InvalidInput(f"unknown output {shown(output.name)}; this model's output is {OUTPUT!r}")
    if "classification" not in output.parameters:
        return None
    parameter = output.parameters["classification"]
    kind = parameter.WhichOneof("parameter_choice")
    k = getattr(parameter, kind) if kind in ("int64_param", "uint64_param") else None
    if k is None or k < 1:
        raise InvalidInput("output parameter 'classification' must be a positive integer")
    return int(k)


def served_input(request: pb.ModelInferRequest, model: ServedModel) -> int:
    """The index of the input a request is served from: its only one or, when it carries both inputs
    ModelMetadata lists (perf_analyzer's default, random-data run sends every input listed), the
    model's tensor; the encoded images are then not read, and the response says so (IGNORED)."""
    names = [tensor.name for tensor in request.inputs]
    if len(names) == 1:
        return 0
    if sorted(names) == sorted((model.runtime.input_name, ENCODED_INPUT)):
        return names.index(model.runtime.input_name)
    raise InvalidInput(
        f"send one input, {model.runtime.input_name!r} (a tensor) or {ENCODED_INPUT!r} "
        f"(encoded images), or both (the tensor is used); the request has {len(names)}"
    )


def to_inputs(request: pb.ModelInferRequest, model: ServedModel, index: int = 0) -> RawBatch | list[bytes]:
    tensor = request.inputs[index]
    name, shape = tensor.name, list(tensor.shape)
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(
            f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} input(s)"
        )
    raw = request.raw_input_contents[index] if request.raw_input_contents else None
    if raw is not None and tensor.contents.ListFields():
        raise InvalidInput(
            f"input {shown(name)}: send the data in raw_input_contents or in contents, not in both"
        )
    if name == ENCODED_INPUT:
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {shown(name)} must be BYTES, got {shown(tensor.datatype)}")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise InvalidInput(f"input {shown(name)} must have shape [N] or [N, 1], got {shown(shape)}")
        if raw is not None:
            return split_bytes(raw, shape[0], name)
        elements = list(tensor.contents.bytes_contents)
        if len(elements) != shape[0]:
            raise InvalidInput(
                f"input {shown(name)}: shape says {shape[0]} elements, contents hold {len(elements)}"
            )
        return elements
    if name != model.runtime.input_name:
        raise InvalidInput(
            f"unknown input {shown(name)}; model {model.name!r} takes {model.runtime.input_name!r} "
            f"or {ENCODED_INPUT!r}"
        )
    expected = kserve_dtype(model.input_dtype)
    if tensor.datatype != expected:
        raise InvalidInput(f"input {shown(name)} must be {expected}, got {shown(tensor.datatype)}")
    dtype, field = DTYPES[expected]
    if raw is None:
        values = getattr(tensor.contents, field)
        raw = np.asarray(values, dtype=dtype).tobytes()
    return RawBatch(shape, dtype.str, raw)


def to_response(request: pb.ModelInferRequest, result: PredictResult, k: int | None) -> pb.ModelInferResponse:
    probabilities = result.probabilities
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=str(result.version), id=request.id
    )
    if k is None:
        response.outputs.add(name=OUTPUT, datatype="FP32", shape=probabilities.shape)
        response.raw_output_contents.append(probabilities.astype("<f4", copy=False).tobytes())
        return response
    indices, values = top_k(probabilities, k)
    labels = result.labels
    # Triton prints the value with C++ std::to_string: six decimals.
    elements = [
        f"{value:f}:{index}:{labels[index]}".encode()
        for index_row, value_row in zip(indices.tolist(), values.tolist(), strict=True)
        for index, value in zip(index_row, value_row, strict=True)
    ]
    response.outputs.add(name=OUTPUT, datatype="BYTES", shape=indices.shape)
    response.raw_output_contents.append(join_bytes(elements))
    return response


# How the metrics read this protocol's requests and answers (the CallCounter interceptor).
COUNTED = {
    DATA_METHODS[0]: Reading(PROTOCOL, pb.ModelInferRequest.FromString, asked, answered),
    DATA_METHODS[1]: Reading(PROTOCOL, pb.ModelInferRequest.FromString, asked, answered_stream),
}
