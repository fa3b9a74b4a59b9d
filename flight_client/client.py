"""`FeatureClient`: write feature tables and read them back over Arrow Flight."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import pyarrow as pa
import pyarrow.flight as flight

from flight_client import inputs
from flight_client.errors import (
    SERVER_ERRORS,
    STREAM_ERRORS,
    FeatureServerError,
    InvalidRequestError,
    ResourceExhaustedError,
    UnavailableError,
    from_flight_error,
)
from flight_client.results import HistoricalResult, OnlineResult
from flight_client.sessions import Sessions
from flight_server.wire.actions import (
    CompactRequest,
    DeleteRequest,
    ExpireRequest,
    OrphanFilesRequest,
    PinRequest,
    UnpinRequest,
)
from flight_server.wire.codec import REQUEST_ID_HEADER, decode_reply, encode, format_timestamp, unwrapped
from flight_server.wire.errors import detail_code
from flight_server.wire.reads import (
    COMPRESSIONS,
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

log = logging.getLogger(__name__)

# A location that means "the server that answered get_flight_info" (Flight's own convention).
REUSE_CONNECTION = "arrow-flight-reuse-connection://?"

SEND_FIRST_BYTES = 32 << 10  # entity rows sent whole before their answer is read (half gRPC's first window)


def _as_of(value: dt.datetime | str | int | None) -> str | None:
    """A time as the protocol's ISO-8601 string; epoch milliseconds converted, a date as its midnight (UTC), NumPy's
    times and ints as Python's, strings checked by the server."""
    value = _python(value)
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time(), tzinfo=dt.timezone.utc)
    if isinstance(value, bool):
        raise TypeError(f"expected a datetime, an ISO-8601 string or epoch milliseconds, got {value!r}")
    if isinstance(value, int):
        value = dt.datetime.fromtimestamp(value / 1000, tz=dt.timezone.utc)
    if isinstance(value, dt.datetime):
        return format_timestamp(value)
    return value


_JSON_VALUES = (type(None), bool, int, float, str)


def _python(value: Any) -> Any:
    """A value of a column given as a list or an Arrow array as plain Python (Arrow and NumPy scalars unwrapped:
    `unwrapped`); pandas' missing float (NaN) as None."""
    value = value.as_py() if isinstance(value, pa.Scalar) else unwrapped(value)
    return None if isinstance(value, float) and math.isnan(value) else value


def _inline(columns: dict[str, list[Any]], time_column: str | None = None) -> dict[str, list[Any]] | None:
    """`columns` as JSON for an inline request, or None when a value would not arrive as it was given: the server
    types inline values as JSON's (whole numbers, floats, text; ISO-8601 text as a time only in `time_column`,
    where datetimes are sent so), so dates, datetimes elsewhere, decimals and bytes go as Arrow instead."""
    inline: dict[str, list[Any]] = {}
    for name, values in columns.items():
        column = inline[name] = []
        for value in map(_python, values):
            if isinstance(value, dt.datetime) and name == time_column:
                value = format_timestamp(value)
            elif not isinstance(value, _JSON_VALUES):
                return None
            column.append(value)
    return inline


def _key_text(name: str, value: Any) -> Any:
    """A `delete` key as JSON: dates, times and decimals as text, which the server reads as the key's type."""
    value = _python(value)
    if isinstance(value, (dt.date, dt.time)):  # a datetime too
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if not isinstance(value, _JSON_VALUES):
        raise InvalidRequestError(
            f"delete keys of {name!r} cannot be sent as {type(value).__name__}; delete those rows with a filter",
            "INVALID_ARGUMENT",
        )
    return value


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM data given as bytes, as PEM text, or as the path of a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


def _location(location: str | flight.Location) -> str:
    """`host:port` means `grpc://host:port`; HTTP is refused with the schemes Flight speaks."""
    if isinstance(location, flight.Location):
        location = location.uri.decode()
    scheme, separator, _ = location.partition("://")
    if not separator:
        return f"grpc://{location}"
    if scheme.lower() in ("http", "https"):
        raise ValueError(
            f"{location!r}: Arrow Flight speaks gRPC, not HTTP; use grpc://host:port, or grpc+tls://host:port for TLS"
        )
    return location


def _key_batch(columns: dict[str, list[Any]], table: pa.Table | None) -> pa.RecordBatch | None:
    """The keys of an online lookup as one record batch; None if Arrow cannot type them (the server's
    answer to the inline request then says what is wrong with them)."""
    if table is not None:
        return one_batch(table)
    try:
        return pa.RecordBatch.from_pydict(columns)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def _feature_refs(value: Any) -> bool:
    """Whether `value` looks like feature references (`"table:feature"`): entities never do, which tells
    Feast's argument order (features first) from ours."""
    refs = [value] if isinstance(value, str) else value
    return isinstance(refs, (list, tuple)) and bool(refs) and all(isinstance(r, str) and ":" in r for r in refs)


def null_keys_explained(error: FeatureServerError, rows: pa.Table | None) -> FeatureServerError:
    """The server sees a float key column; when the rows' column has nulls, that is why: say so."""
    match = re.match(r"entity column '([^']+)' is ", str(error))
    if rows is None or not isinstance(error, InvalidRequestError) or match is None:
        return error
    name = inputs.null_float_keys(rows, [match.group(1)])
    if name is None:
        return error
    return InvalidRequestError(inputs.null_keys_message(name, rows.schema.field(name).type), error.code)


