"""The model repository: `MODELS/<name>/<version>/model.onnx`, found, loaded and held.

Each model's facts come from its own files (ONNX metadata, or the `model.json` sidecar), never from
special cases here. Each loaded version gets its runtime and its own dynamic batcher. `ServedModel`
is the protobuf-free core of a classification: input rows in, top-k out, used by the gRPC service,
by `score --local` and by `bench`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.batching import BatchingConfig, DynamicBatcher
from serving.contract import (
    SIDECAR_NAME,
    ContractError,
    ModelContract,
    from_metadata,
    from_sidecar,
    has_contract,
)
from serving.postprocess import softmax, top_k
from serving.runtime import ModelLoadError, ModelRuntime, RuntimeOptions

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class ModelNotFoundError(LookupError):
    """No such model or version in the repository."""


def discover(root: Path) -> dict[str, dict[int, Path]]:
    """{name: {version: path to model.onnx}} for every `root/<name>/<int>/model.onnx`."""
    if not root.is_dir():
        raise ModelNotFoundError(f"model repository {root} does not exist")
    found: dict[str, dict[int, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = {
            int(v.name): v / MODEL_FILE
            for v in model_dir.iterdir()
            if v.is_dir() and v.name.isdigit() and (v / MODEL_FILE).is_file()
        }
        if versions:
            found[model_dir.name] = dict(sorted(versions.items()))
    return found


def load_contract(model_path: Path, runtime: ModelRuntime) -> ModelContract:
    """The contract from the ONNX metadata, else from the sidecar; checked against the graph's shapes."""
    sidecar = model_path.parent / SIDECAR_NAME
    if has_contract(runtime.metadata):
        contract = from_metadata(runtime.metadata)
    elif sidecar.exists():
        if runtime.num_classes is None:
            raise ContractError(
                f"{model_path}: the output's class axis is dynamic; the sidecar must list labels"
            )
        contract = from_sidecar(sidecar, runtime.num_classes)
    else:
        raise ContractError(f"{model_path} has no convserve metadata and no {SIDECAR_NAME} sidecar beside it")
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


@dataclass(frozen=True)
class Classification:
    """Top-k of each row: class indices and probabilities, (rows, k) each."""

    indices: np.ndarray
    probabilities: np.ndarray


class ServedModel:
    """One model version: runtime, contract and batcher; rows in, probabilities out."""

    def __init__(
        self, name: str, version: int, path: Path, runtime: ModelRuntime, batching: BatchingConfig
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.runtime = runtime
        self.contract = load_contract(path, runtime)
        self.batching = batching
        workers = ThreadPoolExecutor(runtime.options.instances, thread_name_prefix=f"{name}-{version}")
        config = dataclasses.replace(
            batching, max_inflight=max(batching.max_inflight, runtime.options.instances + 1)
        )
        self.batcher = DynamicBatcher(self.probabilities, config, workers)
        self._workers = workers
        self._shape = list(self.contract.image_shape)
        self._dtype_name = self.input_dtype.name
        self._tensor_bytes = int(np.prod(self._shape)) * self.input_dtype.itemsize

    @property
    def input_dtype(self) -> np.dtype:
        return self.runtime.input_dtype

    def accepts_tensor(self, shape: Iterable[int], dtype: str, size: int) -> bool:
        """A raw tensor in exactly the input's shape, dtype and byte size (the fast path's check)."""
        return size == self._tensor_bytes and dtype == self._dtype_name and list(shape) == self._shape

    def new_rows(self, count: int) -> np.ndarray:
        return np.empty((count, *self.contract.image_shape), dtype=self.input_dtype)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """The batch function: one model call and, for logits models, one softmax over the batch."""
        output = self.runtime.run(batch)
        return (
            softmax(output.astype(np.float32, copy=False))
            if self.contract.output_kind == "logits"
            else output
        )

    async def classify(self, rows: np.ndarray, k: int, deadline: float | None = None) -> Classification:
        probabilities = await self.batcher.submit(rows, deadline)
        indices, values = top_k(probabilities, k)
        return Classification(indices, values)

    def warm_up(self) -> None:
        """One call per bucket-ish size so the first requests do not pay for allocation and tuning."""
        for size in sorted({1, self.batching.max_batch_size}):
            self.probabilities(np.zeros((size, *self.contract.image_shape), dtype=self.input_dtype))

    async def close(self) -> None:
        await self.batcher.close()
        self._workers.shutdown(wait=True)


def load_version(
    name: str, version: int, path: Path, runtime_options: RuntimeOptions, batching: BatchingConfig
) -> ServedModel:
    try:
        return ServedModel(name, version, path, ModelRuntime(path, runtime_options), batching)
    except (ContractError, ModelLoadError) as exc:
        raise ModelLoadError(f"cannot serve {name} version {version}: {exc}") from exc


class ModelRepository:
    """All served models, by name and version."""

    def __init__(self, models: dict[str, dict[int, ServedModel]]) -> None:
        self.models = models

    @classmethod
    def load(
        cls, root: Path, runtime_options: RuntimeOptions, batching: BatchingConfig, only: str | None = None
    ) -> ModelRepository:
        """Loads every model under `root` (or only the one named `only`), every version."""
        found = {name: v for name, v in discover(root).items() if only is None or name == only}
        if not found:
            raise ModelNotFoundError(
                f"no models under {root} (expected {root}/<name>/<version>/{MODEL_FILE})"
            )
        models: dict[str, dict[int, ServedModel]] = {}
        for name, versions in found.items():
            for version, path in versions.items():
                served = load_version(name, version, path, runtime_options, batching)
                models.setdefault(name, {})[version] = served
                log.info(
                    "loaded model %s version %d from %s: %s", name, version, path, served.runtime.describe()
                )
        return cls(models)

    def get(self, name: str, version: int = 0) -> ServedModel:
        versions = self.models.get(name)
        if not versions:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r} (served: {known})")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version} (served: {sorted(versions)})")
        return versions[version]

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def warm_up(self) -> None:
        for model in self.all():
            model.warm_up()

    async def close(self) -> None:
        for model in self.all():
            await model.close()
