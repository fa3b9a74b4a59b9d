"""Read plans for the PyTorch and Ray integrations: a scan or a training set planned once, kept as parts
that pickle, so that every worker reads its share over a connection of its own (Flight connections survive
neither fork nor pickle). A part is a ticket of the server's endpoints (`Endpoint`), or a range of local
entity rows (`EntityRows`) that a worker sends with `do_exchange`, the path of
`get_historical_features(entity_df=...)`, with every snapshot pinned at planning."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from flight_client import inputs
from flight_client.client import FeatureClient, batches, null_keys_explained
from flight_client.errors import InvalidRequestError
from flight_server.wire.reads import one_batch

# Where a training set's schema names the snapshots it was computed from (flight_server/training/plan.py).
SNAPSHOTS_METADATA_KEY = b"flight.snapshots"

# Endpoints a read is split into when the caller does not say (per rank, for PyTorch): enough for 8 workers each.
DEFAULT_PARTITIONS = 8

# Parts a reader (a DataLoader worker, a Ray read task) reads at a time (`ReadPlan.batches`): two keep the server
# computing one while the reader takes in the other, and leave no call unread for longer than a batch of the other.
READS_AT_ONCE = 2

T = TypeVar("T")

# The process whose plans and reads opened Flight connections. gRPC does not survive fork: a forked copy of that
# process hangs on its first call, so it is refused with an explanation instead.
_connected_in: int | None = None


def connect(location: str, client_options: dict[str, Any]) -> FeatureClient:
    """A new client, unless this process is a fork of one that used Flight already."""
    global _connected_in
    if _connected_in not in (None, os.getpid()):
        raise RuntimeError(
            "this process was forked from one that had opened Flight connections, which gRPC does not survive: "
            "start workers with the 'forkserver' or 'spawn' method, e.g. "
            "DataLoader(..., multiprocessing_context='forkserver')"
        )
    _connected_in = os.getpid()
    return FeatureClient(location, online_sessions=False, **client_options)


@dataclass(frozen=True)
class Endpoint:
    """One ticket and the replicas that redeem it (none: the server that planned it)."""

    ticket: bytes
    locations: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class EntityRows:
    """Local entity rows `start` to `start + len(rows)`: a compact copy, so that it pickles alone (a slice
    would carry its whole table's buffers to every Ray task)."""

    start: int
    rows: pa.Table = field(repr=False)


Part = Endpoint | EntityRows


@dataclass(frozen=True)
class ReadPlan:
    """A planned read: where to connect, the result's schema and its parts (`endpoints`) in order.

    `client_options` are `FeatureClient` keyword arguments (`token`, `tls_root_certs`, ...); each
    worker opens its own client with them. `columns` (None: all) are kept of every batch. `exchange`
    holds the `iter_historical_features` options that `EntityRows` parts are sent with.
    """

    location: str
    schema: pa.Schema
    endpoints: tuple[Part, ...]
    total_records: int | None = None
    columns: tuple[str, ...] | None = None
    client_options: dict[str, Any] = field(default_factory=dict)
    exchange: dict[str, Any] = field(default_factory=dict)

    def batches(self, endpoints: Sequence[Part], at_once: int = READS_AT_ONCE) -> Iterator[pa.RecordBatch]:
        """The record batches of `endpoints` over a new connection, `at_once` parts read at a time: each by a
        thread of its own into a buffer of one batch, their batches taken in turn (a part that ends gives its
        turn to the next part), so that the server computes a part while the caller takes in another. Taking
        them in turn keeps every call read: a call opened ahead and left unread until its turn came would be
        cut by the server's idle watch (`--idle-timeout-seconds`), and every call on its connection with it.
        The order is the same for the same parts and batches."""
        if at_once < 1:
            raise ValueError(f"at_once must be at least 1, got {at_once}")
        with connect(self.location, self.client_options) as client:

            def read(part: Part) -> PartReader[pa.RecordBatch]:
                if isinstance(part, EntityRows):
                    return lambda opened: client._exchange_rows(part.rows, opened=opened, **self.exchange)
                endpoint = flight.FlightEndpoint(part.ticket, list(part.locations))

                def get(opened: Callable[[Cancellable], None]) -> Iterator[pa.RecordBatch]:
                    stream = client._open_endpoint(endpoint)
                    opened(stream)
                    return batches(stream)

                return get

            for batch in in_turn([read(part) for part in endpoints], at_once):
                yield batch if self.columns is None else batch.select(list(self.columns))


class Cancellable(Protocol):
    """A Flight call that another thread may end (`FlightStreamReader.cancel`)."""

    def cancel(self) -> None: ...


# A part's reader: opens the part's call, hands it to `opened` (so that stopping the reader can cancel it), and
# gives its items.
PartReader = Callable[[Callable[[Cancellable], None]], Iterator[T]]


def in_turn(parts: Sequence[PartReader[T]], at_once: int) -> Iterator[T]:
    """The items of `parts`, `at_once` of them read at a time by threads, taken one from each in turn; a part
    that ends makes room for the next, which joins the end of the turn. Leaving early (or failing) stops every
    reader, cancelling its call."""
    waiting: deque[PartReader[T]] = deque(parts)
    turn: deque[_Buffered[T]] = deque()
    try:
        while waiting or turn:
            while waiting and len(turn) < at_once:
                turn.append(_Buffered(waiting.popleft()))
            item = turn[0].next()  # the reader stays in the turn until it answered, so that `finally` stops it
            reader = turn.popleft()
            if item is _ENDED:
                reader.stop()  # its thread has ended, or is about to
                continue
            turn.append(reader)
            yield item
    finally:
        for reader in turn:
            reader.stop()


_ENDED: Any = object()  # what `_Buffered.next` gives once its part has ended


class _Buffered(Generic[T]):
    """A part read by a thread of its own into a buffer of one item, so that the call is drained as fast as
    its reader takes items, and no faster (memory holds an item per part)."""

    def __init__(self, part: PartReader[T]):
        self._items: deque[T] = deque()
        self._ended = self._stopped = False
        self._error: BaseException | None = None
        self._call: Cancellable | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(part,), name="flight-part-reader", daemon=True)
        self._thread.start()

    def _opened(self, call: Cancellable) -> None:
        with self._changed:
            self._call = call
            stopped = self._stopped
        if stopped:  # stopped while the call was being opened: `stop` found no call to cancel
            call.cancel()

    def _read(self, part: PartReader[T]) -> None:
        try:
            items = part(self._opened)
            try:
                for item in items:
                    with self._changed:
                        self._changed.wait_for(lambda: not self._items or self._stopped)
                        if self._stopped:
                            return
                        self._items.append(item)
                        self._changed.notify_all()
            finally:
                close = getattr(items, "close", None)  # a generator's: ends its call (an exchange cancels)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the reader by next(); after `stop`, the cancel's, dropped
            self._error = exc
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def next(self) -> T:
        """The part's next item, `_ENDED` once it has no more; its failure is raised here."""
        with self._changed:
            self._changed.wait_for(lambda: self._items or self._ended)
            if self._items:
                item = self._items.popleft()
                self._changed.notify_all()
                return item
        if self._error is not None:
            raise self._error
        return _ENDED

    def stop(self) -> None:
        """Stop reading (the reader left early, or another part failed): cancel the call, which would otherwise
        hold the thread until the server's next batch, and wait for the thread."""
        with self._changed:
            self._stopped = True
            self._items.clear()
            self._changed.notify_all()
            call = None if self._ended else self._call
        if call is not None:
            call.cancel()
        self._thread.join()


