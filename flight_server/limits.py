"""Limits that keep a few clients from taking a whole server: how many calls run at once.

Request sizes are checked where requests are parsed (`protocol.decode`, `--max-request-kb`); memory
per call is bounded by the engine (`--duckdb-memory-limit`), the write chunk and Flight's flow
control (see docs/operations.md).
"""

from __future__ import annotations

import threading

import pyarrow.flight as flight

from flight_server.errors import LimitError, to_flight_error

MIDDLEWARE_KEY = "limits"


class _Slot(flight.ServerMiddleware):
    """One running call; its slot is given back when the call ends, however it ends."""

    def __init__(self, limit: ConcurrencyLimit):
        self._limit = limit

    def call_completed(self, exception: Exception | None) -> None:
        self._limit.release()


class ConcurrencyLimit(flight.ServerMiddlewareFactory):
    """Refuses calls beyond `maximum` running at once (a stream counts until it ends) with RESOURCE_EXHAUSTED."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.active = 0
        self._lock = threading.Lock()

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> _Slot:
        with self._lock:
            if self.active >= self.maximum:
                raise to_flight_error(
                    LimitError(
                        f"the server is running its maximum of {self.maximum} concurrent requests "
                        "(--max-concurrent-requests): retry later or use another replica"
                    )
                )
            self.active += 1
        return _Slot(self)

    def release(self) -> None:
        with self._lock:
            self.active -= 1
