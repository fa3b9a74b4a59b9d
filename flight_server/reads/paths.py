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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as fs
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.manifest import FileFormat
from pyiceberg.schema import Schema
from pyiceberg.table import FileScanTask, Table
from pyiceberg.types import DecimalType, NestedField

from flight_server.base.filters import quote, to_sql
from flight_server.base.schemas import table_arrow_schema
from flight_server.iceberg.lineage import ROW_BITS
from flight_server.iceberg.snapshots import snapshot_schema
from flight_server.reads.caches import FileCache, FileKey
from flight_server.reads.deleted import (
    DELETED_RELATION,
    deleted_positions,
    deleted_relation,
    position_deleted_files,
    without_deleted,
)
from flight_server.reads.duck import Engine, local_path
from flight_server.reads.plan import ScanPlan, plan_tasks, renamed, schema_changed
from flight_server.wire.errors import RequestError

log = logging.getLogger(__name__)

ORDER = "__order"  # a row's place in commit order (`ROW_BITS`), in `scan_relation`'s relation when asked for

RANKS_RELATION = "__file_ranks"  # each data file's rank in commit order, for `iceberg_scan_sql`


def direct_files(plan: ScanPlan) -> tuple[list[FileScanTask] | None, str]:
    """The planned files (each with its position delete files) for the direct path, or None when DuckDB's
    `iceberg_scan` must read; and why that path.

    The direct path takes whole-table reads (no filter, no limit: the bulk case) when pyiceberg can
    plan them (no equality delete files), every delete file is a Parquet position delete file, and
    no column was ever renamed, nor a name given to another column (files are matched by column name:
    `renamed`); everything else goes through
    DuckDB, so that filters have one semantics (SQL's) whatever the path.
    """
    if plan.request.limit is not None or not isinstance(plan.expression, AlwaysTrue):
        return None, "a filter or a limit"
    if renamed(plan.table):
        return None, "renamed columns"
    if not isinstance(plan.table.io, PyArrowFileIO):
        return None, "storage Arrow does not read"
    if plan.appended is not None:
        return appended_tasks(
            plan
        ), f"{len(plan.appended)} file(s) appended since snapshot {plan.request.since_snapshot}"
    tasks = plan_tasks(plan.table, plan.snapshot_id, AlwaysTrue(), plan.caches.plans)
    if tasks is None:
        return None, "equality delete files"
    deletes = {d.file_path: d for task in tasks for d in task.delete_files}
    if any(d.file_format != FileFormat.PARQUET for d in deletes.values()):
        return None, "deletion vectors"
    return tasks, f"{len(deletes)} position delete file(s) applied" if deletes else "no delete files"


def appended_tasks(plan: ScanPlan) -> list[FileScanTask]:
    """The files appended since `since_snapshot` as read tasks: no delete file can touch them (a snapshot that
    added one in between would have been refused)."""
    return [FileScanTask(data_file) for data_file in plan.appended or []]


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


def direct_reader(
    plan: ScanPlan,
    tasks: list[FileScanTask],
    batch_rows: int,
    cache: FileCache | None = None,
    ranks: dict[str, int] | None = None,
) -> pa.RecordBatchReader | pa.Table:
    """Arrow's own multi-threaded Parquet reader over the planned files (all or a share of `direct_files`),
    without the rows their position delete files delete; with a `cache`, files it holds stream from memory
    and the others are kept in it once read to the end (a Table when it holds them all). With `ranks` (each
    file's rank in commit order), each row's place in commit order too, as column `ORDER` (not cached)."""
    if not tasks:
        return pa.RecordBatchReader.from_batches(plan.schema, [])
    if cache is not None and cache.max_bytes and ranks is None:
        return _through_cache(plan, tasks, batch_rows, cache)
    scanner, paths, by_fragment = _scanner(plan, tasks, batch_rows)
    if ranks is not None:
        at = {path: ranks[location] << ROW_BITS for path, location in paths.items()}
        placed = without_deleted(scanner.scan_batches(), by_fragment, at, ORDER)
        schema = scanner.projected_schema.append(pa.field(ORDER, pa.int64()))
        return pa.RecordBatchReader.from_batches(schema, (batch for _, batch in placed))
    if not by_fragment:
        return scanner.to_reader()
    batches = without_deleted(scanner.scan_batches(), by_fragment)
    return pa.RecordBatchReader.from_batches(scanner.projected_schema, (batch for _, batch in batches))


