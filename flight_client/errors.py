"""Server errors as Python exceptions whose message is the server's explanation."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.wire.errors import error_code, error_message


class FeatureServerError(Exception):
    """The server refused or failed a request; `code` says which kind (see docs/protocol.md).

    Without `code`, the class's own (`default_code`): an exception rebuilt from its message alone, as PyTorch's
    DataLoader raises a worker's in the main process, keeps its kind."""

    default_code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code or self.default_code


class InvalidRequestError(FeatureServerError, ValueError):
    """The request was wrong (malformed, mistyped, impossible): fix it, do not retry it."""

    default_code = "INVALID_ARGUMENT"


class NotFoundError(FeatureServerError, KeyError):
    """A table, column or snapshot the request names does not exist."""

    default_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConflictError(FeatureServerError):
    """The request lost a race with a concurrent change; nothing was done and a retry is safe."""

    default_code = "CONFLICT"


class ResourceExhaustedError(FeatureServerError):
    """The request would exceed a limit the server is configured with; the message names it."""

    default_code = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(FeatureServerError):
    """The server requires a valid bearer token (`FeatureClient(..., token=...)`) and got none or a wrong one."""

    default_code = "UNAUTHENTICATED"


class PermissionDeniedError(FeatureServerError):
    """The token is valid but lacks the permission or namespace the request needs; the message says which."""

    default_code = "PERMISSION_DENIED"


class UnavailableError(FeatureServerError, ConnectionError):
    """The server could not be reached, or ended the call (shutting down, or the call was idle too long):
    retry, at another replica or once it is back."""

    default_code = "UNAVAILABLE"


_BY_CODE: dict[str, type[FeatureServerError]] = {
    kind.default_code: kind
    for kind in (
        InvalidRequestError,
        NotFoundError,
        ConflictError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
    )
}

# What pyarrow's client raises for a server's error: Flight errors, and Arrow errors for INVALID_ARGUMENT and NOT_FOUND.
SERVER_ERRORS = (flight.FlightError, pa.ArrowException)

# What reading a stream's batches raises besides: an error the server raised while streaming travels with gRPC's
# UNKNOWN status, which pyarrow raises as a plain OSError. Only for code that reads nothing but Flight streams: in
# code that also reads the caller's data, an OSError may be the caller's own.
STREAM_ERRORS = (*SERVER_ERRORS, OSError)


# gRPC's words for a server it could not reach (the reason follows them), and for a host name that did not resolve.
_UNREACHABLE = re.compile(r"failed to connect to all addresses[;:]?\s*(?:last error: )?(?:UNKNOWN: )?(.*)")
_UNRESOLVED = re.compile(r"(?:errors resolving|DNS resolution failed for) (\S+?):? .*?([^:\[\]]*)\]?$")


def from_flight_error(exc: Exception) -> FeatureServerError:
    """Strip gRPC's decorations from a Flight error and pick the exception class from its kind."""
    message = error_message(exc)
    code = error_code(exc)
    if code == "UNAVAILABLE":
        message = _unreachable(message) or message
    return _BY_CODE.get(code, FeatureServerError)(message, code)


def _unreachable(message: str) -> str | None:
    """One line for a server that cannot be reached, or None when the message says something else."""
    unresolved = _UNRESOLVED.search(message)
    if unresolved:
        host, reason = unresolved.group(1), unresolved.group(2).strip() or "no address"
        return f"cannot reach the feature server: host {host} does not resolve ({reason}); is the location right?"
    unreachable = _UNREACHABLE.search(message)
    if unreachable:
        # gRPC's reason ends its chain of "address: what failed: why"; the why is what a person needs.
        reason = unreachable.group(1).strip().rstrip(".").rpartition(": ")[2].lower() or "no answer"
        return f"cannot reach the feature server ({reason}): is it running, and is the location right?"
    return None
