"""`dictionary_columns` decides as the plain per-column judgement it replaced (kept below as the reference): the
same columns keep a dictionary, for every mix of types, nulls, NaNs, signed zeros, repeats and chunks."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flight_server.changes import dictionaries
from flight_server.changes.dictionaries import (
    LEAST_REPEATS,
    LEAST_VALUES,
    SAMPLE_ROWS,
    _decimal_width,
    _distinct_values,
    dictionary_columns,
)

LIMITS = [4 << 10, 64 << 10, 256 << 10, 2 << 20]
INT64_MIN = np.iinfo(np.int64).min  # a timestamp numpy reads as NaT, which equals nothing


def reference_columns(table: pa.Table, limit_bytes: int) -> bool | list[str]:
    """`dictionary_columns` as it was: each sampled column sorted (or counted) on its own."""
    rows = table.num_rows
    if rows < LEAST_VALUES or any(pa.types.is_nested(f.type) or "." in f.name for f in table.schema):
        return True
    columns = table.columns
    if rows > SAMPLE_ROWS:
        positions = np.sort(np.random.default_rng(rows).choice(rows, SAMPLE_ROWS, replace=False))
        columns = [_reference_sample(column, positions) for column in columns]
    keep = [
        f.name
        for f, column in zip(table.schema, columns, strict=True)
        if not _reference_plain(column, rows, limit_bytes)
    ]
    return True if len(keep) == table.num_columns else keep


def _reference_sample(column: pa.ChunkedArray, positions: np.ndarray) -> pa.ChunkedArray:
    starts = np.cumsum([0, *(len(chunk) for chunk in column.chunks)])
    chunk_of = np.searchsorted(starts, positions, side="right") - 1
    taken = [column.chunk(i).take(pa.array(positions[chunk_of == i] - starts[i])) for i in np.unique(chunk_of).tolist()]
    return pa.chunked_array(taken, column.type)


def _reference_plain(sample: pa.ChunkedArray, rows: int, limit_bytes: int) -> bool:
    kind, size = sample.type, len(sample)
    if sample.null_count:
        sample = sample.drop_null()
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind):
        values = sample.to_numpy()
        if pa.types.is_floating(kind):
            values = values[~np.isnan(values)]
        if len(values) < LEAST_VALUES:
            return False
        values = np.sort(values)
        differs = values[1:] != values[:-1]
        if differs.all():
            return True
        starts = np.flatnonzero(np.concatenate(([True], differs)))
        counts = np.diff(np.append(starts, len(values)))
        width = kind.bit_width / 8
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
        else:
            width = 4 + pc.sum(pc.binary_length(sample)).as_py() / len(sample)
    else:
        return False
    valid = rows * int(counts.sum()) / size
    distinct = len(counts) if rows <= SAMPLE_ROWS else _distinct_values(counts, valid)
    return valid / distinct < LEAST_REPEATS or distinct * width > limit_bytes


KINDS: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "int32": pa.int32(),
    "uint64": pa.uint64(),
    "int8": pa.int8(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "timestamp": pa.timestamp("us", "UTC"),
    "timestamp_ns": pa.timestamp("ns"),
    "date32": pa.date32(),
    "date64": pa.date64(),
    "duration": pa.duration("us"),
    "time64": pa.time64("us"),
    "string": pa.string(),
    "large_string": pa.large_string(),
    "binary": pa.binary(),
    "fixed": pa.binary(16),
    "decimal": pa.decimal128(12, 2),
    "bool": pa.bool_(),
}
# How a column's values are drawn: from `cardinality` values spread over a range that fits 4 bytes or spans all 8,
# around zero (floats: signed zeros), pairs 2**32 apart, extremes (the least int64: NaT for a time), or values whose
# 4-byte hashes (`dictionaries._MIX`) all collide.
SCHEMES = ["narrow", "wide", "zeros", "pairs", "extremes", "collide"]
_UNMIX = pow(int(dictionaries._MIX), -1, 1 << 64)


def _integers(rng: np.random.Generator, scheme: str, rows: int, cardinality: int) -> np.ndarray:
    """`rows` int64s from `cardinality` distinct ones (at most), drawn as `scheme` says."""
    if scheme == "narrow":
        pool = rng.integers(-(1 << 31), 1 << 31, cardinality)
    elif scheme == "wide":
        pool = rng.integers(INT64_MIN, np.iinfo(np.int64).max, cardinality, endpoint=True)
    elif scheme == "zeros":
        pool = np.arange(cardinality) - cardinality // 2
    elif scheme == "pairs":
        low = rng.integers(0, 1 << 20, -(-cardinality // 2))
        pool = np.concatenate((low, low + (1 << 32)))  # equal in their low 4 bytes
    elif scheme == "extremes":
        pool = np.concatenate(([INT64_MIN, np.iinfo(np.int64).max], rng.integers(0, 1 << 20, cardinality)))
    else:
        hashes = (int(rng.integers(0, 1 << 32)) << 32) + np.arange(cardinality, dtype=object)
        pool = np.array([int(h * _UNMIX % (1 << 64)) for h in hashes], dtype=np.uint64).view(np.int64)
    return pool[rng.integers(0, len(pool), rows)] if cardinality < rows else rng.permutation(pool)[:rows]


def _column(rng: np.random.Generator, kind: str, scheme: str, rows: int, cardinality: int, nulls: float) -> pa.Array:
    ints = _integers(rng, scheme, rows, max(1, min(cardinality, rows)))
    mask = rng.random(rows) < nulls if nulls else None
    kind_of = KINDS[kind]
    values: Any
    if kind in ("int64", "timestamp", "timestamp_ns", "duration", "date64"):
        return pa.array(ints, pa.int64(), mask=mask).cast(kind_of)
    if kind == "uint64":
        return pa.array(ints.view(np.uint64), kind_of, mask=mask)
    if kind == "time64":
        return pa.array(ints % 86_400_000_000, pa.int64(), mask=mask).cast(kind_of)
    if kind in ("int32", "int8", "date32"):
        small = ints % (100_000 if kind == "date32" else 1 << (kind_of.bit_width - 1))
        return pa.array(small.astype(np.int32), pa.int32(), mask=mask).cast(kind_of)
    if kind in ("float64", "float32"):
        values = ints.astype(np.float64) / 8 if scheme != "wide" else ints.view(np.float64)
        if scheme == "zeros":  # zeros of either sign, which are equal
            values = np.where(values == 0, np.where(rng.random(rows) < 0.5, -0.0, 0.0), values)
        values[rng.random(rows) < nulls / 2] = np.nan  # NaNs as well as nulls
        with np.errstate(over="ignore", invalid="ignore"):  # wide float64s past float32's range: infinities
            return pa.array(values.astype(kind_of.to_pandas_dtype()), kind_of, mask=mask)
    if kind == "decimal":
        return pa.array([Decimal(int(i) % 10**10) / 100 for i in ints], kind_of, mask=mask)
    if kind == "bool":
        return pa.array(ints % 2 == 0, kind_of, mask=mask)
    strings = [f"v{i}" for i in ints.tolist()]
    if kind == "fixed":
        return pa.array([s.encode().ljust(16, b"-")[:16] for s in strings], kind_of, mask=mask)
    if kind == "binary":
        return pa.array([s.encode() for s in strings], kind_of, mask=mask)
    return pa.array(strings, kind_of, mask=mask)


COLUMN = st.tuples(
    st.sampled_from(sorted(KINDS)),
    st.sampled_from(SCHEMES),
    st.sampled_from([1, 2, 30, 500, 1_000, 2_000, 4_000, 10**9]),  # distinct values
    st.sampled_from([0.0, 0.0, 0.01, 0.3, 0.6]),  # nulls
)
ROWS = st.one_of(
    st.sampled_from([LEAST_VALUES - 1, LEAST_VALUES, LEAST_VALUES + 1, SAMPLE_ROWS - 1, SAMPLE_ROWS, SAMPLE_ROWS + 1]),
    st.integers(LEAST_VALUES, 3 * SAMPLE_ROWS),
    st.integers(3 * SAMPLE_ROWS, 30_000),
)


@settings(max_examples=300, deadline=None)
@given(
    columns=st.lists(COLUMN, min_size=1, max_size=6),
    rows=ROWS,
    offset=st.sampled_from([0, 0, 3]),
    chunks=st.sampled_from([1, 1, 2, 7]),
    limit=st.sampled_from(LIMITS),
    seed=st.integers(0, 2**32 - 1),
)
def test_decisions_match_the_per_column_reference(
    columns: list[tuple[str, str, int, float]], rows: int, offset: int, chunks: int, limit: int, seed: int
) -> None:
    """Random tables, sliced (an offset into their buffers) and in several chunks (a put's batches as they came)."""
    rng = np.random.default_rng(seed)
    arrays = {
        f"c{i}_{kind}": _column(rng, kind, scheme, rows + offset, cardinality, nulls)
        for i, (kind, scheme, cardinality, nulls) in enumerate(columns)
    }
    table = pa.table(arrays).slice(offset)
    if chunks > 1:
        table = pa.Table.from_batches(table.to_batches(max_chunksize=-(-rows // chunks)))
    assert dictionary_columns(table, limit) == reference_columns(table, limit)


def _sampled(rows: int) -> np.ndarray:
    return np.sort(np.random.default_rng(rows).choice(rows, SAMPLE_ROWS, replace=False))


@pytest.mark.parametrize("kind", [pa.float64(), pa.float32()])
def test_zeros_of_either_sign_are_one_repeated_value(kind: pa.DataType) -> None:
    """In a large file one repeat in the sample means the values repeat enough for a dictionary: a sample of
    distinct floats but for a 0.0 and a -0.0 (equal) keeps it; without them the column is plain."""
    rows, limit = 400_000, 8 << 20
    values = np.arange(rows, dtype=np.float64) + 0.5
    table = pa.table({"c": pa.array(values.astype(kind.to_pandas_dtype()), kind)})
    assert dictionary_columns(table, limit) == reference_columns(table, limit) == []
    values[_sampled(rows)[:2]] = [0.0, -0.0]
    table = pa.table({"c": pa.array(values.astype(kind.to_pandas_dtype()), kind)})
    assert dictionary_columns(table, limit) == reference_columns(table, limit) is True


@pytest.mark.parametrize("rows", [SAMPLE_ROWS, 400_000])
def test_values_whose_hashes_collide_are_judged_exactly(rows: int) -> None:
    """Distinct int64s and timestamps whose 4-byte hashes are all one: still plain, as the reference says."""
    hashes = [(7 << 32) + i for i in range(rows)]
    values = np.array([h * _UNMIX % (1 << 64) for h in hashes], dtype=np.uint64).view(np.int64)
    table = pa.table({"i": values, "t": pa.array(values).cast(pa.timestamp("us"))})
    assert dictionary_columns(table, 2 << 20) == reference_columns(table, 2 << 20) == []


def test_times_numpy_reads_as_not_a_time_differ_from_each_other() -> None:
    """The least int64 as a timestamp is NaT to numpy, which equals nothing: many of them among times just after it
    do not make a repeated value (as in the reference), though as integers they do."""
    values = INT64_MIN + np.arange(3_000, dtype=np.int64)
    values[::2] = INT64_MIN
    table = pa.table({"t": pa.array(values).cast(pa.timestamp("us")), "i": values})
    assert dictionary_columns(table, 2 << 20) == reference_columns(table, 2 << 20) == ["i"]


def test_numbers_are_sampled_across_the_file_from_its_own_rows() -> None:
    """Numbers are sampled from the column's buffer directly, at the sample's positions past the slice's offset: a
    file whose first rows are distinct but most of whose rows repeat keeps its dictionary."""
    values = np.concatenate((np.arange(10**6, 10**6 + 5_000), np.repeat(np.arange(1_500), 4)))
    table = pa.table({"i": values, "t": pa.array(np.zeros(len(values), np.int64)).cast(pa.timestamp("us", "UTC"))})
    part = table.slice(1_000)
    assert dictionary_columns(part, 2 << 20) == reference_columns(part, 2 << 20) is True
    assert dictionary_columns(table.slice(0, 3_000), 2 << 20) == reference_columns(table.slice(0, 3_000), 2 << 20)
    assert dictionary_columns(table.slice(0, 3_000), 2 << 20) == ["t"]
