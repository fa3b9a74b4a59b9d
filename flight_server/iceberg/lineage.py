"""What changed between two snapshots of a table, from its lineage: the data files appended after an ancestor.

Training-set indexes extend themselves with these files instead of re-reading the table, and scans with
`since_snapshot` return just their rows. Both need the same guarantee: the newer snapshot's rows are exactly
the older one's plus the rows of these files. That holds only when every snapshot in between added data
files and nothing else (no file removed, no delete file added), which `appended_since` checks entry by entry
rather than trusting the operation in each summary. Training-set indexes also follow snapshots that added
delete files (`changed_since`): they mask the deleted rows instead of reading the table again. Online indexes,
which hold the latest row per key rather than rows by file, also follow compactions (`through_replaces`): `replace`
snapshots whose entries show the same rows in other files (`replace_changes_rows`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pyiceberg.manifest import DataFile, DataFileContent, ManifestContent, ManifestEntry, ManifestEntryStatus
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot, ancestors_of

from flight_server.base.lru import WeightedLru
from flight_server.base.outages import missing_file
from flight_server.iceberg.catalog import table_name


@dataclass(frozen=True)
class Appended:
    """The data files added after `since` up to `until` (in commit order: `commit_order`), or why there is no such list:
    `blocker` is the first snapshot in between that did more than append (None if `since` is no ancestor)."""

    since: int
    until: int
    files: list[DataFile] | None
    blocker: int | None = None
    why: str = ""
    deletes: list[DataFile] = field(default_factory=list)  # delete files added in between (`changed_since` only)

    def explain(self, table: Table) -> str:
        """Why the rows added since `since` cannot be told apart, for an error message."""
        name = table_name(table)
        if self.blocker is None:
            return f"since_snapshot {self.since}: not an ancestor of snapshot {self.until} of table {name!r}"
        return (
            f"since_snapshot {self.since}: snapshot {self.blocker} of table {name!r} in between {self.why}; "
            "re-read in full"
        )


# Why there is no list when a snapshot in between lost its manifests: most likely an expiry (this server's, another
# replica's or engine's) deleted them after the table was loaded; else storage lost them, which only a new load of
# the table would tell apart. Callers then read the newer snapshot whole, as they do when it expired before (then it
# is no longer in the lineage at all), which needs no manifest of a snapshot in between.
EXPIRED_MEANWHILE = "lost its manifests (expired meanwhile, or missing from storage)"
# Why there is no list when the snapshots before one in between were expired (the snapshot `since` was kept, by a
# pin say): what they changed is no longer known. Nor whether it descends from `since` at all (a pin of a snapshot
# that a rollback left behind looks the same once the snapshots before the rollback are expired).
EXPIRED_BEFORE = "follows snapshots that were expired (or does not descend from it)"


def appended_since(table: Table, since: int, until: int, through_replaces: bool = False) -> Appended:
    """The files appended after snapshot `since` up to `until` (none if they are the same snapshot).

    `through_replaces` also follows `replace` snapshots (compactions) whose entries show that they left the rows as
    they were (`replace_changes_rows`): the newer snapshot's rows are then the same as the older one's plus the
    appended files' rows, though some of those files may since have been compacted away (still readable until
    snapshot expiry deletes them). Scans and training sets, which read rows by file, never pass it."""
    return _changes(table, since, until, deletes=False, through_replaces=through_replaces)


def changed_since(table: Table, since: int, until: int) -> Appended:
    """The files appended after snapshot `since` up to `until`, and the delete files added (position or equality):
    the newer snapshot's rows are the older one's plus the appended files' rows, less what the delete files
    delete. No list when a snapshot in between removed a data file."""
    return _changes(table, since, until, deletes=True)


def _changes(table: Table, since: int, until: int, deletes: bool, through_replaces: bool = False) -> Appended:
    chain = []
    snapshot = table.snapshot_by_id(until)
    while snapshot is not None and snapshot.snapshot_id != since:
        chain.append(snapshot)
        parent = snapshot.parent_snapshot_id
        snapshot = table.snapshot_by_id(parent) if parent is not None else None
    if snapshot is None:
        start = table.snapshot_by_id(since)
        if chain and start is not None and start.timestamp_ms < chain[-1].timestamp_ms:
            # The walk stopped at a snapshot newer than `since` with no parent left (expiry drops the parent id of a
            # kept snapshot whose parent it expires): not the table's first snapshot, which `since` cannot precede.
            return Appended(since, until, None, chain[-1].snapshot_id, EXPIRED_BEFORE)
        return Appended(since, until, None)
    files: list[DataFile] = []
    added_deletes: list[DataFile] = []
    for step in reversed(chain):
        try:
            added, removed = _own_entries(table, step)
            replace = through_replaces and step.summary is not None and step.summary.operation == Operation.REPLACE
            why = replace_changes_rows(table, step, added, removed) if replace else None
        except OSError as exc:  # pyiceberg's FileIO, for a missing object, local or in an object store
            if not missing_file(exc):
                raise
            return Appended(since, until, None, step.snapshot_id, EXPIRED_MEANWHILE)
        if replace:
            if why is None:
                continue  # the same rows in other files
            return Appended(since, until, None, step.snapshot_id, why)
        if removed:
            return Appended(
                since, until, None, step.snapshot_id, "removes data files (rows deleted, overwritten or compacted)"
            )
        data = sorted((f for f in added if f.content == DataFileContent.DATA), key=lambda f: written_order(f.file_path))
        if len(data) < len(added) and not deletes:
            return Appended(since, until, None, step.snapshot_id, "deletes rows")
        files += data
        added_deletes += [f for f in added if f.content != DataFileContent.DATA]
    return Appended(since, until, files, deletes=added_deletes)


# The files recent appends added (`_own_entries`), by (table uuid, snapshot id): a snapshot's never change. Filled by
# the appends this process commits (`remember_append`), by those its write process committed (`keep_appended`) and
# by the appends it reads. Following the snapshot a merge-append just made otherwise reads its merged manifest, which
# lists every file of the table: 50-170 ms of Avro decoding after every few puts, in the online refresh that makes a
# put visible to lookups and in the training-set indexes the serving process brings forward. Bounded by weight: a
# file counts its statistics values (about 70 bytes each in memory; a file of a 500-column table holds 3,000) plus
# `FILE_WEIGHT` for the rest; snapshots that removed files (compactions, overwrites) are not kept.
OWN_WEIGHT_KEPT = 250_000  # about 20 MB
FILE_WEIGHT = 8
VALUE_BYTES = 70  # what a statistics value takes in memory: the unit of `files_weight`


def files_weight(files: list[DataFile]) -> int:
    """What keeping `files` weighs: `FILE_WEIGHT` a file, plus a file's statistics values."""
    statistics = (
        "column_sizes",
        "value_counts",
        "null_value_counts",
        "nan_value_counts",
        "lower_bounds",
        "upper_bounds",
    )
    return sum(FILE_WEIGHT + sum(len(getattr(f, name) or ()) for name in statistics) for f in files)


