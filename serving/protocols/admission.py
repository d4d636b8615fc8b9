"""Admission of calls, and the drain that makes a shutdown under load lose nothing.

While serving, calls are admitted and counted. From SIGTERM (`begin_drain`):
  * a new call is parked: it waits, matched to its handler, and is refused with UNAVAILABLE only
    after the server has stopped accepting (`release`). A client that loops on calls therefore has
    nothing in flight that gRPC core has received but not yet handed to a handler when the server
    stops, which core would cancel (grpc/grpc#41785): it sees UNAVAILABLE, never CANCELLED;
  * work already admitted finishes with its result; a new message on an open stream is answered
    UNAVAILABLE at once (the stream itself is admitted);
  * `release` also ends open streams with UNAVAILABLE, so nothing waits for the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

from serving.core.errors import Unavailable

QUIET_S = 0.05  # no call reached a handler for this long: every looping client is parked


class Admission:
    def __init__(self) -> None:
        self.draining = False
        self.active = 0  # admitted calls and stream messages doing work
        self.parked = 0
        self.last_arrival = 0.0
        self.arrivals = 0  # calls that reached a handler, ever
        self._released = asyncio.Event()
        self._on_release: set[Callable[[], object]] = set()  # what they return is not used

    def arrive(self) -> None:
        self.last_arrival = time.monotonic()
        self.arrivals += 1

    async def refuse_if_draining(self) -> None:
        """Parks a new call while draining, then refuses it; returns at once while serving."""
        if not self.draining:
            return
        self.parked += 1
        try:
            await self._released.wait()
        finally:
            self.parked -= 1
        raise Unavailable("server is shutting down")

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def on_release(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Registers what ends an open stream at release; returns the function that unregisters it."""
        self._on_release.add(callback)
        return lambda: self._on_release.discard(callback)

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_drained(self, until: float) -> None:
        """Until admitted work is done and no call arrived for QUIET_S, or the monotonic time `until`."""
        while time.monotonic() < until and (
            self.active > 0 or time.monotonic() - self.last_arrival < QUIET_S
        ):
            await asyncio.sleep(QUIET_S / 5)

    def release(self) -> None:
        self._released.set()
        for callback in list(self._on_release):
            callback()

    async def wait_idle(self, until: float) -> None:
        while time.monotonic() < until and (self.active > 0 or self.parked > 0 or self._on_release):
            await asyncio.sleep(0.01)
