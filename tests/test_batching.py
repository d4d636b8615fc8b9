"""The dynamic batcher alone: every caller gets exactly its own rows, in order, whatever the timing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.core.batch_settings import BatchingConfig
from serving.core.batching import (
    PRIORITY_LOW,
    BatcherClosedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)
from serving.core.run_times import RUN_TIME_WINDOW


class RecordingModel:
    """A batch function that tags each row (row * 10 + 1) and records the batch sizes it was given.

    With `gated`, every call waits until the test opens the gate: "the model is busy" is then a fact
    the test controls, not a guess about timing on a loaded machine.
    """

    def __init__(self, delay: float = 0.0, gated: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    async def busy(self) -> None:
        """Returns once a batch is inside the model."""
        assert await asyncio.to_thread(self.started.wait, 10)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(batch))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.started.set()
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        return batch * 10 + 1


def rows_for(caller: int, count: int) -> np.ndarray:
    """Rows unique to one caller: (caller, position) in two columns."""
    return np.stack([np.full(count, caller), np.arange(count)], axis=1).astype(np.int64)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    gaps=st.lists(st.floats(0, 0.002), min_size=30, max_size=30),
    max_batch=st.integers(1, 16),
    delay_ms=st.sampled_from([0.0, 0.5, 3.0]),
    model_ms=st.sampled_from([0.0, 1.0]),
)
def test_every_caller_gets_its_own_rows_in_order(counts, gaps, max_batch, delay_ms, model_ms) -> None:
    model = RecordingModel(model_ms / 1000)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch, delay_ms / 1000, max_queue_rows=10_000))

        async def caller(index: int) -> None:
            await asyncio.sleep(gaps[index])
            sent = rows_for(index, counts[index])
            got = await batcher.submit(sent)
            np.testing.assert_array_equal(got, sent * 10 + 1)

        await asyncio.gather(*(caller(i) for i in range(len(counts))))
        await batcher.close()
        assert batcher.stats.items == sum(counts)
        assert batcher.stats.submitted == len(counts)
        assert sum(size * n for size, n in batcher.stats.batch_sizes.items()) == sum(counts)

    asyncio.run(scenario())
    assert max(model.sizes) <= max_batch  # rows, not requests
    assert sum(model.sizes) == sum(counts)
    assert model.most_running == 1  # one worker thread: batches never overlap on the model


def test_lone_request_runs_at_once_without_waiting_for_max_delay() -> None:
    model = RecordingModel()

    async def scenario() -> float:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=64, max_delay_s=5.0))
        started = time.perf_counter()
        await batcher.submit(rows_for(0, 1))
        took = time.perf_counter() - started
        await batcher.close()
        return took

    assert asyncio.run(scenario()) < 1.0  # far below max_delay: an idle model does not wait for a batch


def test_requests_arriving_while_busy_are_merged() -> None:
    model = RecordingModel(gated=True)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=64, max_delay_s=1.0))
        first = asyncio.create_task(batcher.submit(rows_for(0, 1)))
        await model.busy()
        rest = [asyncio.create_task(batcher.submit(rows_for(i, 2))) for i in range(1, 31)]
        await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(first, *rest)
        await batcher.close()

    asyncio.run(scenario())
    assert model.sizes[0] == 1
    assert max(model.sizes) == 60  # 30 callers of 2 rows: one batch once the model was free


def test_callers_of_one_tick_share_batches_and_full_batches_are_staged() -> None:
    model = RecordingModel(delay=0.05)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=4, max_delay_s=10.0))
        tasks = [asyncio.create_task(batcher.submit(rows_for(i, 1))) for i in range(9)]
        await asyncio.gather(*tasks)
        await batcher.close()

    asyncio.run(scenario())
    # All nine arrive in one event-loop tick: a full batch runs, the next full one is staged behind it,
    # and the last row goes as soon as the model is free -- never waiting out max_delay.
    assert model.sizes == [4, 4, 1]


def test_large_request_is_split_into_rows_of_max_batch() -> None:
    model = RecordingModel()

    async def scenario() -> np.ndarray:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8, max_delay_s=0.001))
        got = await batcher.submit(rows_for(3, 30))
        await batcher.close()
        return got

    np.testing.assert_array_equal(asyncio.run(scenario()), rows_for(3, 30) * 10 + 1)
    assert max(model.sizes) <= 8 and sum(model.sizes) == 30


def test_queue_is_bounded_in_rows() -> None:
    model = RecordingModel(gated=True)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(4, 0.001, max_queue_rows=8, max_inflight=1))
        running = asyncio.create_task(batcher.submit(rows_for(0, 4)))
        await model.busy()
        queued = asyncio.create_task(batcher.submit(rows_for(1, 8)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="overloaded: queue full"):
            await batcher.submit(rows_for(2, 1))
        model.gate.set()
        await asyncio.gather(running, queued)
        assert batcher.stats.rejected == 1
        await batcher.close()

    asyncio.run(scenario())


def test_expired_rows_are_dropped_before_the_model() -> None:
    """On the batcher's own clock: the deadline passes while the first batch holds the model."""
    now = [100.0]
    release = threading.Event()
    seen: list[int] = []

    def gated(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        release.wait(10)
        return batch

    async def scenario() -> None:
        batcher = DynamicBatcher(gated, BatchingConfig(4, 0.001, max_inflight=1), clock=lambda: now[0])
        running = asyncio.create_task(batcher.submit(rows_for(0, 1)))
        while not seen:  # the first batch is in the model
            await asyncio.sleep(0.001)
        late = asyncio.create_task(batcher.submit(rows_for(1, 3), deadline=now[0] + 1.0))
        await asyncio.sleep(0)
        now[0] += 2.0  # its deadline passes while it waits in the queue
        release.set()
        with pytest.raises(DeadlineExceededError):
            await late
        await running
        assert batcher.stats.dropped_rows == 3
        await batcher.close()

    asyncio.run(scenario())
    assert seen == [1]  # the model never saw the expired rows


def test_cancelled_callers_are_skipped_and_others_unaffected() -> None:
    model = RecordingModel(gated=True)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(8, 0.001, max_inflight=1))
        running = asyncio.create_task(batcher.submit(rows_for(0, 1)))
        await model.busy()
        gone = asyncio.create_task(batcher.submit(rows_for(1, 5)))
        kept = asyncio.create_task(batcher.submit(rows_for(2, 2)))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        np.testing.assert_array_equal(await kept, rows_for(2, 2) * 10 + 1)
        await running
        assert batcher.stats.dropped_rows == 5
        await batcher.close()

    asyncio.run(scenario())
    assert model.sizes == [1, 2]


