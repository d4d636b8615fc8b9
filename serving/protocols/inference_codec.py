"""The Open Inference Protocol's codec, shared by its gRPC (`kserve_v2`) and REST (`rest_v2`) forms.

What both forms say the same way: the datatypes and their numpy twins, version strings, the BYTES
tensor's framing (each element a 4-byte little-endian length, then its bytes: tritonclient's
serialisation, in gRPC's `raw_input_contents` and in REST's binary tensor extension), the two inputs
every model takes (its own tensor, or `image_bytes` of encoded images), the one output and Triton's
classification extension ("value:index:label" strings), the model metadata, configuration and
statistics, and the per-version request counts those statistics report (one table for both forms).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc
from serving.core.contract import CALIBRATION_KEYS
from serving.core.errors import InvalidInput, shown
from serving.core.model import ServedModel
from serving.core.postprocess import top_k
from serving.core.receipt import Receipt
from serving.core.types import PredictResult, RawBatch
from serving.core.version import VERSION
from serving.models.registry import ModelRegistry
from serving.protocols.calls import CallStats

if TYPE_CHECKING:  # a message's DESCRIPTOR is the upb (C) descriptor at run time; the stubs type both
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

    FieldDescriptor = pb_descriptor.FieldDescriptor | UpbFieldDescriptor

EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
SERVER_NAME = "convserve"
SERVER_VERSION = VERSION
PLATFORM = "onnxruntime_onnx"
ENCODED_INPUT = "image_bytes"
OUTPUT = "probabilities"
IGNORED = "ignored_inputs"  # a response parameter: the inputs of the request that were not read
LENGTH = struct.Struct("<I")
MAX_VERSION_DIGITS = 18  # an int64 (and `int` refuses strings of over 4,300 digits)

# KServe datatype ↔ numpy, and which typed `contents` field of the gRPC form holds it.
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


def config_dtype(name: str) -> mc.DataType:
    # The generated stub's EnumTypeWrapper.Value says int; the value is a DataType member.
    return cast("mc.DataType", mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"))


def parse_version(version: str) -> int:
    """'' is the newest ready version; otherwise a positive integer in ASCII digits that fits int64
    ("²" and "١" are digits to `str.isdigit`: `int` refuses the first and reads the second as 1)."""
    if not version:
        return 0
    digits = len(version) <= MAX_VERSION_DIGITS and version.isascii() and version.isdigit()
    if not digits or int(version) < 1:
        raise InvalidInput(f"model version must be a positive integer, got {shown(version)}")
    return int(version)


def split_bytes(data: bytes, count: int, name: str) -> list[bytes]:
    """A serialized BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
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


def join_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(e)) + e for e in elements)


# Inputs ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class InputTensor:
    """One request input as either form carries it: raw bytes (gRPC raw_input_contents, REST binary
    extension) or a flat list of elements (gRPC typed contents, REST JSON `data`)."""

    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None
    elements: Sequence[Any] | None = None


def served_input(names: Sequence[str], model: ServedModel) -> int:
    """The index of the input a request is served from: its only one or, when it carries both inputs the
    metadata lists (perf_analyzer's default, random-data run sends every input listed), the model's
    tensor; the encoded images are then not read, and the response says so (IGNORED)."""
    if len(names) == 1:
        return 0
    if sorted(names) == sorted((model.runtime.input_name, ENCODED_INPUT)):
        return list(names).index(model.runtime.input_name)
    raise InvalidInput(
        f"send one input, {model.runtime.input_name!r} (a tensor) or {ENCODED_INPUT!r} "
        f"(encoded images), or both (the tensor is used); the request has {len(names)}"
    )


