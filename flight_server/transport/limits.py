"""Limits that keep a few clients from taking a whole server: how many calls run at once, in all and
per caller (so one stalled or greedy token cannot take every slot).

Request sizes are checked where requests are parsed (`wire.codec.decode`, `--max-request-kb`), record
batches from clients where they are read (`transport.client_streams.ClientReader`, `--max-batch-mb`); memory per call
is further bounded by the engine (`--duckdb-memory-limit`), the write chunk and Flight's flow control
(see docs/operations.md).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pyarrow.flight as flight

from flight_server.transport import calls
from flight_server.transport.errors import to_flight_error
from flight_server.wire.codec import ONLINE_SESSION_HEADER
from flight_server.wire.errors import LimitError

MIDDLEWARE_KEY = "limits"

# Actions that may run at once beyond the limits, so that `health` answers on a busy replica.
ACTION_HEADROOM = 2

Headers = dict[str, list[str]]


class _Slot(flight.ServerMiddleware):
    """One running call; its slot is given back when the call ends, however it ends."""

    def __init__(self, limit: ConcurrencyLimit, caller: str):
        self._limit = limit
        self._caller = caller

    def call_completed(self, exception: Exception | None) -> None:
        self._limit.release(self._caller)


class _Headroom(flight.ServerMiddleware):
    """An action let in beyond the limits; its place in the headroom is given back when it ends."""

    def __init__(self, limit: ConcurrencyLimit):
        self._limit = limit

    def call_completed(self, exception: Exception | None) -> None:
        self._limit.release_headroom()


class _Session(flight.ServerMiddleware):
    """An online session's call: it holds no slot. `do_exchange` refuses it unless it is an online lookup."""


def is_session(context: flight.ServerCallContext) -> bool:
    """Whether the limits let this call through as an online session (only when limits are set)."""
    return isinstance(context.get_middleware(MIDDLEWARE_KEY), _Session)


class ConcurrencyLimit(flight.ServerMiddlewareFactory):
    """Refuses calls beyond `maximum` running at once, or beyond `per_caller` of one caller (0: no such
    limit), with RESOURCE_EXHAUSTED; a stream counts until it ends. Online sessions hold no slot.
    `caller` names a call's caller from its headers (the token's name; without authentication everyone
    is one caller).

    Actions that find the limits full may still run, up to `ACTION_HEADROOM` of them at once: an
    orchestrator's `health` probe must answer while streams hold every slot, or it restarts a replica
    that is merely busy. Middleware sees the RPC (`do_action`) but not the action's type, which is in
    the body, so the headroom is open to every action; they answer with one small message and never
    wait on a client, so they cannot hold it the way a stalled stream holds a slot."""

    def __init__(self, maximum: int, per_caller: int = 0, caller: Callable[[Headers], str] = lambda _: "anonymous"):
        self.maximum = maximum
        self.per_caller = per_caller
        self.active = 0
        self.headroom = 0  # actions running beyond the limits
        self._caller = caller
        self._by_caller: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start_call(self, info: flight.CallInfo, headers: Headers) -> _Slot | _Headroom | _Session:
        if info.method == flight.FlightMethod.DO_EXCHANGE and headers.get(ONLINE_SESSION_HEADER):
            return _Session()  # light, and open for as long as its client serves
        caller = self._caller(headers) if self.per_caller else ""
        with self._lock:
            refused = self._refusal(caller)
            if refused is None:
                self.active += 1
                self._by_caller[caller] += 1
                return _Slot(self, caller)
            if info.method == flight.FlightMethod.DO_ACTION and self.headroom < ACTION_HEADROOM:
                self.headroom += 1
                return _Headroom(self)
        calls.refused(refused)
        raise to_flight_error(refused)

    def _refusal(self, caller: str) -> LimitError | None:
        """Why a call of `caller` cannot have a slot now, if it cannot (under the lock)."""
        if self.maximum and self.active >= self.maximum:
            return LimitError(
                f"the server is running its maximum of {self.maximum} concurrent requests "
                "(--max-concurrent-requests): retry later or use another replica"
            )
        if self.per_caller and self._by_caller[caller] >= self.per_caller:
            return LimitError(
                f"{caller!r} is running its maximum of {self.per_caller} concurrent requests "
                "(--max-concurrent-per-caller): finish or cancel a call first"
            )
        return None

    def release(self, caller: str) -> None:
        with self._lock:
            self.active -= 1
            self._by_caller[caller] -= 1
            if not self._by_caller[caller]:
                del self._by_caller[caller]

    def release_headroom(self) -> None:
        with self._lock:
            self.headroom -= 1
