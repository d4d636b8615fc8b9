"""The job's unit of work: consecutive files packed into one message, under the server's size limit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving.tools.score.inputs import inspect_file

MIB = 1024 * 1024
MESSAGE_OVERHEAD = 4096  # a request's fields besides its images (id, model name, top_k), with room to spare
IMAGE_OVERHEAD = 16  # per image: the field tags and length prefixes around its bytes


@dataclass
class Chunk:
    id: int
    paths: list[str]
    sizes: list[int]  # bytes per file when the job was planned

    @property
    def message_bytes(self) -> int:
        return sum(self.sizes) + IMAGE_OVERHEAD * len(self.sizes)


def pack(
    paths: list[str], sizes: list[int], batch: int, budget: int | None, ids: Iterator[int]
) -> list[Chunk]:
    """Consecutive paths in chunks of at most `batch` files and `budget` bytes of images; a file over
    the budget is alone in its chunk (it is answered with an error, not sent)."""
    chunks: list[Chunk] = []
    current: list[str] = []
    current_sizes: list[int] = []
    for path, size in zip(paths, sizes, strict=True):
        over = budget is not None and sum(current_sizes) + IMAGE_OVERHEAD * len(current) + size > budget
        if current and (len(current) == batch or over):
            chunks.append(Chunk(next(ids), current, current_sizes))
            current, current_sizes = [], []
        current.append(path)
        current_sizes.append(size)
    if current:
        chunks.append(Chunk(next(ids), current, current_sizes))
    return chunks


def too_large(size: int, limit: int) -> str:
    return (
        f"file is {size / MIB:.1f} MiB, over the server's message limit of {limit / MIB:g} MiB: not sent "
        "(raise the server's --max-message-mb, and this job's, to score it)"
    )


def read_chunk(chunk: Chunk, budget: int | None) -> tuple[list[bytes], dict[str, str]]:
    """The chunk's files as bytes; unreadable ones, non-regular ones and (with a budget, the bytes one
    message may carry) any larger than a message become errors and are not sent."""
    unreadable: dict[str, str] = {}
    images = []
    for path in chunk.paths:
        size, problem = inspect_file(path)
        if problem is None and budget is not None and size > budget:
            problem = too_large(size, budget + MESSAGE_OVERHEAD)
        if problem is not None:
            unreadable[path] = problem
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            unreadable[path] = f"cannot read file: {exc.strerror or exc}"
            continue
        if budget is not None and len(data) > budget:  # it grew since it was looked at
            unreadable[path] = too_large(len(data), budget + MESSAGE_OVERHEAD)
            continue
        images.append(data)
    return images, unreadable