def decode_input(tensor: InputTensor, model: ServedModel) -> RawBatch | list[bytes]:
    """The data plane's input for one tensor: a raw batch of the model's input, or encoded images."""
    name, shape = tensor.name, tensor.shape
    if name == ENCODED_INPUT:
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {name!r} must be BYTES, got {shown(tensor.datatype)}")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise InvalidInput(f"input {name!r} must have shape [N] or [N, 1], got {shown(shape)}")
        if tensor.raw is not None:
            return split_bytes(tensor.raw, shape[0], name)
        elements = list(tensor.elements or ())
        if len(elements) != shape[0]:
            raise InvalidInput(
                f"input {name!r}: shape says {shape[0]} elements, contents hold {len(elements)}"
            )
        return elements
    if name != model.runtime.input_name:
        raise InvalidInput(
            f"unknown input {shown(name)}; model {model.name!r} takes {model.runtime.input_name!r} "
            f"or {ENCODED_INPUT!r}"
        )
    expected = kserve_dtype(model.input_dtype)
    if tensor.datatype != expected:
        raise InvalidInput(f"input {name!r} must be {expected}, got {shown(tensor.datatype)}")
    dtype = DTYPES[expected][0]
    raw = tensor.raw
    if raw is None:
        try:
            raw = np.asarray(tensor.elements or [], dtype=dtype).tobytes()
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(f"input {name!r}: data is not a list of {expected} numbers") from None
    return RawBatch(shape, dtype.str, raw)


def classification_k(name: str, value: Any) -> int | None:
    """Checks one requested output: None for the probabilities, or k for the classification extension.
    `value` is the output's `classification` parameter as sent (None when absent)."""
    if name != OUTPUT:
        raise InvalidInput(f"unknown output {shown(name)}; this model's output is {OUTPUT!r}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput("output parameter 'classification' must be a positive integer")
    return value


# Outputs -----------------------------------------------------------------------------------------


def classification_strings(result: PredictResult, k: int) -> tuple[list[int], list[bytes]]:
    """Triton's classification output: shape [N, min(k, classes)] of b"value:index:label"."""
    indices, values = top_k(result.probabilities, k)
    labels = result.labels
    # Triton prints the value with C++ std::to_string: six decimals.
    elements = [
        f"{value:f}:{index}:{labels[index]}".encode()
        for index_row, value_row in zip(indices.tolist(), values.tolist(), strict=True)
        for index, value in zip(index_row, value_row, strict=True)
    ]
    return list(indices.shape), elements


# Metadata, configuration, statistics ------------------------------------------------------------


def abstain_parameters(result: PredictResult) -> dict[str, str]:
    """The response's parameters `abstain` and `score`, one entry per image as JSON lists in strings
    (a parameter holds one scalar): `[false, true]`, `[0.98, 0.31]`. Empty for a result without them."""
    if result.scores is None or result.abstain is None:
        return {}
    return {
        "abstain": json.dumps(result.abstain.tolist()),
        "score": json.dumps([float(s) for s in result.scores.tolist()]),
    }


def receipt_parameters(receipt: Receipt | None) -> dict[str, float | str]:
    """The request's receipt as response parameters (sealed now): `decode_ms`, `queue_ms`, `compute_ms`,
    `other_ms` and `total_ms` (doubles; the first four add up to the total), `batch_sizes` ("8" or
    "32,32") and `trace_id` (strings)."""
    if receipt is None:
        return {}
    fields = receipt.seal().fields()
    fields.pop("model", None)  # the response names its model and version already
    fields.pop("model_version", None)
    return fields


def model_metadata(model: ServedModel, registry: ModelRegistry) -> dict[str, Any]:
    """ModelMetadataResponse as the REST form's JSON; the gRPC form parses it into its message."""
    return {
        "name": model.name,
        "versions": [str(v) for v, e in sorted(registry.versions(model.name).items()) if not e.gone],
        "platform": PLATFORM,
        "inputs": [
            {
                "name": model.runtime.input_name,
                "datatype": kserve_dtype(model.input_dtype),
                "shape": [-1, *model.contract.image_shape],
            },
            {"name": ENCODED_INPUT, "datatype": "BYTES", "shape": [-1, 1]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, model.num_classes]}],
    }


def model_config(model: ServedModel, sha256: str = "", loaded_at: str = "") -> mc.ModelConfig:
    """Triton's model configuration; `parameters` carry the model file's SHA-256 and when the version was
    loaded, as GetModel shows them (a model.onnx replaced under the same version changes both)."""
    batching = model.batcher.config
    return mc.ModelConfig(
        parameters={
            "model_sha256": mc.ModelParameter(string_value=sha256),
            "loaded_at": mc.ModelParameter(string_value=loaded_at),
            # As GetModel: the certificate's state, and the calibration the export wrote.
            "preprocessing": mc.ModelParameter(string_value=model.preprocessing),
            **{
                key: mc.ModelParameter(string_value=str(value))
                for key, value in calibration_facts(model).items()
            },
        },
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
    )


