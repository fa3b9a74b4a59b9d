"""Which snapshot a request reads (by id or commit time), its schema, and the snapshots pinned by tags."""

from __future__ import annotations

from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from flight_server.iceberg.catalog import table_name
from flight_server.wire.codec import parse_timestamp
from flight_server.wire.errors import NotFoundError


def resolve_snapshot(table: Table, snapshot_id: int | None, as_of: str | None) -> int | None:
    """The snapshot a read uses: the one named, the one current at `as_of`, or the current one."""
    if snapshot_id is not None:
        if table.snapshot_by_id(snapshot_id) is None:
            raise NotFoundError(
                f"table {table_name(table)!r} has no snapshot {snapshot_id}: it was expired, or is not one of this "
                "table's; a read that must outlast the table's snapshot expiry pins it first (FeatureClient.pin)"
            )
        return snapshot_id
    if as_of is not None:
        when = parse_timestamp(as_of, "as_of")
        return _current_at(table, int(when.timestamp() * 1000), when.isoformat())
    current = table.current_snapshot()
    return current.snapshot_id if current else None


def _current_at(table: Table, timestamp_ms: int, when: str) -> int:
    """The snapshot current at `timestamp_ms` by the table's snapshot log, refused where the log has a gap.

    pyiceberg's expiry drops the log entries of the snapshots it expires and keeps those around them (Java's
    drops every entry before the last it removes), so the entry before the asked time may name a snapshot
    that was followed by others since expired: that snapshot was not current then, and answering from it
    would read another table state."""
    log = table.history()
    index = next((i for i in range(len(log) - 1, -1, -1) if log[i].timestamp_ms <= timestamp_ms), None)
    if index is None:
        raise NotFoundError(f"table {table_name(table)!r} has no snapshot at or before {when}")
    found = table.snapshot_by_id(log[index].snapshot_id)
    if found is None or (index + 1 < len(log) and _expired_between(table, found, log[index + 1].snapshot_id)):
        raise NotFoundError(
            f"table {table_name(table)!r}: the snapshot current at {when} was expired (the table's history no "
            "longer holds it); read a later time, or a snapshot the table keeps by its id"
        )
    return found.snapshot_id


def _expired_between(table: Table, found: Snapshot, next_id: int) -> bool:
    """Whether a snapshot became current after `found` and before the log's next entry, and was expired.

    The next snapshot is expired itself, or its parent is (other engines leave the parent id), or it has
    none: pyiceberg's expiry clears the parent ids of the expired snapshots' children. A snapshot without a
    parent also starts a replaced table's history, so the sequence numbers (format 2) tell the two apart: a
    number between the two snapshots' that no snapshot holds was expired. Without them (format 1), assume
    expiry: a refusal, never another snapshot's rows. A rollback (the next entry names an older snapshot)
    shows nothing either way, and is answered as the log says."""
    after = table.snapshot_by_id(next_id)
    if after is None:
        return True
    parent = after.parent_snapshot_id
    if parent is not None:
        return parent != found.snapshot_id and table.snapshot_by_id(parent) is None
    if after.timestamp_ms < found.timestamp_ms:  # a rollback to an older snapshot
        return False
    low, high = found.sequence_number or 0, after.sequence_number or 0
    if not low:
        return True
    held = {s.sequence_number for s in table.snapshots()}
    return any(number not in held for number in range(low + 1, high))


def snapshot_schema(table: Table, snapshot_id: int | None) -> Schema:
    """The schema rows had at that snapshot (time travel after schema evolution reads old columns)."""
    snapshot = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else None
    if snapshot is not None and snapshot.schema_id is not None:
        return table.schemas().get(snapshot.schema_id, table.schema())
    return table.schema()


def read_schema(table: Table, snapshot_id: int | None, travel: bool, schema_id: int | None = None) -> Schema:
    """The schema a read answers in: the table's current one for its current state (as pyiceberg, Spark and Trino
    read it: a schema change commits no snapshot, and is seen at once), the snapshot's own for time travel
    (`travel`: a snapshot id, a time or a pin asked for), or `schema_id`'s, which an endpoint ticket carries so
    that every part reads in the schema its request was planned in."""
    if schema_id is not None:
        found = table.schemas().get(schema_id)
        if found is None:
            raise NotFoundError(f"table {table_name(table)!r} has no schema {schema_id}")
        return found
    return snapshot_schema(table, snapshot_id) if travel else table.schema()


def ticket_schema_id(table: Table, snapshot_id: int | None, read: Schema) -> int | None:
    """The `schema_id` an endpoint ticket pinning `snapshot_id` carries for a read in `read`: none when `read` is that
    snapshot's own schema, which a ticket without the field is read in (a pinned snapshot is time travel), by this
    release and by those before the field existed. Tickets so stay readable by the previous release during a rolling
    upgrade unless the answer needs the field: a schema changed since the snapshot with no write after it, or a table
    with no snapshot (docs/protocol.md, "Compatibility")."""
    snapshot = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else None
    if snapshot is not None and snapshot.schema_id == read.schema_id:
        return None
    return read.schema_id
