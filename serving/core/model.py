"""One loaded model version: its ONNX Runtime session(s), its contract and its own dynamic batcher.

The model's facts come from its own files (ONNX metadata, or the `model.json` sidecar), never from
special cases here. `ServedModel.infer` takes input rows and returns their class probabilities (and
abstain scores, where the graph has a score output: `ServedModel.answers` splits them); the data
plane and the in-process tools (`score --local`, the bench's limit) call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from serving.core.batch_settings import BatchingConfig, BatchStats
from serving.core.batching import PRIORITY_HIGH, DynamicBatcher
from serving.core.certificate import CertificateCheck, check_certificate
from serving.core.contract import (
    SIDECAR_NAME,
    ContractError,
    ModelContract,
    from_metadata,
    from_sidecar,
    has_contract,
)
from serving.core.explain import CAM, EXPLAIN_FILE, OCCLUSION, ExplainGraph, ExplainOutputs
from serving.core.postprocess import softmax
from serving.core.receipt import Receipt
from serving.core.runtime import ModelLoadError, ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def load_contract(model_path: Path, runtime: ModelRuntime) -> ModelContract:
    """The contract from the ONNX metadata, else from the sidecar; checked against the graph's shapes."""
    sidecar = model_path.parent / SIDECAR_NAME
    if has_contract(runtime.metadata):
        contract = from_metadata(runtime.metadata)
    elif sidecar.exists():
        contract = from_sidecar(sidecar, 0)  # labels default to class indices once the output is known
    else:
        raise ContractError(f"{model_path} has no convserve metadata and no {SIDECAR_NAME} sidecar beside it")
    if contract.output is not None:
        try:
            runtime.select_output(contract.output)
        except ModelLoadError as exc:
            raise ContractError(f"output: {exc}") from None
    if contract.score_output is not None:
        check_score_output(contract.score_output, runtime)
    if not contract.labels:
        if runtime.num_classes is None:
            raise ContractError(
                f"{model_path}: the output's class axis is dynamic; the sidecar must list labels"
            )
        contract = dataclasses.replace(contract, labels=tuple(str(i) for i in range(runtime.num_classes)))
    if runtime.input_dtype == np.uint8 and (
        not contract.raw_pixels or any(f != round(f) for f in contract.fit.fill)
    ):
        raise ContractError(
            f"{model_path}: a uint8 input takes the pixels as they are: scale must be 1, mean 0, std 1 "
            "and fill whole numbers"
        )
    static = [d if isinstance(d, int) else None for d in runtime.input_shape[1:]]
    if len(static) != 3 or any(
        s is not None and s != e for s, e in zip(static, contract.image_shape, strict=True)
    ):
        raise ContractError(
            f"{model_path}: graph input {runtime.input_shape} does not match the contract's "
            f"{contract.layout} {list(contract.image_shape)}"
        )
    if runtime.num_classes is not None and runtime.num_classes != len(contract.labels):
        raise ContractError(f"{model_path}: {len(contract.labels)} labels for {runtime.num_classes} outputs")
    return contract


def check_score_output(name: str, runtime: ModelRuntime) -> None:
    """The contract's score output exists and holds one number per image."""
    shapes = dict(runtime.outputs)
    if name == runtime.output_name:
        raise ContractError(f"score_output {name!r} is the output the classes are read from")
    if name not in shapes:
        raise ContractError(f"score_output: no output named {name!r}; the graph has {sorted(shapes)}")
    shape = shapes[name]
    if not 1 <= len(shape) <= 2 or (len(shape) == 2 and shape[1] != 1):
        raise ContractError(
            f"score_output {name!r} has shape {shape}; one score per image is [batch] or [batch, 1]"
        )


