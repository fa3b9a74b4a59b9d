"""`FeatureClient`: write feature tables and read them back over Arrow Flight."""

from __future__ import annotations

import datetime as dt
import math
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_client.errors import SERVER_ERRORS, FeatureServerError, ResourceExhaustedError, from_flight_error
from flight_client.sessions import Sessions
from flight_server.wire.actions import (
    CompactRequest,
    DeleteRequest,
    ExpireRequest,
    OrphanFilesRequest,
    PinRequest,
    UnpinRequest,
)
from flight_server.wire.codec import decode_reply, encode, format_timestamp
from flight_server.wire.reads import (
    MAX_INLINE_ENTITIES,
    EntitySource,
    HistoricalRequest,
    OnlineRequest,
    ScanRequest,
    one_batch,
)
from flight_server.wire.writes import WriteRequest, WriteResult, end_marker

if TYPE_CHECKING:
    import pandas as pd

WRITE_BATCH_ROWS = 65_536
# A location that means "the server that answered get_flight_info" (Flight's own convention).
REUSE_CONNECTION = "arrow-flight-reuse-connection://?"


def _as_of(value: dt.datetime | str | int | None) -> str | None:
    """A time as the protocol's ISO-8601 string; epoch milliseconds converted, strings checked by the server."""
    if isinstance(value, bool):
        raise TypeError(f"expected a datetime, an ISO-8601 string or epoch milliseconds, got {value!r}")
    if isinstance(value, int):
        value = dt.datetime.fromtimestamp(value / 1000, tz=dt.timezone.utc)
    if isinstance(value, dt.datetime):
        return format_timestamp(value)
    return value


def _jsonable(value: Any) -> Any:
    """Inline entity values as JSON: datetimes become ISO-8601 (naive means UTC)."""
    if isinstance(value, dt.datetime):
        return format_timestamp(value)
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and math.isnan(value):  # pandas' missing value; JSON has no NaN
        return None
    return value


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM data given as bytes, as PEM text, or as the path of a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


def _batches(data: Any) -> tuple[pa.Schema, Iterable[pa.RecordBatch]]:
    """The schema and the batches of anything tabular, in batches small enough for gRPC."""
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, data
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        pd = sys.modules.get("pandas")  # a DataFrame given means pandas is imported
        if pd is None or not isinstance(data, pd.DataFrame):
            raise TypeError(
                f"expected a pandas DataFrame, Arrow Table/RecordBatch or RecordBatchReader, got {type(data)}"
            )
        data = pa.Table.from_pandas(data, preserve_index=False)
    return data.schema, data.to_batches(max_chunksize=WRITE_BATCH_ROWS)


def _key_batch(columns: dict[str, list[Any]], table: pa.Table | None) -> pa.RecordBatch | None:
    """The keys of an online lookup as one record batch; None if Arrow cannot type them (the server's
    answer to the inline request then says what is wrong with them)."""
    if table is not None:
        return one_batch(table)
    try:
        return pa.RecordBatch.from_pydict(columns)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


