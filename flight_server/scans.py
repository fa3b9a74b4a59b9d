"""Scan queries: resolve a `ScanRequest` against a table and stream its rows.

Planning (`plan_scan`) checks everything the client asked for before any byte moves: the table,
the snapshot (by id or by time), the columns and the filter. Execution (`open_scan`) takes one of
three paths, each producing a C++ `RecordBatchReader` that Flight streams without touching Python per
batch: `direct` (Arrow's Parquet reader over the planned files, for whole-table reads, dropping the
rows of position delete files), `read_parquet` (DuckDB over the files pyiceberg planned, for filtered
or limited scans of tables with position delete files: the deleted positions, cached, are anti-joined
by file row number) or `iceberg_scan` (DuckDB, which prunes files and row groups for filters and
applies position and equality delete files); the log and `flight.read_path` say which, and why. Direct
reads can be split into parts over the files (`scan_parts`), which clients fetch in parallel.
`scan_relation` hands the rows of the same paths to a DuckDB query instead (the online index build).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.manifest import FileFormat
from pyiceberg.schema import Schema
from pyiceberg.table import FileScanTask, Table

from flight_server.catalog import FeatureCatalog, table_name
from flight_server.commits import referenced_data_file
from flight_server.duck import Engine, local_path
from flight_server.errors import NotFoundError, RequestError
from flight_server.filters import parse_filter, quote, to_sql
from flight_server.protocol import ScanRequest, parse_timestamp
from flight_server.schemas import table_arrow_schema

log = logging.getLogger(__name__)
PLAN_CACHE_ENTRIES = 256  # plans of recent reads kept (by table, snapshot and filter)
PLAN_CACHE_MAX_FILES = 10_000  # larger plans are not kept


@dataclass(frozen=True)
class ScanPlan:
    """A checked scan: which snapshot, which columns, which condition."""

    table: Table
    request: ScanRequest
    snapshot_id: int | None
    schema: pa.Schema
    expression: BooleanExpression

    @property
    def name(self) -> str:
        return table_name(self.table)

    def estimated_rows(self) -> int:
        """Rows the scan will return at most: exact without a filter or delete files, else an upper bound
        (the rows of the files the filter may touch, or of the whole snapshot)."""
        if self.snapshot_id is None:
            return 0
        summary = self.table.snapshot_by_id(self.snapshot_id).summary  # type: ignore[union-attr]
        rows = int(summary["total-records"]) if summary and "total-records" in summary else -1
        if not isinstance(self.expression, AlwaysTrue):
            tasks = plan_tasks(self.table, self.snapshot_id, self.expression)
            rows = sum(task.file.record_count for task in tasks) if tasks is not None else rows
        return min(rows, self.request.limit) if self.request.limit is not None and rows >= 0 else rows

    def metadata(self) -> dict[str, Any]:
        """What the result was computed from: enough to ask for the identical result again."""
        return {"table": self.name, "snapshot_id": self.snapshot_id}


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


def plan_scan(catalog: FeatureCatalog, request: ScanRequest) -> ScanPlan:
    return plan_table_scan(catalog.read(request.table), request)


def plan_table_scan(table: Table, request: ScanRequest) -> ScanPlan:
    """`plan_scan` for a table already loaded."""
    snapshot_id = resolve_snapshot(table, request.snapshot_id, request.as_of)
    schema = snapshot_schema(table, snapshot_id)
    arrow = table_arrow_schema(schema)
    if request.columns is not None:
        missing = [c for c in request.columns if arrow.get_field_index(c) < 0]
        if missing:
            raise NotFoundError(f"table {table_name(table)!r} has no column(s) {missing} (columns: {arrow.names})")
        arrow = pa.schema([arrow.field(c) for c in request.columns])
    expression = parse_filter(request.filter, schema)
    return ScanPlan(table, request, snapshot_id, arrow, expression)


class _PlanCache:
    """Plans of recent reads by (table, snapshot, filter): a snapshot never changes, and planning reads
    every manifest in Python (10 delete manifests cost a scan of a 1M-row table 0.70x of copy-on-write)."""

    def __init__(self, entries: int, max_files: int):
        self._entries, self._max_files = entries, max_files
        self._plans: OrderedDict[tuple[str, int | None, str], list[FileScanTask] | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int | None, str]) -> tuple[bool, list[FileScanTask] | None]:
        with self._lock:
            if key not in self._plans:
                return False, None
            self._plans.move_to_end(key)
            return True, self._plans[key]

    def put(self, key: tuple[str, int | None, str], tasks: list[FileScanTask] | None) -> None:
        if tasks is not None and len(tasks) > self._max_files:
            return  # a plan that large is better planned again than kept
        with self._lock:
            self._plans[key] = tasks
            while len(self._plans) > self._entries:
                self._plans.popitem(last=False)


PLANS = _PlanCache(PLAN_CACHE_ENTRIES, PLAN_CACHE_MAX_FILES)


def plan_tasks(table: Table, snapshot_id: int | None, expression: BooleanExpression) -> list[FileScanTask] | None:
    """pyiceberg's plan of a read (files pruned by partition and statistics, each with its delete files),
    or None when pyiceberg cannot plan it: it refuses tables with equality delete files (as Flink
    writes them), which DuckDB's `iceberg_scan` applies. Kept for the next read of the same snapshot."""
    key = (str(table.metadata.table_uuid), snapshot_id, repr(expression))
    found, tasks = PLANS.get(key)
    if found:
        return tasks
    try:
        tasks = list(table.scan(row_filter=expression, snapshot_id=snapshot_id).plan_files())
    except ValueError as exc:
        log.debug("pyiceberg cannot plan a read of %s: %s", table_name(table), exc)
        tasks = None
    PLANS.put(key, tasks)
    return tasks


