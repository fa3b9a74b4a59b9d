"""Keeping a put's cost independent of the table's history.

A pipeline that writes every minute makes 1,440 snapshots a day. Two things would grow with them:
the appended manifests every later read plans through (`commit_append` merges them when the table
asks, as Iceberg's writers do: `commit.manifest-merge.enabled`), and the scan of every snapshot's
summary for a put's `write_id` (`WriteIds` remembers what it saw and reads only the snapshots added
since; `put_summary` writes the ids, and a group commit's snapshot carries many). Old metadata files
are bounded by the table's own properties, which pyiceberg applies on commit (`NEW_TABLE_HISTORY` in
iceberg/catalog.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyiceberg.manifest import DataFile
from pyiceberg.table import Table, TableProperties, Transaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.utils.properties import property_as_bool

from flight_server.iceberg.catalog import table_name
from flight_server.iceberg.internals import append_producer, commit_on_base
from flight_server.iceberg.lineage import remember_append
from flight_server.wire.writes import WriteResult

log = logging.getLogger(__name__)

WRITE_ID_PROPERTY = "flight.write-id"  # the one put's id, in a snapshot of one put
WRITE_IDS_PROPERTY = "flight.write-ids"  # JSON {write_id: [rows, files]}, in a snapshot of several puts
PUTS_PROPERTY = "flight.puts"  # how many puts a snapshot committed (servers before group commit wrote none)


@dataclass(frozen=True)
class Committed:
    """What one put committed, as recorded in its snapshot's summary."""

    write_id: str | None
    rows: int
    files: int


def put_summary(puts: Sequence[Committed]) -> dict[str, str]:
    """The summary properties of a snapshot that commits `puts`: one put's id as before group commit (servers
    that know only `flight.write-id` read it), several puts' ids with their rows and files, for a retry's answer."""
    properties = {PUTS_PROPERTY: str(len(puts))}
    if len(puts) == 1:
        if puts[0].write_id is not None:
            properties[WRITE_ID_PROPERTY] = puts[0].write_id
    elif ids := {p.write_id: [p.rows, p.files] for p in puts if p.write_id is not None}:
        properties[WRITE_IDS_PROPERTY] = json.dumps(ids, separators=(",", ":"))
    return properties


# Write ids remembered, of all tables (about 130 bytes each): past it, those of the least recently used tables go. Not
# a count of tables: pipelines write hundreds in turn, and a table forgotten before its next put has its retained
# snapshots' summaries read again (16 ms for 1,440 snapshots, a day of puts every minute).
MAX_WRITE_IDS = 500_000


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
    append = append_producer(transaction, properties, merge)
    for data_file in files:
        append.append_data_file(data_file)
    spec_id = transaction.table_metadata.default_spec_id  # the spec its manifests are written under
    committed = commit_on_base(transaction, append)
    remember_append(committed, files, spec_id)  # an online refresh right after need not read the manifests back
    return committed


@dataclass
class _Seen:
    """What one table's history said about write ids, up to the snapshot list's first `count` entries."""

    count: int = 0
    last: int | None = None  # the id of the snapshot at `count - 1`
    ids: dict[str, tuple[int, Committed]] = field(default_factory=dict)  # write id -> (snapshot id, its put)


class WriteIds:
    """`write_id` → the snapshot that committed it, per table (by uuid), read incrementally.

    Iceberg appends new snapshots to the end of the metadata's list and expiry only removes some, so
    when the entry at the last position read is still the same snapshot, only the entries after it are
    new; otherwise (expiry, a table replaced under the same name) the table's history is read again. A
    found id is checked against the current metadata: an id whose snapshot expired is forgotten.
    """

    def __init__(self) -> None:
        # By table uuid, least recently used first; snapshot ids, not snapshots: the models of a table no longer
        # kept loaded (`FeatureCatalog.read`) are not held here (about 1.7 KB each).
        self._tables: OrderedDict[str, _Seen] = OrderedDict()
        self._ids = 0  # write ids kept, of all tables
        self._lock = threading.Lock()

    def find(self, table: Table, write_id: str) -> WriteResult | None:
        """The snapshot an earlier put with this `write_id` committed, if it is still retained."""
        metadata = table.metadata
        with self._lock:
            seen = self._update(metadata)
            found = seen.ids.get(write_id)
        if found is None or metadata.snapshot_by_id(found[0]) is None:
            return None
        snapshot_id, put = found
        return WriteResult(table_name(table), snapshot_id, put.rows, put.files, write_id, duplicate=True)

    def _update(self, metadata: TableMetadata) -> _Seen:
        uuid, snapshots = str(metadata.table_uuid), metadata.snapshots
        seen = self._tables.get(uuid)
        if seen is None or not _extends(seen, snapshots):
            self._ids -= len(seen.ids) if seen is not None else 0
            seen = self._tables[uuid] = _Seen()
        self._tables.move_to_end(uuid)
        before = len(seen.ids)
        for snapshot in snapshots[seen.count :]:
            for put in _committed_ids(snapshot):
                if put.write_id is not None:
                    seen.ids.setdefault(put.write_id, (snapshot.snapshot_id, put))
        if len(snapshots) > seen.count:
            seen.count, seen.last = len(snapshots), snapshots[-1].snapshot_id
        self._ids += len(seen.ids) - before
        while self._ids > MAX_WRITE_IDS and len(self._tables) > 1:  # this table's stay: the put needs them
            self._ids -= len(self._tables.popitem(last=False)[1].ids)
        return seen


def _extends(seen: _Seen, snapshots: list[Snapshot]) -> bool:
    """Whether `snapshots` is what `seen` read plus snapshots appended after it (nothing removed)."""
    if seen.count == 0:
        return True
    return len(snapshots) >= seen.count and snapshots[seen.count - 1].snapshot_id == seen.last


def _committed_ids(snapshot: Snapshot) -> list[Committed]:
    """The puts with a write id that the snapshot committed, from either form `put_summary` writes."""
    summary = snapshot.summary.additional_properties if snapshot.summary else {}
    if (write_id := summary.get(WRITE_ID_PROPERTY)) is not None:
        return [Committed(write_id, int(summary.get("added-records", 0)), int(summary.get("added-data-files", 0)))]
    if (ids := summary.get(WRITE_IDS_PROPERTY)) is None:
        return []
    try:
        return [Committed(str(key), int(rows), int(files)) for key, (rows, files) in json.loads(ids).items()]
    except (ValueError, TypeError, AttributeError):
        log.warning(
            "snapshot %s has an unreadable %s: its write ids are ignored", snapshot.snapshot_id, WRITE_IDS_PROPERTY
        )
        return []
