"""Errors a client can cause: one root, `RequestError`, whose subclasses name the kind of error in `code`.

Both the server and `flight_client` use these; `transport.errors` sends each kind with its gRPC status and the code in
the structured detail (docs/protocol.md, "Errors").
"""

from __future__ import annotations


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


class ProtocolError(RequestError):
    """A request that is not well formed (bad JSON, unknown field, wrong type); the message says what is wrong."""


class RequestTooLargeError(LimitError):
    """A request above the size limit: stream its rows (`do_exchange`) instead of sending them inline."""