class FeatureClient:
    """A connection to a feature server; keep one open and reuse it (it is thread-safe).

    `token` is sent as `authorization: Bearer <token>` on every call; `username` and `password` log in
    with basic authentication for one instead (tokens the server gives a password). For a `grpc+tls://` location,
    `tls_root_certs` is the CA that signed the server's certificate (default: the system's), and
    `cert_chain` / `private_key` the client certificate a mutual-TLS server asks for; each is PEM
    bytes, PEM text or a file path. Endpoints that name other replicas are fetched from them, over
    connections opened with the same options and kept for reuse. Online lookups go over streams
    kept open between calls (`flight_client/sessions.py`; `online_sessions=False`: one call each).
    """

    def __init__(
        self,
        location: str,
        *,
        timeout: float | None = None,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_root_certs: bytes | str | Path | None = None,
        cert_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        online_sessions: bool = True,
        **client_options: Any,
    ):
        self.location = location
        pems = {"tls_root_certs": tls_root_certs, "cert_chain": cert_chain, "private_key": private_key}
        client_options.update({name: _pem(value) for name, value in pems.items() if value is not None})
        self._client_options = client_options
        self._client = flight.FlightClient(location, **client_options)
        self._replicas: dict[str, flight.FlightClient] = {location: self._client}
        self._replicas_lock = threading.Lock()
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
        if username is not None:
            try:
                headers = [self._client.authenticate_basic_token(username, password or "")]
            except SERVER_ERRORS as exc:
                self._client.close()
                raise from_flight_error(exc) from None
        self._options = flight.FlightCallOptions(timeout=timeout, headers=headers)
        self._sessions = Sessions(self._client, timeout, headers or []) if online_sessions else None

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sessions is not None:
            self._sessions.close()
        with self._replicas_lock:
            for client in self._replicas.values():
                client.close()
            self._replicas.clear()

    def _connection(self, location: str) -> flight.FlightClient:
        """The open connection to a replica, opened on first use."""
        if location == REUSE_CONNECTION:
            return self._client
        with self._replicas_lock:
            if location not in self._replicas:
                self._replicas[location] = flight.FlightClient(location, **self._client_options)
            return self._replicas[location]

    # Writes

    def write(
        self,
        table: str,
        data: Any,
        *,
        entity_keys: list[str] | None = None,
        event_time: str | None = None,
        created_time: str | None = None,
        ttl: dt.timedelta | int | None = None,
        mode: str = "append",
        write_id: str | None = None,
        evolve: bool = False,
        partition_by: list[str] | None = None,
    ) -> WriteResult:
        """Write `data` as one Iceberg snapshot; creating the table needs `entity_keys` and `event_time`.

        `ttl` is a timedelta or seconds. A retry with the same `write_id` commits nothing new and
        returns the original snapshot. `evolve=True` adds columns the table does not have yet.
        """
        ttl_seconds = int(ttl.total_seconds()) if isinstance(ttl, dt.timedelta) else ttl
        request = WriteRequest(
            table=table,
            mode=mode,
            entity_keys=entity_keys,
            event_time=event_time,
            created_time=created_time,
            ttl_seconds=ttl_seconds,
            partition_by=partition_by,
            write_id=write_id,
            evolve=evolve,
            end_marker=True,
        )
        schema, batches = _batches(data)
        descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        try:
            writer, results = self._client.do_put(descriptor, schema, self._options)
        except SERVER_ERRORS as exc:
            raise from_flight_error(exc) from None
        rows = 0
        try:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
            writer.write_metadata(pa.py_buffer(end_marker(rows)))
            writer.done_writing()
            reply = results.read()
            writer.close()
        except SERVER_ERRORS as exc:
            # The server's explanation arrives when the call is closed.
            try:
                writer.close()
            except SERVER_ERRORS as closed:
                raise from_flight_error(closed) from None
            raise from_flight_error(exc) from None
        if reply is None:
            raise FeatureServerError("the server closed the write without a result", "INTERNAL")
        return WriteResult.from_bytes(reply.to_pybytes())

    def delete(
        self,
        table: str,
        keys: dict[str, list[Any]] | None = None,
        filter: str | None = None,
        mode: str | None = None,
    ) -> dict[str, Any]:
        """Delete the rows of some entities (`keys`: key column -> values, one entity per position) and/or
        those matching `filter`, in one snapshot.

        `mode` is "copy-on-write" (rewrite the files holding them) or "merge-on-read" (write position
        delete files; cheaper deletes, slower reads until `compact`); default: the table's
        `write.delete.mode`, else copy-on-write. Returns the snapshot id and the rows and files changed.
        """
        columns = {k: [_jsonable(v) for v in values] for k, values in keys.items()} if keys is not None else None
        return self._action("delete", asdict(DeleteRequest(table, columns, filter, mode)))

    def compact(self, table: str, filter: str | None = None) -> dict[str, Any]:
        """Rewrite the table's data and delete files (or those of the data files `filter` touches) into
        well-sized data files, in one snapshot; afterwards reads apply no delete files."""
        return self._action("compact", asdict(CompactRequest(table, filter)))

    def expire_snapshots(
        self,
        table: str,
        older_than: dt.datetime | str | int | None = None,
        retain_last: int | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Forget snapshots older than `older_than` except the `retain_last` newest, and delete the files only
        they used; defaults: the table's `history.expire.*` properties (5 days, 1). Pinned snapshots are
        kept (and listed in `kept_pinned`) unless `force`, which drops their pins."""
        request = ExpireRequest(table, _as_of(older_than), retain_last, force)
        return self._action("expire_snapshots", asdict(request))

    def pin(self, table: str, snapshot_id: int | None = None, name: str | None = None) -> dict[str, Any]:
        """Keep a snapshot (default: the current one) from expiring, under `name` (default `pin-<id>`): an
        Iceberg tag, so other engines see and keep it too."""
        return self._action("pin", asdict(PinRequest(table, snapshot_id, name)))

    def unpin(self, table: str, name: str) -> dict[str, Any]:
        """Drop the pin `name`; its snapshot may then expire."""
        return self._action("unpin", asdict(UnpinRequest(table, name)))

    def remove_orphan_files(
        self, table: str, older_than: dt.datetime | str | int | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        """Delete the files under the table's data and metadata folders that no snapshot or metadata file
        references (left by a server that died during a put, say) and that are older than `older_than`
        (default: 3 days ago, so that changes still running keep their files); `dry_run` only lists them.
        Returns their count and bytes, what was deleted, and the first 1000 of them."""
        request = OrphanFilesRequest(table, _as_of(older_than), dry_run)
        return self._action("remove_orphan_files", asdict(request))

    def run_maintenance(self, table: str) -> dict[str, Any]:
        """Run one round of the server's automatic maintenance on `table` now: compact the small files of
        crowded partitions, expire old snapshots (keeping pinned ones and those reads use), remove orphan files
        when due. Returns what it did; `describe` shows the table's last round, `health` the totals."""
        return self._action("run_maintenance", {"table": table})

    # Reads

    def scan(
        self,
        table: str,
        columns: list[str] | None = None,
        filter: str | None = None,
        snapshot_id: int | None = None,
        as_of: dt.datetime | str | int | None = None,
        limit: int | None = None,
    ) -> pa.RecordBatchReader:
        """Stream rows of `table` (optionally at a snapshot or a time), as Arrow record batches.

        The schema metadata says which snapshot was read (`flight.snapshot_id`).
        """
        request = ScanRequest(table, columns, filter, snapshot_id, _as_of(as_of), limit)
        return self._get(request.to_bytes())

    def read_table(
        self,
        table: str,
        columns: list[str] | None = None,
        filter: str | None = None,
        snapshot_id: int | None = None,
        as_of: dt.datetime | str | int | None = None,
        limit: int | None = None,
        *,
        partitions: int | None = None,
    ) -> pa.Table:
        """Read rows of `table` whole, over up to `partitions` endpoints fetched in parallel.

        The server splits only whole-table reads (no filter or limit), by data file; other scans
        come back as one endpoint. Default: the server's `--scan-partitions`. Row order across
        parts is not defined; the schema metadata names the snapshot and read path, as `scan`'s does.
        """
        request = ScanRequest(table, columns, filter, snapshot_id, _as_of(as_of), limit, partitions)
        return self._read_endpoints(self._info(request))

    def flight_info(self, table: str, **scan_options: Any) -> flight.FlightInfo:
        """Schema, row estimate and endpoints of a scan, without reading it."""
        scan_options["as_of"] = _as_of(scan_options.get("as_of"))
        return self._info(ScanRequest(table, **scan_options))

    def _get(self, ticket: bytes, locations: list[str] | None = None) -> pa.RecordBatchReader:
        """Open the stream of `ticket` at the first of `locations` that answers (default: this server)."""
        for i, location in enumerate(locations or [self.location]):
            try:
                stream = self._connection(location).do_get(flight.Ticket(ticket), self._options)
                _ = stream.schema  # surfaces request errors now; see apache/arrow#34731 for why first
                return stream.to_reader()
            except flight.FlightUnavailableError as exc:  # that replica is down or busy: the ticket is good anywhere
                if locations is None or i == len(locations) - 1:
                    raise from_flight_error(exc) from None
            except SERVER_ERRORS as exc:
                raise from_flight_error(exc) from None
        raise AssertionError("unreachable")

    def _fetch(self, endpoint: flight.FlightEndpoint) -> pa.RecordBatchReader:
        """An endpoint's stream, from the replica it names (or this server when it names none)."""
        locations = [location.uri.decode() for location in endpoint.locations]
        return self._get(endpoint.ticket.ticket, locations or None)

    # Training sets

    def get_historical_features(
        self,
        entity_rows: Any,
        features: list[str],
        *,
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        entity_filter: str | None = None,
        partitions: int | None = None,
    ) -> pa.Table:
        """Join `features` (`"table:feature"`) to each entity row as of its timestamp.

        `entity_rows` is a pandas DataFrame, Arrow Table or RecordBatchReader (streamed to the
        server), a dict of column lists (sent inline), or the name of a table on the server
        (optionally with `entity_filter`), whose parts are fetched in parallel. The result has one
        row per entity row, in order; its schema metadata `flight.snapshots` names the snapshots
        it was computed from: pass them back as `snapshot_ids` to get the same result again.
        """
        request = self._historical_request(
            entity_rows, features, full_feature_names, snapshot_ids, as_of, entity_time, entity_filter, partitions
        )
        if request.entities is None:
            return self._exchange(request, entity_rows)
        info = self._info(request)
        return self._read_endpoints(info).replace_schema_metadata(info.schema.metadata)

    def iter_historical_features(
        self,
        entity_rows: Any,
        features: list[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        entity_filter: str | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream a training set batch by batch, for training loops; worker `rank` of `world_size`
        gets a disjoint share (an entity table is split by key on the server, local rows by position).

        Pin `snapshot_ids` (from the `flight.snapshots` metadata of an earlier result) so every worker reads
        the same snapshots.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if isinstance(entity_rows, (str, dict)):
            request = self._historical_request(
                entity_rows, features, full_feature_names, snapshot_ids, as_of, entity_time, entity_filter, world_size
            )
            endpoints = self._info(request).endpoints
            for endpoint in endpoints[rank::world_size]:
                yield from self._fetch(endpoint)
            return
        schema, batches = _batches(entity_rows)
        table = pa.Table.from_batches(list(batches), schema=schema)
        start, stop = rank * table.num_rows // world_size, (rank + 1) * table.num_rows // world_size
        share = table.slice(start, stop - start)
        request = self._historical_request(
            share, features, full_feature_names, snapshot_ids, as_of, entity_time, None, None
        )
        yield from self._exchange(request, share).to_batches()

    def _historical_request(
        self,
        entity_rows: Any,
        features: list[str],
        full_feature_names: bool,
        snapshot_ids: dict[str, int] | None,
        as_of: Any,
        entity_time: str,
        entity_filter: str | None,
        partitions: int | None,
    ) -> HistoricalRequest:
        entities = None
        if isinstance(entity_rows, str):
            entities = EntitySource(table=entity_rows, filter=entity_filter)
        elif isinstance(entity_rows, dict):
            rows = {k: [_jsonable(v) for v in values] for k, values in entity_rows.items()}
            entities = EntitySource(rows=rows)
        return HistoricalRequest(
            features=list(features),
            entities=entities,
            entity_time=entity_time,
            full_feature_names=full_feature_names,
            snapshot_ids=snapshot_ids,
            as_of=_as_of(as_of),
            partitions=partitions,
        )

    # Online serving

    def get_online_features(
        self,
        entities: Any,
        features: list[str],
        *,
        as_of: dt.datetime | str | int | None = None,
        full_feature_names: bool = False,
        request_time: dt.datetime | str | int | None = None,
        apply_ttl: bool = True,
    ) -> pa.Table:
        """The latest `features` (`"table:feature"`) of each entity, one row per entity in order.

        `entities` maps key columns to values (a dict of lists) or is a pandas DataFrame, Arrow
        Table or RecordBatchReader of key columns. Up to 10,000 entities travel inline in one
        `do_get`; more, and readers, are streamed with `do_exchange`. Each table adds a `<table>__<event time>`
        column: when the returned row was valid. Unknown entities, and rows older than the table's
        TTL at `request_time` (now by default; `apply_ttl=False` keeps them), are nulls. `as_of`
        looks into history instead: the latest rows at or before that time (slower: it reads the
        table).
        """
        request = OnlineRequest(
            list(features), None, full_feature_names, _as_of(as_of), _as_of(request_time), apply_ttl
        )
        table: pa.Table | None = None
        if isinstance(entities, dict):
            columns = {k: list(v) if not isinstance(v, list) else v for k, v in entities.items()}
            if len(next(iter(columns.values()), [])) > MAX_INLINE_ENTITIES:
                return self._exchange(request, pa.table(columns))
        elif isinstance(entities, pa.RecordBatchReader):
            return self._exchange(request, entities)  # streamed as it comes, whatever its size
        else:
            schema, batches = _batches(entities)
            table = pa.Table.from_batches(list(batches), schema=schema)
            if table.num_rows > MAX_INLINE_ENTITIES:
                return self._exchange(request, table)
            columns = table.to_pydict()
        if self._sessions is not None and as_of is None and request_time is None:
            keys = _key_batch(columns, table)
            if keys is not None:
                try:
                    return self._sessions.lookup(request, keys)
                except SERVER_ERRORS as exc:
                    raise from_flight_error(exc) from None
        inline = {k: [_jsonable(v) for v in values] for k, values in columns.items()}
        ticket = flight.Ticket(replace(request, entities=inline).to_bytes())
        try:
            return self._client.do_get(ticket, self._options).read_all()
        except SERVER_ERRORS as exc:
            error = from_flight_error(exc)
            if not (isinstance(error, ResourceExhaustedError) and "bytes inline" in str(error)):
                raise error from None
        return self._exchange(request, pa.table(columns))  # the server takes smaller tickets: stream them

    def _info(self, request: ScanRequest | HistoricalRequest) -> flight.FlightInfo:
        try:
            return self._client.get_flight_info(flight.FlightDescriptor.for_command(request.to_bytes()), self._options)
        except SERVER_ERRORS as exc:
            raise from_flight_error(exc) from None

    def _read_endpoints(self, info: flight.FlightInfo) -> pa.Table:
        """Every endpoint of `info`, fetched at once and concatenated in endpoint order."""
        with ThreadPoolExecutor(max_workers=max(1, len(info.endpoints))) as pool:
            parts = list(pool.map(lambda e: self._fetch(e).read_all(), info.endpoints))
        return pa.concat_tables(parts)

    def _exchange(self, request: HistoricalRequest | OnlineRequest, entity_rows: Any) -> pa.Table:
        schema, batches = _batches(entity_rows)
        descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        try:
            writer, reader = self._client.do_exchange(descriptor, self._options)
            with writer:
                writer.begin(schema)
                # The server answers batches as they arrive: read while writing, or both sides would
                # stall once the answers fill the connection's flow-control window.
                sending = _Sender(writer, batches)
                try:
                    result = reader.read_all()
                finally:
                    sending.finish()
                return result
        except SERVER_ERRORS as exc:
            raise from_flight_error(exc) from None

    # Catalog

    def tables(self) -> list[dict[str, Any]]:
        """Every table the server's catalog holds, with its feature definition."""
        return self._action("list_tables")

    def describe(self, table: str) -> dict[str, Any]:
        """Schema, keys, event time, TTL, partitioning and snapshots of one table."""
        return self._action("describe", {"table": table})

    def health(self) -> dict[str, Any]:
        """Whether the server and its catalog answer: version, writes in progress, online index and cache memory."""
        return self._action("health")

    def _action(self, name: str, body: dict[str, Any] | None = None) -> Any:
        payload = encode(body) if body is not None else b""
        try:
            results: Iterator[flight.Result] = self._client.do_action(flight.Action(name, payload), self._options)
            return decode_reply(b"".join(r.body.to_pybytes() for r in results))
        except SERVER_ERRORS as exc:
            raise from_flight_error(exc) from None


class _Sender:
    """Writes entity batches to a `do_exchange` stream from a thread of its own, then ends the stream."""

    def __init__(self, writer: flight.FlightStreamWriter, batches: Iterable[pa.RecordBatch]):
        self._writer, self._batches = writer, batches
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._send, name="flight-exchange-writer", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        try:
            for batch in self._batches:
                self._writer.write_batch(batch)
            self._writer.done_writing()
        except BaseException as exc:  # handed to the caller by finish()
            self._error = exc

    def finish(self) -> None:
        """Wait for the writes; a failed write is raised unless the answer already failed."""
        self._thread.join()
        if self._error is not None and not isinstance(self._error, SERVER_ERRORS):
            raise self._error


def read_flight(
    location: str, table: str | None = None, *, token: str | None = None, tls_root_certs: Any = None, **options: Any
) -> pd.DataFrame:
    """Read into pandas in one call: a table (with `read_table` options), or a training set when
    `features=[...]` and `entity_rows=...` are given (with `get_historical_features` options)."""
    with FeatureClient(location, token=token, tls_root_certs=tls_root_certs) as client:
        if "features" in options:
            entity_rows = options.pop("entity_rows", table)
            return client.get_historical_features(entity_rows, options.pop("features"), **options).to_pandas()
        if table is None:
            raise TypeError("read_flight needs a table, or features= and entity_rows= for a training set")
        return client.read_table(table, **options).to_pandas()