# What a server of a release before the `end_marker` request field (docs/protocol.md, "Ending the entity rows") answers
# the do_exchange of this client, which always sends it: the field is unknown there.
_OLDER_SERVER = "unknown field(s) ['end_marker']"


def older_server_explained(error: FeatureServerError, location: str) -> FeatureServerError:
    """A server too old for this client's do_exchange (during a rolling upgrade, say): say what to do."""
    if not isinstance(error, InvalidRequestError) or _OLDER_SERVER not in str(error):
        return error
    return InvalidRequestError(
        f"the server at {location} runs an older release than this client, whose training sets and streamed online "
        "lookups need a server that takes 'end_marker': upgrade the servers before the clients (docs/operations.md, "
        f"'Upgrading'), or use the previous client until then (the server said: {error})",
        error.code,
    )


def _sent_once(write_id: str | None, data: Any) -> str | None:
    """Why a put answered UNAVAILABLE is not sent again, or None when it may be: only a put with a `write_id` commits
    once however often it is sent, and only rows held in memory can be sent again."""
    if write_id is None:
        return "a put without a write_id could commit twice; give it one to have it retried"
    if inputs.is_stream(data):
        return "its rows were a stream, read once; give a Table or DataFrame to have it retried"
    return None


# gRPC's own words for a connection lost during a call (a server killed, a connection cut), never a server's answer.
_CONNECTION_LOST = re.compile(r"Stream removed|Socket closed|Connection reset|Broken pipe|GOAWAY", re.IGNORECASE)


def _maybe_committed(error: FeatureServerError, raw: Exception, ended: bool) -> FeatureServerError:
    """`error`, saying that the put may have committed when the connection was lost (gRPC's own UNAVAILABLE, no answer
    of the server's, which says so itself where it may have) after the put's whole stream had gone out."""
    lost = detail_code(raw) is None and _CONNECTION_LOST.search(str(error)) is not None
    if not ended or not lost or not isinstance(error, UnavailableError):
        return error
    return UnavailableError(
        f"{error} (the connection was lost after the whole put was sent: it may have committed; send it again "
        "with the same write_id, which commits once)"
    )


RETRY_FIRST_PAUSE = 0.1  # seconds before the first retry of a call answered UNAVAILABLE; doubled at each next
RETRY_MAX_PAUSE = 2.0


