"""Errors a client can cause: one root, `RequestError`, whose subclasses name the gRPC-style code.

Both the server and `flight_client` use these; `transport.errors` turns them into Flight errors.
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


class ProtocolError(RequestError):
    """A request that is not well formed (bad JSON, unknown field, wrong type); the message says what is wrong."""


class RequestTooLargeError(LimitError):
    """A request above the size limit: stream its rows (`do_exchange`) instead of sending them inline."""
