"""Errors a client can cause, and how they travel over Flight.

Handlers raise these; the service turns them into `FlightServerError`s whose message is the
explanation alone (a plain Python exception would send the server's traceback to the client)
and whose `extra_info` carries a machine-readable code (see docs/protocol.md).
"""

from __future__ import annotations

import json

import pyarrow.flight as flight


class RequestError(ValueError):
    """The request is wrong: malformed, mistyped, or impossible. Code `INVALID_ARGUMENT`."""

    code = "INVALID_ARGUMENT"


class NotFoundError(RequestError):
    """A table, column or snapshot the request names does not exist. Code `NOT_FOUND`."""

    code = "NOT_FOUND"


class ConflictError(RequestError):
    """The request lost a race it cannot resolve itself; retrying it is safe. Code `CONFLICT`."""

    code = "CONFLICT"


class LimitError(RequestError):
    """The request would exceed a configured limit (such as the online index memory cap).
    Code `RESOURCE_EXHAUSTED`."""

    code = "RESOURCE_EXHAUSTED"


def to_flight_error(exc: Exception) -> flight.FlightError:
    """The Flight error a client sees for `exc`: its message, and its code in `extra_info`."""
    if isinstance(exc, flight.FlightError):
        return exc
    code = exc.code if isinstance(exc, RequestError) else "INTERNAL"
    message = str(exc) if isinstance(exc, RequestError) else f"internal error: {type(exc).__name__}: {exc}"
    return flight.FlightServerError(message, extra_info=json.dumps({"code": code}).encode())
