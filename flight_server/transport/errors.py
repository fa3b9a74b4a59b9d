"""How errors travel over Flight: one table from each kind of error to the gRPC status every client understands.

pyarrow's Python server picks a call's gRPC status by the class of the exception a handler raises, so each kind
names the class that becomes its status (docs/protocol.md, "Errors", shows the table as clients see it). Flight's own
error classes also carry a structured detail, `{"code": kind}`: the finer kinds that share a status (a conflict and a
limit are both UNAVAILABLE) stay apart there. pyarrow has no Flight class for INVALID_ARGUMENT or NOT_FOUND, so those
two travel as `ArrowInvalid` and `ArrowKeyError`, whose status says their kind and which carry no detail.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.base.outages import outage
from flight_server.wire.errors import error_kind

# Frames of a logged traceback: every one (see `plain_error_messages`).
LOGGED_FRAMES = 1000


class Route(NamedTuple):
    """How one kind of error reaches clients: the gRPC status, and the exception pyarrow turns into it."""

    status: str
    error: Any  # an exception class (pyarrow's are untyped)


# The one table: error kind (the `code` of the structured detail) -> gRPC status. pyarrow cannot send
# RESOURCE_EXHAUSTED, ALREADY_EXISTS, ABORTED or FAILED_PRECONDITION, so a conflict (retry: the race may go the
# other way) and a limit (retry later, or at another replica) go as UNAVAILABLE, their kind in the detail.
ROUTES: dict[str, Route] = {
    "INVALID_ARGUMENT": Route("INVALID_ARGUMENT", pa.ArrowInvalid),
    "NOT_FOUND": Route("NOT_FOUND", pa.ArrowKeyError),
    "CONFLICT": Route("UNAVAILABLE", flight.FlightUnavailableError),
    "RESOURCE_EXHAUSTED": Route("UNAVAILABLE", flight.FlightUnavailableError),
    "UNAUTHENTICATED": Route("UNAUTHENTICATED", flight.FlightUnauthenticatedError),
    "PERMISSION_DENIED": Route("PERMISSION_DENIED", flight.FlightUnauthorizedError),
    "CANCELLED": Route("CANCELLED", flight.FlightCancelledError),
    "DEADLINE_EXCEEDED": Route("DEADLINE_EXCEEDED", flight.FlightTimedOutError),
    "INTERNAL": Route("INTERNAL", flight.FlightInternalError),
    # The catalog or the object store failing for now (`base/outages.py`): retry.
    "UNAVAILABLE": Route("UNAVAILABLE", flight.FlightUnavailableError),
}


def to_flight_error(exc: Exception) -> Exception:
    """The exception to raise so that a client sees `exc` with its kind's gRPC status, its message, and (where
    pyarrow can send one) the kind in the structured detail. Flight errors raised by pyarrow itself pass as they are."""
    if isinstance(exc, flight.FlightError):
        return exc
    kind, message = error_kind(exc)
    down = outage(exc) if kind == "INTERNAL" else None
    if down is not None:
        kind, message = "UNAVAILABLE", down
    error = ROUTES[kind].error
    if issubclass(error, flight.FlightError):
        return error(message, extra_info=json.dumps({"code": kind}).encode())
    return error(message)


class _FullTracebacks:
    """A log record factory that renders a record's traceback with every frame, whatever `sys.tracebacklimit` says."""

    def __init__(self, make: Callable[..., logging.LogRecord]):
        self.make = make

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.make(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info, limit=LOGGED_FRAMES)).rstrip("\n")
        return record


def plain_error_messages() -> None:
    """Keep tracebacks out of the messages clients see, and in the server's log.

    pyarrow appends to the message of an INVALID_ARGUMENT or NOT_FOUND error the Python exception it came from,
    formatted with the process's `sys.tracebacklimit`: at 0 that is `Python exception: <class>: <message>`, without
    frames or server paths. The limit is global, so log records render their tracebacks with an explicit limit."""
    sys.tracebacklimit = 0
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _FullTracebacks):
        logging.setLogRecordFactory(_FullTracebacks(factory))
