"""ONNX Runtime sessions: provider choice, deliberate CPU options, and the batch call.

A session runs in a worker thread (ONNX Runtime releases the GIL). With `instances` > 1 each worker
thread owns one session, bound when the thread starts (`bind_worker`, the executor's initializer), so
several batches run at once on separate sessions (useful when one CUDA stream leaves the GPU idle).
The event loop thread, which runs tiny batches inline only while no worker is busy, uses session 0.
On CUDA, batches are padded up to a few bucket sizes so cuDNN does not tune its
kernels again for every new batch size; the padding rows are dropped from the results.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
}


TINY_MODEL_S = 0.001


class ModelLoadError(RuntimeError):
    """The model cannot be run as asked."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    intra_op_threads: int = 0  # 0: one per core
    instances: int = 1
    spin: bool = False  # ONNX Runtime's spin-wait burns a core that decoding and gRPC need
    cuda_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # Serve a version whose preprocessing certificate fails (serving/core/certificate.py), saying so.
    allow_preprocessing_drift: bool = False


def parse_device(device: str) -> tuple[str, int]:
    kind, _, index = device.partition(":")
    number = index.isascii() and index.isdigit()  # not "²", which isdigit() takes and int() refuses
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not number)):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return kind, int(index or 0)


def choose_providers(device: str, available: list[str]) -> tuple[list, str]:
    """The provider list for a device request, and a sentence saying what was chosen and why."""
    kind, index = parse_device(device)
    has_cuda = "CUDAExecutionProvider" in available
    if kind == "cpu":
        return ["CPUExecutionProvider"], "CPU (asked for)"
    if has_cuda:
        cuda = (
            "CUDAExecutionProvider",
            {
                "device_id": index,
                "cudnn_conv_algo_search": "EXHAUSTIVE",
                "arena_extend_strategy": "kNextPowerOfTwo",
            },
        )
        return [cuda, "CPUExecutionProvider"], f"CUDA device {index}"
    reason = "CUDA asked for but not available in this onnxruntime build" if kind == "cuda" else "no CUDA"
    return ["CPUExecutionProvider"], f"CPU ({reason})"


