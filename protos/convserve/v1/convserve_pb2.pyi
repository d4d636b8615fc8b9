from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "top_k", "images", "id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    top_k: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., top_k: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., id: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("class_index", "label", "probability", "error", "abstain", "score")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    class_index: _containers.RepeatedScalarFieldContainer[int]
    label: _containers.RepeatedScalarFieldContainer[str]
    probability: _containers.RepeatedScalarFieldContainer[float]
    error: Error
    abstain: bool
    score: float
    def __init__(self, class_index: _Optional[_Iterable[int]] = ..., label: _Optional[_Iterable[str]] = ..., probability: _Optional[_Iterable[float]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., abstain: _Optional[bool] = ..., score: _Optional[float] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "compute_ms", "other_ms", "total_ms", "batch_sizes", "batches", "trace_id")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    OTHER_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    compute_ms: float
    other_ms: float
    total_ms: float
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    batches: int
    trace_id: str
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., other_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., batches: _Optional[int] = ..., trace_id: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("id", "model", "version", "results", "error", "receipt")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[ImageResult]
    error: Error
    receipt: Receipt
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "layout", "color_mode", "height", "width", "dtype", "scale", "mean", "std", "shape", "channel_order", "resize")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COLOR_MODE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layout: str
    color_mode: str
    height: int
    width: int
    dtype: str
    scale: float
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    shape: _containers.RepeatedScalarFieldContainer[int]
    channel_order: str
    resize: str
    def __init__(self, name: _Optional[str] = ..., layout: _Optional[str] = ..., color_mode: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., dtype: _Optional[str] = ..., scale: _Optional[float] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., shape: _Optional[_Iterable[int]] = ..., channel_order: _Optional[str] = ..., resize: _Optional[str] = ...) -> None: ...

class BatchingSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_delay_ms", "max_queue_size")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_delay_ms: float
    max_queue_size: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("requests", "items", "batches", "batch_sizes", "rejected", "expired", "dropped_rows", "failed", "submitted")
    class BatchSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    requests: int
    items: int
    batches: int
    batch_sizes: _containers.ScalarMap[int, int]
    rejected: int
    expired: int
    dropped_rows: int
    failed: int
    submitted: int
    def __init__(self, requests: _Optional[int] = ..., items: _Optional[int] = ..., batches: _Optional[int] = ..., batch_sizes: _Optional[_Mapping[int, int]] = ..., rejected: _Optional[int] = ..., expired: _Optional[int] = ..., dropped_rows: _Optional[int] = ..., failed: _Optional[int] = ..., submitted: _Optional[int] = ...) -> None: ...

class VersionState(_message.Message):
    __slots__ = ("version", "state", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: str
    reason: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "input", "labels", "output_kind", "batching", "stats", "provider", "state", "reason", "version_states", "model_sha256", "loaded_at", "explain_methods", "metadata", "abstain_threshold", "preprocessing")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_STATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_METHODS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    input: InputSpec
    labels: _containers.RepeatedScalarFieldContainer[str]
    output_kind: str
    batching: BatchingSettings
    stats: ModelStats
    provider: str
    state: str
    reason: str
    version_states: _containers.RepeatedCompositeFieldContainer[VersionState]
    model_sha256: str
    loaded_at: str
    explain_methods: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    abstain_threshold: float
    preprocessing: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., output_kind: _Optional[str] = ..., batching: _Optional[_Union[BatchingSettings, _Mapping]] = ..., stats: _Optional[_Union[ModelStats, _Mapping]] = ..., provider: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., version_states: _Optional[_Iterable[_Union[VersionState, _Mapping]]] = ..., model_sha256: _Optional[str] = ..., loaded_at: _Optional[str] = ..., explain_methods: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., abstain_threshold: _Optional[float] = ..., preprocessing: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "version", "top_k", "images", "id", "methods", "class_index", "activations", "activation_grids", "occlusion_patch", "occlusion_stride")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_GRIDS_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_PATCH_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_STRIDE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    top_k: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    id: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    class_index: int
    activations: bool
    activation_grids: bool
    occlusion_patch: int
    occlusion_stride: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., top_k: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., id: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., class_index: _Optional[int] = ..., activations: _Optional[bool] = ..., activation_grids: _Optional[bool] = ..., occlusion_patch: _Optional[int] = ..., occlusion_stride: _Optional[int] = ...) -> None: ...

class HeatMap(_message.Message):
    __slots__ = ("method", "map")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    method: str
    map: Tensor
    def __init__(self, method: _Optional[str] = ..., map: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BlockActivations(_message.Message):
    __slots__ = ("block", "maps", "caption", "grid_png")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    block: int
    maps: Tensor
    caption: str
    grid_png: bytes
    def __init__(self, block: _Optional[int] = ..., maps: _Optional[_Union[Tensor, _Mapping]] = ..., caption: _Optional[str] = ..., grid_png: _Optional[bytes] = ...) -> None: ...

class ImageExplanation(_message.Message):
    __slots__ = ("result", "class_index", "label", "maps", "model_input", "blocks")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    result: ImageResult
    class_index: int
    label: str
    maps: _containers.RepeatedCompositeFieldContainer[HeatMap]
    model_input: Tensor
    blocks: _containers.RepeatedCompositeFieldContainer[BlockActivations]
    def __init__(self, result: _Optional[_Union[ImageResult, _Mapping]] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., maps: _Optional[_Iterable[_Union[HeatMap, _Mapping]]] = ..., model_input: _Optional[_Union[Tensor, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[BlockActivations, _Mapping]]] = ...) -> None: ...

class OcclusionSettings(_message.Message):
    __slots__ = ("patch", "stride", "copies")
    PATCH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    patch: int
    stride: int
    copies: int
    def __init__(self, patch: _Optional[int] = ..., stride: _Optional[int] = ..., copies: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("id", "model", "version", "methods", "images", "occlusion", "receipt")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    version: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    images: _containers.RepeatedCompositeFieldContainer[ImageExplanation]
    occlusion: OcclusionSettings
    receipt: Receipt
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., images: _Optional[_Iterable[_Union[ImageExplanation, _Mapping]]] = ..., occlusion: _Optional[_Union[OcclusionSettings, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class EchoMessage(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
