"""How request errors travel over Flight: the message alone, and a machine-readable code."""

from __future__ import annotations

import json

import pyarrow.flight as flight

from flight_server.wire.errors import RequestError


def to_flight_error(exc: Exception) -> flight.FlightError:
    """The Flight error a client sees for `exc`: its message, and its code in `extra_info`."""
    if isinstance(exc, flight.FlightError):
        return exc
    code = exc.code if isinstance(exc, RequestError) else "INTERNAL"
    message = str(exc) if isinstance(exc, RequestError) else f"internal error: {type(exc).__name__}: {exc}"
    return flight.FlightServerError(message, extra_info=json.dumps({"code": code}).encode())
