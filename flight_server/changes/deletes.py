"""Deleting rows by entity keys and/or a filter, copy-on-write or merge-on-read: one snapshot either way.

Both modes find the rows alike: DuckDB's `iceberg_scan` over the current snapshot (so earlier
position and equality deletes are already applied) names each matching row's data file and
position. Then

* copy-on-write rewrites every data file holding such a row without it (a file left empty is just
  dropped): reads keep the direct path, and a delete costs a rewrite of the files it touches;
* merge-on-read writes one position delete file per touched data file (Parquet `file_path`, `pos`
  with Iceberg's reserved field ids): a delete costs a small file, and every read applies it
  (through `iceberg_scan`) until `compact` folds it in.

The request's `mode`, else the table property `write.delete.mode` (Iceberg's own, so Spark and
Trino agree), else copy-on-write (Iceberg's default) decides. A delete removes the matching rows
of the snapshot it planned on; rows appended concurrently stay, anything else concurrent makes it
plan again.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.conversions import to_bytes
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation
from pyiceberg.types import LongType

from flight_server.base.filters import parse_filter, quote, to_sql
from flight_server.base.schemas import table_arrow_schema
from flight_server.changes.commits import (
    OPERATION_PROPERTY,
    SCAN_SOURCE,
    TableChanges,
    commit_rewrite,
    commit_until,
    delete_files,
    live_files,
)
from flight_server.changes.files import parquet_bytes_per_row, write_reader
from flight_server.iceberg.catalog import PROP_DELETE_MODE, FeatureSpec, table_name
from flight_server.iceberg.positions import PATH_FIELD_ID, POS_FIELD_ID, POSITION_DELETE_SCHEMA, referenced_data_file
from flight_server.iceberg.snapshots import snapshot_schema
from flight_server.reads.duck import local_path
from flight_server.wire.actions import DELETE_MODES, DeleteRequest, DeleteResult
from flight_server.wire.errors import RequestError

log = logging.getLogger(__name__)

COPY_ON_WRITE, MERGE_ON_READ = DELETE_MODES

KEYS_RELATION = "__delete_keys"

VIRTUAL_COLUMNS = ("filename", "file_row_number")  # iceberg_scan's, shadowed by table columns of these names


def delete_mode(table: Table) -> str:
    """The table's default delete mode (`write.delete.mode`)."""
    mode = table.metadata.properties.get(PROP_DELETE_MODE, COPY_ON_WRITE)
    if mode not in DELETE_MODES:
        raise RequestError(
            f"table {table_name(table)!r} has {PROP_DELETE_MODE}={mode!r}, which is none of {list(DELETE_MODES)}: "
            "name the mode in the request"
        )
    return mode


def row_condition(table: Table, schema: Schema, request: DeleteRequest) -> tuple[str, list[Any], pa.Table | None]:
    """The SQL condition on `iceberg_scan(...) AS t` naming the rows to delete, its bound parameters, and
    the key rows it joins (to register as `KEYS_RELATION`)."""
    name = table_name(table)
    arrow = table_arrow_schema(schema)
    if reserved := [c for c in VIRTUAL_COLUMNS if c in arrow.names]:
        raise RequestError(f"table {name!r} has column(s) {reserved}, which DuckDB reserves: it cannot delete rows")
    conditions, params, keys = [], [], None
    if request.filter is not None:
        where, params = to_sql(parse_filter(request.filter, schema), schema)
        conditions.append(where)
    if request.keys is not None:
        spec = FeatureSpec.from_properties(table.metadata.properties)
        entity_keys = list(spec.entity_keys) if spec else []
        if unknown := [k for k in request.keys if k not in entity_keys]:
            raise RequestError(
                f"delete request: {unknown} are not entity keys of {name!r} (keys: {entity_keys}); "
                "delete by other columns with 'filter'"
            )
        columns = {}
        for column, values in request.keys.items():
            key_type = arrow.field(column).type
            try:
                columns[column] = pa.array(values, key_type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise RequestError(f"delete request: key column {column!r} is {key_type}: {exc}") from None
        keys = pa.table(columns)
        match = " AND ".join(f"k.{quote(c)} = t.{quote(c)}" for c in columns)
        conditions.append(f"EXISTS (SELECT 1 FROM {KEYS_RELATION} AS k WHERE {match})")
    return " AND ".join(f"({c})" for c in conditions), params, keys


def write_position_deletes(table: Table, data_files: list[DataFile], positions: pa.ChunkedArray) -> list[DataFile]:
    """One position delete file per data file (its sorted row positions), with path bounds that tell
    readers the one data file it applies to. Files already written are deleted if it fails."""
    written: list[DataFile] = []
    try:
        for data_file, rows in zip(data_files, positions, strict=True):
            pos = rows.values
            paths = pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(pos), np.int32)), [data_file.file_path])
            location = table.location_provider().new_data_location(f"{uuid.uuid4()}-deletes.parquet")
            output = table.io.new_output(location)
            with output.create() as stream:
                pq.write_table(pa.table([paths, pos], schema=POSITION_DELETE_SCHEMA), stream)
            path_bytes = data_file.file_path.encode()
            low, high = pc.min_max(pos).values()
            delete_file = DataFile.from_args(
                content=DataFileContent.POSITION_DELETES,
                file_path=location,
                file_format=FileFormat.PARQUET,
                partition=data_file.partition,
                record_count=len(pos),
                file_size_in_bytes=len(output),
                value_counts={PATH_FIELD_ID: len(pos), POS_FIELD_ID: len(pos)},
                null_value_counts={PATH_FIELD_ID: 0, POS_FIELD_ID: 0},
                lower_bounds={PATH_FIELD_ID: path_bytes, POS_FIELD_ID: to_bytes(LongType(), low.as_py())},
                upper_bounds={PATH_FIELD_ID: path_bytes, POS_FIELD_ID: to_bytes(LongType(), high.as_py())},
            )
            delete_file.spec_id = data_file.spec_id  # not a manifest field: the manifest's spec
            written.append(delete_file)
    except BaseException:
        delete_files(table.io, [f.file_path for f in written])
        raise
    return written


