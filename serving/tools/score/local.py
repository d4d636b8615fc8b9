"""`--local MODEL_DIR`: the same data plane in process (decode pool, dynamic batcher, ONNX Runtime,
top-k), with no server: for a laptop, and as the reference."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from serving.tools.score.chunks import Chunk, read_chunk
from serving.tools.score.job import Job
from serving.tools.score.results_file import ImageOutcome

if TYPE_CHECKING:
    from serving.core.types import ClassifyResult


def local_worker(job: Job, model_dir: Path) -> None:
    """The same data plane in process: decode pool, dynamic batcher, ONNX Runtime, top-k."""
    from serving.core.errors import ServingError
    from serving.core.types import ClassifyRequest
    from serving.models.local import open_local

    args = job.args
    local = open_local(model_dir)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()

        async def one(chunk: Chunk) -> None:
            images, unreadable = await loop.run_in_executor(local.pool, read_chunk, chunk, None)
            result: ClassifyResult | str | None = None
            if images:
                request = ClassifyRequest(images, args.model, args.version, args.top_k)
                try:
                    result = await local.dataplane.classify(request)
                except ServingError as exc:  # the whole request failed
                    result = str(exc)
            job.answers.put((chunk, local_outcomes(chunk, unreadable, result)))

        never = threading.Event()
        while (chunk := await loop.run_in_executor(None, job.next_chunk, never)) is not None:
            task = asyncio.create_task(one(chunk))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await local.close()

    asyncio.run(run())


def local_outcomes(
    chunk: Chunk, unreadable: dict[str, str], result: ClassifyResult | str | None
) -> list[ImageOutcome]:
    """Matches a data plane result (read images only, in order) back to the chunk's paths."""
    per_image = iter(result.per_image()) if result is not None and not isinstance(result, str) else iter(())
    outcomes = []
    for path in chunk.paths:
        if path in unreadable:
            outcomes.append(ImageOutcome(path, error=unreadable[path]))
        elif isinstance(result, str):
            outcomes.append(ImageOutcome(path, error=result))
        else:
            predictions, error = next(per_image)
            outcomes.append(
                ImageOutcome(
                    path,
                    [p.label for p in predictions],
                    [p.index for p in predictions],
                    [p.probability for p in predictions],
                    error,
                )
            )
    return outcomes
