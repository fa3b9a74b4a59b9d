"""The skeleton of the actions that rewrite a table's files (`delete`, `compact`), one snapshot each.

An attempt loads the table, plans on its current snapshot (its rows through DuckDB's `iceberg_scan`,
deletes applied), writes the replacement files with the shared Parquet writer, and commits a rewrite
snapshot under the table's lock (`commit_rewrite`); a lost race plans again until the commit timeout
(`commit_until`), and the files an attempt wrote are deleted when it does not commit. An action states
only which files go and what replaces them (its `Plan`), and what it answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import duckdb
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot

from flight_server.base.filters import quote
from flight_server.base.schemas import table_arrow_schema
from flight_server.changes.commits import (
    OPERATION_PROPERTY,
    SCAN_SOURCE,
    TableChanges,
    commit_rewrite,
    delete_files,
    live_files,
)
from flight_server.changes.files import parquet_bytes_per_row, write_reader
from flight_server.iceberg.catalog import FeatureSpec, table_name
from flight_server.iceberg.snapshots import snapshot_schema
from flight_server.reads.duck import local_path
from flight_server.reads.plan import refuse_readded


@dataclass
class SnapshotRows:
    """The snapshot an attempt plans on: its schema and files, its rows (`query`, `rewrite`), and the files
    the attempt wrote (deleted if it fails before its commit)."""

    table: Table
    snapshot: Snapshot
    schema: Schema
    cursor: duckdb.DuckDBPyConnection
    batch_rows: int
    chunk_bytes: int
    written: list[DataFile] = field(default_factory=list)

    @cached_property
    def files(self) -> list[DataFile]:
        """Every live data and delete file (read when first needed: a delete that matches nothing needs none)."""
        return live_files(self.table.io, self.snapshot)

    def query(self, sql: str, params: list[Any]) -> duckdb.DuckDBPyConnection:
        """Run `sql` over `SCAN_SOURCE` (this snapshot's rows) with `params` after the scan's own."""
        scan = [local_path(self.table.metadata_location), self.snapshot.snapshot_id]
        return self.cursor.execute(sql, [*scan, *params])

    def rewrite(self, where: str, params: list[Any], replacing: list[DataFile]) -> list[DataFile]:
        """The rows `where` selects, in new data files of the table's target size (sorted as a put sorts),
        their size first estimated from the files they replace."""
        arrow = table_arrow_schema(self.schema)
        refuse_readded(self.table, self.schema, arrow.names)  # else the old column's values go into the new
        columns = ", ".join(quote(n) for n in arrow.names)
        reader = self.query(f"SELECT {columns} FROM {SCAN_SOURCE} WHERE {where}", params)
        spec = FeatureSpec.from_properties(self.table.metadata.properties)
        rows = reader.to_arrow_reader(self.batch_rows).cast(arrow)
        files = write_reader(
            self.table.metadata, rows, self.table.io, spec, self.chunk_bytes, parquet_bytes_per_row(replacing)
        )
        return self.keep(files)

    def keep(self, files: list[DataFile]) -> list[DataFile]:
        """Files the action wrote itself: deleted with the others if the attempt fails before its commit."""
        self.written += files
        return files


@dataclass(frozen=True)
class Plan:
    """What an attempt commits: the snapshot's operation, the files removed and added, the rows deleted or
    rewritten; `tidy` drops the removed files' manifest entries in a second snapshot (`DropRemovedEntries`)."""

    operation: Operation
    removed: list[DataFile]
    added: list[DataFile]
    rows: int
    tidy: bool = False


@dataclass(frozen=True)
class Rewritten:
    """What a rewrite committed: the table's new snapshot; or, with nothing to do, the snapshot it planned on."""

    table: str
    snapshot_id: int | None
    committed: bool = False
    rows: int = 0
    data_files_removed: int = 0
    delete_files_removed: int = 0
    data_files_added: int = 0
    delete_files_added: int = 0


def data_and_delete_files(files: list[DataFile]) -> tuple[int, int]:
    data = sum(f.content == DataFileContent.DATA for f in files)
    return data, len(files) - data


class Rewriter(TableChanges):
    """Runs the actions that rewrite a table's files through `rewrite`."""

    def rewrite(self, table: str, what: str, action: str, plan: Callable[[SnapshotRows], Plan | None]) -> Rewritten:
        """Plan (None: nothing to change, nothing written), write and commit until one attempt commits or the
        commit timeout passes; `what` names the action in errors, `action` in the snapshot summary."""
        return self.until(table, what, lambda: self.rewrite_once(table, action, plan))

    def rewrite_once(self, name: str, action: str, plan: Callable[[SnapshotRows], Plan | None]) -> Rewritten:
        """One attempt: a lost race raises (`CommitFailedException`, `ValidationException`) with nothing committed."""
        table = self.catalog.load(name)
        snapshot = table.current_snapshot()
        if snapshot is None:
            return Rewritten(table_name(table), None)
        self.engine.use_storage(table.io.properties)
        schema = snapshot_schema(table, snapshot.snapshot_id)
        rows = SnapshotRows(table, snapshot, schema, self.engine.cursor(), self.batch_rows, self.chunk_bytes)
        try:
            try:
                planned = plan(rows)
            finally:
                rows.cursor.close()
        except BaseException:
            delete_files(table.io, [f.file_path for f in rows.written])
            raise
        if planned is None:
            return Rewritten(table_name(table), snapshot.snapshot_id)
        lock = self.locks(self.catalog.identifier(name))
        properties = {OPERATION_PROPERTY: action}
        snapshot_id = commit_rewrite(
            lock, table, planned.operation, planned.removed, planned.added, properties, tidy=planned.tidy
        )
        data_removed, deletes_removed = data_and_delete_files(planned.removed)
        data_added, deletes_added = data_and_delete_files(planned.added)
        return Rewritten(
            table_name(table),
            snapshot_id,
            committed=True,
            rows=planned.rows,
            data_files_removed=data_removed,
            delete_files_removed=deletes_removed,
            data_files_added=data_added,
            delete_files_added=deletes_added,
        )
