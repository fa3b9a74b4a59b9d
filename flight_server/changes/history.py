"""Keeping a put's cost independent of the table's history.

A pipeline that writes every minute makes 1,440 snapshots a day. Two things would grow with them:
the appended manifests every later read plans through (`commit_append` merges them when the table
asks, as Iceberg's writers do: `commit.manifest-merge.enabled`), and the scan of every snapshot's
summary for a put's `write_id` (`WriteIds` remembers what it saw and reads only the snapshots added
since). Old metadata files are bounded by the table's own properties, which pyiceberg applies on
commit (`NEW_TABLE_HISTORY` in iceberg/catalog.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pyiceberg.manifest import DataFile
from pyiceberg.table import Table, TableProperties, Transaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.utils.properties import property_as_bool

from flight_server.iceberg.catalog import table_name
from flight_server.iceberg.internals import commit_on_base
from flight_server.wire.writes import WriteResult

WRITE_ID_PROPERTY = "flight.write-id"

MAX_TABLES = 256  # tables whose write ids are remembered; past it, the memory starts over


def commit_append(transaction: Transaction, files: list[DataFile], properties: dict[str, str]) -> Table:
    """Append `files` as one snapshot, only on the state the transaction was opened on (`commit_on_base`): a
    merge-append when the table enables manifest merging (small manifests are folded into one once
    `commit.manifest.min-count-to-merge` of them would be live), else a fast append (one more manifest per
    put), as pyiceberg's own `append` decides."""
    merge = property_as_bool(
        transaction.table_metadata.properties,
        TableProperties.MANIFEST_MERGE_ENABLED,
        TableProperties.MANIFEST_MERGE_ENABLED_DEFAULT,
    )
    update = transaction.update_snapshot(snapshot_properties=properties)
    append = update.merge_append() if merge else update.fast_append()
    for data_file in files:
        append.append_data_file(data_file)
    return commit_on_base(transaction, append)


@dataclass
class _Seen:
    """What one table's history said about write ids, up to the snapshot list's first `count` entries."""

    count: int = 0
    last: int | None = None  # the id of the snapshot at `count - 1`
    ids: dict[str, Snapshot] = field(default_factory=dict)


class WriteIds:
    """`write_id` → the snapshot that committed it, per table (by uuid), read incrementally.

    Iceberg appends new snapshots to the end of the metadata's list and expiry only removes some, so
    when the entry at the last position read is still the same snapshot, only the entries after it are
    new; otherwise (expiry, a table replaced under the same name) the table's history is read again. A
    found id is checked against the current metadata: an id whose snapshot expired is forgotten.
    """

    def __init__(self) -> None:
        self._tables: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def find(self, table: Table, write_id: str) -> WriteResult | None:
        """The snapshot an earlier put with this `write_id` committed, if it is still retained."""
        metadata = table.metadata
        with self._lock:
            seen = self._update(metadata)
            snapshot = seen.ids.get(write_id)
        if snapshot is None or metadata.snapshot_by_id(snapshot.snapshot_id) is None:
            return None
        summary = snapshot.summary.additional_properties if snapshot.summary else {}
        return WriteResult(
            table=table_name(table),
            snapshot_id=snapshot.snapshot_id,
            rows=int(summary.get("added-records", 0)),
            files=int(summary.get("added-data-files", 0)),
            write_id=write_id,
            duplicate=True,
        )

    def _update(self, metadata: TableMetadata) -> _Seen:
        uuid, snapshots = str(metadata.table_uuid), metadata.snapshots
        seen = self._tables.get(uuid)
        if seen is None or not _extends(seen, snapshots):
            if len(self._tables) >= MAX_TABLES:
                self._tables.clear()
            seen = self._tables[uuid] = _Seen()
        for snapshot in snapshots[seen.count :]:
            summary = snapshot.summary.additional_properties if snapshot.summary else {}
            if (write_id := summary.get(WRITE_ID_PROPERTY)) is not None:
                seen.ids.setdefault(write_id, snapshot)
        if len(snapshots) > seen.count:
            seen.count, seen.last = len(snapshots), snapshots[-1].snapshot_id
        return seen


def _extends(seen: _Seen, snapshots: list[Snapshot]) -> bool:
    """Whether `snapshots` is what `seen` read plus snapshots appended after it (nothing removed)."""
    if seen.count == 0:
        return True
    return len(snapshots) >= seen.count and snapshots[seen.count - 1].snapshot_id == seen.last
