"""The dynamic batcher: rows from many concurrent callers merged into one array per model call.

Generic on purpose: it knows nothing of images, protobuf or ONNX. It takes a function from a stacked
array (N, ...) to an array with N rows, and hands each caller exactly its own rows back, in order.

Dispatch policy (all in the event loop thread, driven by callbacks, no polling task):
  * idle model (no batch in flight): run whatever is queued at once, so a lone request never waits
    ("at once" is the end of the current event-loop tick, so callers runnable in the same tick share it);
  * model busy: keep collecting, and stage the next batch when it is full (`max_batch_size` rows) or
    its oldest row has waited `max_delay` -- an upper bound, never a fixed wait;
  * up to `max_inflight` batches at a time (default 2: one running, the next one staged), so the
    model never idles between batches;
  * a batch expected to take less than `inline_below_s` (a tiny CNN: tens of microseconds; judged by
    the fastest of the model's recent calls of about its size, see `run_times`) runs in
    the event loop itself when nothing is in flight: the hand-off to a worker thread and back would
    cost more than the call, and blocking the loop that briefly costs nothing. With nothing queued
    either, and callers arriving one per tick, `submit` runs the caller's rows at once, without a
    future or a loop turn (`_run_now`); callers that arrive together share the tick's batch.
  * two priority levels (Triton's `priority_levels`): classification at PRIORITY_HIGH, explanations'
    masked copies at PRIORITY_LOW. Low rows never share a batch with high ones, and a batch of only low
    rows is started only when nothing is in flight, so a high row waits behind at most the one low
    batch already running -- a short one (`low_batch_size`) while high rows keep coming, a full one
    after `quiet_after_s` without any; one at a time on the event loop for a fast model, which then
    turns once to accept high callers before the next. Low rows
    that have waited `low_max_wait_s` go first into the next batch (starvation bound), whatever is
    queued above them.
Sizes count rows, not requests; a request larger than `max_batch_size` is split into several items.
Each level's queue is bounded in rows (`QueueFullError` beyond it) and rows whose deadline has passed, or
whose caller went away, are dropped before they reach the model (`DeadlineExceededError`, counted
in `dropped_rows`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from serving.core.batch_settings import BatchingConfig, BatchStats
from serving.core.errors import DeadlineExceeded, Overloaded, Unavailable
from serving.core.receipt import Receipt, batch_ran
from serving.core.run_times import RunTimes

BatchFunction = Callable[[np.ndarray], np.ndarray]
PRIORITY_HIGH = 0  # classification: every request a client waits on
PRIORITY_LOW = 1  # work that must never hold classification up (occlusion's masked copies)


class QueueFullError(Overloaded):
    """The batcher's queue holds `max_queue_rows` rows already."""


class DeadlineExceededError(DeadlineExceeded):
    """The rows' deadline passed before a batch could take them."""


class BatcherClosedError(Unavailable):
    """The batcher no longer accepts work (the server is shutting down)."""


class _Pending:
    """One caller's chunk of rows waiting in the queue."""

    __slots__ = ("deadline", "enqueued", "future", "receipt", "rows")

    def __init__(
        self,
        rows: np.ndarray,
        future: asyncio.Future,
        deadline: float | None,
        enqueued: float,
        receipt: Receipt | None,
    ):
        self.rows = rows
        self.future = future
        self.deadline = deadline
        self.enqueued = enqueued
        self.receipt = receipt


def rows_of(batch: list[_Pending]) -> int:
    """The rows a batch holds (its items' rows together)."""
    return sum(len(item.rows) for item in batch)


