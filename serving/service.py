"""The gRPC servicer: the protobuf edge of the request path.

validate -> decode in a thread pool (raw tensors inline, zero-copy) -> ServedModel.classify (batcher,
ONNX Runtime, softmax / top-k) -> response. Everything past this module speaks numpy.

Errors: bad input is INVALID_ARGUMENT with a message that names the image and the reason. In a
request of many images, a bad image gets its own error entry and the others their results; only
when every image fails does the whole call fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image

from protos.convserve.v1 import convserve_pb2 as pb
from protos.convserve.v1 import convserve_pb2_grpc as pb_grpc
from serving.batching import BatcherClosedError, DeadlineExceededError, QueueFullError
from serving.preprocess import DEFAULT_MAX_PIXELS, ImageError, decode_batch, open_image, tensor_to_input
from serving.repository import Classification, ModelNotFoundError, ModelRepository, ServedModel

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
DEFAULT_MAX_IMAGES = 256
STREAM_INFLIGHT = 64  # requests of one stream processed concurrently
INLINE_DECODE_PIXELS = 4096  # a request whose images hold fewer pixels in all is decoded on the event loop


class StatusError(Exception):
    """Ends a call (or, on a stream, one request) with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_images: int = DEFAULT_MAX_IMAGES
    max_pixels: int = DEFAULT_MAX_PIXELS


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, repository: ModelRepository | None, decode_pool: Executor, limits: Limits) -> None:
        self.repository = repository
        self.decode_pool = decode_pool
        self.limits = limits
        self.shutting_down = False
        # Shutdown waits until no call is active and none has started for a moment (server.drain).
        self.last_call_at = 0.0
        self.active_calls = 0

    # -- RPCs -------------------------------------------------------------------------------------

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        self.last_call_at = time.monotonic()
        self.active_calls += 1
        try:
            return await self.classify(request, deadline_of(context))
        except StatusError as exc:
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises
        finally:
            self.active_calls -= 1

    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Handles up to STREAM_INFLIGHT requests at once; each response carries its request's id."""
        self.last_call_at = time.monotonic()
        responses: asyncio.Queue[pb.ClassifyResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_INFLIGHT)
        tasks: set[asyncio.Task] = set()

        async def answer(request: pb.ClassifyRequest) -> None:
            try:
                if self.shutting_down:  # calls already open stay open, but take no new work
                    raise StatusError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
                response = await self.classify(request, deadline_of(context))
            except StatusError as exc:
                response = pb.ClassifyResponse(
                    id=request.id,
                    model=request.model,
                    version=request.version,
                    error=pb.Error(code=exc.code.value[0], message=exc.message),
                )
            finally:
                slots.release()
            await responses.put(response)

        async def read_all() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
            finally:
                await responses.put(None)

        reader = asyncio.create_task(read_all())
        self.active_calls += 1
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # surfaces a failure of the request stream itself
        finally:
            self.active_calls -= 1
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        try:
            return pb.ListModelsResponse(models=[self._model_info(m) for m in self._newest_each()])
        except StatusError as exc:
            await context.abort(exc.code, exc.message)
            raise

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            return self._model_info(self._resolve(request.name, request.version))
        except StatusError as exc:
            await context.abort(exc.code, exc.message)
            raise

    async def Echo(self, request: pb.EchoMessage, context: grpc.aio.ServicerContext) -> pb.EchoMessage:
        return request

    # -- the request path -------------------------------------------------------------------------

    async def classify(
        self, request: pb.ClassifyRequest, deadline: float | None = None
    ) -> pb.ClassifyResponse:
        """One request through the whole path, without gRPC: also what `score --local` calls."""
        model = self._resolve(request.model, request.version)
        k = self._validate_top_k(request)
        count = len(request.images)
        if count == 0:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "request holds no images")
        if count > self.limits.max_images:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request holds {count} images; the limit is {self.limits.max_images}",
            )
        rows, errors = await self._prepare(model, request.images)
        if len(errors) == count:
            summary = "; ".join(f"image {i}: {msg}" for i, msg in sorted(errors.items())[:5])
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, summary)
        good = [i for i in range(count) if i not in errors]
        if errors:
            rows = rows[good]
        try:
            result = await model.classify(rows, k, deadline)
        except QueueFullError as exc:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"model {model.name} is overloaded: {exc}"
            ) from exc
        except DeadlineExceededError as exc:
            raise StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from exc
        except BatcherClosedError as exc:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        return build_response(request, model, result, good, errors)

    async def _prepare(
        self, model: ServedModel, images: Iterable[pb.Image]
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Input rows for every image (in order) and {index: error} for those that cannot be used."""
        images = list(images)
        contract = model.contract
        errors: dict[int, str] = {}
        if all(image.HasField("tensor") for image in images):
            tensors = [image.tensor for image in images]
            if all(model.accepts_tensor(t.shape, t.dtype, len(t.data)) for t in tensors):
                # The common case, checked in bulk: one join, one zero-copy view of the whole batch.
                data = tensors[0].data if len(tensors) == 1 else b"".join(t.data for t in tensors)
                return np.frombuffer(data, dtype=model.input_dtype).reshape(
                    len(tensors), *contract.image_shape
                ), {}
        rows = model.new_rows(len(images))
        opened: list[tuple[int, Image.Image]] = []
        pixels = 0
        for index, image in enumerate(images):
            kind = image.WhichOneof("data")
            try:
                if kind == "encoded":
                    # Only the header is read here: sizes are checked before any pixel is decoded.
                    opened.append((index, open_image(image.encoded, self.limits.max_pixels)))
                    pixels += opened[-1][1].width * opened[-1][1].height
                elif kind == "tensor":
                    t = image.tensor
                    rows[index] = tensor_to_input(t.shape, t.dtype, t.data, contract, model.input_dtype)
                else:
                    errors[index] = "image holds neither encoded bytes nor a tensor"
            except ImageError as exc:
                errors[index] = str(exc)
        if opened and pixels <= INLINE_DECODE_PIXELS:
            errors.update(decode_batch(opened, contract, rows))  # tiny images: a thread hop costs more
        elif opened:
            loop = asyncio.get_running_loop()
            errors.update(await loop.run_in_executor(self.decode_pool, decode_batch, opened, contract, rows))
        return rows, errors

    def _loaded(self) -> ModelRepository:
        if self.repository is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "models are still loading")
        return self.repository

    def _resolve(self, name: str, version: int) -> ServedModel:
        repository = self._loaded()
        if not name:
            models = repository.models
            if len(models) != 1:
                raise StatusError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"name a model: this server serves {sorted(models)}"
                )
            name = next(iter(models))
        if version < 0:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT, f"version must be 0 (newest) or positive, got {version}"
            )
        try:
            return repository.get(name, version)
        except ModelNotFoundError as exc:
            raise StatusError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc

    @staticmethod
    def _validate_top_k(request: pb.ClassifyRequest) -> int:
        if not request.HasField("top_k"):
            return DEFAULT_TOP_K
        if request.top_k < 1:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be at least 1, got {request.top_k}"
            )
        return request.top_k

    def _newest_each(self) -> list[ServedModel]:
        return [versions[max(versions)] for versions in self._loaded().models.values()]

    def _model_info(self, model: ServedModel) -> pb.ModelInfo:
        c, stats, batching = model.contract, model.batcher.stats, model.batcher.config
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            versions=sorted(self._loaded().models[model.name]),
            input=pb.InputSpec(
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
            ),
            labels=c.labels,
            output_kind=c.output_kind,
            batching=pb.BatchingSettings(
                max_batch_size=batching.max_batch_size,
                max_delay_ms=batching.max_delay_s * 1000,
                max_queue_size=batching.max_queue_rows,
            ),
            stats=pb.ModelStats(
                requests=stats.requests,
                items=stats.items,
                batches=stats.batches,
                batch_sizes=dict(stats.batch_sizes),
                rejected=stats.rejected,
                expired=stats.expired,
            ),
            provider=model.runtime.provider,
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the batcher's clock (time.monotonic)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def build_response(
    request: pb.ClassifyRequest,
    model: ServedModel,
    result: Classification,
    good: list[int],
    errors: dict[int, str],
) -> pb.ClassifyResponse:
    response = pb.ClassifyResponse(id=request.id, model=model.name, version=model.version)
    labels = model.contract.labels
    index_rows = result.indices.tolist()
    probability_rows = result.probabilities.tolist()
    if not errors:
        for indices, probabilities in zip(index_rows, probability_rows, strict=True):
            response.results.add(
                class_index=indices, label=[labels[i] for i in indices], probability=probabilities
            )
        return response
    row_of = {image: row for row, image in enumerate(good)}
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for image in range(len(good) + len(errors)):
        if image in errors:
            response.results.add(error=pb.Error(code=invalid, message=f"image {image}: {errors[image]}"))
        else:
            row = row_of[image]
            indices = index_rows[row]
            response.results.add(
                class_index=indices, label=[labels[i] for i in indices], probability=probability_rows[row]
            )
    return response
