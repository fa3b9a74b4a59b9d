"""What changed between two snapshots of a table, from its lineage: the data files appended after an ancestor.

Training-set indexes extend themselves with these files instead of re-reading the table, and scans with
`since_snapshot` return just their rows. Both need the same guarantee: the newer snapshot's rows are exactly
the older one's plus the rows of these files. That holds only when every snapshot in between added data
files and nothing else (no file removed, no delete file added), which `appended_since` checks entry by entry
rather than trusting the operation in each summary. Training-set indexes also follow snapshots that added
delete files (`changed_since`): they mask the deleted rows instead of reading the table again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyiceberg.manifest import DataFile, DataFileContent, ManifestContent, ManifestEntryStatus
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of

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


def appended_since(table: Table, since: int, until: int) -> Appended:
    """The files appended after snapshot `since` up to `until` (none if they are the same snapshot)."""
    return _changes(table, since, until, deletes=False)


def changed_since(table: Table, since: int, until: int) -> Appended:
    """The files appended after snapshot `since` up to `until`, and the delete files added (position or equality):
    the newer snapshot's rows are the older one's plus the appended files' rows, less what the delete files
    delete. No list when a snapshot in between removed a data file."""
    return _changes(table, since, until, deletes=True)


def _changes(table: Table, since: int, until: int, deletes: bool) -> Appended:
    chain = []
    snapshot = table.snapshot_by_id(until)
    while snapshot is not None and snapshot.snapshot_id != since:
        chain.append(snapshot)
        parent = snapshot.parent_snapshot_id
        snapshot = table.snapshot_by_id(parent) if parent is not None else None
    if snapshot is None:
        return Appended(since, until, None)
    files: list[DataFile] = []
    added_deletes: list[DataFile] = []
    for step in reversed(chain):
        added = len(files)
        for manifest in step.manifests(table.io):
            if manifest.added_snapshot_id != step.snapshot_id:
                continue  # written by an earlier snapshot: holds nothing this one changed
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                if entry.snapshot_id != step.snapshot_id or entry.status == ManifestEntryStatus.EXISTING:
                    continue
                if entry.status == ManifestEntryStatus.DELETED:
                    return Appended(
                        since,
                        until,
                        None,
                        step.snapshot_id,
                        "removes data files (rows deleted, overwritten or compacted)",
                    )
                if entry.data_file.content == DataFileContent.DATA:
                    files.append(entry.data_file)
                elif deletes:
                    added_deletes.append(entry.data_file)
                else:
                    return Appended(since, until, None, step.snapshot_id, "deletes rows")
        files[added:] = sorted(files[added:], key=lambda f: f.file_path)
    return Appended(since, until, files, deletes=added_deletes)


def commit_order(table: Table, snapshot_id: int) -> dict[str, tuple[int, int, str]]:
    """Each data file of the snapshot and its place in the order the files were committed: by data sequence
    number, then (format v1 has none) by the snapshot that added it among the snapshot's ancestors, then by
    path within one commit. Where rows tie, the later file's win: a table read in this order and one brought
    forward by `changed_since`'s files (oldest commit first, each commit's by path) agree row for row."""
    current = table.snapshot_by_id(snapshot_id)
    assert current is not None, "a snapshot of the table"
    rank = {snapshot.snapshot_id: -i for i, snapshot in enumerate(ancestors_of(current, table.metadata))}
    order: dict[str, tuple[int, int, str]] = {}
    for manifest in current.manifests(table.io):
        if manifest.content != ManifestContent.DATA:
            continue
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
            path = entry.data_file.file_path
            added_by = rank.get(entry.snapshot_id, -len(rank)) if entry.snapshot_id is not None else -len(rank)
            order[path] = (entry.sequence_number or 0, added_by, path)
    return order
