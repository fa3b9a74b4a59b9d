"""Server errors as Python exceptions whose message is the server's explanation."""

from __future__ import annotations

import contextlib
import json

import pyarrow.flight as flight


class FeatureServerError(Exception):
    """The server refused or failed a request; `code` says which kind (see docs/protocol.md)."""

    def __init__(self, message: str, code: str = "INTERNAL"):
        super().__init__(message)
        self.code = code


class InvalidRequestError(FeatureServerError, ValueError):
    """The request was wrong (malformed, mistyped, impossible): fix it, do not retry it."""


class NotFoundError(FeatureServerError, KeyError):
    """A table, column or snapshot the request names does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConflictError(FeatureServerError):
    """The request lost a race with a concurrent change; nothing was done and a retry is safe."""


class ResourceExhaustedError(FeatureServerError):
    """The request would exceed a limit the server is configured with; the message names it."""


class UnauthenticatedError(FeatureServerError):
    """The server requires a valid bearer token (`FeatureClient(..., token=...)`) and got none or a wrong one."""


class PermissionDeniedError(FeatureServerError):
    """The token is valid but lacks the permission or namespace the request needs; the message says which."""


_BY_CODE: dict[str, type[FeatureServerError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "NOT_FOUND": NotFoundError,
    "CONFLICT": ConflictError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
}


def from_flight_error(exc: Exception) -> FeatureServerError:
    """Strip gRPC's decorations from a Flight error and pick the exception class from its code."""
    message = str(exc).split(". Detail:", 1)[0].split(". gRPC client debug context:", 1)[0]
    code = "INTERNAL"
    extra = getattr(exc, "extra_info", None)
    if extra:
        with contextlib.suppress(ValueError, AttributeError):
            code = json.loads(extra).get("code", code)
    elif isinstance(exc, flight.FlightUnavailableError):
        code = "UNAVAILABLE"
    elif isinstance(exc, flight.FlightUnauthenticatedError):
        code = "UNAUTHENTICATED"
    elif isinstance(exc, flight.FlightUnauthorizedError):
        code = "PERMISSION_DENIED"
    return _BY_CODE.get(code, FeatureServerError)(message, code)