class Deleter(TableChanges):
    """Runs `delete` actions against the catalog."""

    def delete(self, request: DeleteRequest) -> DeleteResult:
        table = self.catalog.load(request.table)
        mode = request.mode or delete_mode(table)
        if mode == MERGE_ON_READ and table.metadata.format_version != 2:
            raise RequestError(
                f"merge-on-read deletes need a format v2 table; {table_name(table)!r} is format "
                f"v{table.metadata.format_version}: use copy-on-write"
            )
        deadline = time.monotonic() + self.commit_timeout
        result = commit_until(deadline, f"delete from {table_name(table)}", lambda: self._delete_once(request, mode))
        log.info(
            "delete (%s) of %d rows from %s: %d data file(s) removed, %d added, %d delete file(s) added: snapshot %s",
            mode,
            result["rows_deleted"],
            result["table"],
            result["data_files_removed"],
            result["data_files_added"],
            result["delete_files_added"],
            result["snapshot_id"],
        )
        return DeleteResult(**result)

    def _delete_once(self, request: DeleteRequest, mode: str) -> dict[str, Any]:
        """Plan on the current snapshot, write the files, commit them (or delete them and raise)."""
        table = self.catalog.load(request.table)
        snapshot = table.current_snapshot()
        result: dict[str, Any] = {
            "table": table_name(table),
            "mode": mode,
            "snapshot_id": snapshot.snapshot_id if snapshot else None,
            "rows_deleted": 0,
            "data_files_removed": 0,
            "data_files_added": 0,
            "delete_files_added": 0,
            "delete_files_removed": 0,
        }
        if snapshot is None:
            return result
        schema = snapshot_schema(table, snapshot.snapshot_id)
        condition, params, keys = row_condition(table, schema, request)
        self.engine.use_storage(table.io.properties)
        scan = [local_path(table.metadata_location), snapshot.snapshot_id]
        cursor = self.engine.cursor()
        try:
            if keys is not None:
                cursor.register(KEYS_RELATION, keys)
            hits = cursor.execute(
                "SELECT filename, list(file_row_number ORDER BY file_row_number) AS positions "
                f"FROM {SCAN_SOURCE} WHERE {condition} GROUP BY filename",
                [*scan, *params],
            ).to_arrow_table()
            if hits.num_rows == 0:
                return result
            files = live_files(table.io, snapshot)
            by_path = {f.file_path: f for f in files if f.content == DataFileContent.DATA}
            touched = [by_path[path] for path in hits.column("filename").to_pylist()]
            if mode == MERGE_ON_READ:
                removed: list[DataFile] = []
                added = write_position_deletes(table, touched, hits.column("positions"))
            else:
                # The touched files' other rows, in new files; their position delete files go with them.
                arrow = table_arrow_schema(schema)
                kept = cursor.execute(
                    f"SELECT {', '.join(quote(n) for n in arrow.names)} FROM {SCAN_SOURCE} "
                    f"WHERE filename IN (SELECT unnest(?)) AND NOT coalesce({condition}, false)",
                    [*scan, hits.column("filename").to_pylist(), *params],
                ).to_arrow_reader(self.batch_rows)
                spec = FeatureSpec.from_properties(table.metadata.properties)
                added = write_reader(
                    table.metadata, kept.cast(arrow), table.io, spec, self.chunk_bytes, parquet_bytes_per_row(touched)
                )
                rewritten = {f.file_path for f in touched}
                removed = touched + [f for f in files if referenced_data_file(f) in rewritten]
        finally:
            cursor.close()
        data_added = sum(f.content == DataFileContent.DATA for f in added)
        operation = Operation.OVERWRITE if data_added else Operation.DELETE
        lock = self.locks(self.catalog.identifier(request.table))
        properties = {OPERATION_PROPERTY: f"delete {mode}"}
        result.update(
            snapshot_id=commit_rewrite(lock, table, operation, removed, added, properties),
            rows_deleted=int(pc.sum(pc.list_value_length(hits.column("positions"))).as_py()),
            data_files_removed=sum(f.content == DataFileContent.DATA for f in removed),
            data_files_added=data_added,
            delete_files_added=len(added) - data_added,
            delete_files_removed=sum(f.content != DataFileContent.DATA for f in removed),
        )
        return result
