"""A server-wide budget of input bytes: decoded and queued rows are bounded in memory, not count.

A request reserves its rows' bytes before any image is decoded and gives them back when it ends,
so under overload the server refuses work (Overloaded) instead of growing without bound.
Used from the event loop thread only, so it needs no lock.
"""

from __future__ import annotations

from serving.core.errors import InvalidInput, Overloaded

MIB = 1024 * 1024


class Reservation:
    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: InputBudget, nbytes: int) -> None:
        self._budget: InputBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        if self._budget is not None:
            self._budget.used -= self.nbytes
            self._budget = None


class InputBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0

    def reserve(self, nbytes: int) -> Reservation:
        if nbytes > self.limit:
            raise InvalidInput(
                f"request needs {nbytes / MIB:.1f} MiB of model input; the server's input budget is "
                f"{self.limit / MIB:.0f} MiB: send fewer images per request"
            )
        if self.used + nbytes > self.limit:
            raise Overloaded(
                f"input budget full: {self.used / MIB:.1f} of {self.limit / MIB:.0f} MiB in use, "
                f"this request needs {nbytes / MIB:.1f} MiB"
            )
        self.used += nbytes
        return Reservation(self, nbytes)