# Decode on every core (row groups and files at once: `use_threads`), each file's column chunks fetched in a few
# coalesced reads ahead of decoding (`pre_buffer`): pyarrow's defaults today, said here so that a change of them
# cannot quietly make cold scans single-threaded or seek per page on object stores.
_PARQUET = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True))
# Local data files are mapped, not read into buffers: decoding reads the page cache in place (a fifth less server
# CPU per cold scan of the benchmark table). Iceberg's files are never rewritten in place, and an expired file
# deleted while mapped stays readable.
_MAPPED = fs.LocalFileSystem(use_mmap=True)


def _scanner(
    plan: ScanPlan, tasks: list[FileScanTask], batch_rows: int
) -> tuple[ds.Scanner, dict[str, str], dict[str, np.ndarray]]:
    """A scanner of `tasks`' files, their locations by the paths its fragments name, and the deleted row
    positions of each fragment that has some."""
    io = plan.table.io
    assert isinstance(io, PyArrowFileIO), "direct_files plans only tables Arrow reads"
    scheme, netloc, _ = io.parse_location(tasks[0].file.file_path)
    paths = {io.parse_location(task.file.file_path)[2]: task.file.file_path for task in tasks}
    sizes = {task.file.file_path: task.file.file_size_in_bytes for task in tasks}
    schema = plan.read  # files matched by name (no column ever renamed): a file older than a column lacks it
    filesystem = _MAPPED if scheme == "file" else io.fs_by_scheme(scheme, netloc)
    # Each file's size from its manifest entry: no request per file to ask for it (a HEAD each on object stores).
    fragments = [
        _PARQUET.make_fragment(path, filesystem, file_size=sizes[location]) for path, location in paths.items()
    ]
    dataset = ds.FileSystemDataset(fragments, table_arrow_schema(schema), _PARQUET, filesystem)
    deleted = deleted_positions(io, tasks, plan.caches.positions)
    by_fragment = {path: deleted[location] for path, location in paths.items() if location in deleted}
    scanner = dataset.scanner(columns=plan.schema.names, batch_size=batch_rows, use_threads=True)
    return scanner, paths, by_fragment


def _through_cache(
    plan: ScanPlan, tasks: list[FileScanTask], batch_rows: int, cache: FileCache
) -> pa.RecordBatchReader | pa.Table:
    """The files `cache` holds, then the others decoded (and kept once the scan has read them all); when it
    holds them all, their rows as a Table, which Flight streams from C++ as the raw ceiling does: no Python and
    no GIL per batch (a Python generator per batch measured 0.74x of the ceiling)."""
    columns = plan.schema  # the Arrow schema read, projected (`plan_table_scan`)
    shape = (columns.to_string(),)
    keys = {
        task.file.file_path: (task.file.file_path, shape, tuple(sorted(d.file_path for d in task.delete_files)))
        for task in tasks
    }
    held: list[pa.RecordBatch] = []
    missing = []
    for task in tasks:
        batches = cache.get(keys[task.file.file_path])
        if batches is None:
            missing.append(task)
        else:
            held.extend(batches)
    if not missing:
        return pa.Table.from_batches(held, held[0].schema if held else columns)
    scanner, paths, by_fragment = _scanner(plan, missing, batch_rows)
    decoded = without_deleted(scanner.scan_batches(), by_fragment)
    return pa.RecordBatchReader.from_batches(
        scanner.projected_schema, _keeping(held, decoded, {p: keys[loc] for p, loc in paths.items()}, cache)
    )


