"""The state the workers share: a queue of chunks, a bound on chunks in flight, the message limit (lowered
when a server refuses a message as too large), and the answers."""

from __future__ import annotations

import argparse
import logging
import queue
import re
import threading
from collections.abc import Iterator

import grpc

from serving.client import connection_from_args
from serving.tools.score.chunks import MESSAGE_OVERHEAD, Chunk, pack
from serving.tools.score.results_file import ImageOutcome

log = logging.getLogger(__package__)  # the job's one logger, "serving.tools.score"

SIZE_REFUSAL = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")  # gRPC's words for a too-large message


class Job:
    """The shared state: a queue of chunks, a bound on chunks in flight, the message limit, the answers."""

    def __init__(
        self,
        chunks: list[Chunk],
        inflight_chunks: int,
        args: argparse.Namespace,
        limit: int | None,
        ids: Iterator[int],
    ) -> None:
        self.connection = connection_from_args(args)  # TLS files and token file, checked once
        self.limit = limit  # bytes per message; None in process (no messages)
        self.ids = ids
        self.limit_lock = threading.Lock()
        self.todo: queue.Queue[Chunk] = queue.Queue()
        for chunk in chunks:
            self.todo.put(chunk)
        self.slots = threading.Semaphore(max(1, inflight_chunks))
        self.answers: queue.Queue[tuple[Chunk, list[ImageOutcome]] | Exception] = queue.Queue()
        self.finished = threading.Event()
        self.args = args

    def next_chunk(self, closed: threading.Event) -> Chunk | None:
        """Blocks for a slot and a chunk; None once the job is finished or the caller's stream closed."""
        while not self.finished.is_set() and not closed.is_set():
            if not self.slots.acquire(timeout=0.1):
                continue
            try:
                chunk = self.todo.get(timeout=0.1)
            except queue.Empty:
                self.slots.release()
                continue
            return self.fit(chunk)
        return None

    @property
    def budget(self) -> int | None:
        """Bytes of images one message may carry."""
        return None if self.limit is None else self.limit - MESSAGE_OVERHEAD

    def fit(self, chunk: Chunk) -> Chunk:
        """The chunk, or its first part when the limit was lowered after it was packed (the rest is
        queued again, holding no slot: each part takes its own when it is sent)."""
        budget = self.budget
        if budget is None or len(chunk.paths) == 1 or chunk.message_bytes <= budget:
            return chunk
        first, *rest = pack(chunk.paths, chunk.sizes, len(chunk.paths), budget, self.ids)
        for part in rest:
            self.todo.put(part)
        return first

    def follow_refusal(self, exc: grpc.RpcError, limit_before: int | None) -> bool:
        """True when the server refused a message as larger than its limit and the job now packs under
        that limit (a refusal for size is the job's mistake, not an outage: nothing is counted).
        `limit_before` is the limit when the stream began: a refusal of a message packed under an
        older, higher limit is explained; one packed under the server's own limit is counted."""
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # also "overloaded": that one is retried
            return False
        found = SIZE_REFUSAL.search(exc.details() or "")
        if found is None:
            return False
        sent, server_limit = int(found[1]), int(found[2])
        with self.limit_lock:
            if self.limit is None:
                return False
            if server_limit >= self.limit:  # lowered already, by this stream or another one
                return limit_before is not None and self.limit < limit_before
            self.limit = server_limit
        log.warning(
            "the server refused a message of %d bytes as larger than its limit: "
            "packing messages under %d bytes from now on (pass --max-message-mb to start there)",
            sent,
            server_limit,
        )
        return True

    def give_back(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self.todo.put(chunk)
            self.slots.release()