class _Backoff:
    """The pauses between attempts of a call the server answered UNAVAILABLE (a read, a put with a `write_id`), for
    `seconds` after the first."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.pause = RETRY_FIRST_PAUSE

    def again(self, error: FeatureServerError) -> bool:
        """Wait, and say to try again; False (at once) when `error` is no outage or the time is up."""
        left = self.deadline - time.monotonic()
        if not isinstance(error, UnavailableError) or left <= 0:
            return False
        pause = min(self.pause, left)
        log.info("the feature server is unavailable (%s); trying again in %.1f s", error, pause)
        time.sleep(pause)
        self.pause = min(self.pause * 2, RETRY_MAX_PAUSE)
        return True


class FeatureClient:
    """A connection to a feature server; keep one open and reuse it (it is thread-safe).

    `token` is sent as `authorization: Bearer <token>` on every call; `username` and `password` log in
    with basic authentication for one instead (tokens the server gives a password). For a `grpc+tls://` location,
    `tls_root_certs` is the CA that signed the server's certificate (default: the system's), and
    `cert_chain` / `private_key` the client certificate a mutual-TLS server asks for; each is PEM
    bytes, PEM text or a file path. Endpoints that name other replicas are fetched from them, over
    connections opened with the same options and kept for reuse. Online lookups go over streams
    kept open between calls (`flight_client/sessions.py`; `online_sessions=False`: one call each).
    `compression` (`"lz4"` or `"zstd"`) asks for scans and training sets compressed on the wire: for
    networks slower than about 1 GB/s, at the server's and this process's CPU cost.
    A `location` without a scheme (`localhost:8815`) means `grpc://`.
    `request_id` is sent as `x-request-id` on every call: the server's log lines of those calls carry it.
    `retry_seconds`: for how long calls the server answers UNAVAILABLE (a replica restarting, the catalog or object
    store away, nothing listening yet) are tried again, with pauses from 0.1 s doubling to 2 s, at each of an
    endpoint's replicas in turn: planning a scan or training set (`flight_info`, `training_set_info`), opening a
    ticket (`read_endpoint`, and the readers of `flight_client.torch` and `flight_client.ray`), reading one
    whole (`read_table`), and a `write` with a `write_id` of rows held in memory (see `write`); not a stream that
    has handed out rows, nor other puts, lookups or actions. 0 (the default): raise at once. A training job or a
    pipeline that should ride through a rolling restart or a catalog failover sets a minute.

    Every method taking rows accepts polars, pandas and pyarrow data, DuckDB relations, anything
    exporting Arrow's C stream, a dict of lists or a list of dicts (`flight_client/inputs.py`).
    """

    def __init__(
        self,
        location: str | flight.Location,
        *,
        timeout: float | None = None,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_root_certs: bytes | str | Path | None = None,
        cert_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        online_sessions: bool = True,
        compression: str | None = None,
        request_id: str | None = None,
        retry_seconds: float = 0.0,
        **client_options: Any,
    ):
        if compression is not None and compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {list(COMPRESSIONS)} or None, got {compression!r}")
        if not retry_seconds >= 0:
            raise ValueError(f"retry_seconds must be 0 or more, got {retry_seconds!r}")
        self.location = location = _location(location)
        self.compression = compression
        self.retry_seconds = retry_seconds
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
        if request_id is not None:
            headers = [*(headers or []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
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
        entity_keys: str | Sequence[str] | None = None,
        event_time: str | None = None,
        created_time: str | None = None,
        ttl: dt.timedelta | int | None = None,
        mode: str = "append",
        write_id: str | None = None,
        evolve: bool = False,
        partition_by: str | Sequence[str] | None = None,
    ) -> WriteResult:
        """Write `data` as one Iceberg snapshot; creating the table needs `entity_keys` and `event_time`.

        `ttl` is a timedelta or seconds. A retry with the same `write_id` commits nothing new and
        returns the original snapshot (`duplicate` true). `evolve=True` adds columns the table does not have yet.
        `partition_by` takes transforms as `bucket(8, id)` or as `describe` prints them, `bucket[8](id)`.
        Readers and C streams (a DuckDB relation, say) are sent as they are read, never held whole.

        With the client's `retry_seconds`, a put with a `write_id` that the server answers UNAVAILABLE (a replica
        restarting, its write process restarting, the catalog away), before or while its rows stream or by going
        away before its answer, is sent again until it is answered: it commits once whichever attempt landed, and
        when an unanswered one had committed, the answer is that snapshot's, `duplicate` true. Only rows that can
        be sent twice are: a Table, RecordBatch, DataFrame or dict of columns, held whole meanwhile; a reader or a
        C stream is read once, and a put without `write_id` could commit twice: those raise at once, as without
        `retry_seconds`.
        """
        ttl_seconds = int(ttl.total_seconds()) if isinstance(ttl, dt.timedelta) else ttl
        request = WriteRequest(
            table=table,
            mode=mode,
            entity_keys=None if entity_keys is None else inputs.name_list(entity_keys, "entity_keys"),
            event_time=event_time,
            created_time=created_time,
            ttl_seconds=ttl_seconds,
            partition_by=None if partition_by is None else inputs.name_list(partition_by, "partition_by"),
            write_id=write_id,
            evolve=evolve,
            end_marker=True,
        )
        descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        once = _sent_once(write_id, data) if self.retry_seconds else None
        if not self.retry_seconds or once is not None:
            try:
                return self._put(descriptor, *inputs.stream(data))
            except UnavailableError as error:
                raise error if once is None else UnavailableError(f"{error} (not tried again: {once})") from None
        rows = inputs.to_table(data)  # held: each attempt sends it again
        backoff = _Backoff(self.retry_seconds)
        while True:
            try:
                return self._put(descriptor, *inputs.stream(rows))
            except UnavailableError as error:
                if not backoff.again(error):
                    raise

    def _put(
        self, descriptor: flight.FlightDescriptor, schema: pa.Schema, batches: Iterable[pa.RecordBatch]
    ) -> WriteResult:
        """One `do_put` of `batches`, ended with the end-of-stream marker; its errors as `FeatureServerError`s."""
        try:
            writer, results = self._client.do_put(descriptor, schema, self._options)
        except SERVER_ERRORS as exc:
            raise from_flight_error(exc) from None
        rows = 0
        ended = False  # the end-of-stream marker went out: the server may commit from then on
        try:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
            writer.write_metadata(pa.py_buffer(end_marker(rows)))
            ended = True
            writer.done_writing()
            reply = results.read()
            writer.close()
        except SERVER_ERRORS as exc:
            raw = exc
            try:
                writer.close()
            except SERVER_ERRORS as closed:  # the server's explanation arrives when the call is closed
                raw = closed
            raise _maybe_committed(from_flight_error(raw), raw, ended) from None
        if reply is None:
            raise FeatureServerError("the server closed the write without a result", "INTERNAL")
        return WriteResult.from_bytes(reply.to_pybytes())

    def delete(
        self,
        table: str,
        keys: Any = None,
        filter: str | None = None,
        mode: str | None = None,
    ) -> dict[str, Any]:
        """Delete the rows of some entities (`keys`: key column -> values, one entity per position, or any
        rows `write` takes, of key columns) and/or those matching `filter`, in one snapshot.

        `mode` is "copy-on-write" (rewrite the files holding them) or "merge-on-read" (write position
        delete files; cheaper deletes, slower reads until `compact`); default: the table's
        `write.delete.mode`, else copy-on-write. Returns the snapshot id and the rows and files changed.
        """
        columns = None
        if keys is not None:
            given = inputs.python_columns(keys)
            given = given if given is not None else inputs.to_table(keys).to_pydict()
            columns = {k: [_key_text(k, v) for v in values] for k, values in given.items()}
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
        max_snapshots: int | None = None,
    ) -> dict[str, Any]:
        """Forget snapshots older than `older_than` except the `retain_last` newest, then (with `max_snapshots`)
        the oldest until at most `max_snapshots` (or `retain_last`, if more) remain, and delete the files only
        they used; defaults: the table's `history.expire.*` properties (5 days, 1), no cap. Pinned snapshots are
        kept (and listed in `kept_pinned`) unless `force`, which drops their pins."""
        request = ExpireRequest(table, _as_of(older_than), retain_last, force, max_snapshots)
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
        since_snapshot: int | None = None,
    ) -> pa.RecordBatchReader:
        """Stream rows of `table` (optionally at a snapshot or a time), as Arrow record batches.

        The current state is read in the table's current schema, a snapshot or a time in the snapshot's own. The
        schema metadata says which snapshot and schema were read (`flight.snapshot_id`, `flight.schema_id`). With
        `since_snapshot`, only the rows appended after that snapshot (refused if a snapshot in between deleted or
        overwrote rows).
        """
        request = ScanRequest(
            table,
            columns,
            filter,
            snapshot_id,
            _as_of(as_of),
            limit,
            compression=self.compression,
            since_snapshot=since_snapshot,
        )
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
        request = ScanRequest(
            table, columns, filter, snapshot_id, _as_of(as_of), limit, partitions, compression=self.compression
        )
        return self._read_endpoints(self._info(request))

    def flight_info(self, table: str, **scan_options: Any) -> flight.FlightInfo:
        """Schema, row estimate and endpoints of a scan, without reading it."""
        scan_options["as_of"] = _as_of(scan_options.get("as_of"))
        scan_options.setdefault("compression", self.compression)
        return self._info(ScanRequest(table, **scan_options))

    def training_set_info(
        self,
        entity_rows: str | dict[str, list[Any]],
        features: str | Sequence[str],
        *,
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        entity_filter: str | None = None,
        partitions: int | None = None,
    ) -> flight.FlightInfo:
        """Schema and endpoints of a training set, without reading it: entity rows in a server table are split
        by key into `partitions` endpoints, inline rows (a dict of column lists) are one. Their tickets pin
        every snapshot; redeem each with `read_endpoint`, in any process."""
        if not isinstance(entity_rows, (str, dict)):
            raise TypeError(f"training_set_info takes a table name or a dict of column lists, got {type(entity_rows)}")
        request = self._historical_request(
            entity_rows, features, full_feature_names, snapshot_ids, as_of, entity_time, entity_filter, partitions
        )
        if request.entities is None:  # a dict whose values JSON does not carry as they are
            columns = inputs.python_columns(entity_rows) or {}
            held = [name for name, values in columns.items() if _inline({name: values}, entity_time) is None]
            raise TypeError(
                f"training_set_info puts the entity rows in its tickets as JSON, which cannot carry the values of "
                f"{held} as they are (dates, decimals, bytes, or times outside entity_time); get_historical_features "
                "sends such rows as Arrow, or put them in a table on the server"
            )
        return self._info(request)

    def read_endpoint(self, endpoint: flight.FlightEndpoint) -> pa.RecordBatchReader:
        """The rows of one endpoint of `flight_info` or `training_set_info`, from its first replica that answers.
        Not read again elsewhere when that replica goes away while streaming: the caller may hold some of its rows."""
        return reader(self._open_endpoint(endpoint))

    def _get(self, ticket: bytes) -> pa.RecordBatchReader:
        """The stream of `ticket` at this server, its errors raised as `FeatureServerError`s."""
        return reader(self._open(ticket, [self.location])[0])

    def _open(self, ticket: bytes, locations: Sequence[str]) -> tuple[flight.FlightStreamReader, int]:
        """The call of `ticket` at the first of `locations` that answers, and that location's index, trying them
        all again for `retry_seconds` while none does. The call is returned for another thread to `cancel`
        (`plans.in_turn` stopping a part's reader)."""
        backoff = _Backoff(self.retry_seconds)
        while True:
            try:
                return self._open_once(ticket, locations)
            except UnavailableError as error:
                if not backoff.again(error):
                    raise

    def _open_once(self, ticket: bytes, locations: Sequence[str]) -> tuple[flight.FlightStreamReader, int]:
        for i, location in enumerate(locations):
            try:
                stream = self._connection(location).do_get(flight.Ticket(ticket), self._options)
                _ = stream.schema  # surfaces request errors now; see apache/arrow#34731 for why first
                return stream, i
            except flight.FlightUnavailableError as exc:  # that replica is down or busy: the ticket is good anywhere
                if i == len(locations) - 1:
                    raise from_flight_error(exc) from None
            except STREAM_ERRORS as exc:
                raise from_flight_error(exc) from None
        raise AssertionError("unreachable")

    def _open_endpoint(self, endpoint: flight.FlightEndpoint) -> flight.FlightStreamReader:
        return self._open(endpoint.ticket.ticket, self._locations(endpoint))[0]

    def _locations(self, endpoint: flight.FlightEndpoint) -> list[str]:
        """Where `endpoint` is read, in order: the replicas it names, or this server when it names none."""
        return [location.uri.decode() for location in endpoint.locations] or [self.location]

    def _read_whole(self, endpoint: flight.FlightEndpoint) -> pa.Table:
        """An endpoint's rows, read whole. A replica that goes away while streaming them (UNAVAILABLE) is read
        again from the start at the endpoint's next location (after the last, at the first again for
        `retry_seconds`): nothing of the failed read was handed out, so no row comes twice."""
        locations = self._locations(endpoint)
        first = 0
        backoff = _Backoff(self.retry_seconds)
        while True:
            stream, at = self._open(endpoint.ticket.ticket, locations[first:])
            try:
                return stream.read_all()  # not to_reader()'s: it raises a bare OSError, the error's kind lost
            except STREAM_ERRORS as exc:
                error = from_flight_error(exc)
                first += at + 1
                if not isinstance(error, UnavailableError):
                    raise error from None
                if first == len(locations):
                    if not backoff.again(error):
                        raise error from None
                    first = 0

    # Training sets

    @overload
    def get_historical_features(
        self,
        entity_rows: Any,
        features: str | Sequence[str],
        *,
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        entity_filter: str | None = None,
        partitions: int | None = None,
    ) -> pa.Table: ...

    @overload
    def get_historical_features(
        self,
        *,
        entity_df: Any,
        features: str | Sequence[str],
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        entity_filter: str | None = None,
        partitions: int | None = None,
    ) -> HistoricalResult: ...

    def get_historical_features(
        self,
        entity_rows: Any = None,
        features: str | Sequence[str] | None = None,
        *,
        entity_df: Any = None,
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        entity_filter: str | None = None,
        partitions: int | None = None,
    ) -> pa.Table | HistoricalResult:
        """Join `features` (`"table:feature"`, or one such string) to each entity row as of its timestamp.

        `entity_rows` is a DataFrame, Arrow data, a DuckDB relation or a reader (streamed to the
        server), a dict of column lists or a list of row dicts (sent inline when JSON carries their values:
        numbers, text, and datetimes in `entity_time`; else as Arrow), or the name of a table on
        the server (optionally with `entity_filter`), whose parts are fetched in parallel. The result has one
        row per entity row, in order; its schema metadata `flight.snapshots` names the snapshots
        it was computed from: pass them back as `snapshot_ids` to get the same result again.
        Feast's form, `entity_df=...`, returns a `HistoricalResult` (`.to_df()`, `.to_arrow()`) instead
        of the Table.
        """
        if (entity_rows is None) == (entity_df is None):
            raise TypeError("get_historical_features takes the entity rows once: entity_rows, or Feast's entity_df")
        if features is None:
            raise TypeError('get_historical_features needs features=["table:feature", ...]')
        rows = entity_rows if entity_df is None else entity_df
        request = self._historical_request(
            rows, features, full_feature_names, snapshot_ids, as_of, entity_time, entity_filter, partitions
        )
        if request.entities is None:
            table = self._exchange(request, rows)
        else:
            info = self._info(request)
            table = self._read_endpoints(info).replace_schema_metadata(info.schema.metadata)
        return table if entity_df is None else HistoricalResult(table)

    def iter_historical_features(
        self,
        entity_rows: Any,
        features: str | Sequence[str],
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
        if isinstance(entity_rows, str):  # split by key on the server; local rows, Python values too, by position
            request = self._historical_request(
                entity_rows, features, full_feature_names, snapshot_ids, as_of, entity_time, entity_filter, world_size
            )
            endpoints = self._info(request).endpoints
            for endpoint in endpoints[rank::world_size]:
                yield from batches(self._open_endpoint(endpoint))
            return
        table = inputs.to_table(entity_rows)
        if not table.num_rows:  # nothing to split: sent as given, so a dict of empty lists is typed by the tables
            if rank == 0:
                yield from self.get_historical_features(
                    entity_rows,
                    features,
                    full_feature_names=full_feature_names,
                    snapshot_ids=snapshot_ids,
                    as_of=as_of,
                    entity_time=entity_time,
                ).to_batches()
            return
        start, stop = rank * table.num_rows // world_size, (rank + 1) * table.num_rows // world_size
        yield from self._exchange_rows(
            table.slice(start, stop - start),
            features,
            full_feature_names=full_feature_names,
            snapshot_ids=snapshot_ids,
            as_of=as_of,
            entity_time=entity_time,
        )

    def _exchange_rows(
        self,
        rows: pa.Table,
        features: str | Sequence[str],
        *,
        full_feature_names: bool = False,
        snapshot_ids: dict[str, int] | None = None,
        as_of: dt.datetime | str | int | None = None,
        entity_time: str = "event_timestamp",
        opened: Callable[[flight.FlightStreamReader], None] | None = None,
        schema_ids: dict[str, int] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """The training set of local entity `rows`, streamed over one `do_exchange` (`_exchange_batches`); a planned
        part pins the `schema_ids` its plan read besides the snapshots."""
        request = self._historical_request(
            rows, features, full_feature_names, snapshot_ids, as_of, entity_time, None, None
        )
        request = replace(request, schema_ids=schema_ids)
        return self._exchange_batches(request, rows, opened)

    def _historical_request(
        self,
        entity_rows: Any,
        features: str | Sequence[str],
        full_feature_names: bool,
        snapshot_ids: dict[str, int] | None,
        as_of: Any,
        entity_time: str,
        entity_filter: str | None,
        partitions: int | None,
    ) -> HistoricalRequest:
        entities = None
        columns = None if isinstance(entity_rows, str) else inputs.python_columns(entity_rows)
        if isinstance(entity_rows, str):
            entities = EntitySource(table=entity_rows, filter=entity_filter)
        elif columns is not None and (inline := _inline(columns, entity_time)) is not None:
            entities = EntitySource(rows=inline)
        return HistoricalRequest(
            features=inputs.name_list(features),
            entities=entities,
            entity_time=entity_time,
            full_feature_names=full_feature_names,
            snapshot_ids=snapshot_ids,
            as_of=_as_of(as_of),
            partitions=partitions,
            compression=self.compression,
        )

    # Online serving

    @overload
    def get_online_features(
        self,
        entities: Any,
        features: str | Sequence[str],
        *,
        as_of: dt.datetime | str | int | None = None,
        full_feature_names: bool = False,
        request_time: dt.datetime | str | int | None = None,
        apply_ttl: bool = True,
    ) -> pa.Table: ...

    # Feast's order (features first): by name, by position, or features by position and entity_rows by name.
    @overload
    def get_online_features(
        self,
        *,
        features: str | Sequence[str],
        entity_rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        full_feature_names: bool = False,
        as_of: dt.datetime | str | int | None = None,
        request_time: dt.datetime | str | int | None = None,
        apply_ttl: bool = True,
    ) -> OnlineResult: ...

    @overload
    def get_online_features(
        self,
        features: str | Sequence[str],
        entity_rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        /,
        *,
        full_feature_names: bool = False,
        as_of: dt.datetime | str | int | None = None,
        request_time: dt.datetime | str | int | None = None,
        apply_ttl: bool = True,
    ) -> OnlineResult: ...

    @overload
    def get_online_features(
        self,
        features: str | Sequence[str],
        /,
        *,
        entity_rows: Sequence[Mapping[str, Any]] | Mapping[str, Any],
        full_feature_names: bool = False,
        as_of: dt.datetime | str | int | None = None,
        request_time: dt.datetime | str | int | None = None,
        apply_ttl: bool = True,
    ) -> OnlineResult: ...

    def get_online_features(
        self,
        entities: Any = None,
        features: Any = None,  # or, in Feast's order, the entity rows
        *,
        entity_rows: Any = None,
        as_of: dt.datetime | str | int | None = None,
        full_feature_names: bool = False,
        request_time: dt.datetime | str | int | None = None,
        apply_ttl: bool = True,
    ) -> pa.Table | OnlineResult:
        """The latest `features` (`"table:feature"`, or one such string) of each entity, one row per entity in order.

        `entities` maps key columns to values (a dict of lists, or a list of row dicts) or is a
        DataFrame, Arrow data or a DuckDB relation of key columns (read whole: keys are few), or a
        RecordBatchReader. Up to 10,000 entities travel inline in one
        `do_get`; more, and readers, are streamed with `do_exchange`. Each table adds a `<table>__<event time>`
        column (`<table>` with its namespace only when two tables share a name): when the returned row was
        valid. Unknown entities, and rows older than the table's TTL at `request_time` (now by default;
        `apply_ttl=False` keeps them), are nulls. `as_of` looks into history instead: the latest rows at or
        before that time (slower: it reads the table). Feast's form, features first
        (`get_online_features(features, entity_rows=[{...}])`, by position or by name), returns an
        `OnlineResult` (`.to_dict()`, `.to_df()`, `.to_arrow()`) instead of the Table.
        """
        if entity_rows is None and _feature_refs(entities) and features is not None and not _feature_refs(features):
            entities, features, entity_rows = None, entities, features  # Feast's order, given by position
        elif entity_rows is not None and features is None:
            entities, features = None, entities  # Feast's features by position, entity_rows by name
        if features is None:
            raise TypeError('get_online_features needs features=["table:feature", ...]')
        if entity_rows is not None:
            if entities is not None:
                raise TypeError("get_online_features takes the entities once: entities, or Feast's entity_rows")
            table = self._online(entity_rows, features, as_of, full_feature_names, request_time, apply_ttl)
            # The answer's columns: the keys (the entity columns), the features, then the tables' event times.
            shown = inputs.to_table(entity_rows).num_columns + len(inputs.name_list(features))
            return OnlineResult(table, table.column_names[shown:])
        if entities is None:
            raise TypeError("get_online_features needs the entities: a dict of key columns, rows or a DataFrame")
        return self._online(entities, features, as_of, full_feature_names, request_time, apply_ttl)

    def _online(
        self,
        entities: Any,
        features: str | Sequence[str],
        as_of: dt.datetime | str | int | None,
        full_feature_names: bool,
        request_time: dt.datetime | str | int | None,
        apply_ttl: bool,
    ) -> pa.Table:
        request = OnlineRequest(
            inputs.name_list(features), None, full_feature_names, _as_of(as_of), _as_of(request_time), apply_ttl
        )
        table: pa.Table | None = None
        columns = inputs.python_columns(entities)
        if columns is not None:
            if len(next(iter(columns.values()), [])) > MAX_INLINE_ENTITIES:
                return self._exchange(request, pa.table(columns))
        elif isinstance(entities, pa.RecordBatchReader):
            return self._exchange(request, entities)  # streamed as it comes, whatever its size
        else:
            table = inputs.decoded(inputs.to_table(entities))  # categorical keys as their values
            nulls = inputs.null_float_keys(table)  # every column of an online lookup is a key
            if nulls is not None:
                raise InvalidRequestError(
                    inputs.null_keys_message(nulls, table.schema.field(nulls).type), "INVALID_ARGUMENT"
                )
            if table.num_rows > MAX_INLINE_ENTITIES:
                return self._exchange(request, table)
            columns = table.to_pydict()
        if self._sessions is not None and as_of is None and request_time is None:
            keys = _key_batch(columns, table)
            if keys is not None:
                try:
                    return self._sessions.lookup(request, keys)
                except STREAM_ERRORS as exc:
                    raise from_flight_error(exc) from None
        inline = _inline(columns)
        if inline is None:  # values JSON does not carry as they are: as Arrow
            return self._exchange(request, table if table is not None else inputs.to_table(entities))
        ticket = flight.Ticket(replace(request, entities=inline).to_bytes())
        try:
            return self._client.do_get(ticket, self._options).read_all()
        except STREAM_ERRORS as exc:
            error = from_flight_error(exc)
            if not (isinstance(error, ResourceExhaustedError) and "bytes inline" in str(error)):
                raise error from None
        return self._exchange(request, pa.table(columns))  # the server takes smaller tickets: stream them

    def _info(self, request: ScanRequest | HistoricalRequest) -> flight.FlightInfo:
        descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        backoff = _Backoff(self.retry_seconds)
        while True:
            try:
                return self._client.get_flight_info(descriptor, self._options)
            except SERVER_ERRORS as exc:
                error = from_flight_error(exc)
                if not backoff.again(error):
                    raise error from None

    def _read_endpoints(self, info: flight.FlightInfo) -> pa.Table:
        """Every endpoint of `info`, fetched at once (`_read_whole`) and concatenated in endpoint order."""
        with ThreadPoolExecutor(max_workers=max(1, len(info.endpoints))) as pool:
            parts = list(pool.map(self._read_whole, info.endpoints))
        return pa.concat_tables(parts)

    def _exchange(self, request: HistoricalRequest | OnlineRequest, entity_rows: Any) -> pa.Table:
        with self._exchanging(request, entity_rows) as reader:
            return reader.read_all()

    def _exchange_batches(
        self,
        request: HistoricalRequest,
        entity_rows: Any,
        opened: Callable[[flight.FlightStreamReader], None] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """The answer's batches as they arrive: memory holds a batch, not the answer. `opened` is handed the call
        once it is open, for another thread to `cancel` (`plans.in_turn` stopping a part's reader)."""
        with self._exchanging(request, entity_rows) as reader:
            if opened is not None:
                opened(reader)
            yield from _data(reader)

    @contextmanager
    def _exchanging(
        self, request: HistoricalRequest | OnlineRequest, entity_rows: Any
    ) -> Iterator[flight.FlightStreamReader]:
        """A `do_exchange` sending `entity_rows` while the caller reads the answer; server errors are raised
        as `FeatureServerError`s, and a caller that stops reading early cancels the call."""
        held = None if inputs.is_stream(entity_rows) else inputs.to_table(entity_rows)
        schema, batches = inputs.stream(entity_rows if held is None else held)
        descriptor = flight.FlightDescriptor.for_command(replace(request, end_marker=True).to_bytes())
        leaving: BaseException | None = None  # the caller's own exception (or stop), which outranks the cancel's
        try:
            writer, reader = self._client.do_exchange(descriptor, self._options)
            with writer:
                writer.begin(schema)
                # The server answers batches as they arrive: read while writing, or both sides would
                # stall once the answers fill the connection's flow-control window. Rows that fit the window are
                # all sent first, sparing a thread. The rows end with the end-of-stream marker, never a half-close
                # from the sending thread (`_Sender`).
                sending = _Sender(writer, schema, batches, background=held is None or held.nbytes > SEND_FIRST_BYTES)
                try:
                    yield reader
                except BaseException as exc:
                    reader.cancel()  # the sender may be blocked on a window only the reader would open
                    sending.finish(raising=False)
                    leaving = None if isinstance(exc, STREAM_ERRORS) else exc
                    raise
                try:
                    sending.finish()
                except BaseException as exc:
                    leaving = exc if exc is sending.rows_error else None  # the caller's, raised as it is (an OSError)
                    raise
        except STREAM_ERRORS as exc:
            if leaving is not None:
                raise leaving from None
            raise older_server_explained(null_keys_explained(from_flight_error(exc), held), self.location) from None

    # Catalog

    def tables(self) -> list[dict[str, Any]]:
        """Every table the server's catalog holds, with its feature definition."""
        return self._action("list_tables")

    def describe(self, table: str) -> dict[str, Any]:
        """Schema, keys, event time, TTL, partitioning and snapshots of one table."""
        return self._action("describe", {"table": table})

    def health(self, catalog: bool = True) -> dict[str, Any]:
        """Whether the server and its catalog answer: version, writes in progress, online index and cache memory.
        `catalog=False` asks the server alone (a readiness check: it answers while the catalog is away)."""
        return self._action("health") if catalog else self._action("health", {"catalog": False})

    def calls(self) -> dict[str, Any]:
        """The calls the server is running now, the longest running first (needs the admin permission): each
        call's request and trace ids, method, kind, caller, tables, client address, seconds so far, rows and bytes
        moved. `tracked` is false when the server does not track calls (it runs without metrics and JSON logs)."""
        return self._action("calls")

    def _action(self, name: str, body: dict[str, Any] | None = None) -> Any:
        payload = encode(body) if body is not None else b""
        try:
            results: Iterator[flight.Result] = self._client.do_action(flight.Action(name, payload), self._options)
            return decode_reply(b"".join(r.body.to_pybytes() for r in results))
        except SERVER_ERRORS as exc:
            raise from_flight_error(exc) from None


def reader(stream: flight.FlightStreamReader) -> pa.RecordBatchReader:
    """`stream` as a RecordBatchReader whose errors while streaming are `FeatureServerError`s (`batches`)."""
    return pa.RecordBatchReader.from_batches(stream.schema, batches(stream))


def batches(stream: flight.FlightStreamReader) -> Iterator[pa.RecordBatch]:
    """The batches of a `do_get` call, an error while streaming (the server's, or its going away) raised as the
    `FeatureServerError` the same error at the call's start would be."""
    try:
        yield from _data(stream)
    except STREAM_ERRORS as exc:
        raise from_flight_error(exc) from None


def _data(stream: flight.FlightStreamReader) -> Iterator[pa.RecordBatch]:
    """A call's batches, read with `read_chunk`: `to_reader()`'s reader raises every error as a bare OSError, its
    kind (UNAVAILABLE, the server's code) lost."""
    while True:
        try:
            chunk = stream.read_chunk()
        except StopIteration:
            return
        if chunk.data is not None:  # None: a message of metadata only
            yield chunk.data


class _Sender:
    """Writes entity batches to a `do_exchange` stream from a thread of its own, then the end-of-stream marker
    (docs/protocol.md) that the request promised. When the entity rows themselves fail (a stream that raises), the
    marker ends them too, so that the call does not wait forever for the rest, and `finish` raises that failure
    instead of returning the answer for part of the rows. (Not `cancel`: pyarrow turns a call cancelled under a
    running read into a KeyboardInterrupt.)

    The sender never half-closes the call (`done_writing`): Arrow Flight's half-close is not guarded against the
    one its reader makes when it sees the call end (`WritableDataStream::DoFinish`, which half-closes unless the
    writer's `done_writing_` flag, set without its lock, already says so), and a server that refused the request
    while this thread half-closed made gRPC abort the process ("API misuse of type
    GRPC_CALL_ERROR_TOO_MANY_OPERATIONS"). The server instead ends the call after the marker, and the call is
    half-closed on the reading thread only: by the reader when it ends, or by closing the writer.

    Without `background` the batches are written at once on the calling thread, before the answer is read: for
    rows that fit the connection's flow-control window, which the writes never wait on."""

    def __init__(
        self,
        writer: flight.FlightStreamWriter,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        background: bool = True,
    ):
        self._writer, self._schema, self._batches = writer, schema, batches
        self.rows_error: BaseException | None = None  # the entity rows' own failure, whatever its kind
        self._error: BaseException | None = None  # a failed write
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._send, name="flight-exchange-writer", daemon=True)
            self._thread.start()
        else:
            self._send()

    def _send(self) -> None:
        batches = iter(self._batches)
        rows, written = 0, False
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except BaseException as exc:  # the entity rows failed: end the stream, raise it in finish()
                    self.rows_error = exc
                    break
                self._writer.write_batch(batch)
                rows, written = rows + batch.num_rows, True
            if not written:  # the schema goes out with the first batch, and must precede the marker
                self._writer.write_batch(pa.RecordBatch.from_pylist([], schema=self._schema))
            self._writer.write_metadata(pa.py_buffer(end_marker(rows)))
        except BaseException as exc:  # handed to the caller by finish()
            self._error = exc

    def finish(self, raising: bool = True) -> None:
        """Wait for the writes; the entity rows' own failure is raised (an Arrow error of a CSV reader too: the
        answer covers only the rows before it), and a failed write unless the answer already failed."""
        if self._thread is not None:
            self._thread.join()
        if not raising:
            return
        if self.rows_error is not None:
            raise self.rows_error
        if self._error is not None and not isinstance(self._error, SERVER_ERRORS):
            raise self._error


def read_flight(
    location: str,
    table: str | None = None,
    *,
    token: str | None = None,
    tls_root_certs: Any = None,
    compression: str | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Read into pandas in one call: a table (with `read_table` options), or a training set when
    `features=[...]` and `entity_rows=...` are given (with `get_historical_features` options)."""
    with FeatureClient(location, token=token, tls_root_certs=tls_root_certs, compression=compression) as client:
        if "features" in options:
            entity_rows = options.pop("entity_rows", table)
            return client.get_historical_features(entity_rows, options.pop("features"), **options).to_pandas()
        if table is None:
            raise TypeError("read_flight needs a table, or features= and entity_rows= for a training set")
        return client.read_table(table, **options).to_pandas()