def calibration_facts(model: ServedModel) -> dict[str, str]:
    """abstain_threshold and score_output (when set); temperature, ece_before, ece_after, abstain_score
    and the AUROCs it was chosen by (when export wrote them)."""
    contract = model.contract
    facts = {k: contract.extra[k] for k in CALIBRATION_KEYS if k in contract.extra}
    if contract.abstain_threshold is not None:
        facts["abstain_threshold"] = f"{contract.abstain_threshold:.9g}"
    if contract.score_output is not None:
        facts["score_output"] = contract.score_output
    return facts


def model_statistics(model: ServedModel, calls: CallStats) -> pb.ModelStatistics:
    """Triton's statistics of one version: its requests over every protocol, from the request ledger
    (the figures GetModel and convserve_requests_total report), and its batches from the batcher."""
    stats = model.stats
    requests = calls.of_version(model.name, model.version)
    Duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=requests.last_ms,
        inference_count=stats.items,
        execution_count=stats.batches,
        inference_stats=pb.InferStatistics(
            success=Duration(count=requests.ok, ns=round(requests.ok_s * 1e9)),
            fail=Duration(count=requests.failed, ns=round(requests.failed_s * 1e9)),
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


_INTEGERS = {
    pb_descriptor.FieldDescriptor.TYPE_INT64,
    pb_descriptor.FieldDescriptor.TYPE_UINT64,
    pb_descriptor.FieldDescriptor.TYPE_SINT64,
    pb_descriptor.FieldDescriptor.TYPE_FIXED64,
    pb_descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def proto_json(message: Message, defaults: bool = True, base64_bytes: bool = False) -> dict[str, Any]:
    """A message as Triton's REST form writes it: field names as in the .proto, 64-bit integers as JSON
    numbers (protobuf's own JSON mapping writes them as strings), enums by name; with `defaults`, every
    scalar and list written even at its default (readers such as perf_analyzer expect a count of 0, not
    no count); a sub-message and a oneof member only when set. Without `defaults`, only what is set.
    Bytes fields as latin-1 text (Triton's BYTES parameters), or base64 as protobuf's JSON writes them."""
    if not defaults:
        return {d.name: _json_value(d, value, defaults, base64_bytes) for d, value in message.ListFields()}
    out: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        optional = descriptor.message_type is not None or descriptor.containing_oneof is not None
        if not descriptor.is_repeated and optional and not message.HasField(descriptor.name):
            continue
        out[descriptor.name] = _json_value(
            descriptor, getattr(message, descriptor.name), defaults, base64_bytes
        )
    return out


def _json_value(descriptor: FieldDescriptor, value: Any, defaults: bool, b64: bool) -> Any:
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        value_field = descriptor.message_type.fields_by_name["value"]
        return {key: _scalar(value_field, item, defaults, b64) for key, item in value.items()}
    if descriptor.is_repeated:
        return [_scalar(descriptor, item, defaults, b64) for item in value]
    return _scalar(descriptor, value, defaults, b64)


def _scalar(descriptor: FieldDescriptor, value: Any, defaults: bool, b64: bool) -> Any:
    if descriptor.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
        return proto_json(value, defaults, b64)
    if descriptor.type == pb_descriptor.FieldDescriptor.TYPE_ENUM:
        assert descriptor.enum_type is not None  # an enum field always has its enum's descriptor
        return descriptor.enum_type.values_by_number[value].name
    if descriptor.type == pb_descriptor.FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii") if b64 else value.decode("latin-1")
    if descriptor.type in _INTEGERS:
        return int(value)
    return value


def files_of(registry: ModelRegistry, model: ServedModel) -> tuple[str, str]:
    """(SHA-256 of the model file, when it was loaded) of a served version, for its configuration."""
    entry = registry.entry(model.name, model.version)
    return entry.sha256, entry.loaded_at_text
