"""The server's log lines: readable text, or one JSON object per line (`--log-format json`).

One handler on the root logger writes every event, ours and those of the libraries that log through
Python's `logging` (gRPC's Python layer, uvicorn, asyncio), plus Python's warnings and the exceptions
no code caught, so that with `json` a log collector can parse every line. A JSON line holds `time`
(ISO 8601, UTC), `level`, `logger`, `message`, the record's structured extras (`extra=`, e.g. the access
log's fields) and an exception's traceback as one string field: never a multi-line traceback.

Not covered: gRPC core's C library writes its own lines to stderr (kept to errors by GRPC_VERBOSITY,
see `serving.__main__`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# An extra that replaces the message in JSON, where the fields already say what the text would.
JSON_MESSAGE = "_json_message"
# Attributes every LogRecord has; any other attribute came from `extra=` and becomes a field.
STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (`fields`: added to every record, e.g. a worker's index)."""

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, JSON_MESSAGE, None) or record.getMessage(),
            **self.fields,
        }
        for key, value in vars(record).items():
            if key not in STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII only: no raw control character or Unicode line separator can split the line.
        return json.dumps(entry, default=str, ensure_ascii=True)


def formatter(log_format: LogFormat, worker: int | None = None) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter({"worker": worker} if worker is not None else None)
    prefix = f"worker {worker} " if worker is not None else ""
    return logging.Formatter(TEXT_FORMAT.replace("%(levelname)s", prefix + "%(levelname)s"))


def configure_logging(level: str | int, log_format: LogFormat = "text", worker: int | None = None) -> None:
    """The root logger writes to stderr in `log_format`; replaces any handler set before."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format, worker))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    if log_format == "json":  # tracebacks no code caught: logged as one record, not printed
        sys.excepthook = log_uncaught
        threading.excepthook = log_thread_uncaught


def log_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("convserve").critical("uncaught exception", exc_info=(kind, error, traceback))


def log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("convserve").error(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
