"""Errors a client can cause: one root, `RequestError`, whose subclasses name the kind of error in `code`.

Both the server and `flight_client` use these; `transport.errors` sends each kind with its gRPC status and the code in
the structured detail (docs/protocol.md, "Errors"). `error_kind` says what any exception is to a client, its
message without server paths: what the server answers, and what it shows of a failure elsewhere (`describe`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os

import pyarrow as pa
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


class UnauthenticatedError(RequestError):
    """The call has no valid credentials (bearer token, or name and password). Code `UNAUTHENTICATED`."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(RequestError):
    """The token lacks the permission or the namespace the request needs. Code `PERMISSION_DENIED`."""

    code = "PERMISSION_DENIED"


class CancelledError(RequestError):
    """The client cancelled the call or went away; nothing was committed. Code `CANCELLED`."""

    code = "CANCELLED"


class StorageError(Exception):
    """The server's storage failed it (a folder it cannot list, an object store's error): no fault of the request,
    and not one a retry as such mends. The message says what the server was doing, for which table, and the
    fault's class, never a server path; the server's log has the cause. Code `INTERNAL`."""

    code = "INTERNAL"


class ProtocolError(RequestError):
    """A request that is not well formed (bad JSON, unknown field, wrong type); the message says what is wrong."""


class UnknownFieldsError(ProtocolError):
    """A request with fields this release does not know: a typo, a client newer than the server, or a ticket that a
    newer release minted (docs/protocol.md, "Compatibility")."""


class RequestTooLargeError(LimitError):
    """A request above the size limit: stream its rows (`do_exchange`) instead of sending them inline."""


# The kind each gRPC status means when the error carries no code of its own: INVALID_ARGUMENT and NOT_FOUND never
# do (pyarrow raises them as ArrowInvalid and ArrowKeyError), nor do errors from gRPC itself (a server that is down).
_BY_CLASS: tuple[tuple[type[Exception], str], ...] = (
    (pa.ArrowInvalid, "INVALID_ARGUMENT"),
    (pa.ArrowKeyError, "NOT_FOUND"),
    (flight.FlightUnavailableError, "UNAVAILABLE"),
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
    (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightCancelledError, "CANCELLED"),
    (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
)


def detail_code(exc: BaseException) -> str | None:
    """The kind in a Flight call's structured detail, which a server of ours sends with each error it answers (as a
    write process relays it), or None: gRPC's own status only (a process or a connection gone), or no detail of ours."""
    extra = getattr(exc, "extra_info", None)
    if extra:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return str(json.loads(extra)["code"])
    return None


def error_code(exc: BaseException) -> str:
    """The kind of a Flight call's error: the code in its structured detail, else what its gRPC status means."""
    return detail_code(exc) or next((code for cls, code in _BY_CLASS if isinstance(exc, cls)), "INTERNAL")


def error_message(exc: BaseException) -> str:
    """A Flight call's error message without gRPC's decorations (detail, debug context)."""
    return str(exc).split(". Detail:", 1)[0].split(". gRPC client debug context:", 1)[0]


def error_kind(exc: Exception) -> tuple[str, str]:
    """The kind of `exc` and the message a client may see: a request error's explanation; for a bug in the server
    only its class (its message may name server paths; the server's log has it, with the traceback)."""
    if isinstance(exc, (RequestError, StorageError)):
        return exc.code, str(exc)
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED", "the server timed out working on the request"
    if isinstance(exc, concurrent.futures.CancelledError):
        return "CANCELLED", "the request was cancelled"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the warehouse or a spill folder
        return "RESOURCE_EXHAUSTED", f"the server ran out of space ({os.strerror(exc.errno)}); nothing was changed"
    return "INTERNAL", f"internal error ({type(exc).__name__}); the server's log has the details"
