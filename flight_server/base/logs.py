"""The server's log: text or JSON lines on stderr, every line logged while a call runs tagged with its request id.

pyarrow runs each Flight call on one gRPC thread from its middleware's `start_call` to its `call_completed`, but
gives Python a fresh thread state for each callback, so a context variable set in `start_call` is gone by the time
the handler runs. The call a thread is serving is therefore kept here by thread id (`bind`), and a filter copies its
request id (and W3C trace id) onto each record. Work a call hands to other threads (DuckDB, join workers) logs
without them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(call)s: %(message)s"

LOG_FORMATS = ("text", "json")

# Record attributes a JSON line carries when they are set: the call's tags, and the fields of a call's own line.
JSON_FIELDS = ("request_id", "trace_id", "peer", "method", "kind", "code", "duration_ms")


class Tagged(Protocol):
    """What a log line learns of the call its thread is serving."""

    @property
    def request_id(self) -> str: ...

    @property
    def trace_id(self) -> str | None: ...


_CALLS: dict[int, Tagged] = {}  # by thread id: the call each gRPC thread is serving


def bind(call: Tagged) -> None:
    """Tag what this thread logs with `call` until `unbind` (or until it binds the next call)."""
    _CALLS[threading.get_ident()] = call


def unbind(call: Tagged) -> None:
    if _CALLS.get(threading.get_ident()) is call:
        del _CALLS[threading.get_ident()]


def current() -> Tagged | None:
    """The call this thread is serving, if any."""
    return _CALLS.get(threading.get_ident())


class CallFilter(logging.Filter):
    """Copies the request id and trace id of the call the logging thread serves onto the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = _CALLS.get(record.thread) if record.thread is not None else None
        if call is not None and getattr(record, "request_id", None) is None:
            record.request_id, record.trace_id = call.request_id, call.trace_id
        request_id = getattr(record, "request_id", None)
        record.call = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, msg, the call's fields when set, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in JSON_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log at `level` to stderr, as text lines or (`json`) JSON lines, each tagged with its call's request id."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {LOG_FORMATS}")
    handler = logging.StreamHandler()
    handler.addFilter(CallFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(True)  # a warning is a log line too, not a line of plain text among the JSON
