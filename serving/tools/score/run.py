"""The job from flags to summary: what to score (less what `--out` holds already), the workers (servers'
streams or the local data plane), and the answers written as they arrive."""

from __future__ import annotations

import argparse
import itertools
import queue
import sys
import threading
import time
from dataclasses import dataclass

from tqdm import tqdm

from serving.client import DEFAULT_SERVER
from serving.tools.score.chunks import MESSAGE_OVERHEAD, MIB, pack
from serving.tools.score.errors import ScoreError
from serving.tools.score.inputs import find_inputs, inspect_file
from serving.tools.score.job import Job
from serving.tools.score.local import local_worker
from serving.tools.score.remote import stream_worker
from serving.tools.score.results_file import ResultWriter, completed_paths, output_format
from serving.tools.shard import parse_shard, select_shard


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
    paths = input_paths(args)
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
    workers = start_workers(job, args)
    try:
        collect(job, workers, todo, writer, summary)
    finally:
        job.finished.set()
        writer.close()
        summary.wall_s = time.perf_counter() - started
    return summary


def input_paths(args: argparse.Namespace) -> list[str]:
    """The input's paths, this shard's only with `--shard`."""
    paths = find_inputs(args.input)
    if not paths:  # e.g. a folder the container engine created empty for a missing bind mount
        raise ScoreError(f"no images in {args.input!r}: nothing to score", exit_code=2)
    if args.shard is not None:
        try:
            paths = select_shard(paths, *parse_shard(args.shard))
        except ValueError as exc:
            raise ScoreError(str(exc), exit_code=2) from None
    return paths


def start_workers(job: Job, args: argparse.Namespace) -> list[threading.Thread]:
    """The local data plane, or `--streams` streams to every server."""
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
    return workers


def collect(
    job: Job, workers: list[threading.Thread], todo: list[str], writer: ResultWriter, summary: Summary
) -> None:
    """Writes the answers as they arrive until every path has its line; raises when no worker is left."""
    args = job.args
    answered: set[int] = set()
    remaining = set(todo)  # by path: a chunk split after a refusal is answered under new ids
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


def run_score(args: argparse.Namespace) -> int:
    try:
        summary = score(args)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(summary.line())
    return 1 if args.fail_on_error and summary.failed else 0