def test_model_failure_reaches_every_caller_of_that_batch_only() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise ValueError("model broke")
        return batch

    async def scenario() -> None:
        batcher = DynamicBatcher(flaky, BatchingConfig(max_batch_size=8, max_delay_s=0.001))
        with pytest.raises(ValueError, match="model broke"):
            await batcher.submit(rows_for(0, 2))
        np.testing.assert_array_equal(await batcher.submit(rows_for(1, 2)), rows_for(1, 2))
        await batcher.close()

    asyncio.run(scenario())


def test_closed_batcher_refuses_new_work_after_finishing_queued_work() -> None:
    model = RecordingModel(delay=0.02)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=2, max_delay_s=0.001))
        pending = [asyncio.create_task(batcher.submit(rows_for(i, 2))) for i in range(4)]
        await asyncio.sleep(0)
        await batcher.close()
        assert all(t.done() and not t.exception() for t in pending)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(rows_for(9, 1))

    asyncio.run(scenario())


def test_close_waits_for_inline_batches_too() -> None:
    model = RecordingModel()  # microseconds per call: runs on the event loop once measured

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=2, max_delay_s=0.001))
        await batcher.submit(rows_for(0, 1))  # measures the model: from now on it runs inline
        pending = [asyncio.create_task(batcher.submit(rows_for(i, 2))) for i in range(1, 5)]
        await asyncio.sleep(0)  # queued; their dispatch is scheduled for the end of this tick
        async with asyncio.timeout(5):  # not wait_for: close() must start before that dispatch runs
            await batcher.close()
        assert all(t.done() and not t.exception() for t in pending)

    asyncio.run(scenario())
    assert sum(model.sizes) == 9