def _keeping(
    held: list[pa.RecordBatch],
    decoded: Iterator[tuple[str, pa.RecordBatch]],
    keys: dict[str, FileKey],
    cache: FileCache,
) -> Iterator[pa.RecordBatch]:
    """`held`, then `decoded`, whose files go into `cache` once every one is read (a scan the client leaves
    early keeps nothing); what all scans collect at once is reserved (`FileCache.reserve`), so that the cache
    and the files on their way into it together stay within its size and the server's memory budget."""
    yield from held
    files: dict[str, list[pa.RecordBatch]] | None = {path: [] for path in keys}
    reserved = 0
    try:
        for path, batch in decoded:
            if files is not None:
                if cache.reserve(batch.nbytes):
                    reserved += batch.nbytes
                    files[path].append(batch)
                else:
                    files = None
            yield batch
        for path, batches in (files or {}).items():
            reserved -= cache.put(keys[path], batches, reserved=True)
    finally:
        cache.release(reserved)


def read_parquet_sql(
    plan: ScanPlan, tasks: list[FileScanTask], cursor: duckdb.DuckDBPyConnection
) -> tuple[str, list[Any]]:
    """DuckDB's query of the planned files without their deleted rows, filtered (and limited), the deleted
    positions registered with `cursor`: `file_row_number` counts rows in file order before any filter, so
    it is each row's position, whatever DuckDB prunes.

    One `read_parquet` per file with deletes, anti-joined with its positions on the row number alone
    (a join on `filename` too costs a string per row: 25 % slower), and one for the other files. Files appended
    across a schema change (`since_snapshot`) are matched by name: some lack a column added since, or hold a type
    promoted since (`schema_changed`); a column added since the snapshot (read in the table's current schema) is in
    none of them: NULL."""
    schema = plan.read
    union = ", union_by_name => true" if schema_changed(plan.table) else ""
    where, params = to_sql(plan.expression, schema)
    columns = ", ".join(f"t.{quote(name)}" for name in plan.schema.names)
    written = set(snapshot_schema(plan.table, plan.snapshot_id).column_names)
    nulls = "".join(f", {_null(f)} AS {quote(f.name)}" for f in schema.fields if f.name not in written)
    deleted = deleted_positions(plan.table.io, tasks, plan.caches.positions)
    clean = [local_path(task.file.file_path) for task in tasks if task.file.file_path not in deleted]
    branches, args = [], []
    if clean:
        branches.append(
            f"SELECT {columns} FROM (SELECT *{nulls} FROM read_parquet(?, hive_partitioning => false{union})) AS t "
            f"WHERE {where}"
        )
        args += [clean, *params]
    for index, path in enumerate(deleted):
        branches.append(
            f"SELECT {columns} FROM (SELECT * FROM read_parquet(?, file_row_number => true, "
            f"hive_partitioning => false) WHERE {where}) AS t "
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
    plan: ScanPlan,
    tasks: list[FileScanTask],
    engine: Engine,
    batch_rows: int,
    is_cancelled: Callable[[], bool] | None = None,
) -> pa.RecordBatchReader:
    """`read_parquet_sql`, streamed."""
    if not tasks:
        return pa.RecordBatchReader.from_batches(plan.schema, [])
    engine.use_storage(plan.table.io.properties)
    cursor = engine.cursor()
    sql, args = read_parquet_sql(plan, tasks, cursor)
    with engine.interruptible(cursor, is_cancelled):
        return cursor.execute(sql, args).to_arrow_reader(batch_rows)


def iceberg_scan_sql(plan: ScanPlan, engine: Engine, ranked: bool = False) -> tuple[str, list[Any]]:
    """DuckDB's `iceberg_scan` of the plan: it prunes files and row groups and applies every kind of delete file.
    `ranked`: with each row's place in commit order as `ORDER` (its file's rank, from `RANKS_RELATION` by the
    manifest's path as `filename` names it, above its row number; 0 where the scan hides them: `hides_position`)."""
    where, params = to_sql(plan.expression, plan.read)
    columns = ", ".join(f"s.{quote(name)}" for name in plan.schema.names)
    scan = f"{iceberg_source(plan.table, plan.snapshot_id, plan.read)} AS s"
    if ranked and hides_position(plan.schema.names):
        columns += f", 0::BIGINT AS {ORDER}"
    elif ranked:
        columns += f", coalesce(o.__rank, 0) * {1 << ROW_BITS} + s.file_row_number AS {ORDER}"
        scan += f" LEFT JOIN {RANKS_RELATION} AS o USING (filename)"
    sql = f"SELECT {columns} FROM {scan} WHERE {where}"
    args: list[Any] = [
        engine.metadata_file(plan.table.metadata_location, plan.table.metadata),
        plan.snapshot_id,
        *params,
    ]
    if plan.request.limit is not None:
        sql += " LIMIT ?"
        args.append(plan.request.limit)
    return sql, args