_own: WeightedLru[tuple[str, int], list[DataFile]] = WeightedLru(OWN_WEIGHT_KEPT, files_weight)


def cache_stats() -> dict[str, Any]:
    """What is kept of recent appends (weighed in statistics values, `files_weight`), for metrics and `health`."""
    return _own.stats("values")


def remember_append(table: Table, files: list[DataFile], spec_id: int) -> None:
    """Record that `table`'s current snapshot, just committed by this process as an append, added `files`, written
    under partition spec `spec_id` (the one its manifests name, which reading them would set on the files)."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return
    for data_file in files:
        data_file.spec_id = spec_id
    keep_appended((str(table.metadata.table_uuid), snapshot.snapshot_id), list(files))


def committed_appends(snapshot_id: int) -> tuple[tuple[str, int], list[DataFile]] | None:
    """The key (table uuid, snapshot id) and files of the append kept as `snapshot_id`, if any: a write process hands
    them to its serving process with every put's answer (a group commit's puts share a snapshot, and whichever
    answer arrives first brings them). The newest are looked at first: a put's own commit was just kept."""
    return _own.newest(lambda key: key[1] == snapshot_id)


def kept_appended(key: tuple[str, int]) -> bool:
    """Whether the files the snapshot `key` (table uuid, snapshot id) added are kept."""
    return key in _own


