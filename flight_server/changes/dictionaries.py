"""Which columns of a data file get a Parquet dictionary: those whose values repeat.

Arrow's Parquet writer dictionary-encodes every column until the dictionary outgrows `write.parquet.dict-size-bytes`.
A column of distinct values (continuous features, timestamps, fine-grained ids) is hashed value by value and then
continues plain anyway, or, in a file whose column fits the limit, is stored as a dictionary as large as its values
plus the indices on top. Iceberg's Java writer (parquet-mr) drops a dictionary once its first page shows it makes
the page no smaller; this decides the same before writing, from a sample of the file's rows: a column whose sampled
values are all, or nearly all, distinct is written plain, and every other column keeps its dictionary (and the
table's limit). The values read back are the same either way; only the encoding differs. Measured in
docs/benchmarks.md (Parquet settings).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_ROWS = 2048  # rows a file's columns are judged on (all of them in a smaller file)
LEAST_VALUES = 1024  # non-null values a column needs in the sample to be judged; with fewer it keeps its dictionary
DISTINCT_SHARE = 0.98  # of the sampled values distinct: the column is written plain


def dictionary_columns(table: pa.Table) -> bool | list[str]:
    """pyarrow.parquet's `use_dictionary` for a file of `table`'s rows: True (every column, Arrow's default) or the
    columns that keep a dictionary. Only flat tables are judged (a dictionary list names columns by dotted paths)."""
    rows = table.num_rows
    if rows < LEAST_VALUES or any(pa.types.is_nested(f.type) or "." in f.name for f in table.schema):
        return True
    if rows > SAMPLE_ROWS:  # the same positions for the same row count: the same files for the same rows
        positions = np.sort(np.random.default_rng(rows).choice(rows, SAMPLE_ROWS, replace=False))
        table = table.take(pa.array(positions))
    keep = [f.name for f, column in zip(table.schema, table.columns, strict=True) if not _distinct(column)]
    return True if len(keep) == table.num_columns else keep


def _distinct(column: pa.ChunkedArray) -> bool:
    """Whether a sample's values are (nearly) all distinct, nulls and NaNs aside (a NaN or null is one repeated value
    to a dictionary). Only the types a dictionary serves are judged: numbers, text, bytes, dates and times."""
    kind = column.type
    if column.null_count:
        column = column.drop_null()
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind):
        values = column.to_numpy()  # no copy for a chunk of numbers without nulls; sorting them beats hashing
        if pa.types.is_floating(kind):
            values = values[~np.isnan(values)]
        if len(values) < LEAST_VALUES:
            return False
        values = np.sort(values)
        distinct = 1 + int(np.count_nonzero(values[1:] != values[:-1]))
    elif (
        pa.types.is_decimal(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind))
    ):
        if len(column) < LEAST_VALUES:
            return False
        values, distinct = column, pc.count_distinct(column).as_py()
    else:
        return False
    return distinct >= DISTINCT_SHARE * len(values)
