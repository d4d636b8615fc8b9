"""Scoring through servers: long-lived ClassifyStream calls fed from the job's queue; a stream that
breaks puts its unanswered chunks back, and reconnects with backoff while its server is away."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import grpc

from protos.convserve.v1 import convserve_pb2 as pb
from serving.tools.score.chunks import Chunk, read_chunk
from serving.tools.score.errors import ScoreError
from serving.tools.score.job import Job
from serving.tools.score.results_file import ImageOutcome

log = logging.getLogger(__package__)  # the job's one logger, "serving.tools.score"

IMAGE_PREFIX = re.compile(r"^image \d+: ")  # how the server names an image within its request
RETRY_LIMIT = 5  # consecutive failed connections before a stream gives up on its server
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def outcomes_of(
    chunk: Chunk, unreadable: dict[str, str], response: pb.ClassifyResponse | None
) -> list[ImageOutcome]:
    """Matches a response's results (sent images only, in order) back to the chunk's paths."""
    results = iter(response.results) if response is not None else iter(())
    outcomes = []
    for path in chunk.paths:
        if path in unreadable:
            outcomes.append(ImageOutcome(path, error=unreadable[path]))
            continue
        if response is not None and response.HasField("error"):
            outcomes.append(ImageOutcome(path, error=response.error.message))
            continue
        result = next(results)
        if result.HasField("error"):
            message = IMAGE_PREFIX.sub("", result.error.message)  # the line names its file instead
            outcomes.append(ImageOutcome(path, error=message))
        else:
            outcomes.append(
                ImageOutcome(path, list(result.label), list(result.class_index), list(result.probability))
            )
    return outcomes


def build_request(
    chunk: Chunk, model: str, version: int, top_k: int, budget: int | None
) -> tuple[pb.ClassifyRequest | None, dict]:
    """Reads the chunk's files; unreadable ones, and any over the message budget, are errors, not sent."""
    images, unreadable = read_chunk(chunk, budget)
    if not images:
        return None, unreadable
    request = pb.ClassifyRequest(id=str(chunk.id), model=model, version=version, top_k=top_k)
    request.images.extend(pb.Image(encoded=data) for data in images)
    return request, unreadable


def stream_once(job: Job, target: str) -> int:
    """One ClassifyStream call; returns the chunks it answered. Unanswered ones go back to the queue."""
    from serving.client import ClassifierClient

    args = job.args
    pending: dict[str, tuple[Chunk, dict]] = {}
    lock = threading.Lock()
    closed = threading.Event()  # gRPC may still pull from `requests` after the call ended
    answered = 0

    def requests() -> Iterator[pb.ClassifyRequest]:
        while (chunk := job.next_chunk(closed)) is not None:
            request, unreadable = build_request(chunk, args.model, args.version, args.top_k, job.budget)
            if request is None:  # nothing readable: answer it here
                job.answers.put((chunk, outcomes_of(chunk, unreadable, None)))
                continue
            with lock:
                if closed.is_set():
                    job.give_back([chunk])
                    return
                pending[request.id] = (chunk, unreadable)
            yield request

    # Each new channel reads the token file again, so a stream that reconnects takes a rotated token.
    client = ClassifierClient(
        target, retries=0, connection=job.connection, max_message_mb=args.max_message_mb + 1
    )
    try:
        for response in client.stream(requests()):
            with lock:
                chunk, unreadable = pending.pop(response.id)
            if response.HasField("error") and response.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                job.give_back([chunk])  # that server is going away: another one answers
                closed.set()  # send nothing more on this stream
                continue
            job.answers.put((chunk, outcomes_of(chunk, unreadable, response)))
            answered += 1
    finally:
        with lock:
            closed.set()
            lost = [chunk for chunk, _ in pending.values()]
            pending.clear()
        if lost:
            log.warning("stream to %s ended with %d unanswered chunk(s): re-sending them", target, len(lost))
        job.give_back(lost)
        client.close()
    return answered


def stream_worker(job: Job, target: str) -> None:
    """Keeps one stream to `target` open while there is work, reconnecting with backoff."""
    failures = 0
    while not job.finished.is_set() and failures < RETRY_LIMIT:
        limit_before = job.limit
        try:
            if stream_once(job, target):
                failures = 0
            elif not job.finished.is_set():  # the server took nothing (shutting down): back off
                failures += 1
                time.sleep(min(0.2 * 2**failures, 5.0))
        except grpc.RpcError as exc:
            if job.follow_refusal(exc, limit_before):  # repacked under the server's limit: go on at once
                continue
            if exc.code() not in RETRYABLE:
                job.answers.put(ScoreError(f"{target}: {exc.code().name}: {exc.details()}"))
                return
            failures += 1
            log.warning(
                "stream to %s failed (%s), attempt %d of %d", target, exc.code().name, failures, RETRY_LIMIT
            )
            time.sleep(min(0.2 * 2**failures, 5.0))
    if failures >= RETRY_LIMIT:
        log.warning("giving up on %s", target)