class ThreadNoting:
    """A batch function that notes the thread of each call, and sleeps `slow_s` in the calls `slow`
    picks (by their number, from 0)."""

    def __init__(self, slow: Callable[[int], bool], slow_s: float) -> None:
        self.threads: list[int] = []
        self.slow, self.slow_s = slow, slow_s

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.slow(len(self.threads)):
            time.sleep(self.slow_s)
        self.threads.append(threading.get_ident())
        return batch


def lone_calls(model: ThreadNoting, calls: int) -> int:
    """`calls` callers one after the other; returns the event loop's thread."""

    async def scenario() -> int:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8))
        for caller in range(calls):
            await batcher.submit(rows_for(caller, 1))
        await batcher.close()
        return threading.get_ident()

    return asyncio.run(scenario())


def test_one_slow_call_keeps_a_fast_model_on_the_event_loop() -> None:
    """A call's time holds its wait for the GIL on return, up to 5 ms while another thread runs Python
    (the event loop, span export). One such call must not send a fast model's batches to the worker
    thread, where every return waits for the busy loop."""
    model = ThreadNoting(slow=lambda call: call == 2, slow_s=0.02)  # 40 × inline_below_s
    loop_thread = lone_calls(model, 12)
    assert model.threads[1:] == [loop_thread] * 11  # the first: queued, nothing was measured yet


def test_a_model_that_turns_slow_leaves_the_event_loop_within_the_window() -> None:
    model = ThreadNoting(slow=lambda call: call >= 3, slow_s=0.002)  # 4 × inline_below_s
    loop_thread = lone_calls(model, 3 + RUN_TIME_WINDOW + 4)
    assert model.threads[1:3] == [loop_thread] * 2
    # Slow calls stay on the loop while a fast one is in the window …
    assert model.threads[3 : 3 + RUN_TIME_WINDOW] == [loop_thread] * RUN_TIME_WINDOW
    # … and once it holds slow calls only, batches go to the worker thread.
    assert loop_thread not in model.threads[3 + RUN_TIME_WINDOW :]


class Timed:
    """A batch function of `fixed_s` a call and `per_row_s` a row (a busy wait: steadier than a sleep)
    that notes each call's rows and whether it ran on the event loop's thread."""

    def __init__(
        self, fixed_s: float, per_row_s: float, slower_from: int = -1, slower_by_s: float = 0.0
    ) -> None:
        self.fixed_s, self.per_row_s = fixed_s, per_row_s
        self.slower_from, self.slower_by_s = slower_from, slower_by_s  # from that call on, each takes longer
        self.loop_thread = 0
        self.calls: list[tuple[int, bool]] = []  # (rows, on the event loop)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        extra = self.slower_by_s if 0 <= self.slower_from <= len(self.calls) else 0.0
        until = time.perf_counter() + self.fixed_s + self.per_row_s * len(batch) + extra
        while time.perf_counter() < until:
            pass
        self.calls.append((len(batch), threading.get_ident() == self.loop_thread))
        return batch


def timed_calls(model: Timed, sizes: list[int]) -> list[tuple[int, bool]]:
    """One caller after another, each with its number of rows, under a 50 ms inline limit (ms-scale
    model times: a noisy machine's stalls stay well inside the margins)."""

    async def scenario() -> None:
        model.loop_thread = threading.get_ident()
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=32, inline_below_s=0.05))
        for caller, rows in enumerate(sizes):
            await batcher.submit(rows_for(caller, rows))
        await batcher.close()

    asyncio.run(scenario())
    return model.calls