def session_options(options: RuntimeOptions, threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or options.intra_op_threads or (os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    return so


def bucket_size(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `rows`; rows itself beyond the largest bucket."""
    position = bisect.bisect_left(buckets, rows)
    return buckets[position] if position < len(buckets) else rows


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
    if rows == len(batch):
        return batch
    padded = np.zeros((rows, *batch.shape[1:]), dtype=batch.dtype)
    padded[: len(batch)] = batch
    return padded


class ModelRuntime:
    """One model version's ONNX Runtime session(s); `run` is safe to call from worker threads."""

    def __init__(self, path: Path, options: RuntimeOptions | None = None) -> None:
        self.path = path
        self.options = options or RuntimeOptions()
        providers, self.provider_reason = choose_providers(self.options.device, ort.get_available_providers())
        so = session_options(self.options, self._choose_threads(path, providers))
        self._sessions = [
            ort.InferenceSession(str(path), so, providers=providers)
            for _ in range(max(1, self.options.instances))
        ]
        self._free = list(reversed(self._sessions))  # workers take sessions 0, 1, ... in order
        self._local = threading.local()
        self._lock = threading.Lock()
        # Calls per session and the most that ran at once: how `--instances` is seen to work.
        self.session_calls = [0] * len(self._sessions)
        self.peak_concurrent = 0
        self._running = 0
        first = self._sessions[0]
        self.provider = first.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        model_input = first.get_inputs()[0]
        self.input_name = model_input.name
        self.input_shape = list(model_input.shape)
        if model_input.type not in ORT_DTYPES:
            raise ModelLoadError(f"{path}: unsupported input type {model_input.type}")
        self.input_dtype = np.dtype(ORT_DTYPES[model_input.type])
        self.output_name = first.get_outputs()[0].name
        self.output_shape = list(first.get_outputs()[0].shape)
        self.metadata = dict(first.get_modelmeta().custom_metadata_map)
        self.intra_op_threads = so.intra_op_num_threads

    def select_output(self, name: str) -> None:
        """Reads the classes from the output called `name` (a contract's `output`) instead of the first."""
        outputs = {o.name: o for o in self._sessions[0].get_outputs()}
        if name not in outputs:
            raise ModelLoadError(f"{self.path}: no output named {name!r}; the graph has {sorted(outputs)}")
        self.output_name = name
        self.output_shape = list(outputs[name].shape)

    @property
    def num_classes(self) -> int | None:
        last = self.output_shape[-1] if self.output_shape else None
        return last if isinstance(last, int) else None

    def _choose_threads(self, path: Path, providers: list) -> int | None:
        """With --intra-op-threads 0 on a CPU: one thread for a tiny model, one per core otherwise.

        Splitting a call that takes microseconds over threads costs more than it saves, and takes a core
        from decoding and gRPC; a model whose 8-image call on one thread takes under TINY_MODEL_S is tiny.
        """
        if (
            self.options.intra_op_threads
            or providers[0] != "CPUExecutionProvider"
            or (os.cpu_count() or 1) == 1
        ):
            return None
        probe = ort.InferenceSession(str(path), session_options(self.options, 1), providers=providers)
        spec = probe.get_inputs()[0]
        if spec.type not in ORT_DTYPES or not all(isinstance(d, int) for d in spec.shape[1:]):
            return None
        x = np.zeros((8, *spec.shape[1:]), dtype=ORT_DTYPES[spec.type])
        probe.run(None, {spec.name: x})
        started = time.perf_counter()
        for _ in range(3):
            probe.run(None, {spec.name: x})
        return 1 if (time.perf_counter() - started) / 3 < TINY_MODEL_S else None

    @property
    def instances(self) -> int:
        return len(self._sessions)

    def bind_worker(self) -> None:
        """Gives the calling worker thread a session of its own (an executor's initializer)."""
        with self._lock:
            index = len(self._sessions) - len(self._free) if self._free else 0
            if self._free:
                self._free.pop()
        self._local.index = index

    @property
    def outputs(self) -> list[tuple[str, list]]:
        """Every output of the graph: (name, shape), in the graph's order."""
        return [(o.name, list(o.shape)) for o in self._sessions[0].get_outputs()]

    def run(self, batch: np.ndarray, session: int | None = None) -> np.ndarray:
        """Runs one batch on the calling thread's session (or the one named, as warm-up does)."""
        return self.run_outputs(batch, [self.output_name], session)[0]

    def run_outputs(
        self, batch: np.ndarray, names: list[str] | None = None, session: int | None = None
    ) -> list[np.ndarray]:
        """The outputs named (all with None) for one batch, each cut to the batch's rows."""
        rows = len(batch)
        if self.on_cuda:
            batch = pad_rows(batch, bucket_size(rows, self.options.cuda_buckets))
        index = getattr(self._local, "index", 0) if session is None else session
        with self._lock:
            self._running += 1
            self.peak_concurrent = max(self.peak_concurrent, self._running)
        try:
            outputs = self._sessions[index].run(names, {self.input_name: batch})
        finally:
            with self._lock:
                self._running -= 1
                self.session_calls[index] += 1
        return [output[:rows] for output in outputs]

    def warm_up_sizes(self, max_batch_size: int) -> list[int]:
        """Every batch size a run can take: each CUDA bucket up to the largest batch, else 1 and the max."""
        if not self.on_cuda:
            return sorted({1, max_batch_size})
        return sorted({bucket_size(n, self.options.cuda_buckets) for n in range(1, max_batch_size + 1)})

    def describe(self) -> str:
        return (
            f"provider {self.provider} [{self.provider_reason}], {len(self._sessions)} instance(s), "
            f"{self.intra_op_threads} intra-op thread(s), spin {'on' if self.options.spin else 'off'}"
        )