def keep_appended(key: tuple[str, int], files: list[DataFile]) -> None:
    """Record that the snapshot `key` (table uuid, snapshot id) only added `files` (their `spec_id` set)."""
    if not kept_appended(key):  # kept already (the answers of a group commit all bring it)
        _own.put(key, files)


def _own_entries(table: Table, snapshot: Snapshot) -> tuple[list[DataFile], list[ManifestEntry]]:
    """The data and delete files the snapshot itself added, and the entries of those it removed."""
    key = (str(table.metadata.table_uuid), snapshot.snapshot_id)
    kept = _own.get(key)
    if kept is not None:
        return list(kept), []
    added, removed = _read_own_entries(table, snapshot)
    if not removed:
        keep_appended(key, added)
    return added, removed


def _read_own_entries(table: Table, snapshot: Snapshot) -> tuple[list[DataFile], list[ManifestEntry]]:
    """`_own_entries` read from the snapshot's manifests."""
    added: list[DataFile] = []
    removed: list[ManifestEntry] = []
    for manifest in snapshot.manifests(table.io):
        if manifest.added_snapshot_id != snapshot.snapshot_id:
            continue  # written by an earlier snapshot: holds nothing this one changed
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
            if entry.snapshot_id != snapshot.snapshot_id or entry.status == ManifestEntryStatus.EXISTING:
                continue
            if entry.status == ManifestEntryStatus.DELETED:
                removed.append(entry)
            else:
                added.append(entry.data_file)
    return added, removed


def replace_changes_rows(
    table: Table, snapshot: Snapshot, added: list[DataFile], entries: list[ManifestEntry]
) -> str | None:
    """Why a `replace` snapshot may have changed the table's rows, or None when its entries (`added` files, the
    `entries` of removed ones) show it did not.

    The operation in a summary is the writer's word; another engine's mislabelled commit must not pass for a
    compaction. So: no delete file added; the rows added equal the removed data files' less the rows their removed
    position delete files deleted (at most that where equality delete files went too: how many rows those deleted
    is not recorded, but no data file they applied to may stay); and the live records its manifest list counts
    moved by exactly those files (no manifest of live files dropped unrecorded)."""
    if any(f.content != DataFileContent.DATA for f in added):
        return "is a replace that adds delete files"
    removed = [e.data_file for e in entries]
    data = sum(f.record_count for f in removed if f.content == DataFileContent.DATA)
    positions = sum(f.record_count for f in removed if f.content == DataFileContent.POSITION_DELETES)
    equality = sum(f.record_count for f in removed if f.content == DataFileContent.EQUALITY_DELETES)
    rows = sum(f.record_count for f in added)
    kept = data - positions
    if rows > kept or (rows < kept and not equality):
        return f"is a replace that changes the row count ({kept} live rows removed, {rows} added)"
    if equality and _keeps_rows_of(table, snapshot, entries):
        return "is a replace that removes equality deletes of data files it keeps"
    parent = table.snapshot_by_id(snapshot.parent_snapshot_id) if snapshot.parent_snapshot_id is not None else None
    before, after = _live_records(table, parent), _live_records(table, snapshot)
    if before is None or after is None or after != (before[0] - data + rows, before[1] - positions - equality):
        return "is a replace whose manifests do not add up to the files it removed and added"
    return None