def test_a_batch_too_large_for_the_event_loop_goes_to_the_worker_thread() -> None:
    """Single rows of 4.1 ms fit under the limit; a batch of 16 rows (64 ms; guessed from them at up
    to 32 × 4.1 ms) goes to the worker thread, while single rows go on running on the loop."""
    calls = timed_calls(Timed(fixed_s=0.0001, per_row_s=0.004), [1, 1, 1, 16, 1])
    assert calls == [(1, False), (1, True), (1, True), (16, False), (1, True)]  # first: nothing measured


def test_bursts_among_lone_calls_keep_their_own_time() -> None:
    """A model of 2 ms a call and 0.1 ms a row: a first burst of 31 rows, guessed from single rows at
    up to 32 × 2.1 ms, goes to the worker thread; it took 5 ms, and the bursts after it run on the
    loop, though 20 single rows, more than a window, come between them."""
    sizes = [1] * 20 + ([31] + [1] * 20) * 3
    calls = timed_calls(Timed(fixed_s=0.002, per_row_s=0.0001), sizes)
    bursts = [on_loop for rows, on_loop in calls if rows == 31]
    assert bursts == [False, True, True]
    assert all(on_loop for rows, on_loop in calls[1:] if rows == 1)


def test_a_fast_model_s_first_batches_of_a_new_size_run_on_the_loop() -> None:
    """Sizes not run yet are guessed from the sizes that were: a burst of 31 rows from single rows of
    0.2 ms (at most 32 ×), then 4 rows from the burst (no more than it), both under the limit."""
    calls = timed_calls(Timed(fixed_s=0.0002, per_row_s=0.00001), [1, 1, 31, 4, 1])
    assert calls == [(1, False), (1, True), (31, True), (4, True), (1, True)]


def test_a_model_that_slows_sends_larger_batches_to_the_worker_with_its_single_rows() -> None:
    """A larger batch costs no less than a smaller one: once single rows show that the model has
    turned slow (60 ms a call from the fifth call on), a size measured fast while it was fast leaves
    the loop too, without waiting for its own window to fill with slow calls."""
    sizes = [1, 1, 16, 1] + [1] * RUN_TIME_WINDOW + [16]
    calls = timed_calls(Timed(fixed_s=0.0002, per_row_s=0.00001, slower_from=4, slower_by_s=0.06), sizes)
    assert calls[2] == (16, True)  # measured fast
    assert calls[-1] == (16, False)


def test_a_fast_model_runs_lone_callers_at_once_and_shares_a_tick_among_callers_who_arrive_together() -> None:
    """Lone callers (a gRPC server hands over about one call per tick) skip the queue; callers who
    become runnable in the same tick (an HTTP server parses many connections' requests at once) still
    share one batch, as they did before the fast path existed."""
    model = RecordingModel()  # microseconds per call: inline once measured

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=32, max_delay_s=0.001))
        await batcher.submit(rows_for(0, 1))  # measures the model (queued: nothing is known yet)
        for caller in range(1, 4):  # lone callers, one per tick: each runs at once, alone
            await batcher.submit(rows_for(caller, 1))
        lone = list(model.sizes)
        answers = await asyncio.gather(*(batcher.submit(rows_for(10 + i, 1)) for i in range(8)))
        first_together = list(model.sizes[len(lone) :])
        answers += await asyncio.gather(*(batcher.submit(rows_for(20 + i, 1)) for i in range(8)))
        second_together = list(model.sizes[len(lone) + len(first_together) :])
        await batcher.submit(rows_for(30, 1))  # alone again: queued once, the tick's batch holds one
        await batcher.submit(rows_for(31, 1))  # … and from then on at once
        await batcher.close()
        assert lone == [1, 1, 1, 1]
        # The first of eight runs at once, before the others are seen; they share the tick's batch,
        # and from then on all eight of a tick do.
        assert first_together == [1, 7] and second_together == [8]
        assert model.sizes[-2:] == [1, 1]
        for caller, rows in zip([*range(10, 18), *range(20, 28)], answers, strict=True):
            np.testing.assert_array_equal(rows, rows_for(caller, 1) * 10 + 1)
        assert batcher.stats.queued == batcher.stats.submitted == 22  # a wait (of 0) for each

    asyncio.run(scenario())


