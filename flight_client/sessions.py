"""Online lookups over `do_exchange` streams kept open between lookups: one round trip each.

Opening a Flight call (a new HTTP/2 stream, its headers, a server thread taking it up) costs more
than answering a lookup of a few entities from the online index, so `FeatureClient` keeps a stream
open per kind of lookup (features, options, key columns) and writes each lookup's keys as one
batch; the server answers every batch with exactly one batch (docs/protocol.md, "Sessions").

A session serves one thread at a time: concurrent lookups open more, and up to `IDLE_PER_KIND`
idle ones are kept for the next. A session that fails after it has answered before (the server
restarted, or ended the call because a table's columns changed) is closed and the lookup retried
once on a new one; a new session's failure is the lookup's. With a client `timeout`, the call's
deadline bounds a session's life, so one older than half of it is replaced before use.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict

import pyarrow as pa
import pyarrow.flight as flight

from flight_client.errors import STREAM_ERRORS
from flight_server.wire.codec import ONLINE_SESSION_HEADER
from flight_server.wire.reads import OnlineRequest

IDLE_PER_KIND = 4  # idle sessions kept per kind of lookup; more concurrent lookups close theirs after use
KINDS = 16  # kinds of lookup with idle sessions kept; the least recently used kind's close first
Kind = tuple[tuple[str, ...], bool, bool, pa.Schema]  # features, full_feature_names, apply_ttl, key columns


class Session:
    """One open `do_exchange`: write a batch of keys, read its answer."""

    def __init__(
        self, client: flight.FlightClient, request: OnlineRequest, keys: pa.Schema, options: flight.FlightCallOptions
    ):
        descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        self.writer, self.reader = client.do_exchange(descriptor, options)
        self.writer.begin(keys)
        self.opened = time.monotonic()

    def lookup(self, keys: pa.RecordBatch) -> pa.Table:
        self.writer.write_batch(keys)
        return pa.Table.from_batches([self.reader.read_chunk().data])

    def close(self) -> None:
        """End the call: tell the server no more keys come, and collect its status (errors included)."""
        with contextlib.suppress(pa.ArrowException, flight.FlightError):
            self.writer.done_writing()
        with contextlib.suppress(pa.ArrowException, flight.FlightError):
            self.writer.close()


class Sessions:
    """The online sessions of one connection."""

    def __init__(self, client: flight.FlightClient, timeout: float | None, headers: list[tuple[bytes, bytes]]):
        self._client = client
        self._timeout = timeout
        self._options = flight.FlightCallOptions(
            timeout=timeout, headers=[*headers, (ONLINE_SESSION_HEADER.encode(), b"1")]
        )
        self._idle: OrderedDict[Kind, list[Session]] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def lookup(self, request: OnlineRequest, keys: pa.RecordBatch) -> pa.Table:
        """The answer to `request` for `keys`; Flight errors are raised as they come."""
        kind = (tuple(request.features), request.full_feature_names, request.apply_ttl, keys.schema)
        session = self._take(kind)
        if session is not None:
            try:
                answer = session.lookup(keys)
            except STREAM_ERRORS:
                session.close()  # gone stale since its last answer: one retry on a new session
            else:
                self._give(kind, session)
                return answer
        session = Session(self._client, request, keys.schema, self._options)
        try:
            answer = session.lookup(keys)
        except BaseException:
            session.close()
            raise
        self._give(kind, session)
        return answer

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle = [s for sessions in self._idle.values() for s in sessions]
            self._idle.clear()
        for session in idle:
            session.close()

    def _take(self, kind: Kind) -> Session | None:
        stale = []
        with self._lock:
            sessions = self._idle.get(kind, [])
            session = sessions.pop() if sessions else None
            while session is not None and self._timeout and time.monotonic() - session.opened > self._timeout / 2:
                stale.append(session)
                session = sessions.pop() if sessions else None
        for old in stale:
            old.close()
        return session

    def _give(self, kind: Kind, session: Session) -> None:
        extra: list[Session] = []
        with self._lock:
            sessions = self._idle.setdefault(kind, [])
            self._idle.move_to_end(kind)
            if self._closed or len(sessions) >= IDLE_PER_KIND:
                extra.append(session)
            else:
                sessions.append(session)
            while len(self._idle) > KINDS:
                extra += self._idle.popitem(last=False)[1]
        for old in extra:
            old.close()
