"""Failures of what the server depends on: the catalog and the object store not answering for a while.

Such a failure is no bug and no fault of the request: clients should retry (UNAVAILABLE), and the message says
which service failed and why in words the libraries use (`connection refused`), never their text whole, which may
quote a connection string, a request or a server path. A commit whose outcome the catalog did not confirm is told
apart: it may have landed, and only a put's retry with the same `write_id` is safe to send blindly.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import duckdb
from pyiceberg.exceptions import CommitStateUnknownException, ServerError, ServiceUnavailableError
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import Timeout as RequestsTimeout
from sqlalchemy.exc import InterfaceError, OperationalError

# pyarrow's S3 filesystem names the AWS SDK's error kind (and curl's code); these mean the store is away, busy or
# failing for now, not that the object or the request is wrong. DuckDB's httpfs says it in words.
_STORE_ERROR = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|REQUEST_TIMEOUT|THROTTLING)\b"
    r"|curlCode: (\d+)|(Could not establish connection|Connection refused|Couldn't connect to server)",
)


def outage(exc: BaseException) -> str | None:
    """The message for a client when `exc` is the catalog or the object store failing for now, else None."""
    chain = list(_chain(exc))
    if any(isinstance(e, CommitStateUnknownException) for e in chain):
        reason = _reason(chain) or "no answer"
        return (
            f"the catalog did not confirm the commit ({reason}), which may have landed; the files written for it "
            "were kept. Retry a put with the same write_id once the catalog answers: it commits once whichever "
            "happened (a delete or compaction: see whether it landed before running it again)"
        )
    for error in chain:
        if isinstance(error, OperationalError | InterfaceError | RequestsConnectionError | RequestsTimeout):
            return f"the catalog is unavailable ({_reason(chain) or 'no answer'}); retry once it answers again"
        if isinstance(error, ServiceUnavailableError | ServerError):
            return f"the catalog is unavailable (it answered: {type(error).__name__}); retry once it answers again"
    for error in chain:
        match = _STORE_ERROR.search(str(error)) if isinstance(error, OSError | duckdb.IOException) else None
        if match:
            what = match.group(1) or (f"curl error {match.group(2)}" if match.group(2) else match.group(3))
            return f"the object store is unavailable ({what.lower().replace('_', ' ')}); retry once it answers again"
    return None


# pyarrow's S3 filesystem opens an object with a HEAD request (a missing one raises FileNotFoundError), then reads it
# with GETs: an object deleted in between (another replica's snapshot expiry, say) fails the read with one of these,
# as a plain OSError.
_MISSING_OBJECT = re.compile(r"AWS Error (RESOURCE_NOT_FOUND|NO_SUCH_KEY)\b")


def missing_file(exc: BaseException) -> bool:
    """Whether `exc` says that a file is not there (any more): `FileNotFoundError`, or an object store's "no such
    key" for an object deleted between opening it and reading it."""
    if isinstance(exc, FileNotFoundError):
        return True
    return isinstance(exc, OSError) and _MISSING_OBJECT.search(str(exc)) is not None


OUTAGE_LOG_SECONDS = 60.0  # a call failing for the same outage is logged once in this long
_OUTAGE_MESSAGES = 256  # distinct messages remembered; past it, the memory starts over


class OutageLog:
    """Warn of calls failing because a service is away once a minute per message, with how many failed since the
    last line: a warning every call (or every online refresh, which asks the write process each poll) would bury
    the log during an outage, and a traceback would say nothing the message does not."""

    def __init__(self, logger: logging.Logger, every: float = OUTAGE_LOG_SECONDS):
        self.logger, self.every = logger, every
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # by message: when last logged (monotonic), calls since

    def failed(self, what: str, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            logged, since = self._last.get(message, (None, 0))
            if logged is not None and now - logged < self.every:
                self._last[message] = (logged, since + 1)
                return
            if len(self._last) >= _OUTAGE_MESSAGES:
                self._last.clear()
            self._last[message] = (now, 0)
        more = (
            f"; {since} more call(s) failed so in the last {now - logged:.0f} s" if logged is not None and since else ""
        )
        cause = " ".join(str(exc).split())[:300]
        self.logger.warning("%s failed: %s%s (%s: %s)", what, message, more, type(exc).__name__, cause)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors behind it (causes, contexts, urllib3's `reason`), each once."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        for link in (error.__cause__, error.__context__, getattr(error, "reason", None)):
            if isinstance(link, BaseException):
                pending.append(link)


def _reason(chain: list[BaseException]) -> str | None:
    """Why the connection failed in a few words: a socket's error, or the last words of the database driver's first
    line (`connection to server at "host", port 5432 failed: Connection refused`), without host names or queries."""
    for error in chain:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror.lower()
    for error in chain:
        if isinstance(error, OperationalError | InterfaceError):
            first = (str(error.orig).strip().splitlines() or [""])[0]
            return first.rsplit(": ", 1)[-1].strip().rstrip(".").lower() or None
    return None