class LevelRecorder:
    """A model of ~1 ms per batch that records when each batch started and which callers' rows it held
    (rows are (level, caller, call) triples; level 1 is low priority)."""

    def __init__(self, delay: float = 0.001) -> None:
        self.delay = delay
        self.batches: list[tuple[float, frozenset[int], set[tuple[int, int, int]]]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        started = time.monotonic()
        time.sleep(self.delay)
        levels = frozenset(int(v) for v in batch[:, 0])
        self.batches.append((started, levels, {tuple(int(v) for v in row) for row in batch}))
        return batch


async def _loop_caller(
    batcher: DynamicBatcher, level: int, caller: int, rows: int, until: float, calls: list
) -> None:
    call = 0
    while time.monotonic() < until:
        batch = np.array([[level, caller, call]] * rows, dtype=np.int64)
        submitted = time.monotonic()
        out = await batcher.submit(batch, priority=level)
        np.testing.assert_array_equal(out, batch)  # its own rows back, whatever the level
        calls.append((level, caller, call, submitted, time.monotonic()))
        call += 1


def test_low_priority_rows_never_hold_a_high_row_behind_more_than_one_batch() -> None:
    """16 callers loop on high-priority calls while 2 loop on 49-row low-priority requests (an
    occlusion's copies): every call completes, and a high row waits behind at most one batch of low
    rows: the one already running (or starting in its worker thread) when it came."""
    model = LevelRecorder()
    calls: list[tuple[int, int, int, float, float]] = []

    async def scenario() -> None:
        config = BatchingConfig(max_batch_size=16, max_delay_s=0.002, low_max_wait_s=60.0)
        batcher = DynamicBatcher(model, config)
        until = time.monotonic() + 1.5
        await asyncio.gather(
            *(_loop_caller(batcher, 0, c, 1, until, calls) for c in range(16)),
            *(_loop_caller(batcher, PRIORITY_LOW, c, 49, until, calls) for c in range(2)),
        )
        await batcher.close()

    asyncio.run(scenario())
    high = [c for c in calls if c[0] == 0]
    low = [c for c in calls if c[0] == PRIORITY_LOW]
    assert len(high) > 200 and len(low) >= 2, (len(high), len(low))
    assert all(levels in ({0}, {PRIORITY_LOW}) for _, levels, _ in model.batches), "levels mixed"
    started_at = {key: started for started, _, keys in model.batches for key in keys}
    low_starts = sorted(started for started, levels, _ in model.batches if levels == {PRIORITY_LOW})
    worst = 0
    for level, caller, call, submitted, _ in high:
        ran = started_at[(level, caller, call)]
        worst = max(worst, sum(1 for s in low_starts if submitted < s < ran))
    assert worst <= 1, f"a high row waited behind {worst} batches of low rows"


def test_low_priority_batches_are_short_under_high_load_and_full_when_quiet() -> None:
    sizes: list[tuple[int, int]] = []  # (level, rows)

    def model(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.001)
        sizes.append((int(batch[0, 0]), len(batch)))
        return batch

    async def scenario() -> None:
        config = BatchingConfig(max_batch_size=16, max_delay_s=0.002, low_max_wait_s=60.0)
        batcher = DynamicBatcher(model, config)
        until = time.monotonic() + 0.6
        calls: list = []
        await asyncio.gather(
            *(_loop_caller(batcher, 0, c, 1, until, calls) for c in range(16)),
            _loop_caller(batcher, PRIORITY_LOW, 0, 40, until, calls),
        )
        loaded = len(sizes)
        await asyncio.sleep(config.quiet_after_s)
        await batcher.submit(np.array([[PRIORITY_LOW, 1, 0]] * 40), priority=PRIORITY_LOW)
        await batcher.close()
        under_load = [rows for level, rows in sizes[:loaded] if level == PRIORITY_LOW]
        quiet = [rows for level, rows in sizes[loaded:]]
        assert under_load and max(under_load) <= config.low_rows_per_batch == 4, under_load
        assert quiet == [16, 16, 8], quiet  # no high row of late: full batches

    asyncio.run(scenario())


def test_low_priority_rows_go_first_once_they_waited_their_bound() -> None:
    """High callers keep the queue full for the whole run, so low rows would wait forever without the
    bound; with it they complete under that load, after about the bound."""
    model = LevelRecorder()
    calls: list[tuple[int, int, int, float, float]] = []
    finished: list[float] = []

    async def scenario() -> None:
        config = BatchingConfig(max_batch_size=4, max_delay_s=0.002, low_max_wait_s=0.1)
        batcher = DynamicBatcher(model, config)
        until = time.monotonic() + 1.5
        high = [asyncio.create_task(_loop_caller(batcher, 0, c, 1, until, calls)) for c in range(32)]
        await asyncio.sleep(0.2)  # the high load is running
        started = time.monotonic()
        out = await batcher.submit(np.array([[PRIORITY_LOW, 99, 0]] * 6), priority=PRIORITY_LOW)
        finished.append(time.monotonic() - started)
        assert len(out) == 6
        assert time.monotonic() < until, "the low rows waited for the high load to end"
        await asyncio.gather(*high)
        await batcher.close()

    asyncio.run(scenario())
    assert 0.09 <= finished[0] < 1.0, finished


def test_each_priority_level_has_its_own_queue_bound() -> None:
    """Explanations filling the low queue do not refuse classification, and the reverse."""
    model = RecordingModel(gated=True)

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=4, max_queue_rows=8))
        first = asyncio.create_task(batcher.submit(rows_for(0, 1)))
        await model.busy()
        low = asyncio.create_task(batcher.submit(rows_for(1, 8), priority=PRIORITY_LOW))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="low-priority queue full"):
            await batcher.submit(rows_for(2, 1), priority=PRIORITY_LOW)
        high = asyncio.create_task(batcher.submit(rows_for(3, 8)))
        await asyncio.sleep(0)
        model.gate.set()
        answers = await asyncio.gather(first, low, high)
        await batcher.close()
        for caller, count, rows in zip((0, 1, 3), (1, 8, 8), answers, strict=True):
            np.testing.assert_array_equal(rows, rows_for(caller, count) * 10 + 1)

    asyncio.run(scenario())


def test_a_fast_models_low_batches_leave_the_loop_a_turn_between_them() -> None:
    """Low batches of a fast model run inline one at a time: between two of them the loop turns, so a
    high caller who arrives meanwhile is served before the rest of the low rows."""
    order: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        order.append(int(batch[0, 0]))
        return batch

    async def scenario() -> None:
        batcher = DynamicBatcher(model, BatchingConfig(max_batch_size=8, inline_below_s=1.0))
        for call in range(3):  # measured fast: high batches run inline
            await batcher.submit(np.array([[0, call]]))
        low = asyncio.create_task(batcher.submit(np.array([[PRIORITY_LOW, 0]] * 40), priority=PRIORITY_LOW))
        await asyncio.sleep(0)  # the low rows are queued and their first batch has run
        await asyncio.sleep(0)
        await batcher.submit(np.array([[0, 9]]))  # a high caller while low batches remain
        await low
        await batcher.close()

    asyncio.run(scenario())
    lows = [i for i, level in enumerate(order) if level == PRIORITY_LOW]
    high = len(order) - 1 - order[::-1].index(0)  # the last high call
    assert lows[0] < high < lows[-1], order  # it went between the low batches, not after all of them