def _renamed(table: Table) -> bool:
    """Whether any column ever had another name: files are then matched by field id, not name."""
    names: dict[int, str] = {}
    for schema in table.schemas().values():
        for f in schema.fields:
            if names.setdefault(f.field_id, f.name) != f.name:
                return True
    return False


def direct_files(plan: ScanPlan) -> tuple[list[FileScanTask] | None, str]:
    """The planned files (each with its position delete files) for the direct path, or None when DuckDB's
    `iceberg_scan` must read; and why that path.

    The direct path takes whole-table reads (no filter, no limit: the bulk case) when pyiceberg can
    plan them (no equality delete files), every delete file is a Parquet position delete file, and
    no column was ever renamed (files are matched by column name); everything else goes through
    DuckDB, so that filters have one semantics (SQL's) whatever the path.
    """
    if plan.request.limit is not None or not isinstance(plan.expression, AlwaysTrue):
        return None, "a filter or a limit"
    if _renamed(plan.table):
        return None, "renamed columns"
    if not isinstance(plan.table.io, PyArrowFileIO):
        return None, "storage Arrow does not read"
    tasks = plan_tasks(plan.table, plan.snapshot_id, AlwaysTrue())
    if tasks is None:
        return None, "equality delete files"
    deletes = {d.file_path: d for task in tasks for d in task.delete_files}
    if any(d.file_format != FileFormat.PARQUET for d in deletes.values()):
        return None, "deletion vectors"
    return tasks, f"{len(deletes)} position delete file(s) applied" if deletes else "no delete files"


def split_files(tasks: list[FileScanTask], count: int) -> list[list[FileScanTask]]:
    """`count` shares of the planned files with similar row counts (largest file first to the lightest share).

    The shares depend only on the set of files, never on their order, so a part ticket needs no
    state: any replica planning the same snapshot reads the same files for the same part.
    """
    shares: list[list[FileScanTask]] = [[] for _ in range(count)]
    rows = [0] * count
    for task in sorted(tasks, key=lambda t: (-t.file.record_count, t.file.file_path)):
        lightest = rows.index(min(rows))
        shares[lightest].append(task)
        rows[lightest] += task.file.record_count
    return shares


def scan_parts(plan: ScanPlan, partitions: int) -> list[list[int] | None]:
    """The `part` of each endpoint ticket: up to `partitions` shares (never more than files) when the
    scan takes the direct path, else one ticket for the whole scan."""
    tasks = direct_files(plan)[0] if partitions > 1 and plan.snapshot_id is not None else None
    count = min(partitions, len(tasks)) if tasks else 1
    return [[index, count] for index in range(count)] if count > 1 else [None]


