"""Why a scoring job cannot run at all."""

from __future__ import annotations


class ScoreError(Exception):
    """The job cannot run (bad input, no server); exit code 1 or 2."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
