"""Arrow schemas in and out: what a new table looks like, and fitting incoming batches to a table.

Incoming columns are matched by name and cast only where no information is lost (integers
widen, floats widen, string flavours unify); timestamps become UTC microseconds, Iceberg's
precision, with naive values taken as UTC. Anything else is a `RequestError` naming the column.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.schema import Schema

from flight_server.wire.errors import RequestError
from flight_server.wire.reads import dictionary_values

UTC_MICROS = pa.timestamp("us", tz="UTC")


def micros(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps as int64 UTC microseconds (naive means UTC), and which of them are not null."""
    values = pc.cast(column, UTC_MICROS, safe=False).cast(pa.int64())
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    return values.fill_null(0).to_numpy(zero_copy_only=False), valid


def normalise_type(t: pa.DataType, column: str) -> pa.DataType:
    """The Arrow type a column of type `t` is stored and served as."""
    if pa.types.is_timestamp(t):
        return UTC_MICROS
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_dictionary(t):
        return normalise_type(t.value_type, column)
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_unsigned_integer(t):
        return {8: pa.int32(), 16: pa.int32(), 32: pa.int64()}.get(t.bit_width) or _unsupported(t, column)
    if pa.types.is_int8(t) or pa.types.is_int16(t):
        return pa.int32()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(normalise_type(t.value_type, column))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, normalise_type(f.type, column), f.nullable) for f in t])
    if pa.types.is_map(t):
        return pa.map_(normalise_type(t.key_type, column), normalise_type(t.item_type, column))
    if pa.types.is_null(t) or pa.types.is_duration(t) or pa.types.is_interval(t) or pa.types.is_union(t):
        _unsupported(t, column)
    return t


def _unsupported(t: pa.DataType, column: str) -> pa.DataType:
    raise RequestError(f"column {column!r} has type {t}, which an Iceberg table cannot store")


def table_arrow_schema(schema: Schema) -> pa.Schema:
    """The Arrow schema a table's rows are written with and served as.

    Timestamps keep the Iceberg type's zone: `timestamptz` is UTC, `timestamp` (as other engines
    may create) stays zone-naive, so writes to such tables store the same values.
    """
    raw = schema_to_pyarrow(schema, include_field_ids=False)
    return pa.schema(
        [
            pa.field(f.name, f.type if pa.types.is_timestamp(f.type) else normalise_type(f.type, f.name), f.nullable)
            for f in raw
        ]
    )


def new_table_schema(stream: pa.Schema, required: Iterable[str]) -> pa.Schema:
    """The schema of a table created from a write stream; key and time columns become required."""
    required = set(required)
    return pa.schema([pa.field(f.name, normalise_type(f.type, f.name), f.name not in required) for f in stream])


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether values of `source` fit `target` without loss (checked again per value on cast)."""
    if source == target or pa.types.is_null(source):
        return True
    if pa.types.is_dictionary(source):
        return _castable(source.value_type, target)
    if pa.types.is_integer(target):
        return pa.types.is_integer(source)
    if pa.types.is_floating(target):
        return pa.types.is_integer(source) or (pa.types.is_floating(source) and source.bit_width <= target.bit_width)
    if pa.types.is_timestamp(target):
        return pa.types.is_timestamp(source)
    if pa.types.is_time(target):
        return pa.types.is_time(source)
    if pa.types.is_decimal(target):
        return pa.types.is_decimal(source) or pa.types.is_integer(source)
    if pa.types.is_string(target):
        return pa.types.is_string(source) or pa.types.is_large_string(source) or pa.types.is_string_view(source)
    if pa.types.is_binary(target):
        return pa.types.is_binary(source) or pa.types.is_large_binary(source) or pa.types.is_binary_view(source)
    if pa.types.is_date(target):
        return pa.types.is_date(source)
    return normalise_type(source, "") == target


class Conformer:
    """Fits each batch of a write stream to the table's schema, or says precisely why it cannot."""

    def __init__(self, target: pa.Schema, stream: pa.Schema):
        unknown = [name for name in stream.names if target.get_field_index(name) < 0]
        if unknown:
            raise RequestError(
                f"column(s) {unknown} are not in the table (columns: {target.names}); pass evolve=true to add them"
            )
        if len(set(stream.names)) != len(stream.names):
            raise RequestError(f"the stream has duplicate column names: {stream.names}")
        self.target = target
        self._sources: list[int | None] = []
        for f in target:
            index = stream.get_field_index(f.name)
            if index < 0:
                if not f.nullable:
                    raise RequestError(f"required column {f.name!r} is missing from the stream")
                self._sources.append(None)
                continue
            source = stream.field(index).type
            if not _castable(source, f.type):
                raise RequestError(f"column {f.name!r} has type {source} but the table stores {f.type}")
            self._sources.append(index)

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        columns = []
        for f, index in zip(self.target, self._sources, strict=True):
            if index is None:
                columns.append(pa.nulls(batch.num_rows, f.type))
                continue
            column = batch.column(index)
            if pa.types.is_dictionary(column.type):
                column = dictionary_values(column)  # a cast cannot decode polars' dictionary<string_view>
            if column.type != f.type:
                try:
                    # Timestamps are truncated to microseconds (Iceberg's precision); all else is safe.
                    column = pc.cast(column, f.type, safe=not pa.types.is_timestamp(f.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise RequestError(f"column {f.name!r}: cannot store {column.type} as {f.type}: {exc}") from None
            if not f.nullable and column.null_count:
                raise RequestError(f"column {f.name!r} is required but has {column.null_count} null value(s)")
            columns.append(column)
        return pa.RecordBatch.from_arrays(columns, schema=self.target)
