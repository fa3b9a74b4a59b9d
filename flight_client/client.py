"""`FeatureClient`: write feature tables and read them back over Arrow Flight."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_client.errors import FeatureServerError, from_flight_error
from flight_server.protocol import ScanRequest, WriteRequest, WriteResult, encode, end_marker, format_timestamp

if TYPE_CHECKING:
    import pandas as pd

WRITE_BATCH_ROWS = 65_536


def _as_of(value: dt.datetime | str | int | None) -> str | int | None:
    if isinstance(value, dt.datetime):
        return format_timestamp(value)
    return value


def _batches(data: Any) -> tuple[pa.Schema, Iterable[pa.RecordBatch]]:
    """The schema and the batches of anything tabular, in batches small enough for gRPC."""
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, data
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas is a dependency
            pd = None
        if pd is None or not isinstance(data, pd.DataFrame):
            raise TypeError(
                f"expected a pandas DataFrame, Arrow Table/RecordBatch or RecordBatchReader, got {type(data)}"
            )
        data = pa.Table.from_pandas(data, preserve_index=False)
    return data.schema, data.to_batches(max_chunksize=WRITE_BATCH_ROWS)


class FeatureClient:
    """A connection to a feature server; keep one open and reuse it (it is thread-safe)."""

    def __init__(self, location: str, *, timeout: float | None = None, **client_options: Any):
        self.location = location
        self._client = flight.FlightClient(location, **client_options)
        self._options = flight.FlightCallOptions(timeout=timeout)

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

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
        except flight.FlightError as exc:
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
        except (pa.ArrowException, flight.FlightError) as exc:
            # The server's explanation arrives when the call is closed.
            try:
                writer.close()
            except (pa.ArrowException, flight.FlightError) as closed:
                raise from_flight_error(closed) from None
            raise from_flight_error(exc) from None
        if reply is None:
            raise FeatureServerError("the server closed the write without a result", "INTERNAL")
        return WriteResult.from_bytes(reply.to_pybytes())

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
        request = ScanRequest(table, columns, filter, snapshot_id, _as_of(as_of), limit)  # type: ignore[arg-type]
        return self._get(request.to_bytes())

    def flight_info(self, table: str, **scan_options: Any) -> flight.FlightInfo:
        """Schema, row estimate and endpoints of a scan, without reading it."""
        scan_options["as_of"] = _as_of(scan_options.get("as_of"))
        request = ScanRequest(table, **scan_options)
        descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        try:
            return self._client.get_flight_info(descriptor, self._options)
        except flight.FlightError as exc:
            raise from_flight_error(exc) from None

    def _get(self, ticket: bytes) -> pa.RecordBatchReader:
        try:
            stream = self._client.do_get(flight.Ticket(ticket), self._options)
            _ = stream.schema  # surfaces request errors now; see apache/arrow#34731 for why first
            return stream.to_reader()
        except flight.FlightError as exc:
            raise from_flight_error(exc) from None

    # Catalog

    def tables(self) -> list[dict[str, Any]]:
        """Every table the server's catalog holds, with its feature definition."""
        return self._action("list_tables")

    def describe(self, table: str) -> dict[str, Any]:
        """Schema, keys, event time, TTL, partitioning and snapshots of one table."""
        return self._action("describe", {"table": table})

    def health(self) -> dict[str, Any]:
        return self._action("health")

    def _action(self, name: str, body: dict[str, Any] | None = None) -> Any:
        payload = encode(body) if body is not None else b""
        try:
            results: Iterator[flight.Result] = self._client.do_action(flight.Action(name, payload), self._options)
            return json.loads(b"".join(r.body.to_pybytes() for r in results))
        except flight.FlightError as exc:
            raise from_flight_error(exc) from None


def read_flight(location: str, table: str, **scan_options: Any) -> pd.DataFrame:
    """Read a table (or a filtered, time-travelled part of it) into pandas in one call."""
    with FeatureClient(location) as client:
        return client.scan(table, **scan_options).read_pandas()