class PositionCache:
    """Row positions read from position delete files, by (delete file, data file); the least recently used
    go past `max_bytes`. The files never change, and a table's readers read the same ones over and over
    (Iceberg's Spark executors cache them likewise)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: np.ndarray) -> None:
        with self._lock:
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1].nbytes


POSITIONS = PositionCache(64 << 20)


def deleted_positions(io: FileIO, tasks: list[FileScanTask], cache: PositionCache = POSITIONS) -> dict[str, np.ndarray]:
    """Each data file's deleted row positions (sorted, unique), from the position delete files planned for
    it: cached, or read in parallel (for object storage: they are small and many)."""
    wanted = {(d.file_path, task.file.file_path): d for task in tasks for d in task.delete_files}
    found = {key: cache.get(key) for key in wanted}
    missing = {key[0]: wanted[key] for key, positions in found.items() if positions is None}

    def read(path: str) -> pa.Table:
        # A delete file of one data file (path bounds say which) needs no file_path column.
        columns = ["pos"] if referenced_data_file(missing[path]) is not None else ["file_path", "pos"]
        with io.new_input(path).open() as stream:
            return pq.ParquetFile(stream).read(columns=columns)

    if missing:
        with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
            tables = dict(zip(missing, pool.map(read, missing), strict=True))
        for (delete_path, data_path), delete_file in wanted.items():
            if found[delete_path, data_path] is None:
                table = tables[delete_path]
                if referenced_data_file(delete_file) != data_path:  # a delete file of several data files
                    table = table.filter(pc.equal(table["file_path"].cast(pa.string()), data_path))
                found[delete_path, data_path] = positions = table["pos"].to_numpy()
                cache.put((delete_path, data_path), positions)
    deleted = {}
    for task in tasks:
        parts = [found[d.file_path, task.file.file_path] for d in task.delete_files]
        if parts:
            deleted[task.file.file_path] = _sorted_unique(parts)
    return deleted


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """The positions of several delete files as one sorted array without repeats (a sort: `np.unique` hashes,
    30x slower here)."""
    if len(parts) == 1 and np.all(parts[0][1:] > parts[0][:-1]):  # already so (ours are)
        return parts[0]
    positions = np.sort(np.concatenate(parts))
    return positions[np.concatenate(([True], positions[1:] != positions[:-1]))]


def _without_deleted(
    batches: Iterator[ds.TaggedRecordBatch], deleted: dict[str, np.ndarray]
) -> Iterator[pa.RecordBatch]:
    """The batches of a scan without their deleted rows: a fragment's batches arrive in order, so a running
    count gives each row's position in its file."""
    offsets: dict[str, int] = {}
    for tagged in batches:
        batch, path = tagged.record_batch, tagged.fragment.path
        start = offsets.get(path, 0)
        offsets[path] = start + batch.num_rows
        positions = deleted.get(path)
        if positions is not None:
            low, high = np.searchsorted(positions, [start, start + batch.num_rows])
            if low < high:
                keep = np.ones(batch.num_rows, dtype=bool)
                keep[positions[low:high] - start] = False
                batch = batch.filter(pa.array(keep))
        yield batch


def direct_reader(plan: ScanPlan, tasks: list[FileScanTask], batch_rows: int) -> pa.RecordBatchReader:
    """Arrow's own multi-threaded Parquet reader over the planned files (all or a share of `direct_files`),
    without the rows their position delete files delete."""
    if not tasks:
        return pa.RecordBatchReader.from_batches(plan.schema, [])
    io = plan.table.io
    scheme, netloc, _ = io.parse_location(tasks[0].file.file_path)
    paths = {io.parse_location(task.file.file_path)[2]: task.file.file_path for task in tasks}
    schema = snapshot_schema(plan.table, plan.snapshot_id)
    dataset = ds.dataset(
        list(paths), schema=table_arrow_schema(schema), format="parquet", filesystem=io.fs_by_scheme(scheme, netloc)
    )
    scanner = dataset.scanner(columns=plan.schema.names, batch_size=batch_rows)
    deleted = deleted_positions(io, tasks)
    if not deleted:
        return scanner.to_reader()
    by_fragment = {path: deleted[location] for path, location in paths.items() if location in deleted}
    return pa.RecordBatchReader.from_batches(
        scanner.projected_schema, _without_deleted(scanner.scan_batches(), by_fragment)
    )