def _selected(schema: pa.Schema, columns: Sequence[str] | None) -> pa.Schema:
    """`schema` narrowed to `columns` (None: all of it)."""
    if columns is None:
        return schema
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"columns {missing} are not in the result; it has {schema.names}")
    return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)


def _plan(
    location: str, info: flight.FlightInfo, columns: Sequence[str] | None, client_options: dict[str, Any]
) -> ReadPlan:
    schema = _selected(info.schema, columns)
    endpoints = tuple(Endpoint(e.ticket.ticket, tuple(loc.uri.decode() for loc in e.locations)) for e in info.endpoints)
    total = info.total_records if info.total_records >= 0 else None
    return ReadPlan(location, schema, endpoints, total, tuple(columns) if columns else None, client_options)


def plan_table(
    location: str,
    table: str,
    *,
    columns: Sequence[str] | None = None,
    snapshot_id: int | None = None,
    as_of: dt.datetime | str | int | None = None,
    partitions: int | None = None,
    client_options: dict[str, Any] | None = None,
) -> ReadPlan:
    """Plan a whole-table read split by data file into up to `partitions` endpoints (default: the
    server's `--scan-partitions`); the tickets pin the snapshot. Filters and limits are not offered:
    the server answers them as one endpoint, which no worker could share."""
    options = dict(client_options or {})
    with connect(location, options) as client:
        info = client.flight_info(
            table,
            columns=list(columns) if columns else None,
            snapshot_id=snapshot_id,
            as_of=as_of,
            partitions=partitions,
        )
    return _plan(location, info, None, options)


