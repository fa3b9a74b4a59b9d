"""What the client accepts as rows, and how it becomes Arrow: the one place that decides it.

Every method taking data (`write`, training-set entity rows, online keys, `delete` keys) reads it
through these functions, so each accepts the same things:

* anything that exports Arrow's C stream (`__arrow_c_stream__`: polars DataFrames, DuckDB
  relations, nanoarrow, pyarrow) or C array (`__arrow_c_array__`), without copying;
* pyarrow Tables, RecordBatches and RecordBatchReaders;
* pandas DataFrames. A named index (`set_index("driver_id")`) becomes columns again, since it
  usually holds keys; an unnamed one (the default range, or what a filter or slice leaves) is
  dropped, as it holds only row positions;
* a dict of column lists (`{"driver_id": [1, 2]}`) and a list of row dicts (`[{"driver_id": 1}]`);
* a named pandas or polars Series (`df["driver_id"]`): one column of that name.

Readers and C streams are streamed where the call can stream (writes, training-set entity rows),
never collected into one table. Nothing here imports pandas: a DataFrame given means it is loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from flight_server.wire.reads import dictionary_values

BATCH_ROWS = 65_536  # rows per batch sent: small enough for gRPC's message limits


def name_list(names: str | Sequence[str], what: str = "features") -> list[str]:
    """A list of names; one name given as a string means that name, not its characters."""
    if isinstance(names, str):
        return [names]
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a string or a list of strings, got {names!r}")
    return list(names)


def is_stream(data: Any) -> bool:
    """Whether `data` is read once as a stream (a reader, a DuckDB relation...), not held in memory."""
    if isinstance(data, pa.RecordBatchReader):
        return True
    return hasattr(data, "__arrow_c_stream__") and not _in_memory(data)


def python_columns(data: Any) -> dict[str, list[Any]] | None:
    """Rows given as Python values (a dict of columns or a list of row dicts) as column lists; None
    for every other input. These can travel inline as JSON, where the server types them."""
    if isinstance(data, Mapping):
        columns = [_is_column(values) for values in data.values()]
        if data and not any(columns):  # one row: {"driver_id": 1001}
            return {str(name): [value] for name, value in data.items()}
        if not all(columns):
            single = [name for name, column in zip(data, columns, strict=True) if not column]
            raise TypeError(f"give every column of the rows as a list (or all as single values, for one row): {single}")
        return {str(name): values if isinstance(values, list) else list(values) for name, values in data.items()}
    if isinstance(data, list) and data and all(isinstance(row, Mapping) for row in data):
        names = list(dict.fromkeys(name for row in data for name in row))
        return {str(name): [row.get(name) for row in data] for name in names}
    return None


def stream(data: Any) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and batches of `data`, read as they are sent (readers and C streams stay streams)."""
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, _sized(data)
    if is_stream(data):
        reader = pa.RecordBatchReader.from_stream(data)
        return reader.schema, _sized(reader)
    table = to_table(data)
    return table.schema, iter(table.to_batches(max_chunksize=BATCH_ROWS))


def to_table(data: Any) -> pa.Table:
    """`data` whole, as one Arrow table (streams are read to their end)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if _is_pandas(data):
        return _from_pandas(data)
    if _is_series(data):  # one named column (`df["driver_id"]`): a table of it
        return pa.table({str(data.name): pa.array(data)})
    columns = python_columns(data)
    if columns is not None:
        try:
            if isinstance(data, list):  # every row's names (`python_columns`): pyarrow's from_pylist takes the first's
                return pa.table(columns)
            if all(_is_column(values) for values in data.values()):
                return pa.table(dict(data))  # NumPy arrays and Series without a detour through Python values
            return pa.table(columns)  # one row
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise TypeError(f"the rows cannot be read as Arrow columns: {exc}") from None
    if hasattr(data, "__arrow_c_stream__") or hasattr(data, "__arrow_c_array__"):
        return pa.table(data)
    if isinstance(data, list) and not data:
        raise ValueError("no rows given (an empty list)")
    raise TypeError(
        "expected rows as a polars or pandas DataFrame, a DuckDB relation, an Arrow Table, RecordBatch or "
        f"RecordBatchReader (anything with __arrow_c_stream__), a dict of lists or a list of dicts; got {type(data)}"
    )


def null_float_keys(table: pa.Table, keys: Sequence[str] | None = None) -> str | None:
    """The first of `keys` (default: every column) that is a float column with nulls: integer keys with a
    missing value, which pandas stores as floats (NaN), so they would reach the server as 'double' keys."""
    for name in keys if keys is not None else table.column_names:
        if name in table.column_names:
            column = table.column(name)
            if pa.types.is_floating(column.type) and column.null_count:
                return name
    return None


def null_keys_message(name: str, kind: pa.DataType) -> str:
    return (
        f"key column {name!r} has nulls, which turned its integers into {kind} (pandas stores a missing "
        "integer as NaN): drop those rows, or use pandas' nullable 'Int64' dtype"
    )


def _is_column(values: Any) -> bool:
    """A list, tuple, NumPy array, Series or Arrow array: not a single value (a string is one value)."""
    return hasattr(values, "__len__") and not isinstance(values, (str, bytes, Mapping))


def _sized(batches: Iterator[pa.RecordBatch] | pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """Batches cut to at most BATCH_ROWS rows (zero-copy slices), as they come."""
    for batch in batches:
        if batch.num_rows <= BATCH_ROWS:
            yield batch
        else:
            for offset in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(offset, BATCH_ROWS)


def _in_memory(data: Any) -> bool:
    """Tables and data frames export a C stream too, but are held in memory: they can be sliced."""
    if isinstance(data, (pa.Table, pa.RecordBatch)) or _is_pandas(data):
        return True
    polars = sys.modules.get("polars")
    return polars is not None and isinstance(data, polars.DataFrame)


def _is_pandas(data: Any) -> bool:
    pd = sys.modules.get("pandas")  # a DataFrame given means pandas is imported
    return pd is not None and isinstance(data, pd.DataFrame)


def decoded(table: pa.Table) -> pa.Table:
    """`table` with its dictionary-encoded columns (pandas' `category`, polars' `Categorical`) as their values
    (`dictionary_values`): online keys are compared by value, and the server keys its tables by plain types."""
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, dictionary_values(table.column(i)))
    return table


def _is_series(data: Any) -> bool:
    """A pandas or polars Series with a name (the column it was taken from)."""
    kind = type(data)
    return kind.__name__ == "Series" and kind.__module__.split(".")[0] in ("pandas", "polars") and bool(data.name)


def _from_pandas(frame: Any) -> pa.Table:
    """A DataFrame's columns, with the named levels of its index as columns (unless a column already
    has that name: `set_index(..., drop=False)`); unnamed levels hold positions and are dropped."""
    named = [name for name in frame.index.names if name is not None and name not in frame.columns]
    if named:
        frame = frame.reset_index(level=named)
    return pa.Table.from_pandas(frame, preserve_index=False)
