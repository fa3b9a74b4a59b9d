"""The skeleton of the actions that rewrite a table's files (`delete`, `compact`), one snapshot each.

An attempt loads the table, plans on its current snapshot (its rows through DuckDB's `iceberg_scan`,
deletes applied), writes the replacement files with the shared Parquet writer, and commits a rewrite
snapshot under the table's lock (`commit_rewrite`); a lost race plans again until the commit timeout
(`commit_until`), and the files an attempt wrote are deleted when it does not commit. An action states
only which files go and what replaces them (its `Plan`), and what it answers.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import operator
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import duckdb
import numpy as np
import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot

from flight_server.base.filters import quote
from flight_server.base.outages import missing_file
from flight_server.base.schemas import table_arrow_schema
from flight_server.changes.commits import (
    OPERATION_PROPERTY,
    TableChanges,
    commit_rewrite,
    delete_files,
    expired_under,
    live_files,
)
from flight_server.changes.files import parquet_bytes_per_row, write_reader
from flight_server.iceberg.catalog import LAST_COMPACTION_PROPERTY, FeatureSpec, table_name
from flight_server.iceberg.lineage import ROW_BITS, commit_order
from flight_server.reads.paths import iceberg_source
from flight_server.wire.codec import format_timestamp


@dataclass
class SnapshotRows:
    """The snapshot an attempt plans on: its schema and files, its rows (`query`, `rewrite`), and the files
    the attempt wrote (deleted if it fails before its commit)."""

    table: Table
    snapshot: Snapshot
    schema: Schema
    cursor: duckdb.DuckDBPyConnection
    metadata_file: str  # what `query` has DuckDB read for the table's metadata file (`Engine.metadata_file`)
    batch_rows: int
    chunk_bytes: int
    written: list[DataFile] = field(default_factory=list)
    sequences: dict[str, int] = field(default_factory=dict)  # the data sequence number each file written keeps

    @cached_property
    def files(self) -> list[DataFile]:
        """Every live data and delete file (read when first needed: a delete that matches nothing needs none)."""
        return live_files(self.table.io, self.snapshot)

    @property
    def source(self) -> str:
        """This snapshot's rows as `t` in `schema` (the table's current one: `iceberg_source` takes each column by
        field id, so a column renamed since is read under its new name, one dropped since not at all, and one dropped
        and added again as the new, empty one), with DuckDB's `filename` and `file_row_number`."""
        return f"{iceberg_source(self.table, self.snapshot.snapshot_id, self.schema)} AS t"

    def query(self, sql: str, params: list[Any]) -> duckdb.DuckDBPyConnection:
        """Run `sql` over `source` with `params` after the scan's own."""
        scan = [self.metadata_file, self.snapshot.snapshot_id]
        return self.cursor.execute(sql, [*scan, *params])

    def rewrite(
        self, where: str, params: list[Any], replacing: list[DataFile]
    ) -> tuple[list[DataFile], list[DataFile]]:
        """The rows `where` selects of the data files `replacing` (and all rows of the files `tie_runs` adds to them),
        in new data files of the table's target size (sorted as a put sorts), their size first estimated from the
        files they replace: the new files, and the data files replaced.

        Rows that tie on keys, event time and created time go to the one last in commit order (training/join.py):
        by its file's data sequence number, then its place in the file. So each run of `tie_runs` is written into
        files of its own, its rows in commit order, which keep the run's data sequence number (`sequences`): they
        rank among the other files' rows as before. A new sequence number would rank them after rows committed
        later, even during the rewrite; files that are not neighbours in commit order, merged, could keep no
        sequence number right for all their rows."""
        arrow = table_arrow_schema(self.schema)
        columns = ", ".join(f"t.{quote(n)}" for n in arrow.names)
        runs = tie_runs(self.table, self.snapshot, self.files, replacing)
        extra = {f.file_path for run in runs for f in run.extra}
        paths, numbers, bases = [], [], []
        for number, run in enumerate(runs):
            for rank, f in enumerate(run.files):
                paths.append(f.file_path)
                numbers.append(number)
                bases.append(rank << ROW_BITS)
        self.cursor.register(
            RUNS,
            pa.table(
                {
                    "__file": paths,
                    "__run": numbers,
                    "__base": pa.array(bases, pa.int64()),
                    "__extra": [path in extra for path in paths],
                }
            ),
        )
        reader = self.query(
            f"SELECT {columns}, r.__run FROM {self.source} JOIN {RUNS} AS r ON r.__file = t.filename "
            f"WHERE ({where}) OR r.__extra ORDER BY r.__run, r.__base + t.file_row_number",
            params,
        ).to_arrow_reader(self.batch_rows)
        spec = FeatureSpec.from_properties(self.table.metadata.properties)
        if spec is not None:  # the files written are sorted by its columns
            spec.require_columns(self.table.schema(), table_name(self.table))
        written: list[DataFile] = []
        for number, pieces in itertools.groupby(_by_run(reader), key=operator.itemgetter(0)):
            rows = pa.RecordBatchReader.from_batches(
                reader.schema.remove(len(arrow)), (piece for _, piece in pieces)
            ).cast(arrow)
            run = runs[number]
            estimate = parquet_bytes_per_row(run.files)
            files = self.keep(write_reader(self.table.metadata, rows, self.table.io, spec, self.chunk_bytes, estimate))
            if self.table.metadata.format_version >= 2:  # format v1 has no sequence numbers
                self.sequences.update((f.file_path, run.sequence) for f in files)
            written += files
        return written, [f for run in runs for f in run.files]

    def keep(self, files: list[DataFile]) -> list[DataFile]:
        """Files the action wrote itself: deleted with the others if the attempt fails before its commit."""
        self.written += files
        return files


