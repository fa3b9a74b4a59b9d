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
    positions = None  # the same positions for the same row count: the same files for the same rows
    if rows > SAMPLE_ROWS:
        positions = np.sort(np.random.default_rng(rows).choice(rows, SAMPLE_ROWS, replace=False))
    columns = table.columns
    plain: dict[int, bool] = {}
    for i, column in enumerate(columns):
        if _zero_copy(column):  # sampled in numpy, without an Arrow take
            values = column.chunk(0).to_numpy()
            values = values if positions is None else values[positions]
            plain[i] = _plain_numbers(values, len(values), column.type, rows, limit_bytes)
    rest = [i for i in range(len(columns)) if i not in plain]
    for i, sample in zip(rest, _samples(table.select(rest), positions), strict=True):
        plain[i] = _plain(sample, rows, limit_bytes)
    keep = [f.name for i, f in enumerate(table.schema) if not plain[i]]
    return True if len(keep) == table.num_columns else keep


def _zero_copy(column: pa.ChunkedArray) -> bool:
    """Whether a column's values are a numpy array as they are: numbers and timestamps in one chunk, without
    nulls."""
    kind = column.type
    return (
        column.num_chunks == 1
        and column.null_count == 0
        and (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_timestamp(kind))
    )


def _samples(table: pa.Table, positions: np.ndarray | None) -> list[pa.ChunkedArray]:
    """`table`'s columns at `positions` (every row when None)."""
    if positions is None:
        return table.columns
    if all(column.num_chunks == 1 for column in table.columns):  # one take for every column
        return table.take(pa.array(positions)).columns
    return [_sample(column, positions) for column in table.columns]


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
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind):
        if sample.null_count and not pa.types.is_floating(kind):  # a float's nulls become NaNs
            sample = sample.drop_null()
        return _plain_numbers(sample.to_numpy(), size, kind, rows, limit_bytes)
    if sample.null_count:
        sample = sample.drop_null()
    if (
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
        return _plain_counts(counts, size, width, rows, limit_bytes)
    return False


def _plain_numbers(values: np.ndarray, size: int, kind: pa.DataType, rows: int, limit_bytes: int) -> bool:
    """`_plain` for numbers, dates and times: `values` the sample's non-null ones (NaNs among them), of `size`
    sampled. Sorting them beats hashing; the sort is most of the cost, and 4-byte values sort in half the time of
    8-byte ones: 8-byte values are sorted as 4-byte keys where that is exact (`_narrowed`), and are plain at once if
    4-byte hashes of them all differ (`_hashes_differ`)."""
    if values.dtype.kind == "f":
        values = values[~np.isnan(values)]
    if len(values) < LEAST_VALUES:
        return False
    narrowed = _narrowed(values)
    if narrowed is not None:
        values = narrowed
    elif values.dtype.kind in "iufmM" and values.itemsize == 8 and _hashes_differ(values):
        return True  # no value repeats in the sample: the values barely repeat in the file (a quick way out)
    values = np.sort(values)
    differs = values[1:] != values[:-1]
    if differs.all():
        return True
    starts = np.flatnonzero(np.concatenate(([True], differs)))
    counts = np.diff(np.append(starts, len(values)))
    return _plain_counts(counts, size, kind.bit_width / 8, rows, limit_bytes)  # as Parquet stores it (a date: 4 bytes)


_NOT_A_TIME = np.iinfo(np.int64).min  # numpy's NaT, which equals nothing, not even itself


def _narrowed(values: np.ndarray) -> np.ndarray | None:
    """8-byte integers, dates or times (no NaT) as their distance from the least of them, when every distance fits
    4 bytes: equal exactly where the values are, half as long to sort. None otherwise."""
    if values.dtype.kind not in "iumM" or values.itemsize != 8:
        return None
    times = values.dtype.kind in "mM"
    if times:
        values = values.view(np.int64)
    low, high = values.min(), values.max()
    if int(high) - int(low) >= 1 << 32 or (times and low == _NOT_A_TIME):
        return None
    return (values - low).astype(np.uint32)


_MIX = np.uint64(0x9E3779B97F4A7C15)  # 2**64 over the golden ratio: Fibonacci hashing, near values hash far apart


def _hashes_differ(values: np.ndarray) -> bool:
    """Whether 4-byte hashes of `values` (8 bytes each, no NaN) all differ, which proves the values all differ.
    Equal values hash alike (-0.0 made 0.0 first); two hashes that collide say nothing (false then: the values are
    judged exactly)."""
    if values.dtype.kind == "f":
        values = values + 0.0  # -0.0 + 0.0 is 0.0
    hashes = np.sort(((values.view(np.uint64) * _MIX) >> 32).astype(np.uint32))
    return not (hashes[1:] == hashes[:-1]).any()


def _plain_counts(counts: np.ndarray, size: int, width: float, rows: int, limit_bytes: int) -> bool:
    """`_plain` from how often each distinct value is used in a sample of `size` values (nulls and NaNs among
    them, not counted), each stored in `width` bytes."""
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
