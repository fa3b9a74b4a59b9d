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
from flight_server.changes.commits import delete_files
from flight_server.changes.rewrite import Plan, Rewriter, SnapshotRows
from flight_server.iceberg.catalog import PROP_DELETE_MODE, FeatureSpec, table_name
from flight_server.iceberg.positions import PATH_FIELD_ID, POS_FIELD_ID, POSITION_DELETE_SCHEMA, referenced_data_file
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


def _key_array(values: list[Any], key_type: pa.DataType) -> pa.Array:
    """A delete's keys as the key column's type. JSON has no dates, times or decimals: those come as text (ISO-8601,
    decimal digits), which Arrow parses as the type; numbers and text come as themselves."""
    if (pa.types.is_temporal(key_type) or pa.types.is_decimal(key_type)) and all(
        value is None or isinstance(value, str) for value in values
    ):
        text = pa.array(values, pa.string())
        try:
            return text.cast(key_type)
        except pa.ArrowInvalid:
            if not pa.types.is_timestamp(key_type):
                raise
            # Times with an offset for a key without a zone, or without one for a key in UTC: both read as UTC.
            other = pa.timestamp(key_type.unit, None if key_type.tz else "UTC")
            return text.cast(other).cast(key_type)
    return pa.array(values, key_type)


def row_condition(table: Table, schema: Schema, request: DeleteRequest) -> tuple[str, list[Any], pa.Table | None]:
    """The SQL condition on `iceberg_scan(...) AS t` naming the rows to delete, its bound parameters, and
    the key rows it joins (to register as `KEYS_RELATION`)."""
    name = table_name(table)
    arrow = table_arrow_schema(schema)
    if reserved := [c for c in VIRTUAL_COLUMNS if c in arrow.names]:
        raise RequestError(f"table {name!r} has column(s) {reserved}, which DuckDB reserves: it cannot delete rows")
    conditions: list[str] = []
    params: list[Any] = []
    keys: pa.Table | None = None
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
                columns[column] = _key_array(values, key_type)
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


class Deleter(Rewriter):
    """Runs `delete` actions against the catalog."""

    def delete(self, request: DeleteRequest) -> DeleteResult:
        table = self.catalog.load(request.table)
        mode = request.mode or delete_mode(table)
        if mode == MERGE_ON_READ and table.metadata.format_version != 2:
            raise RequestError(
                f"merge-on-read deletes need a format v2 table; {table_name(table)!r} is format "
                f"v{table.metadata.format_version}: use copy-on-write"
            )
        done = self.rewrite(
            request.table, "delete from", f"delete {mode}", lambda rows: self._plan(rows, request, mode)
        )
        log.info(
            "delete (%s) of %d rows from %s: %d data file(s) removed, %d added, %d delete file(s) added: snapshot %s",
            mode,
            done.rows,
            done.table,
            done.data_files_removed,
            done.data_files_added,
            done.delete_files_added,
            done.snapshot_id,
        )
        return DeleteResult(
            table=done.table,
            mode=mode,
            snapshot_id=done.snapshot_id,
            rows_deleted=done.rows,
            data_files_removed=done.data_files_removed,
            data_files_added=done.data_files_added,
            delete_files_added=done.delete_files_added,
            delete_files_removed=done.delete_files_removed,
        )

    def _plan(self, rows: SnapshotRows, request: DeleteRequest, mode: str) -> Plan | None:
        """Find the matching rows (data file and position) and write the files that delete them."""
        condition, params, keys = row_condition(rows.table, rows.schema, request)
        if keys is not None:
            rows.cursor.register(KEYS_RELATION, keys)
        hits = rows.query(
            "SELECT filename, list(file_row_number ORDER BY file_row_number) AS positions "
            f"FROM {rows.source} WHERE {condition} GROUP BY filename",
            params,
        ).to_arrow_table()
        if hits.num_rows == 0:
            return None
        paths = hits.column("filename").to_pylist()
        by_path = {f.file_path: f for f in rows.files if f.content == DataFileContent.DATA}
        touched = [by_path[path] for path in paths]
        if mode == MERGE_ON_READ:
            removed: list[DataFile] = []
            added = rows.keep(write_position_deletes(rows.table, touched, hits.column("positions")))
        else:
            # The touched files' other rows, in new files; their position delete files go with them.
            kept = f"filename IN (SELECT unnest(?)) AND NOT coalesce({condition}, false)"
            added, touched = rows.rewrite(kept, [paths, *params], touched)
            rewritten = {f.file_path for f in touched}
            removed = touched + [f for f in rows.files if referenced_data_file(f) in rewritten]
        operation = Operation.OVERWRITE if any(f.content == DataFileContent.DATA for f in added) else Operation.DELETE
        deleted = int(pc.sum(pc.list_value_length(hits.column("positions"))).as_py())
        return Plan(operation, removed, added, deleted)