RUNS = "__rewrite_runs"  # each file a rewrite replaces: its run (`tie_runs`) and its rank in it (above ROW_BITS)


def _by_run(reader: pa.RecordBatchReader) -> Iterator[tuple[int, pa.RecordBatch]]:
    """The batches of a reader ordered by its last column (a run number), cut where it changes, without it."""
    for batch in reader:
        runs = batch.column(batch.num_columns - 1).to_numpy()
        cuts = [0, *(np.flatnonzero(runs[1:] != runs[:-1]) + 1).tolist(), batch.num_rows]
        rows = batch.drop_columns([batch.schema.names[-1]])
        for start, stop in itertools.pairwise(cuts):
            if stop > start:
                yield int(runs[start]), rows.slice(start, stop - start)


class Run(NamedTuple):
    """Data files a rewrite writes into files of their own (`tie_runs`), and the data sequence number those keep."""

    files: list[DataFile]  # in commit order
    extra: list[DataFile]  # of `files`, those not asked for: rewritten whole so that the run ends with a commit
    sequence: int


def tie_runs(table: Table, snapshot: Snapshot, live: list[DataFile], replacing: list[DataFile]) -> list[Run]:
    """The data files `replacing` of `snapshot` in runs of files that are neighbours in commit order
    (`commit_order`) among the `live` data files their rows can tie with: the files of the same partition when the
    live files' one partition spec partitions by keys, event time or created time only (rows that tie share
    them), else all.

    A run's new files keep its highest data sequence number when a file comes after it, and then rank after the
    files of that number (they are added later): so the files of that number after the run join it, rewritten
    whole (a commit of several files in one partition: a put of more than `--write-chunk-mb`; in a format v1
    table, where every number is 0, every file after it). A run that nothing follows takes the snapshot's own
    number, as Java's rewrites take the starting one: files committed meanwhile rank after it, and equality
    delete files of that number or below (a compaction applied them) apply to none of its rows."""
    order = commit_order(table, snapshot.snapshot_id)
    spec = FeatureSpec.from_properties(table.metadata.properties)
    data = sorted((f for f in live if f.content == DataFileContent.DATA), key=lambda f: order[f.file_path])
    specs = {f.spec_id for f in data}
    tied: set[str | None] = {*spec.entity_keys, spec.event_time, spec.created_time} if spec is not None else set()
    sources = [table.schema().find_column_name(p.source_id) for s in specs for p in table.specs()[s].fields]
    separate = len(specs) == 1 and all(name in tied for name in sources)
    chosen = {f.file_path for f in replacing}
    domains: dict[Any, list[DataFile]] = {}
    for f in data:
        domains.setdefault((f.spec_id, f.partition) if separate else None, []).append(f)
    runs = []
    for files in domains.values():
        run: list[DataFile] = []
        extra: list[DataFile] = []
        highest = 0
        for f in files:
            sequence = order[f.file_path][0]  # in commit order: the highest of the run so far, or above
            if f.file_path in chosen or (run and sequence <= highest):
                run.append(f)
                extra += [] if f.file_path in chosen else [f]
                highest = sequence
            elif run:
                runs.append(Run(run, extra, highest))
                run, extra = [], []
        if run:
            runs.append(Run(run, extra, snapshot.sequence_number or 0))
    return runs


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