DELETED_RELATION = "__deleted_positions"


def position_deleted_files(plan: ScanPlan) -> tuple[list[FileScanTask] | None, str]:
    """The planned files of a filtered or limited scan for the `read_parquet` path, or None and why not.

    DuckDB reads the files pyiceberg planned (pruned by partition and statistics) instead of planning
    them itself and reading the position delete files on every scan, as `iceberg_scan` does (0.5x of
    a copy-on-write table's speed with 100 delete files): the filter is the same SQL, so the rows are too.
    Only when the table has position delete files (without, `iceberg_scan` is as fast), no equality
    delete files, one schema in its history (files are read by column name) and no column DuckDB's
    `file_row_number` would shadow.
    """
    shapes = {tuple((f.field_id, f.name, f.field_type) for f in s.fields) for s in plan.table.schemas().values()}
    if len(shapes) > 1:
        return None, "a filter or a limit, on a table whose schema changed"
    if "file_row_number" in snapshot_schema(plan.table, plan.snapshot_id).column_names:
        return None, "a filter or a limit, on a table with a column DuckDB's file_row_number would shadow"
    tasks = plan_tasks(plan.table, plan.snapshot_id, plan.expression)
    if tasks is None:
        return None, "equality delete files"
    deletes = {d.file_path: d for task in tasks for d in task.delete_files}
    summary = plan.table.snapshot_by_id(plan.snapshot_id).summary  # type: ignore[arg-type, union-attr]
    in_table = int(summary["total-delete-files"]) if summary and "total-delete-files" in summary else len(deletes)
    if not in_table:
        return None, "a filter or a limit, no delete files"
    if any(d.file_format != FileFormat.PARQUET for d in deletes.values()):
        return None, "deletion vectors"
    return tasks, f"a filter or a limit, {len(deletes)} position delete file(s) applied"


def deleted_relation(deleted: dict[str, np.ndarray]) -> pa.Table:
    """The deleted positions as rows: `file`, the index of the data file in `deleted`, and `pos`."""
    counts = [len(positions) for positions in deleted.values()]
    files = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    positions = np.concatenate(list(deleted.values())) if deleted else np.empty(0, np.int64)
    return pa.table({"file": files, "pos": pa.array(positions, pa.int64())})


def read_parquet_sql(
    plan: ScanPlan, tasks: list[FileScanTask], cursor: duckdb.DuckDBPyConnection
) -> tuple[str, list[Any]]:
    """DuckDB's query of the planned files without their deleted rows, filtered (and limited), the deleted
    positions registered with `cursor`: `file_row_number` counts rows in file order before any filter, so
    it is each row's position, whatever DuckDB prunes.

    One `read_parquet` per file with deletes, anti-joined with its positions on the row number alone
    (a join on `filename` too costs a string per row: 25 % slower), and one for the other files."""
    schema = snapshot_schema(plan.table, plan.snapshot_id)
    where, params = to_sql(plan.expression, schema)
    columns = ", ".join(f"t.{quote(name)}" for name in plan.schema.names)
    deleted = deleted_positions(plan.table.io, tasks)
    clean = [local_path(task.file.file_path) for task in tasks if task.file.file_path not in deleted]
    branches, args = [], []
    if clean:
        branches.append(f"SELECT {columns} FROM read_parquet(?) AS t WHERE {where}")
        args += [clean, *params]
    for index, path in enumerate(deleted):
        branches.append(
            f"SELECT {columns} FROM (SELECT * FROM read_parquet(?, file_row_number => true) WHERE {where}) AS t "
            f"ANTI JOIN (SELECT pos FROM {DELETED_RELATION} WHERE file = {index}) AS d ON d.pos = t.file_row_number"
        )
        args += [local_path(path), *params]
    sql = " UNION ALL ".join(branches)
    if plan.request.limit is not None:
        sql = f"SELECT * FROM ({sql}) LIMIT ?"
        args.append(plan.request.limit)
    cursor.register(DELETED_RELATION, deleted_relation(deleted))
    return sql, args