def plan_training_set(
    location: str,
    entity_rows: Any,
    features: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    partitions: int | None = None,
    entity_filter: str | None = None,
    snapshot_ids: dict[str, int] | None = None,
    as_of: dt.datetime | str | int | None = None,
    entity_time: str = "event_timestamp",
    full_feature_names: bool = False,
    client_options: dict[str, Any] | None = None,
) -> ReadPlan:
    """Plan a training set, every snapshot pinned in its parts. Entity rows in a server table (`entity_rows`:
    its name) are split by key into `partitions` endpoints; local rows (anything `get_historical_features`
    takes: a DataFrame, Arrow data, a dict of lists...) are read whole here and cut into `partitions`
    contiguous row ranges (default 1), which workers send themselves. `columns` picks output columns
    client-side."""
    options = dict(client_options or {})
    if not isinstance(entity_rows, str):
        if entity_filter is not None:
            raise ValueError("entity_filter filters an entity table on the server: filter local entity rows first")
        if partitions is not None and partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        table = inputs.to_table(entity_rows)
        return _plan_local(
            location,
            table,
            features,
            columns,
            partitions or 1,
            options,
            snapshot_ids,
            as_of,
            entity_time,
            full_feature_names,
        )
    with connect(location, options) as client:
        info = client.training_set_info(
            entity_rows,
            features,
            full_feature_names=full_feature_names,
            snapshot_ids=snapshot_ids,
            as_of=as_of,
            entity_time=entity_time,
            entity_filter=entity_filter,
            partitions=partitions,
        )
    return _plan(location, info, columns, options)


def _plan_local(
    location: str,
    table: pa.Table,
    features: str | Sequence[str],
    columns: Sequence[str] | None,
    partitions: int,
    client_options: dict[str, Any],
    snapshot_ids: dict[str, int] | None,
    as_of: dt.datetime | str | int | None,
    entity_time: str,
    full_feature_names: bool,
) -> ReadPlan:
    """Local entity rows as `partitions` row ranges. The plan is one exchange of no rows: the server checks
    the request and answers the result's schema, naming the snapshots it resolved, which every range pins."""
    exchange: dict[str, Any] = {"features": inputs.name_list(features), "entity_time": entity_time}
    exchange["full_feature_names"] = full_feature_names
    with connect(location, client_options) as client:
        try:
            empty = client.get_historical_features(
                table.slice(0, 0), snapshot_ids=snapshot_ids, as_of=as_of, **exchange
            )
        except InvalidRequestError as error:  # a float key column: say whether its nulls made it so
            raise null_keys_explained(error, table) from None
    resolved = json.loads(empty.schema.metadata[SNAPSHOTS_METADATA_KEY])
    used = resolved["features"]
    pins = {name: snapshot for name, snapshot in used.items() if snapshot is not None}  # None: a table still empty
    # The schemas read too: a pinned snapshot alone reads in its own, not the table's current one.
    schemas = resolved.get("schema_ids") or {}
    ranges = tuple(
        EntityRows(start, _compact(table.slice(start, stop - start)))
        for start, stop in row_ranges(table.num_rows, partitions)
    )
    return ReadPlan(
        location,
        _selected(empty.schema, columns),
        ranges,
        table.num_rows,  # one result row per entity row
        tuple(columns) if columns else None,
        client_options,
        {**exchange, "snapshot_ids": pins, "schema_ids": schemas or None},
    )


def row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """`[start, stop)` of `parts` contiguous ranges covering `rows` rows, sizes differing by one at most;
    empty ones left out (fewer rows than parts)."""
    bounds = [i * rows // parts for i in range(parts + 1)]
    return [(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False) if stop > start]


def _compact(table: pa.Table) -> pa.Table:
    """A slice as a table of its own buffers (concatenating copies them)."""
    return pa.concat_tables([table, table.schema.empty_table()]).combine_chunks()


def rebatch(batches: Iterator[pa.RecordBatch], size: int | None) -> Iterator[pa.RecordBatch]:
    """`batches` as batches of exactly `size` rows (the last may be shorter); None keeps the server's
    batches (empty ones dropped). Slices are zero-copy; a batch spanning two input batches is copied."""
    if size is None:
        yield from (b for b in batches if b.num_rows)
        return
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pending.append(batch)
        rows += batch.num_rows
        if rows < size:
            continue
        table = pa.Table.from_batches(pending)
        whole = rows - rows % size
        for start in range(0, whole, size):
            yield one_batch(table.slice(start, size))
        rest = table.slice(whole)
        pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield one_batch(pa.Table.from_batches(pending))
