"""RunTimes: what a batch of a given size is expected to take, from the model's recent calls."""

import math

from serving.core.run_times import RUN_TIME_WINDOW, RunTimes


def test_nothing_measured_means_no_batch_is_expected_to_be_fast() -> None:
    assert RunTimes().expected_s(1) == math.inf


def test_a_size_class_is_judged_by_its_fastest_recent_call() -> None:
    times = RunTimes()
    for took in (0.004, 0.001, 0.003):
        times.record(5, took)  # 5 rows: the class of 4-7
    assert times.expected_s(7) == 0.001 and times.expected_s(4) == 0.001


def test_the_fastest_call_is_forgotten_after_a_window_of_slower_ones() -> None:
    times = RunTimes()
    times.record(1, 0.001)
    for _ in range(RUN_TIME_WINDOW - 1):
        times.record(1, 0.010)
    assert times.expected_s(1) == 0.001
    times.record(1, 0.010)
    assert times.expected_s(1) == 0.010


def test_a_larger_batch_is_never_expected_to_cost_less_than_a_smaller_one() -> None:
    times = RunTimes()
    times.record(1, 0.005)  # single rows became slow
    times.record(16, 0.002)  # a burst measured while the model was still fast
    assert times.expected_s(16) == 0.005


def test_an_unmeasured_size_is_guessed_from_the_sizes_measured_around_it() -> None:
    times = RunTimes()
    times.record(1, 0.001)  # class 1
    assert times.expected_s(4) == 0.001 * 2**3  # class 3 (4-7 rows), two up: at most 8x the rows
    times.record(64, 0.006)  # class 7, measured cheaper than the guess from below
    assert times.expected_s(4) == 0.006
