"""Every call, from start to end: its request id and trace id, its status code, its line in the log and its metrics.

`CallLog` is the server's first middleware when metrics or JSON logs are on; without them calls are not tracked
(a Python middleware costs every call three trips into Python). A call takes the client's `x-request-id` (or gets a
fresh one, sent back in the same response header) and the trace id of a W3C `traceparent` header; every log line of
it carries them (`base/logs.py`). Handlers `tag` it with its request kind. When it ends it is counted
(`ServerMetrics`) and logged with its code: DEBUG when it succeeded, INFO when it failed. Calls that the later
middleware (authentication, concurrency limits) refuses never reach `call_completed`, so those middleware report
them (`refused`).
"""

from __future__ import annotations

import logging
import os
import re
import time

import pyarrow.flight as flight

from flight_server.base.logs import bind, current, unbind
from flight_server.transport.errors import ROUTES
from flight_server.transport.metrics import Flow, ServerMetrics
from flight_server.wire.actions import RunningCall
from flight_server.wire.codec import REQUEST_ID_HEADER
from flight_server.wire.errors import RequestError, detail_code, error_kind
from flight_server.wire.reads import HistoricalRequest, OnlineRequest, ScanRequest
from flight_server.wire.writes import WriteRequest

log = logging.getLogger(__name__)

MIDDLEWARE_KEY = "calls"

TRACEPARENT_HEADER = "traceparent"

# The request kinds as labelled in metrics and logs; an action is labelled with its name.
KINDS = {ScanRequest: "scan", HistoricalRequest: "training_set", OnlineRequest: "online", WriteRequest: "write"}

_REQUEST_ID = re.compile(r"[\w.:/+=-]{1,128}")  # what a client's id may be: it goes into logs as it is

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?")

# The status each exception class a call can end with travels as (those pyarrow raises itself are Flight errors).
_CODES = {route.error: route.status for route in ROUTES.values()}


def code_of(exception: BaseException | None) -> str:
    """The code a call ended with: OK, its gRPC status, or the finer kind in a Flight error's detail
    (CONFLICT, RESOURCE_EXHAUSTED: both travel as UNAVAILABLE)."""
    if exception is None:
        return "OK"
    kind = detail_code(exception)
    if kind in ROUTES:
        return str(kind)
    for error, status in _CODES.items():
        if isinstance(exception, error):
            return status
    return "UNKNOWN"


def _header(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return str(values[0]) if values else None


def _trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (version-traceid-parentid-flags), if it is a valid one."""
    match = _TRACEPARENT.fullmatch(traceparent.strip().lower()) if traceparent else None
    if match is None or match.group(1) == "ff" or not match.group(2).strip("0"):
        return None
    return match.group(2)


class Call(flight.ServerMiddleware):
    """One call: its ids, its kind once a handler knows it, and when it started."""

    def __init__(self, calls: CallLog, method: str, request_id: str, trace_id: str | None):
        self.calls = calls
        self.method = method
        self.request_id = request_id
        self.trace_id = trace_id
        self.kind = ""
        self.peer: str | None = None
        self.caller: str | None = None  # the token's name, when the server requires authentication
        self.tables: list[str] = []  # those the request names, once checked
        self.started = time.perf_counter()
        self.ended = False
        self.flows: list[Flow] = []  # what it receives and sends, in pairs (`flows`), while metrics are on

    def running(self, now: float) -> RunningCall:
        """What the `calls` action says of the call, at `now` (`time.perf_counter`)."""
        received, sent = (self.flows[0], self.flows[1]) if len(self.flows) >= 2 else (None, None)
        return RunningCall(
            request_id=self.request_id,
            trace_id=self.trace_id,
            method=self.method,
            kind=self.kind,
            caller=self.caller,
            tables=self.tables,
            peer=self.peer,
            seconds=round(now - self.started, 3),
            rows_received=received.total_rows if received is not None else None,
            bytes_received=received.total_bytes if received is not None else None,
            rows_sent=sent.total_rows if sent is not None else None,
            bytes_sent=sent.total_bytes if sent is not None else None,
        )

    def sending_headers(self) -> dict[str, str]:
        return {REQUEST_ID_HEADER: self.request_id}

    def call_completed(self, exception: BaseException | None) -> None:
        self.calls.end(self, code_of(exception))


class CallLog(flight.ServerMiddlewareFactory):
    """Starts a `Call` for every RPC, and counts and logs it when it ends."""

    def __init__(self, metrics: ServerMetrics | None):
        self.metrics = metrics
        self._running: dict[int, Call] = {}  # by id(): the calls started and not ended (`running`)

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> Call:
        sent = _header(headers, REQUEST_ID_HEADER)
        request_id = sent if sent is not None and _REQUEST_ID.fullmatch(sent) else os.urandom(8).hex()
        call = Call(self, info.method.name.lower(), request_id, _trace_id(_header(headers, TRACEPARENT_HEADER)))
        self._running[id(call)] = call
        bind(call)
        return call

    def running(self) -> list[RunningCall]:
        """The calls running now, the longest running first (the `calls` action)."""
        now = time.perf_counter()
        calls = list(self._running.values())  # one step under the GIL: threads start and end calls meanwhile
        return sorted((call.running(now) for call in calls), key=lambda c: -c.seconds)

    def end(self, call: Call, code: str) -> None:
        if call.ended:
            return
        call.ended = True
        self._running.pop(id(call), None)
        seconds = time.perf_counter() - call.started
        for flow in call.flows:
            flow.flush()
        if self.metrics is not None:
            self.metrics.completed(call.method, call.kind, code, seconds)
        level = logging.DEBUG if code == "OK" else logging.INFO
        if log.isEnabledFor(level):
            fields = {"method": call.method, "kind": call.kind, "code": code, "duration_ms": round(seconds * 1e3, 3)}
            log.log(
                level,
                "%s%s %s in %.1f ms%s",
                call.method,
                f" {call.kind}" if call.kind else "",
                code,
                seconds * 1e3,
                f" from {call.peer}" if call.peer else "",
                extra={**fields, "peer": call.peer},
            )
        unbind(call)


def tag(context: flight.ServerCallContext, kind: str) -> Call | None:
    """Label the running call with its request kind (and note its peer, for its log line)."""
    call: Call | None = context.get_middleware(MIDDLEWARE_KEY)
    if call is not None:
        call.kind = kind
        call.peer = context.peer()
    return call


def note(context: flight.ServerCallContext, caller: str | None, tables: list[str]) -> None:
    """Record who makes the running call and the tables it names, for the `calls` action."""
    call: Call | None = context.get_middleware(MIDDLEWARE_KEY)
    if call is not None:
        call.caller, call.tables = caller, list(dict.fromkeys(tables))


def flows(context: flight.ServerCallContext, metrics: ServerMetrics) -> tuple[Flow, Flow]:
    """What the running call receives and sends, counted by its kind (`tag` it first) until it ends."""
    call: Call = context.get_middleware(MIDDLEWARE_KEY)
    received, sent = metrics.received(call.kind), metrics.sent(call.kind)
    call.flows += (received, sent)
    return received, sent


def refused(exc: RequestError) -> None:
    """End the call this thread started with the code of `exc`: a later middleware refuses it, so pyarrow will
    not report its end."""
    call = current()
    if isinstance(call, Call):
        call.calls.end(call, error_kind(exc)[0])