class DynamicBatcher:
    """Merges concurrent `submit` calls into batches for `run_batch`, run in `executor` threads."""

    def __init__(
        self,
        run_batch: BatchFunction,
        config: BatchingConfig | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_batch = run_batch
        self.config = config or BatchingConfig()
        self.stats = BatchStats()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()  # PRIORITY_HIGH
        self._low: collections.deque[_Pending] = collections.deque()  # PRIORITY_LOW
        self._queued_rows = 0  # both levels
        self._low_rows = 0
        self._last_high = -float("inf")  # when the last high-priority row came (this batcher's clock)
        self._inflight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._closed = False
        self._idle: asyncio.Event | None = None
        self._run_times = RunTimes()
        self._dispatch_pending = False
        # Whether callers arrive together (several in one loop tick): then even a fast idle model
        # waits for the tick's end to share the batch; else it runs a caller's rows at once.
        self._arrive_together = False
        self._ran_now_this_tick = False

    async def submit(
        self,
        rows: np.ndarray,
        deadline: float | None = None,
        priority: int = PRIORITY_HIGH,
        receipt: Receipt | None = None,
    ) -> np.ndarray:
        """Queues `rows` (N, ...) and returns the N output rows; `deadline` is on this batcher's clock.
        `receipt` learns the queue wait, the model calls and the batches the rows ran in."""
        if self._closed:
            raise BatcherClosedError("the model is shutting down")
        count = len(rows)
        if count == 0:
            raise ValueError("submit needs at least one row")
        low = priority != PRIORITY_HIGH
        waiting = self._low_rows if low else self._queued_rows - self._low_rows
        if waiting + count > self.config.max_queue_rows:
            self.stats.rejected += 1
            level = "low-priority " if low else ""
            raise QueueFullError(
                f"overloaded: {level}queue full, {waiting} rows waiting, limit {self.config.max_queue_rows}"
            )
        now = self._clock()
        if receipt is not None:
            receipt.handed_over(time.perf_counter())
        step = self.config.max_batch_size
        loop = asyncio.get_running_loop()
        if low:
            return await self._submit_low(rows, count, deadline, now, loop, receipt)
        self._last_high = now
        if count <= step and self._fits_inline(count):
            if self._ran_now_this_tick:
                self._arrive_together = True  # a second caller in the tick: share from now on
            elif not self._queue and not self._low and not self._arrive_together:
                self._ran_now_this_tick = True
                loop.call_soon(self._end_tick)
                return self._run_now(rows, count, deadline, now, receipt)
        self._queued_rows += count
        self.stats.submitted += 1
        if not self._dispatch_pending:
            # Dispatch at the end of this loop tick: callers already runnable enqueue first and share
            # the batch, with no wait added.
            self._dispatch_pending = True
            loop.call_soon(self._dispatch_soon)
        if count <= step:  # one item: the usual case, without the list and the slicing
            future = loop.create_future()
            self._queue.append(_Pending(rows, future, deadline, now, receipt))
            return await future
        futures = []
        for start in range(0, count, step):
            future = loop.create_future()
            self._queue.append(_Pending(rows[start : start + step], future, deadline, now, receipt))
            futures.append(future)
        return np.concatenate(await asyncio.gather(*futures))

    async def _submit_low(
        self,
        rows: np.ndarray,
        count: int,
        deadline: float | None,
        now: float,
        loop: asyncio.AbstractEventLoop,
        receipt: Receipt | None,
    ) -> np.ndarray:
        """Low-priority rows always queue (they never run ahead of a tick's high callers)."""
        self._queued_rows += count
        self._low_rows += count
        self.stats.submitted += 1
        futures = []
        step = self.config.low_rows_per_batch
        for start in range(0, count, step):
            future = loop.create_future()
            chunk = rows[start : start + step]
            self._low.append(_Pending(chunk, future, deadline, now, receipt))
            futures.append(future)
        if not self._dispatch_pending:
            self._dispatch_pending = True
            loop.call_soon(self._dispatch_soon)
        outputs = await asyncio.gather(*futures)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _run_now(
        self, rows: np.ndarray, count: int, deadline: float | None, now: float, receipt: Receipt | None
    ) -> np.ndarray:
        """A fast model, nothing queued or running, callers arriving one by one: the rows are a batch
        of their own, run here.

        Queueing them would cost a future and a loop turn or two, more than the model call itself,
        to wait for callers that do not come (a gRPC server hands over about one call per loop tick).
        Where they do come together (an HTTP server parses many connections' requests in one tick),
        a second caller in the tick turns this off until a tick's batch holds a lone caller again.
        """
        self.stats.submitted += 1
        self.stats.queue_wait.observe(0.0)
        if deadline is not None and now >= deadline:
            self.stats.dropped_rows += count
            raise DeadlineExceededError("deadline passed while queued")
        self._count_batch(count)
        started = time.perf_counter()
        output: np.ndarray | None
        error: BaseException | None
        try:
            (output, took_ns), error = self._run([rows]), None
        except Exception as exc:
            output, took_ns, error = None, 0, exc
        if receipt is not None:
            batch_ran((receipt,), count, started, time.perf_counter())
        error = self._finish_run(count, output, error, took_ns)
        if error is not None or output is None:  # _finish_run made a missing output an error
            raise error or RuntimeError("batch function returned no rows")
        return output

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (not yet handed to the model)."""
        return self._queued_rows

    def _end_tick(self) -> None:
        self._ran_now_this_tick = False

    def _dispatch_soon(self) -> None:
        self._dispatch_pending = False
        self._arrive_together = len(self._queue) > 1  # lone callers again: the next may run at once
        self._maybe_dispatch()

    def _maybe_dispatch(self) -> None:
        config = self.config
        while (self._queue or self._low) and self._inflight < config.max_inflight:
            now = self._clock()
            overdue = bool(self._low) and now >= self._low[0].enqueued + config.low_max_wait_s
            if self._queue and not overdue:
                due = self._queue[0].enqueued + config.max_delay_s
                high_rows = self._queued_rows - self._low_rows
                ready = self._inflight == 0 or high_rows >= config.max_batch_size or now >= due
                if not ready:
                    self._arm_timer(due)
                    return
                batch = self._take_batch(self._queue, now)
            elif self._inflight == 0 or overdue:
                # Low rows alone start only on an idle model (or once overdue): a high row that comes
                # meanwhile waits behind this one batch at most, a short one while high rows come.
                quiet = now - self._last_high >= config.quiet_after_s
                limit = config.max_batch_size if quiet else config.low_rows_per_batch
                batch = self._take_batch(self._low, now, limit=limit)
                if overdue:  # what room is left goes to the high rows, oldest first
                    batch += self._take_batch(self._queue, now, rows_of(batch))
                # At most one low batch inline per turn of the loop: a run of them would keep the loop
                # from accepting the high callers they must not hold up, and a thread hand-off per
                # batch costs a tiny model more than the batch.
                if batch and self._dispatch(batch, inline=not overdue):
                    asyncio.get_running_loop().call_soon(self._maybe_dispatch)
                    return
                continue
            else:
                self._arm_timer(self._low[0].enqueued + config.low_max_wait_s)
                return
            if batch:
                self._dispatch(batch)
        if self._idle is not None and self._inflight == 0 and not self._queue and not self._low:
            self._idle.set()  # close() is waiting for the last batch

    def _take_batch(
        self, queue: collections.deque[_Pending], now: float, rows: int = 0, limit: int = 0
    ) -> list[_Pending]:
        """Pops whole items of one level, oldest first, until the batch holds `limit` rows (default
        max_batch_size; `rows` already taken); drops cancelled and expired ones."""
        limit = limit or self.config.max_batch_size
        batch: list[_Pending] = []
        low = queue is self._low
        while queue:
            item = queue[0]
            size = len(item.rows)
            expired = item.deadline is not None and now >= item.deadline
            # The caller went away (cancelled, or its deadline passed in gRPC), or its deadline passed.
            if item.future.done() or expired:
                queue.popleft()
                self._queued_rows -= size
                self._low_rows -= size if low else 0
                self.stats.dropped_rows += size
                if not item.future.done():
                    item.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                continue
            if rows + size > limit:
                break
            queue.popleft()
            self._queued_rows -= size
            self._low_rows -= size if low else 0
            batch.append(item)
            rows += size
        for item in batch:
            self.stats.queue_wait.observe(now - item.enqueued)
        return batch

    def _count_batch(self, rows: int) -> None:
        self.stats.batches += 1
        self.stats.items += rows
        self.stats.batch_sizes[rows] += 1

    def _finish_run(
        self, rows: int, output: np.ndarray | None, error: BaseException | None, took_ns: int
    ) -> BaseException | None:
        """Records a model call's time (event loop thread); returns what its callers get as an error,
        if anything."""
        self.stats.batch_compute_ns[rows] += took_ns
        if took_ns:  # 0: the call failed before it could be timed
            took = took_ns * 1e-9
            self.stats.compute.observe(took)
            self._run_times.record(rows, took)
        if error is None and (output is None or len(output) != rows):
            error = RuntimeError(
                f"batch function returned {0 if output is None else len(output)} rows for {rows}"
            )
        return error

    def _fits_inline(self, rows: int) -> bool:
        """Whether a call of `rows` rows may run on the event loop: nothing in flight, and expected to
        take less than `inline_below_s`, below which blocking the loop costs less than a worker thread's
        hand-off and return."""
        return self._inflight == 0 and self._run_times.expected_s(rows) < self.config.inline_below_s

    def _dispatch(self, batch: list[_Pending], inline: bool = True) -> bool:
        """Runs the batch on the event loop when `inline` allows and it fits, else hands it to a worker
        thread; True when it ran inline (and is done)."""
        rows = rows_of(batch)
        self._count_batch(rows)
        parts = [item.rows for item in batch]
        started = time.perf_counter()
        if inline and self._fits_inline(rows):
            # A fast model on an idle batcher: two thread hand-offs would cost more than the call.
            try:
                (output, took_ns), error = self._run(parts), None
            except Exception as exc:
                output, took_ns, error = None, 0, exc
            self._complete(batch, rows, output, error, took_ns, started)
            return True
        self._inflight += 1
        done = asyncio.get_running_loop().run_in_executor(self._executor, self._run, parts)
        done.add_done_callback(lambda result: self._deliver(batch, rows, result, started))
        return False

    def _run(self, parts: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """Stack the parts and call the model (in a worker thread, or inline for fast models);
        returns the output and the call's duration in ns."""
        started = time.perf_counter_ns()
        stacked = parts[0] if len(parts) == 1 else np.concatenate(parts)
        output = self.run_batch(stacked)
        return output, time.perf_counter_ns() - started

    def _deliver(self, batch: list[_Pending], rows: int, result: asyncio.Future, started: float) -> None:
        """Event loop thread: a worker finished a batch."""
        self._inflight -= 1
        error = result.exception()
        output, took_ns = (None, 0) if error else result.result()
        self._complete(batch, rows, output, error, took_ns, started)
        self._maybe_dispatch()

    def _complete(
        self,
        batch: list[_Pending],
        rows: int,
        output: np.ndarray | None,
        error: BaseException | None,
        took_ns: int,
        started: float,
    ) -> None:
        """Hands each caller its own slice, in the order the batch was formed (`started`: when the batch
        was handed to the model, on the receipts' clock)."""
        # One entry per request: a request's low-priority chunks can share a batch.
        receipts = list(dict.fromkeys(item.receipt for item in batch if item.receipt is not None))
        if receipts:
            batch_ran(receipts, rows, started, time.perf_counter())
        error = self._finish_run(rows, output, error, took_ns)
        offset = 0
        for item in batch:
            size = len(item.rows)
            if not item.future.done():
                if error is None and output is not None:  # _finish_run: no output is an error
                    item.future.set_result(output[offset : offset + size])
                else:
                    item.future.set_exception(error or RuntimeError("batch function returned no rows"))
            offset += size

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = when
        self._timer = loop.call_later(max(0.0, when - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._maybe_dispatch()

    async def close(self) -> None:
        """Refuses new work, lets queued and running batches finish, then releases the worker threads."""
        self._closed = True
        if self._queue or self._low or self._inflight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
        if self._own_executor:
            self._executor.shutdown(wait=True)