def read_parquet_reader(
    plan: ScanPlan, tasks: list[FileScanTask], engine: Engine, batch_rows: int
) -> pa.RecordBatchReader:
    """`read_parquet_sql`, streamed."""
    if not tasks:
        return pa.RecordBatchReader.from_batches(plan.schema, [])
    engine.use_storage(plan.table.io.properties)
    cursor = engine.cursor()
    sql, args = read_parquet_sql(plan, tasks, cursor)
    return cursor.execute(sql, args).to_arrow_reader(batch_rows)


def iceberg_scan_sql(plan: ScanPlan) -> tuple[str, list[Any]]:
    """DuckDB's `iceberg_scan` of the plan: it prunes files and row groups and applies every kind of delete file."""
    schema = snapshot_schema(plan.table, plan.snapshot_id)
    where, params = to_sql(plan.expression, schema)
    columns = ", ".join(quote(name) for name in plan.schema.names)
    sql = f"SELECT {columns} FROM iceberg_scan(?, snapshot_from_id => ?) WHERE {where}"
    args: list[Any] = [local_path(plan.table.metadata_location), plan.snapshot_id, *params]
    if plan.request.limit is not None:
        sql += " LIMIT ?"
        args.append(plan.request.limit)
    return sql, args


def read_path(plan: ScanPlan) -> tuple[str, list[FileScanTask] | None]:
    """Which path reads the plan (`empty`, `direct`, `read_parquet` or `iceberg_scan`) and the files the first
    two read; logged with why, for every read of a snapshot (scans, training sets, online index builds)."""
    if plan.snapshot_id is None or plan.request.limit == 0:
        return "empty", None
    files, why = direct_files(plan)
    part = plan.request.part
    if part is not None:
        if files is None:
            raise RequestError(
                f"scan of {plan.name!r} cannot be read in parts ({why}): read it whole, without 'part', "
                "or ask get_flight_info again"
            )
        files = split_files(files, part[1])[part[0]]
    path = "direct"
    if files is None:
        path = "iceberg_scan"
        if plan.request.limit is not None or not isinstance(plan.expression, AlwaysTrue):
            files, why = position_deleted_files(plan)
            path = "read_parquet" if files is not None else path
    log.info(
        "scan %s at snapshot %s: %s path (%s)%s",
        plan.name,
        plan.snapshot_id,
        path,
        why,
        f", part {part}" if part is not None else "",
    )
    return path, files


def open_scan(plan: ScanPlan, engine: Engine, batch_rows: int) -> tuple[pa.RecordBatchReader, str]:
    """Stream the planned rows, and say which read path does it; memory stays bounded."""
    path, files = read_path(plan)
    if path == "empty":
        return pa.RecordBatchReader.from_batches(plan.schema, []), path
    if path == "direct":
        reader = direct_reader(plan, files or [], batch_rows)
    elif path == "read_parquet":
        reader = read_parquet_reader(plan, files or [], engine, batch_rows)
    else:
        engine.use_storage(plan.table.io.properties)
        reader = engine.cursor().execute(*iceberg_scan_sql(plan)).to_arrow_reader(batch_rows)
    return (reader if reader.schema == plan.schema else reader.cast(plan.schema)), path


SCANNED_RELATION = "__scanned"


def scan_relation(
    plan: ScanPlan, engine: Engine, cursor: duckdb.DuckDBPyConnection, batch_rows: int
) -> tuple[str, list[Any], str]:
    """The planned rows as a relation for a query of them on `cursor` (SQL and its parameters), read on the
    path `open_scan` takes, which it returns too. Arrow's readers are registered with the cursor, so the
    query consumes them as they stream; DuckDB's own paths stay inside the query (a reader DuckDB made,
    fed back into DuckDB, can hang)."""
    path, files = read_path(plan)
    engine.use_storage(plan.table.io.properties)
    if path == "iceberg_scan" or (path == "read_parquet" and files):
        sql, args = iceberg_scan_sql(plan) if path == "iceberg_scan" else read_parquet_sql(plan, files or [], cursor)
        return f"({sql})", args, path
    rows = direct_reader(plan, files, batch_rows) if path == "direct" and files else plan.schema.empty_table()
    cursor.register(SCANNED_RELATION, rows if rows.schema == plan.schema else rows.cast(plan.schema))
    return SCANNED_RELATION, [], path
