"""Scan planning: check a `ScanRequest` against its table (snapshot, columns, filter) and plan its files.

Plans of recent reads are kept per (table, snapshot, current schema, filter): a snapshot never changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.manifest import DataFile
from pyiceberg.schema import Schema, make_compatible_name, sanitize_column_names
from pyiceberg.table import FileScanTask, Table

from flight_server.base.filters import parse_filter
from flight_server.base.schemas import table_arrow_schema
from flight_server.iceberg.catalog import FeatureCatalog, table_name
from flight_server.iceberg.internals import without_statistics
from flight_server.iceberg.lineage import appended_since
from flight_server.iceberg.snapshots import read_schema, resolve_snapshot
from flight_server.reads.caches import PlanCache, ReadCaches
from flight_server.wire.errors import NotFoundError, RequestError
from flight_server.wire.reads import ScanRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanPlan:
    """A checked scan: which snapshot, in which schema (`read`: `read_schema`), which columns, which condition."""

    table: Table
    request: ScanRequest
    snapshot_id: int | None
    schema: pa.Schema
    expression: BooleanExpression
    caches: ReadCaches
    read: Schema
    appended: list[DataFile] | None = None  # read only these files: the rows appended since an older snapshot

    @property
    def name(self) -> str:
        return table_name(self.table)

    def estimated_rows(self) -> int:
        """Rows the scan will return at most: exact without a filter or delete files, else an upper bound
        (the rows of the files the filter may touch, or of the whole snapshot)."""
        if self.snapshot_id is None:
            return 0
        if self.appended is not None:
            rows = sum(f.record_count for f in self.appended)
            return min(rows, self.request.limit) if self.request.limit is not None else rows
        snapshot = self.table.snapshot_by_id(self.snapshot_id)
        assert snapshot is not None, "resolved against this table"
        records = snapshot.summary.get("total-records") if snapshot.summary else None
        rows = int(records) if records is not None else -1
        if not isinstance(self.expression, AlwaysTrue):
            tasks = plan_tasks(self.table, self.snapshot_id, self.expression, self.caches.plans)
            rows = sum(task.file.record_count for task in tasks) if tasks is not None else rows
        return min(rows, self.request.limit) if self.request.limit is not None and rows >= 0 else rows

    def columns_read(self) -> list[str]:
        """The columns the read matches in files: those it returns, and under a filter all (it may name any)."""
        if isinstance(self.expression, AlwaysTrue):
            return self.schema.names
        return self.read.column_names

    def metadata(self) -> dict[str, Any]:
        """What the result was computed from: enough to ask for the identical result again."""
        metadata: dict[str, Any] = {
            "table": self.name,
            "snapshot_id": self.snapshot_id,
            "schema_id": self.read.schema_id,
        }
        if self.request.since_snapshot is not None:
            metadata["since_snapshot"] = self.request.since_snapshot
        return metadata


def plan_scan(catalog: FeatureCatalog, request: ScanRequest, caches: ReadCaches) -> ScanPlan:
    """A scan's plan, of the table as the catalog has it now (a snapshot named by id, as last read while the catalog
    is unavailable: `read_snapshot`)."""
    return plan_table_scan(catalog.read_snapshot(request.table, request.snapshot_id), request, caches)


def plan_table_scan(table: Table, request: ScanRequest, caches: ReadCaches) -> ScanPlan:
    """`plan_scan` for a table already loaded: the current state in the table's current schema, time travel in the
    snapshot's own, an endpoint ticket in the schema its request was planned in (`read_schema`)."""
    snapshot_id = resolve_snapshot(table, request.snapshot_id, request.as_of)
    travel = request.snapshot_id is not None or request.as_of is not None
    schema = read_schema(table, snapshot_id, travel, request.schema_id)
    arrow = table_arrow_schema(schema)
    if request.columns is not None:
        if not request.columns:  # zero columns would read zero rows, which no caller means
            raise RequestError("columns: give at least one column, or leave it out for all")
        missing = [c for c in request.columns if arrow.get_field_index(c) < 0]
        if missing:
            raise NotFoundError(f"table {table_name(table)!r} has no column(s) {missing} (columns: {arrow.names})")
        arrow = pa.schema([arrow.field(c) for c in request.columns])
    expression = parse_filter(request.filter, schema)
    appended = None
    if request.since_snapshot is not None:
        since = resolve_snapshot(table, request.since_snapshot, None)
        assert since is not None, "a snapshot id resolves to itself"
        if snapshot_id is None:
            raise RequestError(f"since_snapshot {since}: table {table_name(table)!r} has no snapshot to read up to")
        found = appended_since(table, since, snapshot_id)
        if found.files is None:
            raise RequestError(found.explain(table))
        appended = found.files
    return ScanPlan(table, request, snapshot_id, arrow, expression, caches, schema, appended)


def plan_tasks(
    table: Table, snapshot_id: int | None, expression: BooleanExpression, plans: PlanCache
) -> list[FileScanTask] | None:
    """pyiceberg's plan of a read (files pruned by partition and statistics, each with its delete files),
    or None when pyiceberg cannot plan it: it refuses tables with equality delete files (as Flink
    writes them), which DuckDB's `iceberg_scan` applies. Kept for the next read of the same snapshot, its files
    without the statistics the pruning used (`without_statistics`): every part of a split read plans again, which
    reads every manifest (3-4 s for 700 files of 500 columns on a loaded machine), and a wide table's statistics
    would fill the cache with a few plans."""
    key = (str(table.metadata.table_uuid), snapshot_id, table.metadata.current_schema_id, repr(expression))
    found, tasks = plans.plan(key)
    if found:
        return tasks
    try:
        tasks = list(table.scan(row_filter=expression, snapshot_id=snapshot_id).plan_files())
    except ValueError as exc:
        log.debug("pyiceberg cannot plan a read of %s: %s", table_name(table), exc)
        tasks = None
    for task in tasks or []:
        task.file = without_statistics(task.file)
    plans.keep(key, tasks)
    return tasks


def renamed(table: Table) -> bool:
    """Whether a file may name a column otherwise than the table does: a column that ever had another name, a
    name that another column had before (dropped and added again), or one whose name Iceberg writers rewrite in
    the files (`rate-1` is stored as `rate_x2D1`, `sanitize_column_names`). Files must then be matched by field
    id, not by name."""
    names: dict[int, str] = {}
    ids: dict[str, int] = {}
    for schema in table.schemas().values():
        if _rewritten_in_files(schema):
            return True
        for f in schema.fields:
            if names.setdefault(f.field_id, f.name) != f.name or ids.setdefault(f.name, f.field_id) != f.field_id:
                return True
    return False


def schema_changed(table: Table) -> bool:
    """Whether the table's history has more than one shape of columns (ids, names, types): its files may then lack
    a column or hold a narrower type than the schema read, and DuckDB's `read_parquet` must match them by name
    (`union_by_name`) instead of taking the first file's columns for all."""
    shapes = {tuple((f.field_id, f.name, f.field_type) for f in s.fields) for s in table.schemas().values()}
    return len(shapes) > 1


def _rewritten_in_files(schema: Schema) -> bool:
    """Whether Iceberg writers store any of the schema's names otherwise. A flat schema is checked name by name
    (every scan plans through here); pyiceberg's whole-schema rewrite (about 0.5 ms for 50 columns) only when
    some column nests others."""
    if all(f.field_type.is_primitive for f in schema.fields):
        return any(make_compatible_name(f.name) != f.name for f in schema.fields)
    return sanitize_column_names(schema) != schema