def _compaction_record(planned: Plan) -> dict[str, str]:
    """What a compaction leaves in the table's properties, in its own commit, so that `describe` shows it through
    any replica: when, by which host (a replica's pod), and the files and bytes it replaced. A few hundred bytes,
    replaced by the next compaction."""
    data_removed, deletes_removed = data_and_delete_files(planned.removed)
    record = {
        "at": format_timestamp(dt.datetime.now(dt.timezone.utc)),
        "by": socket.gethostname(),
        "data_files_removed": data_removed,
        "delete_files_removed": deletes_removed,
        "data_files_added": data_and_delete_files(planned.added)[0],
        "rows": planned.rows,
        "bytes_removed": sum(f.file_size_in_bytes for f in planned.removed),
        "bytes_added": sum(f.file_size_in_bytes for f in planned.added),
    }
    return {LAST_COMPACTION_PROPERTY: json.dumps(record, separators=(",", ":"))}


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
        """One attempt: a lost race raises (`CommitFailedException`, `ValidationException`) with nothing committed.
        A snapshot planned on that another replica expired meanwhile is one too: its files are gone, and a commit
        made it no longer the newest first (its files were those of the current snapshot when it was loaded)."""
        table = self.catalog.load(name)
        try:
            return self._rewrite_on(name, table, action, plan)
        except (OSError, duckdb.IOException) as exc:  # pyiceberg's reads (manifests), DuckDB's (data)
            if (isinstance(exc, OSError) and not missing_file(exc)) or expired_under(self.catalog, name, table) is None:
                raise  # the files of a snapshot the table still has: lost, no race
            raise CommitFailedException("the snapshot planned on was expired meanwhile (by another replica)") from exc

    def _rewrite_on(
        self, name: str, table: Table, action: str, plan: Callable[[SnapshotRows], Plan | None]
    ) -> Rewritten:
        snapshot = table.current_snapshot()
        if snapshot is None:
            return Rewritten(table_name(table), None)
        self.engine.use_storage(table.io.properties)
        schema = table.schema()  # rows are written in it: read in it, as every read of the current state is
        metadata = self.engine.metadata_file(table.metadata_location, table.metadata)
        rows = SnapshotRows(table, snapshot, schema, self.engine.cursor(), metadata, self.batch_rows, self.chunk_bytes)
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
        data_removed, deletes_removed = data_and_delete_files(planned.removed)
        data_added, deletes_added = data_and_delete_files(planned.added)
        snapshot_id = commit_rewrite(
            lock,
            table,
            planned.operation,
            planned.removed,
            planned.added,
            properties,
            tidy=planned.tidy,
            sequences=rows.sequences,
            table_properties=_compaction_record(planned) if action == "compact" else None,
        )
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
