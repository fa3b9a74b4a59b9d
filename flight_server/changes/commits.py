"""Committing file-level changes (deletes, rewrites, compactions) as one snapshot each, safely under races.

pyiceberg 0.12 commits data files only (its deletes are copy-on-write), so `RewriteFiles` does what
Iceberg's Java `RowDelta` and `RewriteFiles` do: it removes data and delete files, adds data and
delete files (the delete files in manifests of their own, as format v2 requires) and keeps every
other manifest of the parent snapshot. A change is planned on one snapshot (row positions, rows to
keep); if anything but appends was committed since, the plan may be wrong, so the commit is refused
(`ValidationException`) and `commit_until` plans again on the new snapshot. Concurrent appends are
kept and do not force a new plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar

from pyiceberg.exceptions import (
    CommitFailedException,
    CommitStateUnknownException,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.io import FileIO
from pyiceberg.manifest import (
    DataFile,
)
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot

from flight_server.base.locks import LockPool
from flight_server.base.metrics import COMMIT_RETRIES
from flight_server.iceberg.catalog import FeatureCatalog, table_name
from flight_server.iceberg.internals import (
    DropRemovedEntries,
    MemoTransaction,
    RewriteFiles,
    commit_transaction,
    discard_written,
)
from flight_server.reads.duck import Engine
from flight_server.wire.errors import ConflictError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class TableChanges:
    """What the actions that rewrite a table's files (`delete`, `compact`, ...) work with."""

    catalog: FeatureCatalog
    engine: Engine
    locks: LockPool
    chunk_bytes: int
    commit_timeout: float
    batch_rows: int

    def until(self, table: str, what: str, attempt: Callable[[], T]) -> T:
        """`commit_until` the commit timeout from now, its messages naming the table (`what` it does to it)."""
        deadline = time.monotonic() + self.commit_timeout
        return commit_until(deadline, f"{what} {'.'.join(self.catalog.identifier(table))}", attempt)


def commit_until(deadline: float, what: str, attempt: Callable[[], T]) -> T:
    """Run `attempt` (plan, write files, commit) until it commits: a lost race plans again on the new
    snapshot; past `deadline` the caller gets a `ConflictError` and nothing is committed.

    `attempt` deletes the files it wrote when its commit fails."""
    while True:
        try:
            return attempt()
        except (CommitFailedException, ValidationException) as exc:
            COMMIT_RETRIES.inc()
            if time.monotonic() > deadline:
                raise ConflictError(
                    f"could not {what} because of concurrent changes ({exc}); nothing was committed"
                ) from None
            log.info("%s: a concurrent commit won (%s); planning again", what, exc)


def expired_under(catalog: FeatureCatalog, name: str, planned: Table) -> Table | None:
    """The table as it is now, when the snapshot that was current in `planned` is gone from it: another replica
    committed and then expired it meanwhile, deleting its manifest list, so that a change planned on it fails
    reading its files (FileNotFoundError) where it would have lost its commit's race anyway: plan again on this.
    None when the table still has that snapshot (its files are lost: no race)."""
    base = planned.current_snapshot()
    now = catalog.load(name)
    if base is None or now.metadata.snapshot_by_id(base.snapshot_id) is not None:
        return None
    return now


def delete_files(io: FileIO, paths: list[str]) -> None:
    """Delete files a failed change wrote (best effort: nothing references them)."""
    for path in paths:
        try:
            io.delete(path)
        except Exception:  # the files are unreferenced either way
            log.warning("could not delete uncommitted file %s", path, exc_info=True)


def commit_rewrite(
    lock: AbstractContextManager[object],
    table: Table,
    operation: Operation,
    removed: list[DataFile],
    added: list[DataFile],
    properties: dict[str, str],
    tidy: bool = False,
    sequences: Mapping[str, int] | None = None,
    table_properties: Mapping[str, str] | None = None,
) -> int:
    """Commit a `RewriteFiles` on `table` (as loaded when the change was planned) as one snapshot, and
    return the table's new current snapshot id; the `added` files are deleted when it surely did not commit. A
    failure of the catalog's commit other than a lost race or a refused change raises `CommitStateUnknownException`
    and keeps them: the catalog may have applied it (a dropped connection at COMMIT), and the table would then
    reference deleted files. The manifests and manifest lists it wrote go with the `added` files (`discard_written`),
    also those of a snapshot whose writing failed midway. Added files in `sequences` keep the data sequence number it
    gives them (`RewriteFiles`).

    With `tidy`, the same commit adds a `DropRemovedEntries` snapshot after it, which becomes current. The same
    commit sets `table_properties`, if any (what a compaction records of itself)."""
    transaction = MemoTransaction(table)
    try:
        with lock:
            RewriteFiles(transaction, operation, removed, added, properties, sequences or {}).commit()
            if tidy:
                DropRemovedEntries(transaction, properties).commit()
            if table_properties:
                transaction.set_properties(dict(table_properties))
            try:
                snapshot = commit_transaction(transaction).current_snapshot()
            except (CommitFailedException, ValidationException, TableAlreadyExistsError, CommitStateUnknownException):
                raise
            except Exception as exc:
                raise CommitStateUnknownException(f"the commit's outcome is unknown ({type(exc).__name__})") from exc
    except CommitStateUnknownException:
        log.warning("a rewrite of %s may have committed; keeping its %d new files", table_name(table), len(added))
        raise
    except BaseException:
        discard_written(transaction)
        delete_files(table.io, [f.file_path for f in added])
        raise
    assert snapshot is not None
    return snapshot.snapshot_id


def live_files(io: FileIO, snapshot: Snapshot | None) -> list[DataFile]:
    """Every data and delete file of a snapshot."""
    if snapshot is None:
        return []
    return [
        entry.data_file
        for manifest in snapshot.manifests(io)
        for entry in manifest.fetch_manifest_entry(io, discard_deleted=True)
    ]


OPERATION_PROPERTY = "flight.operation"  # snapshot summary: which server operation made the snapshot