class ServedModel:
    """One model version: runtime, contract and batcher; rows in, probabilities (and scores) out."""

    def __init__(
        self, name: str, version: int, path: Path, runtime: ModelRuntime, batching: BatchingConfig
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.runtime = runtime
        self.contract = load_contract(path, runtime)
        self.certificate = self._check_certificate()
        self.batching = batching
        # One worker thread per session; each binds its own session when it starts.
        workers = ThreadPoolExecutor(
            runtime.instances, thread_name_prefix=f"{name}-{version}", initializer=runtime.bind_worker
        )
        config = dataclasses.replace(batching, max_inflight=max(batching.max_inflight, runtime.instances + 1))
        self.batcher = DynamicBatcher(self.predict, config, workers)
        # The explain graph, where the version has one: its own batcher on the same worker threads.
        explain_path = path.parent / EXPLAIN_FILE
        self.explain_graph: ExplainGraph | None = None
        self.explain_batchers: dict[bool, DynamicBatcher] = {}  # with block maps or without
        if explain_path.exists():
            graph = ExplainGraph(explain_path, runtime.options, self.contract, self.input_dtype)
            self.explain_graph = graph
            self.explain_batchers = {
                True: DynamicBatcher(graph.run_packed, config, workers),
                False: DynamicBatcher(graph.run_cam, config, workers),
            }
        self._workers = workers
        self._shape = list(self.contract.image_shape)
        self._dtype_name = self.input_dtype.name
        self.row_nbytes = int(np.prod(self._shape)) * self.input_dtype.itemsize
        # Requests that resolved this version and have not finished (event loop thread only): a version
        # swapped out or removed is closed only once this is back to zero.
        self.in_flight = 0
        self._unused = asyncio.Event()  # set while no request holds this version
        self._unused.set()

    def _check_certificate(self) -> CertificateCheck | None:
        """Refuses (ContractError) a version whose fixtures this server preprocesses or runs otherwise
        than training did, unless the runtime options allow drift: then it serves and says so."""
        check = check_certificate(
            self.path,
            self.contract,
            lambda rows: self.answers(self.predict(rows.astype(self.input_dtype)))[0],
        )
        if check is None or check.passed:
            return check
        if not self.runtime.options.allow_preprocessing_drift:
            raise ContractError(
                f"preprocessing differs from training: {check.drift} (--allow-preprocessing-drift serves it "
                "anyway)"
            )
        log.warning(
            "model %s version %d: preprocessing differs from training: %s; served anyway "
            "(--allow-preprocessing-drift)",
            self.name,
            self.version,
            check.drift,
        )
        return check

    @property
    def preprocessing_drift(self) -> str:
        """Why this version's fixtures did not match ('' when they did or it has none)."""
        return self.certificate.drift if self.certificate is not None else ""

    @property
    def preprocessing(self) -> str:
        """The certificate in words: "passed: N fixtures", "none" or "drift: <reason>"."""
        check = self.certificate
        if check is None:
            return "none"
        return f"drift: {check.drift}" if check.drift else f"passed: {check.fixtures} fixtures"

    @property
    def input_dtype(self) -> np.dtype:
        return self.runtime.input_dtype

    @property
    def stats(self) -> BatchStats:
        return self.batcher.stats

    @property
    def num_classes(self) -> int:
        return len(self.contract.labels)

    def accepts_tensor(self, shape: Iterable[int], dtype: str, size: int) -> bool:
        """A raw tensor in exactly the input's shape, native dtype and byte size (the fast path's check)."""
        return size == self.row_nbytes and dtype == self._dtype_name and list(shape) == self._shape

    def new_rows(self, count: int) -> np.ndarray:
        return np.empty((count, *self.contract.image_shape), dtype=self.input_dtype)

    def predict(self, batch: np.ndarray, session: int | None = None) -> np.ndarray:
        """The batch function: one model call and, for logits models, one softmax over the batch. Its
        rows are the probabilities and, when the contract names a score output, one more column holding
        that score: one array, so the batcher slices each caller's rows out of both at once. `session`:
        one instance's (warm-up), else the runtime picks."""
        score_output = self.contract.score_output
        if score_output is None:
            return self._probabilities(self.runtime.run(batch, session))
        output, scores = self.runtime.run_outputs(batch, [self.runtime.output_name, score_output], session)
        probabilities = self._probabilities(output)
        packed = np.empty((len(probabilities), probabilities.shape[1] + 1), dtype=np.float32)
        packed[:, :-1] = probabilities
        packed[:, -1] = scores.reshape(len(probabilities))
        return packed

    def _probabilities(self, output: np.ndarray) -> np.ndarray:
        kind = self.contract.output_kind
        if kind == "logits":
            return softmax(output.astype(np.float32, copy=False))
        if kind == "log-probabilities":
            return np.exp(output.astype(np.float32, copy=False))
        return output

    def answers(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict`'s (or `infer`'s) rows as the probabilities and the score output's values (None
        without one: the abstain score is then the top probability)."""
        if self.contract.score_output is None:
            return rows, None
        return np.ascontiguousarray(rows[:, :-1]), rows[:, -1].copy()

    async def infer(
        self,
        rows: np.ndarray,
        deadline: float | None = None,
        priority: int = PRIORITY_HIGH,
        receipt: Receipt | None = None,
    ) -> np.ndarray:
        """`predict`'s rows for `rows` (`answers` splits them), batched with every other caller's rows."""
        return await self.batcher.submit(rows, deadline, priority, receipt)

    @property
    def explain_methods(self) -> tuple[str, ...]:
        """What this version can explain with: occlusion always, cam with an explain graph."""
        return (CAM, OCCLUSION) if self.explain_graph is not None else (OCCLUSION,)

    async def explain_rows(
        self,
        rows: np.ndarray,
        deadline: float | None = None,
        blocks: bool = False,
        receipt: Receipt | None = None,
    ) -> ExplainOutputs:
        """The explain graph's outputs for `rows` (block maps only if asked), batched with other
        explanations' rows."""
        if self.explain_graph is None:
            raise RuntimeError(f"{self.name} version {self.version} has no explain graph")
        batcher = self.explain_batchers[blocks]
        return self.explain_graph.unpack(await batcher.submit(rows, deadline, receipt=receipt))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Counts one request using this version, from its resolution to its end."""
        self.in_flight += 1
        self._unused.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._unused.set()

    async def wait_unused(self) -> None:
        """Returns once no request holds this version (new ones must no longer resolve to it); any
        number of callers may wait (each holder clears the event, so it is set only at zero)."""
        while self.in_flight:
            await self._unused.wait()

    def warm_up(self, sizes: Iterable[int] | None = None) -> None:
        """One call per batch size a run can take (or per size given), so live traffic pays for no
        allocation or tuning."""
        for size in sizes or self.runtime.warm_up_sizes(self.batching.max_batch_size):
            batch = np.zeros((size, *self.contract.image_shape), dtype=self.input_dtype)
            for session in range(self.runtime.instances):
                self.predict(batch, session)  # the very outputs live calls fetch
            if self.explain_graph is not None and size == 1:  # explanations come one image at a time
                self.explain_graph.run_packed(batch)

    async def close(self) -> None:
        await self.batcher.close()
        for batcher in self.explain_batchers.values():
            await batcher.close()
        self._workers.shutdown(wait=True)


def load_model(
    name: str, version: int, path: Path, runtime_options: RuntimeOptions, batching: BatchingConfig
) -> ServedModel:
    """Loads one version; any reason it cannot be served is a ModelLoadError naming it."""
    try:
        return ServedModel(name, version, path, ModelRuntime(path, runtime_options), batching)
    except (ContractError, ModelLoadError) as exc:
        raise ModelLoadError(f"cannot serve {name} version {version}: {exc}") from exc
    except Exception as exc:  # onnxruntime raises its own types for a corrupt or unsupported file
        raise ModelLoadError(f"cannot serve {name} version {version}: {type(exc).__name__}: {exc}") from exc
