"""Which snapshot a request reads (by id or commit time), its schema, and the snapshots pinned by tags."""

from __future__ import annotations

from pyiceberg.schema import Schema
from pyiceberg.table import Table

from flight_server.iceberg.catalog import table_name
from flight_server.wire.codec import parse_timestamp
from flight_server.wire.errors import NotFoundError


def resolve_snapshot(table: Table, snapshot_id: int | None, as_of: str | None) -> int | None:
    """The snapshot a read uses: the one named, the one current at `as_of`, or the current one."""
    if snapshot_id is not None:
        if table.snapshot_by_id(snapshot_id) is None:
            raise NotFoundError(f"table {table_name(table)!r} has no snapshot {snapshot_id}")
        return snapshot_id
    if as_of is not None:
        when = parse_timestamp(as_of, "as_of")
        snapshot = table.snapshot_as_of_timestamp(int(when.timestamp() * 1000))
        if snapshot is None:
            raise NotFoundError(f"table {table_name(table)!r} has no snapshot at or before {when.isoformat()}")
        return snapshot.snapshot_id
    current = table.current_snapshot()
    return current.snapshot_id if current else None


def snapshot_schema(table: Table, snapshot_id: int | None) -> Schema:
    """The schema rows had at that snapshot (time travel after schema evolution reads old columns)."""
    snapshot = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else None
    if snapshot is not None and snapshot.schema_id is not None:
        return table.schemas().get(snapshot.schema_id, table.schema())
    return table.schema()
