"""`python -m serving score INPUT --out results.jsonl`: a batch scoring job.

Images are read and sent while earlier answers come back: each server gets `--streams` long-lived
ClassifyStream calls, all fed from one queue of chunks (`--batch` images per message) with at most
`--inflight` images unanswered. Chunks are packed by bytes as well, under the server's message limit
(`--max-message-mb`, lowered to what the server says when it refuses a message as too large), and a
file larger than that limit gets its own error line instead of sinking its chunk. A stream that
breaks puts its unanswered chunks back on the queue, so the other servers (or the same one, once it
is back) score them. One output line per image, in the order answers arrive; rerunning with the same
`--out` skips what is already there. Only regular files are read: a FIFO, a device, a dangling
symbolic link or a loop of links gets a line saying it was skipped (reading a FIFO would block the
job for ever).

`--local MODEL_DIR` runs the very same data plane in process (decode pool, dynamic batcher, ONNX
Runtime, top-k), with no server: for a laptop, and as the reference.

File names need not be valid UTF-8: undecodable bytes are kept as they are (Python's
surrogateescape), so the CSV's path column holds the file's real name byte for byte, JSONL escapes
them (as \\udcXX), and a rerun matches both.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import errno
import glob
import io
import itertools
import json
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from tqdm import tqdm

from protos.convserve.v1 import convserve_pb2 as pb
from serving.client import DEFAULT_SERVER, add_connection_arguments, connection_from_args
from serving.tools.shard import parse_shard, select_shard

if TYPE_CHECKING:
    from serving.core.types import ClassifyResult

log = logging.getLogger(__name__)

IMAGE_PREFIX = re.compile(r"^image \d+: ")  # how the server names an image within its request
RETRY_LIMIT = 5  # consecutive failed connections before a stream gives up on its server
MIB = 1024 * 1024
MESSAGE_OVERHEAD = 4096  # a request's fields besides its images (id, model name, top_k), with room to spare
IMAGE_OVERHEAD = 16  # per image: the field tags and length prefixes around its bytes
SIZE_REFUSAL = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")  # gRPC's words for a too-large message
FILE_KINDS = {  # what a path that is not a regular file is, for its line
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class ScoreError(Exception):
    """The job cannot run (bad input, no server); exit code 1 or 2."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a folder (recursive), a glob, a text file of paths, or - for stdin")
    parser.add_argument("--out", type=Path, required=True, help="results file; appended to on restart")
    parser.add_argument(
        "--format", choices=["jsonl", "csv"], default=None, help="default: from --out's suffix"
    )
    parser.add_argument(
        "--server",
        action="append",
        help=f"HOST:PORT or dns:///NAME:PORT; repeatable (default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--local", type=Path, default=None, help="score in process with this model (no server)"
    )
    parser.add_argument("--model", default="", help="model name (default: the server's only model)")
    parser.add_argument("--version", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="images per message")
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=64,
        help="the server's --max-message-mb: messages are packed under it, a larger file gets an error "
        "line; a server that refuses a message as too large is followed to its own limit (default 64)",
    )
    parser.add_argument("--inflight", type=int, default=256, help="images sent and not yet answered, at most")
    parser.add_argument("--streams", type=int, default=2, help="ClassifyStream calls per server")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 when any image failed")
    parser.add_argument(
        "--shard",
        default=None,
        help="INDEX/COUNT: score only this shard of the input (serving/tools/shard.py)",
    )
    add_connection_arguments(parser)


# -- inputs and outputs ---------------------------------------------------------------------------


def image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def find_inputs(spec: str) -> list[str]:
    """Paths from a folder (recursive, image suffixes only), a glob, a list file, or '-' (stdin)."""
    if spec == "-":
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
        return [line.strip() for line in text.splitlines() if line.strip()]
    path = Path(spec)
    if path.is_dir():
        suffixes = image_suffixes()
        # Anything but a folder: a FIFO or a dangling link named like an image gets a line saying so.
        return sorted(str(p) for p in path.rglob("*") if not p.is_dir() and p.suffix.lower() in suffixes)
    if any(ch in spec for ch in "*?["):
        return sorted(p for p in glob.glob(spec, recursive=True) if not Path(p).is_dir())
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        return [line.strip() for line in text.splitlines() if line.strip()]
    raise ScoreError(f"input {spec!r} is not a folder, a glob, a list file or -", exit_code=2)


def inspect_file(path: str) -> tuple[int, str | None]:
    """The file's size, or why it is not read: only regular files are (a FIFO would block for ever)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return 0, "skipped: symbolic link loop"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return 0, "skipped: dangling symbolic link"
        return 0, f"cannot read file: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "a special file")
        return 0, f"skipped: not a regular file ({kind})"
    return info.st_size, None


def output_format(out: Path, chosen: str | None) -> str:
    return chosen or ("csv" if out.suffix.lower() == ".csv" else "jsonl")


def completed_paths(out: Path, fmt: str) -> set[str]:
    """Paths already scored in `out`; a last line cut off by a kill is dropped from the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(keep) != len(data):
        out.write_bytes(keep)
    text = keep.decode("utf-8", "surrogateescape")
    if fmt == "csv":
        return {row["path"] for row in csv.DictReader(io.StringIO(text))}
    return {json.loads(line)["path"] for line in text.splitlines() if line.strip()}


