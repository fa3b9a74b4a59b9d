"""Which columns of a data file get a Parquet dictionary: those it pays for.

Arrow's Parquet writer dictionary-encodes every column until the dictionary outgrows `write.parquet.dict-size-bytes`.
A column of distinct values (continuous features, timestamps, fine-grained ids) is hashed value by value and then
continues plain anyway, or, in a file whose column fits the limit, is stored as a dictionary as large as its values
plus the indices on top. Iceberg's Java writer (parquet-mr) drops a dictionary once its first page shows it makes
the page no smaller; this decides the same before writing, from a sample of the file's rows: a column is written
plain when its values barely repeat, or when its distinct values would outgrow the dictionary limit (Arrow would
fall back after hashing a limit's worth of them). Every other column keeps its dictionary. The values read back are
the same either way; only the encoding differs. Measured in docs/benchmarks.md (Writes).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SAMPLE_ROWS = 2048  # rows a file's columns are judged on (all of them in a smaller file)
LEAST_VALUES = 1024  # non-null values a column needs in the sample to be judged; with fewer it keeps its dictionary
LEAST_REPEATS = 1.1  # times a value is used on average, at least, for a dictionary to pay


def dictionary_columns(table: pa.Table, limit_bytes: int) -> bool | list[str]:
    """pyarrow.parquet's `use_dictionary` for a file of `table`'s rows whose dictionaries stop at `limit_bytes` a
    column chunk: True (every column, Arrow's default) or the columns that keep a dictionary. Only flat tables are
    judged (a dictionary list names columns by dotted paths)."""
    rows = table.num_rows
    if rows < LEAST_VALUES or any(pa.types.is_nested(f.type) or "." in f.name for f in table.schema):
        return True
    columns = table.columns
    if rows > SAMPLE_ROWS:  # the same positions for the same row count: the same files for the same rows
        positions = np.sort(np.random.default_rng(rows).choice(rows, SAMPLE_ROWS, replace=False))
        if all(column.num_chunks == 1 for column in columns):  # one take for every column
            columns = table.take(pa.array(positions)).columns
        else:
            columns = [_sample(column, positions) for column in columns]
    keep = [f.name for f, column in zip(table.schema, columns, strict=True) if not _plain(column, rows, limit_bytes)]
    return True if len(keep) == table.num_columns else keep


def _sample(column: pa.ChunkedArray, positions: np.ndarray) -> pa.ChunkedArray:
    """The values at `positions` (sorted), taken chunk by chunk: a take on a column of many chunks (a put's batches
    as they came) would first copy it whole into one."""
    starts = np.cumsum([0, *(len(chunk) for chunk in column.chunks)])
    chunk_of = np.searchsorted(starts, positions, side="right") - 1
    taken = [column.chunk(i).take(pa.array(positions[chunk_of == i] - starts[i])) for i in np.unique(chunk_of).tolist()]
    return pa.chunked_array(taken, column.type)


def _plain(sample: pa.ChunkedArray, rows: int, limit_bytes: int) -> bool:
    """Whether a column is better written without a dictionary, from a sample of its values (all of them when the
    file has as many rows as the sample): nulls and NaNs aside (each one repeated value to a dictionary), the
    file's distinct values are estimated from how often the sampled ones repeat (`_distinct_values`), and the
    dictionary pays if values repeat and fit the limit. Only the types a dictionary serves are judged: numbers,
    text, bytes, dates and times."""
    kind, size = sample.type, len(sample)
    if sample.null_count:
        sample = sample.drop_null()
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind):
        values = sample.to_numpy()  # no copy for a chunk of numbers; sorting them beats hashing
        if pa.types.is_floating(kind):
            values = values[~np.isnan(values)]
        if len(values) < LEAST_VALUES:
            return False
        values = np.sort(values)
        differs = values[1:] != values[:-1]
        if differs.all():  # no value repeats in the sample: the values barely repeat in the file (a quick way out)
            return True
        starts = np.flatnonzero(np.concatenate(([True], differs)))
        counts = np.diff(np.append(starts, len(values)))
        width = kind.bit_width / 8  # as Parquet stores it (a date is 4 bytes, numpy's 8)
    elif (
        pa.types.is_decimal(kind)
        or pa.types.is_fixed_size_binary(kind)
        or pa.types.is_string(kind)
        or (pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))
    ):
        if len(sample) < LEAST_VALUES:
            return False
        counts = pc.value_counts(sample).field("counts").to_numpy()
        if pa.types.is_decimal(kind):
            width = _decimal_width(kind.precision)
        elif pa.types.is_fixed_size_binary(kind):
            width = float(kind.byte_width)
        else:  # a PLAIN value: its length, its bytes
            width = 4 + pc.sum(pc.binary_length(sample)).as_py() / len(sample)
    else:
        return False
    valid = rows * int(counts.sum()) / size
    distinct = len(counts) if rows <= SAMPLE_ROWS else _distinct_values(counts, valid)
    return valid / distinct < LEAST_REPEATS or distinct * width > limit_bytes


def _decimal_width(precision: int) -> float:
    """Bytes a decimal takes in the server's files (`store_decimal_as_integer`): an int32 up to 9 digits, an int64 up
    to 18, else the fewest bytes that hold the precision."""
    if precision <= 9:
        return 4.0
    if precision <= 18:
        return 8.0
    return float(math.ceil((precision * math.log2(10) + 1) / 8))


def _distinct_values(counts: np.ndarray, valid: float) -> float:
    """The distinct values among `valid` values, from a sample's counts of each value it holds. With few repeats in
    the sample, from how often two sampled values are equal (about (repeats - 1) / valid of the pairs); with many,
    the values seen plus those the values seen once and twice say were missed (Chao1 for a sample drawn without
    replacement, Chao and Lin 2012, bias-corrected: the sampled share `q` of the rows corrects it for large
    samples), at most `valid`."""
    sampled, seen = int(counts.sum()), len(counts)
    repeated = sampled - seen
    if repeated * 8 <= sampled:
        return valid / (1 + 2 * valid * repeated / sampled**2)
    once, twice = int(np.count_nonzero(counts == 1)), int(np.count_nonzero(counts == 2))
    q = min(sampled / valid, 0.999)
    missed = once * (once - 1) / (2 * (twice + 1) * sampled / (sampled - 1) + q / (1 - q) * once)  # bias-corrected
    return min(valid, seen + missed)
