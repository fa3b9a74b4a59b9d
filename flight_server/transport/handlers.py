"""One handler per read request kind (scan, training set, online lookup): what `get_flight_info`, `get_schema`,
`do_get` and `do_exchange` do with it. The service finds the handler in `handlers(...)` by the request's type,
so adding a kind is a handler and a row, not a branch in every RPC.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.iceberg.snapshots import ticket_schema_id
from flight_server.reads.paths import open_scan, scan_parts
from flight_server.reads.plan import ScanPlan, plan_scan
from flight_server.training.entities import plan_request
from flight_server.training.plan import endpoint_requests
from flight_server.transport.components import Components
from flight_server.transport.idle import OpenSessions
from flight_server.wire.errors import RequestError
from flight_server.wire.reads import HistoricalRequest, OnlineRequest, ScanRequest

log = logging.getLogger(__name__)

SNAPSHOT_METADATA_KEY = b"flight.snapshot_id"

SCHEMA_METADATA_KEY = b"flight.schema_id"  # the table's schema the rows are in: its current one, unless time travel

TABLE_METADATA_KEY = b"flight.table"

READ_PATH_METADATA_KEY = b"flight.read_path"

ReadRequest = ScanRequest | HistoricalRequest | OnlineRequest

R = TypeVar("R", contravariant=True)


class RequestHandler(Protocol[R]):
    """What the read RPCs do with one kind of request; a kind that does not support an RPC says so (RequestError)."""

    @property
    def waits_on_client(self) -> bool:
        """Whether its `do_exchange` waits on the client between lookups by design (an online session): it may
        carry the session header, and the idle timeout counts only its waits for the client to read results."""
        ...

    def schema(self, request: R) -> pa.Schema: ...

    def info(self, descriptor: flight.FlightDescriptor, request: R) -> flight.FlightInfo: ...

    def open(self, request: R, is_cancelled: Callable[[], bool] | None = None) -> pa.RecordBatchReader | pa.Table:
        """The `do_get` result of a ticket; DuckDB work before the first batch stops once `is_cancelled()`
        (`context.is_cancelled`: the client cancelled or went away)."""
        ...

    def exchange(
        self,
        request: R,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        context: flight.ServerCallContext,
    ) -> None: ...


class Endpoints:
    """Endpoints spread round robin over the replicas, starting one further each call, or each led by the replica
    that owns its keys; each lists every replica, its own first, so a client can fall back to the next. No
    locations: fetch from this server."""

    def __init__(self, locations: list[str]):
        self.locations = locations
        self._turn = itertools.count()

    def __call__(self, tickets: list[bytes], owners: list[int | None] | None = None) -> list[flight.FlightEndpoint]:
        """`owners`: per ticket, the index in `locations` of the replica to name first (None: the next in turn)."""
        n = len(self.locations)
        start = next(self._turn) if n else 0
        firsts = [start + i if owner is None else owner for i, owner in enumerate(owners or [None] * len(tickets))]
        return [
            flight.FlightEndpoint(ticket, [self.locations[(first + k) % n] for k in range(n)])
            for ticket, first in zip(tickets, firsts, strict=True)
        ]


def scan_schema(plan: ScanPlan, read_path: str | None = None) -> pa.Schema:
    """A scan's schema, with the table, snapshot and schema it reads (and how, once known) in its metadata."""
    metadata = {
        TABLE_METADATA_KEY: plan.name.encode(),
        SNAPSHOT_METADATA_KEY: str(plan.snapshot_id).encode(),
        SCHEMA_METADATA_KEY: str(plan.read.schema_id).encode(),
    }
    if read_path is not None:
        metadata[READ_PATH_METADATA_KEY] = read_path.encode()
    return plan.schema.with_metadata(metadata)


def held_snapshot(plan: ScanPlan) -> list[tuple[str, int | None]]:
    """The (table uuid, snapshot) a scan reads, for `SnapshotsInUse`."""
    return [(str(plan.table.metadata.table_uuid), plan.snapshot_id)]