# Iceberg's primitive types as DuckDB names them: the type of a column promoted since a snapshot, or added since
_DUCKDB_TYPES = {
    "boolean": "BOOLEAN",
    "int": "INTEGER",
    "long": "BIGINT",
    "float": "FLOAT",
    "double": "DOUBLE",
    "date": "DATE",
    "time": "TIME",
    "timestamp": "TIMESTAMP",
    "timestamptz": "TIMESTAMPTZ",
    "string": "VARCHAR",
    "uuid": "UUID",
    "binary": "BLOB",
}


def _duckdb_type(field: NestedField) -> str | None:
    if isinstance(field.field_type, DecimalType):
        return f"DECIMAL({field.field_type.precision}, {field.field_type.scale})"
    return _DUCKDB_TYPES.get(str(field.field_type))


def _null(field: NestedField) -> str:
    """A NULL of the column's type (untyped where DuckDB has no name for it: the result is cast once read)."""
    kind = _duckdb_type(field)
    return f"NULL::{kind}" if kind is not None else "NULL"


def iceberg_source(table: Table, snapshot_id: int | None, read: Schema) -> str:
    """`iceberg_scan(?, snapshot_from_id => ?)` (its parameters: the metadata file, the snapshot) with the columns
    of `read`. DuckDB answers a snapshot in the schema it was written with; a read in another (the table's current
    one, which a schema change without a write replaced) takes each column by field id: under its new name, cast
    where promoted, NULL where the snapshot has none (added, or dropped and added again). DuckDB's virtual
    columns `filename` and `file_row_number` stay beside them unless a column hides them (`hides_position`)."""
    scan = "iceberg_scan(?, snapshot_from_id => ?)"
    written = snapshot_schema(table, snapshot_id)
    if [(f.field_id, f.name, f.field_type) for f in written.fields] == [
        (f.field_id, f.name, f.field_type) for f in read.fields
    ]:
        return scan
    by_id = {f.field_id: f for f in written.fields}
    columns = []
    for f in read.fields:
        old, kind = by_id.get(f.field_id), _duckdb_type(f)
        if old is None:
            columns.append(f"{_null(f)} AS {quote(f.name)}")
        elif old.field_type != f.field_type and kind is not None:
            columns.append(f"CAST({quote(old.name)} AS {kind}) AS {quote(f.name)}")
        else:
            columns.append(f"{quote(old.name)} AS {quote(f.name)}")
    if not hides_position(written.column_names) and not hides_position(read.column_names):
        columns += ["filename", "file_row_number"]
    return f"(SELECT {', '.join(columns)} FROM {scan})"


def files_relation(files: list[str], names: list[str], cursor: duckdb.DuckDBPyConnection) -> tuple[str, list[Any]]:
    """The rows of data `files` (in commit order) with columns `names`, matched by name (a file written before a
    column was added lacks it), and each row's place in commit order as `ORDER` (0 where `hides_position`)."""
    scan = "read_parquet(?, union_by_name => true, hive_partitioning => false) AS s"
    paths = [local_path(f) for f in files]
    if hides_position(names):
        return f"(SELECT *, 0::BIGINT AS {ORDER} FROM {scan})", [paths]
    cursor.register(RANKS_RELATION, _ranks_table({path: rank for rank, path in enumerate(paths)}))
    place = f"coalesce(o.__rank, 0) * {1 << ROW_BITS} + s.file_row_number AS {ORDER}"
    return f"(SELECT s.*, {place} FROM {scan} LEFT JOIN {RANKS_RELATION} AS o USING (filename))", [paths]


