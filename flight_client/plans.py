"""Read plans for the PyTorch and Ray integrations: a scan or a training set planned once (one
`get_flight_info`), kept as plain tickets that pickle, so that every worker redeems its share of the
endpoints over a connection of its own (Flight connections survive neither fork nor pickle)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_client.client import FeatureClient
from flight_server.wire.reads import one_batch

# Endpoints a read is split into when the caller does not say (per rank, for PyTorch): enough for 8 workers each.
DEFAULT_PARTITIONS = 8

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


@dataclass(frozen=True)
class ReadPlan:
    """A planned read: where to connect, the result's schema and its endpoints in server order.

    `client_options` are `FeatureClient` keyword arguments (`token`, `tls_root_certs`, ...); each
    worker opens its own client with them. `columns` (None: all) are kept of every batch.
    """

    location: str
    schema: pa.Schema
    endpoints: tuple[Endpoint, ...]
    total_records: int | None = None
    columns: tuple[str, ...] | None = None
    client_options: dict[str, Any] = field(default_factory=dict)

    def batches(self, endpoints: Sequence[Endpoint]) -> Iterator[pa.RecordBatch]:
        """The record batches of `endpoints`, one endpoint after the other, over a new connection."""
        with connect(self.location, self.client_options) as client:
            for endpoint in endpoints:
                reader = client.read_endpoint(flight.FlightEndpoint(endpoint.ticket, list(endpoint.locations)))
                for batch in reader:
                    yield batch if self.columns is None else batch.select(list(self.columns))


def _plan(
    location: str, info: flight.FlightInfo, columns: Sequence[str] | None, client_options: dict[str, Any]
) -> ReadPlan:
    schema = info.schema
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ValueError(f"columns {missing} are not in the result; it has {schema.names}")
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
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
    entity_rows: str | dict[str, list[Any]],
    features: list[str],
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
    """Plan a training set whose entity rows are a server table, split by entity key into `partitions`
    endpoints (inline rows, a dict of column lists, are one endpoint); the tickets pin every snapshot.
    `columns` picks output columns (entity and feature columns) client-side."""
    if not isinstance(entity_rows, (str, dict)):
        raise TypeError(
            "entity rows for a split training set must be a server table's name (or a small dict of column lists); "
            f"got {type(entity_rows).__name__}: write them to a table first (FeatureClient.write) so that the "
            "server splits them by key across workers"
        )
    options = dict(client_options or {})
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