@dataclass(frozen=True)
class Scans:
    """Rows of one table; a whole-table scan is split by data file over several endpoints."""

    parts: Components
    endpoints: Endpoints
    waits_on_client: bool = False

    def schema(self, request: ScanRequest) -> pa.Schema:
        return scan_schema(plan_scan(self.parts.catalog, request, self.parts.caches))

    def info(self, descriptor: flight.FlightDescriptor, request: ScanRequest) -> flight.FlightInfo:
        if request.part is not None:
            raise RequestError("scan request: 'part' is for tickets; ask get_flight_info for 'partitions' instead")
        plan = plan_scan(self.parts.catalog, request, self.parts.caches)
        with self.parts.caches.in_use.hold(held_snapshot(plan)):  # splitting by file reads its manifests
            # Tickets pin the snapshot and the schema read, so fetching them later returns exactly what was described.
            parts = scan_parts(plan, request.partitions or self.parts.config.scan_partitions)
        tickets = [
            replace(
                request,
                snapshot_id=plan.snapshot_id,
                schema_id=ticket_schema_id(plan.table, plan.snapshot_id, plan.read),
                as_of=None,
                partitions=None,
                part=p,
            )
            for p in parts
        ]
        return flight.FlightInfo(
            scan_schema(plan),
            descriptor,
            self.endpoints([ticket.to_bytes() for ticket in tickets]),
            plan.estimated_rows(),
            -1,
            app_metadata=json.dumps(plan.metadata()).encode(),
        )

    def open(
        self, request: ScanRequest, is_cancelled: Callable[[], bool] | None = None
    ) -> pa.RecordBatchReader | pa.Table:
        """The scan's rows; from the scan cache, a Table that Flight streams without Python per batch and that
        holds no snapshot (it reads no file that expiry could delete). The snapshot is held from planning on:
        `open_scan` reads its manifests (and DuckDB's `iceberg_scan` runs to its first batch)."""
        plan = plan_scan(self.parts.catalog, request, self.parts.caches)
        in_use, held = self.parts.caches.in_use, held_snapshot(plan)
        with in_use.hold(held):
            rows, path = open_scan(
                plan, self.parts.engine, self.parts.config.batch_rows, is_cancelled, self.parts.caches.files
            )
            schema = scan_schema(plan, path)
            if isinstance(rows, pa.Table):
                return rows.replace_schema_metadata(schema.metadata)
            return in_use.holding(held, rows.cast(schema))  # taken before `hold` lets go: no gap

    def exchange(
        self,
        request: ScanRequest,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        context: flight.ServerCallContext,
    ) -> None:
        raise RequestError("do_exchange takes a historical or an online request (see docs/protocol.md)")


@dataclass(frozen=True)
class TrainingSetRequests:
    """Training sets: entity rows joined point-in-time to features, from a table, inline or streamed."""

    parts: Components
    endpoints: Endpoints
    waits_on_client: bool = False

    def schema(self, request: HistoricalRequest) -> pa.Schema:
        return plan_request(self.parts.catalog, request)[0].schema

    def info(self, descriptor: flight.FlightDescriptor, request: HistoricalRequest) -> flight.FlightInfo:
        plan, inline = plan_request(self.parts.catalog, request)
        partitions = request.partitions or self.parts.config.historical_partitions
        parts = endpoint_requests(plan, partitions, self.endpoints.locations)
        endpoints = self.endpoints([part.to_bytes() for part, _ in parts], [owner for _, owner in parts])
        rows = inline.num_rows if inline is not None else -1
        return flight.FlightInfo(
            plan.schema, descriptor, endpoints, rows, -1, app_metadata=json.dumps(plan.snapshots()).encode()
        )

    def open(self, request: HistoricalRequest, is_cancelled: Callable[[], bool] | None = None) -> pa.RecordBatchReader:
        return self.parts.training.open(request, is_cancelled)

    def exchange(
        self,
        request: HistoricalRequest,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        context: flight.ServerCallContext,
    ) -> None:
        rows = self.parts.training.exchange(request, reader, writer, context.is_cancelled)
        log.info("training set of %d entity rows streamed", rows)


@dataclass(frozen=True)
class OnlineLookups:
    """The latest features of some entities: keys inline in a ticket, or streamed, often over a session."""

    parts: Components
    sessions: OpenSessions
    waits_on_client: bool = True

    def schema(self, request: OnlineRequest) -> pa.Schema:
        return self.parts.online.plan(request).schema

    def info(self, descriptor: flight.FlightDescriptor, request: OnlineRequest) -> flight.FlightInfo:
        # `end_marker` is for do_exchange: a ticket leaves it out (do_get reads no stream; older releases refuse it).
        endpoint = flight.FlightEndpoint(replace(request, end_marker=False).to_bytes(), [])
        return flight.FlightInfo(self.schema(request), descriptor, [endpoint], -1, -1)

    def open(self, request: OnlineRequest, is_cancelled: Callable[[], bool] | None = None) -> pa.Table:
        return self.parts.online.get(request, is_cancelled)

    def exchange(
        self,
        request: OnlineRequest,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        context: flight.ServerCallContext,
    ) -> None:
        with self.sessions.open(context.peer()):
            rows = self.parts.online.exchange(request, reader, writer, context.is_cancelled)
        log.debug("online lookup of %d streamed entities", rows)


def handlers(
    parts: Components, endpoints: Endpoints, sessions: OpenSessions
) -> dict[type[ReadRequest], RequestHandler[Any]]:
    """The one table from request type to its handler."""
    return {
        ScanRequest: Scans(parts, endpoints),
        HistoricalRequest: TrainingSetRequests(parts, endpoints),
        OnlineRequest: OnlineLookups(parts, sessions),
    }