def _ranks_table(ranks: dict[str, int]) -> pa.Table:
    return pa.table(
        {"filename": pa.array(list(ranks), pa.string()), "__rank": pa.array(list(ranks.values()), pa.int64())}
    )


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
    if files is None and plan.appended is not None:
        if renamed(plan.table):  # read_parquet matches columns by name
            raise RequestError(f"since_snapshot: {plan.name!r} has renamed columns; read it in full")
        path, files, why = "read_parquet", appended_tasks(plan), f"{why}, appended files only"
    elif files is None:
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


def open_scan(
    plan: ScanPlan,
    engine: Engine,
    batch_rows: int,
    is_cancelled: Callable[[], bool] | None = None,
    cache: FileCache | None = None,
) -> tuple[pa.RecordBatchReader | pa.Table, str]:
    """Stream the planned rows, and say which read path does it; memory stays bounded. DuckDB's work up to
    the first batch (a selective filter may scan much for it) is interrupted once `is_cancelled()`; later
    batches are computed only as the client takes them. Direct reads go through `cache` when given: a Table
    when it holds every file (the rows are in memory already, and read no file)."""
    path, files = read_path(plan)
    if path == "empty":
        return pa.RecordBatchReader.from_batches(plan.schema, []), path
    if path == "direct":
        reader = direct_reader(plan, files or [], batch_rows, cache)
    elif path == "read_parquet":
        reader = read_parquet_reader(plan, files or [], engine, batch_rows, is_cancelled)
    else:
        engine.use_storage(plan.table.io.properties)
        cursor = engine.cursor()
        with engine.interruptible(cursor, is_cancelled):
            reader = cursor.execute(*iceberg_scan_sql(plan, engine)).to_arrow_reader(batch_rows)
    return (reader if reader.schema == plan.schema else reader.cast(plan.schema)), path


SCANNED_RELATION = "__scanned"


def hides_position(names: Iterable[str]) -> set[str]:
    """The columns named as DuckDB's virtual columns `filename` and `file_row_number` (names match in any case),
    which a scan then returns instead of those: with either, DuckDB cannot tell a row's place in commit order
    (and neither `iceberg_scan` nor `read_parquet` can rename `file_row_number`)."""
    return {name for name in names if name.lower() in {"filename", "file_row_number"}}


def scan_relation(
    plan: ScanPlan,
    engine: Engine,
    cursor: duckdb.DuckDBPyConnection,
    batch_rows: int,
    ranks: dict[str, int] | None = None,
) -> tuple[str, list[Any], str]:
    """The planned rows as a relation for a query of them on `cursor` (SQL and its parameters), read on the
    path `open_scan` takes, which it returns too. Arrow's readers are registered with the cursor, so the
    query consumes them as they stream; DuckDB's own paths stay inside the query (a reader DuckDB made,
    fed back into DuckDB, can hang). With `ranks` (of a whole snapshot's files: `commit_ranks`), the relation
    has one more column, `ORDER`, each row's place in commit order (0 where DuckDB cannot tell it:
    `hides_position`), so that a query can settle full ties as training sets do."""
    path, files = read_path(plan)
    engine.use_storage(plan.table.io.properties)
    if path == "iceberg_scan" or (path == "read_parquet" and files):
        assert ranks is None or path == "iceberg_scan", "commit order only for whole snapshots"
        if ranks is not None and not hides_position(plan.schema.names):
            cursor.register(RANKS_RELATION, _ranks_table(ranks))
        sql, args = (
            iceberg_scan_sql(plan, engine, ranks is not None)
            if path == "iceberg_scan"
            else read_parquet_sql(plan, files or [], cursor)
        )
        return f"({sql})", args, path
    if path == "direct" and files:
        rows: pa.RecordBatchReader | pa.Table = direct_reader(plan, files, batch_rows, ranks=ranks)
    else:
        rows = plan.schema.empty_table()
        if ranks is not None:
            rows = rows.append_column(ORDER, pa.array([], pa.int64()))
    schema = plan.schema if ranks is None else plan.schema.append(pa.field(ORDER, pa.int64()))
    cursor.register(SCANNED_RELATION, rows if rows.schema == schema else rows.cast(schema))
    return SCANNED_RELATION, [], path