def _keeps_rows_of(table: Table, snapshot: Snapshot, entries: list[ManifestEntry]) -> bool:
    """Whether a data file that the removed equality delete files applied to (an older data sequence number) is
    still in the snapshot: its deleted rows would be back."""
    applied = max(e.sequence_number or 0 for e in entries if e.data_file.content == DataFileContent.EQUALITY_DELETES)
    return any(
        (entry.sequence_number or 0) < applied
        for manifest in snapshot.manifests(table.io)
        if manifest.content == ManifestContent.DATA
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
    )


def _live_records(table: Table, snapshot: Snapshot | None) -> tuple[int, int] | None:
    """The records of a snapshot's live data files and of its live delete files, as its manifest list counts them
    (None when a manifest does not say)."""
    if snapshot is None:
        return None
    totals = [0, 0]
    for manifest in snapshot.manifests(table.io):
        if manifest.added_rows_count is None or manifest.existing_rows_count is None:
            return None
        totals[manifest.content == ManifestContent.DELETES] += manifest.added_rows_count + manifest.existing_rows_count
    return totals[0], totals[1]


def commit_order(table: Table, snapshot_id: int) -> dict[str, tuple[int, int, WrittenOrder]]:
    """Each data file of the snapshot and its place in the order the files were committed: by data sequence
    number, then (format v1 has none) by the snapshot that added it among the snapshot's ancestors, then within
    one commit in the order they were written (`written_order`). Where rows tie, the later file's win: a table
    read in this order and one brought forward by `changed_since`'s files (oldest commit first, each commit's in
    written order) agree row for row."""
    current = table.snapshot_by_id(snapshot_id)
    assert current is not None, "a snapshot of the table"
    rank = {snapshot.snapshot_id: -i for i, snapshot in enumerate(ancestors_of(current, table.metadata))}
    order: dict[str, tuple[int, int, WrittenOrder]] = {}
    for manifest in current.manifests(table.io):
        if manifest.content != ManifestContent.DATA:
            continue
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            path = entry.data_file.file_path
            added_by = rank.get(entry.snapshot_id, -len(rank)) if entry.snapshot_id is not None else -len(rank)
            order[path] = (entry.sequence_number or 0, added_by, written_order(path))
    return order


# How pyiceberg, this server and Iceberg's Java writers name a write's data files: `<task>-<n>-<write uuid>.<ext>`
# (Java: `<partition>-<task>-<operation uuid>-<n>.<ext>`), the numbers counting up as the write goes on; an
# object-store layout without partition folders puts hash bits before the name (`<bits>-<name>`). Anchored on the
# uuid, so that other names (`2024-01-31.parquet`) are not taken for these.
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_WRITTEN_NAME = re.compile(rf"(?:.*-)?(\d+)-(\d+)-({_UUID})(?:-(\d+))?(?:\.[^.]+)+")
WrittenOrder = tuple[str, int, int, int, str]


def data_file_name(number: int, write: uuid.UUID, extension: str) -> str:
    """The name of a write's `number`th data file, as pyiceberg names them: what `written_order` reads back."""
    return f"00000-{number}-{write}.{extension}"


def written_order(path: str) -> WrittenOrder:
    """A data file's place among the files of its commit: by write (its uuid), then the numbers in its name as
    numbers, which is the order a put or a compaction wrote them (as text, file 10 came before file 2, and a tie
    written later in the same put lost); other names by name; the path last."""
    name = path.rsplit("/", 1)[-1]
    match = _WRITTEN_NAME.fullmatch(name)
    if match is None:
        return (name, 0, 0, 0, path)
    return (match[3], int(match[1]), int(match[2]), int(match[4] or 0), path)


ROW_BITS = 40  # a row's place in commit order: its file's rank (`commit_ranks`) above its row number in the file


def commit_ranks(table: Table, snapshot_id: int) -> dict[str, int]:
    """Each data file of the snapshot and its rank in `commit_order` (0 first): a row's place in commit order is
    `rank << ROW_BITS` plus its row number in its file (files of fewer than 2**40 rows)."""
    order = commit_order(table, snapshot_id)
    return {path: rank for rank, path in enumerate(sorted(order, key=order.__getitem__))}
