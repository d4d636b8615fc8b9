"""How long a model call of a given batch size takes: what the batcher judges inline running by.

Sizes are grouped in classes by their bit length (1, 2-3, 4-7, ...). A class of its own keeps a
burst's times from being pushed out of the window by the single rows that come between bursts.
"""

from __future__ import annotations

import collections
import math

RUN_TIME_WINDOW = 16  # model calls of one size class whose fastest says how long such a call takes


class RunTimes:
    """The fastest of each size class's last RUN_TIME_WINDOW calls, and what a batch should take."""

    __slots__ = ("_expected_by_class", "_fastest_s", "_recent_s")

    def __init__(self) -> None:
        self._recent_s: dict[int, collections.deque[float]] = {}
        self._fastest_s: dict[int, float] = {}
        self._expected_by_class: dict[int, float] = {}  # `expected_s`'s answers, until a fastest changes

    def record(self, rows: int, took_s: float) -> None:
        """A call's time. The fastest, not the mean: a call's time also holds its wait for the GIL when
        it returns, up to the switch interval (5 ms) while another thread (the event loop, span export)
        runs Python; a mean took one such wait for a slow model, moved batches to the worker thread,
        where every return waits for the busy loop, and kept them there. A model that has become slow
        for good is seen within RUN_TIME_WINDOW calls of each size class."""
        size_class = rows.bit_length()
        window = self._recent_s.get(size_class)
        if window is None:
            window = self._recent_s[size_class] = collections.deque(maxlen=RUN_TIME_WINDOW)
        window.append(took_s)
        fastest = min(window)
        if fastest != self._fastest_s.get(size_class):  # about one call in eight, when steady
            self._fastest_s[size_class] = fastest
            self._expected_by_class.clear()

    def expected_s(self, rows: int) -> float:
        """How long a call with `rows` rows should take (cached per size class: asked on every request)."""
        size_class = rows.bit_length()
        expected = self._expected_by_class.get(size_class)
        if expected is None:
            expected = self._expected_by_class[size_class] = self._expect(size_class)
        return expected

    def _expect(self, size_class: int) -> float:
        """The fastest recent call of the class, and never less than a smaller class's (a larger batch
        costs no less: a model that slows shows it first in its commonest class, single rows). For a
        class not run yet, the lowest of: a class d below's time times 2^(d + 1), as far as the rows
        can grow from the bottom of one class to the top of the other (a batch of more rows costs at
        most proportionally more); a larger class's time. Infinite while nothing is measured. Sizes
        within a class differ by up to 2x, and so may their times."""
        known = self._fastest_s
        smaller = [took for other, took in known.items() if other < size_class]
        floor = max(smaller, default=0.0)
        own = known.get(size_class)
        if own is None:
            guesses = [
                took * 2 ** (size_class - other + 1) for other, took in known.items() if other < size_class
            ]
            guesses += [took for other, took in known.items() if other > size_class]
            own = min(guesses, default=math.inf)
        return max(own, floor)