@dataclass
class ImageOutcome:
    path: str
    labels: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


class ResultWriter:
    """Appends one line per image and flushes it, so a killed job keeps every finished line."""

    def __init__(self, out: Path, fmt: str, top_k: int) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists() or out.stat().st_size == 0
        self.file = out.open("a", newline="", encoding="utf-8", errors="surrogateescape")
        self.fmt = fmt
        self.top_k = top_k
        if fmt == "csv":
            self.csv = csv.writer(self.file)
            if new:
                ranks = [
                    f"{name}_{r}" for r in range(1, top_k + 1) for name in ("index", "label", "probability")
                ]
                self.csv.writerow(["path", "error", *ranks])

    def write(self, outcome: ImageOutcome) -> None:
        if self.fmt == "csv":
            cells = [
                v
                for i, lbl, p in zip(outcome.indices, outcome.labels, outcome.probabilities, strict=True)
                for v in (i, lbl, f"{p:.6g}")
            ]
            self.csv.writerow([outcome.path, outcome.error or "", *cells])
        else:
            top = [
                {"index": i, "label": lbl, "probability": p}
                for i, lbl, p in zip(outcome.indices, outcome.labels, outcome.probabilities, strict=True)
            ]
            self.file.write(json.dumps({"path": outcome.path, "top_k": top, "error": outcome.error}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# -- work -----------------------------------------------------------------------------------------


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


# -- the job --------------------------------------------------------------------------------------


@dataclass
class Summary:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.failed) / self.wall_s if self.wall_s else 0.0

    def line(self) -> str:
        return (
            f"scored {self.scored}, failed {self.failed}, skipped {self.skipped} (already in the output); "
            f"{self.images_per_s:.1f} images/s; wall time {self.wall_s:.2f}s"
        )


def score(args: argparse.Namespace) -> Summary:
    if min(args.batch, args.inflight, args.top_k, args.streams, args.max_message_mb) < 1:
        raise ScoreError(
            "--batch, --inflight, --top-k, --streams and --max-message-mb must be at least 1", exit_code=2
        )
    fmt = output_format(args.out, args.format)
    paths = find_inputs(args.input)
    if not paths:  # e.g. a folder the container engine created empty for a missing bind mount
        raise ScoreError(f"no images in {args.input!r}: nothing to score", exit_code=2)
    if args.shard is not None:
        try:
            paths = select_shard(paths, *parse_shard(args.shard))
        except ValueError as exc:
            raise ScoreError(str(exc), exit_code=2) from None
    done = completed_paths(args.out, fmt)
    todo = [p for p in dict.fromkeys(paths) if p not in done]
    summary = Summary(skipped=len(paths) - len(todo))
    limit = None if args.local is not None else args.max_message_mb * MIB
    sizes = [inspect_file(path)[0] for path in todo]  # the problems are found again when read
    ids = itertools.count()
    chunks = pack(todo, sizes, args.batch, None if limit is None else limit - MESSAGE_OVERHEAD, ids)
    job = Job(chunks, args.inflight // args.batch, args, limit, ids)
    writer = ResultWriter(args.out, fmt, args.top_k)
    started = time.perf_counter()
    if args.local is not None:
        workers = [threading.Thread(target=local_worker, args=(job, args.local), daemon=True)]
    else:
        targets = args.server or [DEFAULT_SERVER]
        workers = [
            threading.Thread(target=stream_worker, args=(job, t), daemon=True)
            for t in targets
            for _ in range(args.streams)
        ]
    for worker in workers:
        worker.start()
    answered: set[int] = set()
    remaining = set(todo)  # by path: a chunk split after a refusal is answered under new ids
    try:
        with tqdm(total=len(todo), unit="img", desc="scoring", disable=None, smoothing=0.1) as bar:
            while remaining:
                try:
                    item = job.answers.get(timeout=0.5)
                except queue.Empty:
                    if not any(w.is_alive() for w in workers):
                        raise ScoreError(
                            f"no server could score the remaining {len(todo) - bar.n} images "
                            f"(tried {', '.join(args.server or ['the default'])})"
                        ) from None
                    continue
                if isinstance(item, Exception):
                    raise item
                chunk, outcomes = item
                if chunk.id in answered:
                    continue
                answered.add(chunk.id)
                job.slots.release()
                outcomes = [outcome for outcome in outcomes if outcome.path in remaining]
                for outcome in outcomes:
                    remaining.discard(outcome.path)
                    writer.write(outcome)
                    if outcome.error:
                        summary.failed += 1
                    else:
                        summary.scored += 1
                bar.update(len(outcomes))
    finally:
        job.finished.set()
        writer.close()
        summary.wall_s = time.perf_counter() - started
    return summary


def run_score(args: argparse.Namespace) -> int:
    try:
        summary = score(args)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(summary.line())
    return 1 if args.fail_on_error and summary.failed else 0
