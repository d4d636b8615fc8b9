"""The data plane: one classification from request to top-k, with no protocol in sight.

resolve model and version → validate → reserve input memory → decode images / take raw tensors →
dynamic batcher → ONNX Runtime → top-k. Requests and results are dataclasses (`serving.core.types`);
failures are domain errors (`serving.core.errors`). Every protocol edge and the in-process tools
call `DataPlane.classify` (top-k) or `DataPlane.predict` (full probability rows; the same path);
`DataPlane.explain` adds heat maps (`serving.core.explain`) on the same path.

One bad image in a request of many gets its own entry in `ClassifyResult.errors` and the others
their results; only when every image fails does the whole request fail (InvalidInput).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from serving.core import defaults
from serving.core.batching import PRIORITY_LOW
from serving.core.budget import MIB, InputBudget
from serving.core.errors import DeadlineExceeded, InvalidInput, Overloaded, shown
from serving.core.explain import CAM, EXPLAIN_FILE, METHODS, OCCLUSION, grid_png, input_pixels
from serving.core.input_rows import input_rows
from serving.core.model import ServedModel
from serving.core.occlusion import (
    OcclusionGrid,
    occluded_copies,
    occlusion_grid,
    occlusion_map,
    probability_drops,
)
from serving.core.postprocess import abstain, top_k
from serving.core.preprocess import (
    ImageError,
    batch_to_input,
)
from serving.core.receipt import Receipt
from serving.core.types import (
    BlockMaps,
    ClassifyRequest,
    ClassifyResult,
    ExplainRequest,
    ExplainResult,
    ImageExplanation,
    ImageInput,
    OcclusionSettings,
    Prediction,
    PredictRequest,
    PredictResult,
    RawBatch,
)

# A cancellation this close to the deadline is the client's own deadline passing (see _run).
CLIENT_DEADLINE_LEAD_S = 0.05


@dataclass(frozen=True)
class Limits:
    max_images: int = defaults.MAX_IMAGES
    max_pixels: int = defaults.MAX_PIXELS
    max_request_pixels: int = defaults.MAX_REQUEST_PIXELS
    default_top_k: int = defaults.TOP_K
    max_explain_copies: int = defaults.MAX_EXPLAIN_COPIES


def unless_all_failed(count: int) -> Callable[[dict[int, str]], None]:
    """The check of requests with per-image errors: they fail as a whole only when no image is usable."""

    def check(errors: dict[int, str]) -> None:
        if len(errors) == count:
            summary = "; ".join(f"image {i}: {msg}" for i, msg in sorted(errors.items())[:5])
            raise InvalidInput(summary)

    return check


async def run_together(work: dict[str, Coroutine[Any, Any, Any]]) -> dict[str, Any]:
    """Every awaitable's result by name; the first failure cancels the others (an explanation whose
    graph call failed must not go on submitting its occlusion copies)."""
    if len(work) == 1:  # the usual case (cam alone): no task to make
        ((name, awaitable),) = work.items()
        return {name: await awaitable}
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {name: group.create_task(job) for name, job in work.items()}
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the domain error itself, for the error table
    return {name: task.result() for name, task in tasks.items()}


class ModelResolver(Protocol):
    """Finds the served version for a request (the model registry implements it)."""

    def resolve(self, name: str, version: int) -> ServedModel: ...


class DataPlane:
    def __init__(
        self,
        models: ModelResolver,
        decode_pool: Executor,
        limits: Limits | None = None,
        budget: InputBudget | None = None,
    ) -> None:
        self.models = models
        self.decode_pool = decode_pool
        self.limits = limits or Limits()
        self.budget = budget or InputBudget(defaults.INPUT_BUDGET_MB * MIB)

    async def classify(self, request: ClassifyRequest) -> ClassifyResult:
        model = self.models.resolve(request.model, request.version)
        with model.hold():  # a version swapped out meanwhile is closed only after this request ends
            return await self._classify(model, request)

    async def _classify(self, model: ServedModel, request: ClassifyRequest) -> ClassifyResult:
        k = self._top_k(request.top_k)
        count = len(request.images)

        answers, errors = await self._run(
            model,
            count,
            lambda: self._input_rows(model, request.images),
            unless_all_failed(count),
            request.deadline,
            request.receipt,
        )
        probabilities, given_scores = model.answers(answers)
        indices, values = top_k(probabilities, k)
        scores, flags = abstain(probabilities, model.contract.abstain_threshold, given_scores)
        return ClassifyResult(
            model.name, model.version, model.contract.labels, indices, values, count, errors, scores, flags
        )

    async def explain(self, request: ExplainRequest) -> ExplainResult:
        """Heat maps of why each image gets its class (`serving.core.explain`), beside its top-k."""
        model = self.models.resolve(request.model, request.version)
        with model.hold():
            return await self._explain(model, request)

    async def _explain(self, model: ServedModel, request: ExplainRequest) -> ExplainResult:
        k = self._top_k(request.top_k)
        methods = self._explain_methods(model, request.methods)
        contract = model.contract
        if request.target is not None and not 0 <= request.target < model.num_classes:
            raise InvalidInput(
                f"class {request.target} is not one of the model's {model.num_classes} classes"
            )
        if request.activations and model.explain_graph is None:
            raise InvalidInput(
                f"activation maps come from an explain graph ({EXPLAIN_FILE}); model {shown(model.name)} "
                f"version {model.version} has none"
            )
        grid = None
        count = len(request.images)
        if OCCLUSION in methods:
            grid = occlusion_grid(contract.height, contract.width, request.patch, request.stride)
            if count * grid.copies > self.limits.max_explain_copies:
                raise InvalidInput(
                    f"occlusion needs {grid.copies} masked copies per image, {count * grid.copies} for "
                    f"{count} image(s); the limit per request is {self.limits.max_explain_copies}: send "
                    "fewer images or a larger patch or stride"
                )

        async def run(rows: np.ndarray) -> list[ImageExplanation]:
            return await self._explain_rows(model, rows, methods, request, k, grid)

        explanations, errors = await self._run(
            model,
            count,
            lambda: self._input_rows(model, request.images),
            unless_all_failed(count),
            request.deadline,
            request.receipt,
            run,
            1 + (grid.copies if grid else 0),
        )
        settings = OcclusionSettings(grid.patch, grid.stride, grid.copies) if grid else None
        return ExplainResult(
            model.name, model.version, contract.labels, methods, count, explanations, errors, settings
        )

    @staticmethod
    def _explain_methods(model: ServedModel, asked: Sequence[str]) -> tuple[str, ...]:
        offered = model.explain_methods
        if not asked:
            return offered[:1]  # cam where the version has an explain graph, else occlusion
        unknown = [m for m in asked if m not in METHODS]
        if unknown:
            raise InvalidInput(
                f"unknown explanation method {shown(unknown[0])}; methods: {', '.join(METHODS)}"
            )
        if CAM in asked and CAM not in offered:
            raise InvalidInput(
                f"model {shown(model.name)} version {model.version} has no explain graph "
                f"({EXPLAIN_FILE}), so no cam; it offers occlusion"
            )
        return tuple(m for m in METHODS if m in asked)

    async def _explain_rows(
        self,
        model: ServedModel,
        rows: np.ndarray,
        methods: tuple[str, ...],
        request: ExplainRequest,
        k: int,
        grid: OcclusionGrid | None,
    ) -> list[ImageExplanation]:
        """The usable rows' explanations. The explain graph (or the model) and the occlusion copies run
        at once; the copies at low priority, so classification traffic goes first."""
        contract, deadline, receipt = model.contract, request.deadline, request.receipt
        graph = model.explain_graph
        # A float32 explain graph's probabilities are the model's own (verified at export); a reduced
        # precision model gets its top-k from the model itself, as Classify would, and so does one
        # whose abstain score is a graph output the explain graph does not have.
        use_graph = graph is not None and (CAM in methods or request.activations)
        own_probabilities = (
            not use_graph
            or contract.extra.get("precision", "fp32") != "fp32"
            or contract.score_output is not None
        )
        work: dict[str, Coroutine[Any, Any, Any]] = {}
        if use_graph:
            work["graph"] = model.explain_rows(rows, deadline, request.activations, receipt)
        if own_probabilities:
            work["probabilities"] = model.infer(rows, deadline, receipt=receipt)
        if grid is not None:
            copies = np.empty((len(rows) * grid.copies, *rows.shape[1:]), dtype=rows.dtype)
            for i, row in enumerate(rows):
                occluded_copies(row, contract, grid, copies[i * grid.copies : (i + 1) * grid.copies])
            work["copies"] = self._infer_copies(model, copies, deadline, receipt)
        results = await run_together(work)
        # The graph's outputs are there whenever CAM or activations were asked for.
        outputs: Any = results.get("graph")
        given_scores = None
        if "probabilities" in results:
            probabilities, given_scores = model.answers(results["probabilities"])
        else:
            probabilities = outputs.probabilities
        targets = (
            np.full(len(rows), request.target) if request.target is not None else probabilities.argmax(axis=1)
        )
        indices, values = top_k(probabilities, k)
        scores, flags = abstain(probabilities, contract.abstain_threshold, given_scores)
        labels = contract.labels
        explanations = []
        for i, row in enumerate(rows):
            target = int(targets[i])
            maps: dict[str, np.ndarray] = {}
            if CAM in methods:
                maps[CAM] = np.ascontiguousarray(outputs.cam[i, target])
            if grid is not None:
                masked = results["copies"][i * grid.copies : (i + 1) * grid.copies]
                drops = probability_drops(probabilities[i], masked, target)
                maps[OCCLUSION] = occlusion_map(drops, grid, contract.height, contract.width)
            blocks = []
            if request.activations and outputs is not None and graph is not None:
                for b, block in enumerate(outputs.blocks, start=1):
                    caption = graph.caption(b, block[i])
                    png = grid_png(block[i], caption) if request.activation_grids else b""
                    blocks.append(BlockMaps(b, np.ascontiguousarray(block[i]), caption, png))
            predictions = [
                Prediction(int(c), labels[c], float(p)) for c, p in zip(indices[i], values[i], strict=True)
            ]
            explanations.append(
                ImageExplanation(
                    predictions,
                    target,
                    labels[target],
                    maps,
                    input_pixels(row, contract),
                    blocks,
                    float(scores[i]),
                    bool(flags[i]),
                )
            )
        return explanations

    @staticmethod
    async def _infer_copies(
        model: ServedModel, copies: np.ndarray, deadline: float | None, receipt: Receipt | None
    ) -> np.ndarray:
        """Occlusion copies at low priority, a quarter of the queue's bound at a time: a request's copies
        may outnumber what the queue holds, and others' explanations need room beside them."""
        chunk = max(model.batcher.config.max_batch_size, model.batcher.config.max_queue_rows // 4)
        outputs = [
            await model.infer(copies[start : start + chunk], deadline, PRIORITY_LOW, receipt)
            for start in range(0, len(copies), chunk)
        ]
        outputs = [model.answers(rows)[0] for rows in outputs]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    async def predict(self, request: PredictRequest) -> PredictResult:
        """Full probability rows (N, classes) for every image; any unusable image fails the whole
        request with InvalidInput naming the input and the first bad image (protocols without
        per-item errors, such as the Open Inference Protocol, need exactly this)."""
        model = self.models.resolve(request.model, request.version)
        with model.hold():
            return await self._predict(model, request)

    async def _predict(self, model: ServedModel, request: PredictRequest) -> PredictResult:
        inputs, name = request.inputs, request.input_name

        if isinstance(inputs, RawBatch):
            count = int(inputs.shape[0]) if len(inputs.shape) else 0

            async def prepare() -> tuple[np.ndarray, dict[int, str]]:
                try:
                    contract = model.contract
                    return batch_to_input(
                        inputs.shape, inputs.dtype, inputs.data, contract, model.input_dtype
                    ), {}
                except ImageError as exc:
                    raise InvalidInput(f"input {shown(name)}: {exc}") from None
        else:
            count = len(inputs)

            async def prepare() -> tuple[np.ndarray, dict[int, str]]:
                return await self._input_rows(model, inputs)

        def check(errors: dict[int, str]) -> None:
            if errors:
                first = min(errors)
                more = f" ({len(errors) - 1} more unusable)" if len(errors) > 1 else ""
                raise InvalidInput(f"input {shown(name)} image {first}: {errors[first]}{more}")

        answers, _ = await self._run(model, count, prepare, check, request.deadline, request.receipt)
        probabilities, given_scores = model.answers(answers)
        scores, flags = abstain(probabilities, model.contract.abstain_threshold, given_scores)
        return PredictResult(model.name, model.version, model.contract.labels, probabilities, scores, flags)

    async def _run(
        self,
        model: ServedModel,
        count: int,
        prepare: Callable[[], Awaitable[tuple[np.ndarray, dict[int, str]]]],
        check: Callable[[dict[int, str]], None],
        deadline: float | None,
        receipt: Receipt | None,
        infer: Callable[[np.ndarray], Awaitable[Any]] | None = None,
        rows_per_image: int = 1,
    ) -> tuple[Any, dict[int, str]]:
        """The shared path: count → reserve input memory → prepare rows → check → batcher.

        Returns the model's rows for the usable images (`ServedModel.answers` splits them into
        probabilities and scores; or what `infer` makes of them) and {index: error}
        for the others. `rows_per_image`: input rows each image will hold in memory (an explanation's
        occlusion copies count against the budget too). `receipt` learns the model version, the decode,
        and (from the batcher) the queue wait, the model calls and the batch sizes.
        """
        if receipt is not None:
            receipt.answered_by(model.name, model.version)
        if count <= 0:
            raise InvalidInput("request holds no images")
        if count > self.limits.max_images:
            raise InvalidInput(f"request holds {count} images; the limit is {self.limits.max_images}")
        try:
            reservation = self.budget.reserve(count * rows_per_image * model.row_nbytes)
        except Overloaded:
            model.stats.rejected += 1
            raise
        try:
            started = time.perf_counter()
            rows, errors = await prepare()
            decoded = time.perf_counter() - started
            model.stats.decode.observe(decoded)
            if receipt is not None:
                receipt.decoded(started, decoded)
            check(errors)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed while the images were decoded")
            if errors:
                rows = rows[[i for i in range(count) if i not in errors]]
            work = model.infer(rows, deadline, receipt=receipt) if infer is None else infer(rows)
            probabilities = await work
        except DeadlineExceeded:
            model.stats.expired += 1
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the client's deadline passes: that is an expiry too. The client's
            # clock started before ours by the time the call took to reach us, so its cancellation can come
            # a little before our deadline.
            if deadline is not None and time.monotonic() >= deadline - CLIENT_DEADLINE_LEAD_S:
                model.stats.expired += 1
            raise
        finally:
            reservation.release()
        return probabilities, errors

    def _input_rows(
        self, model: ServedModel, images: Sequence[ImageInput]
    ) -> Coroutine[Any, Any, tuple[np.ndarray, dict[int, str]]]:
        limits = self.limits
        return input_rows(model, images, self.decode_pool, limits.max_pixels, limits.max_request_pixels)

    def _top_k(self, k: int | None) -> int:
        if k is None:
            return self.limits.default_top_k
        if k < 1:
            raise InvalidInput(f"top_k must be at least 1, got {k}")
        return k
