"""The write path's files: partitioned exactly as pyiceberg partitions, rows read back as put, and every
`write.parquet.*` table property honoured by the files a put writes."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.io.fileformat import FileFormatFactory
from pyiceberg.io.pyarrow import data_file_statistics_from_parquet_metadata
from pyiceberg.manifest import FileFormat
from pyiceberg.schema import assign_fresh_schema_ids
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata, new_table_metadata
from pyiceberg.table.sorting import UNSORTED_SORT_ORDER
from pyiceberg.types import IntegerType, LongType

from flight_client import FeatureClient, FeatureServerError, InvalidRequestError
from flight_server.base.schemas import new_table_schema, table_arrow_schema
from flight_server.changes.dictionaries import LEAST_VALUES, SAMPLE_ROWS, _distinct_values, dictionary_columns
from flight_server.changes.files import (
    PARQUET_DEFAULTS,
    StatisticsLayout,
    _FileContext,
    file_statistics,
    parquet_options,
    partition_counts,
    partition_values,
    partitioned_rows,
    sort_rows,
)
from flight_server.iceberg.catalog import FeatureSpec, partition_spec
from flight_server.iceberg.internals import partitions, schema_without_ids, to_file_schema
from tests.conftest import local_files, sqlite_catalog, start_server

SPEC = FeatureSpec(("key",), "ts", None, None)
LAYOUTS = [
    ["month(ts)", "bucket(8, key)"],  # the default
    [],
    ["day(ts)"],
    ["year(ts)", "identity(tag)"],
    ["truncate(2, tag)", "hour(ts)"],
]
FALLBACK = ["identity(value)"]  # float partition values (NaN equals nothing): pyiceberg's own partitioning, as is
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def rows_strategy() -> st.SearchStrategy[pa.Table]:
    """Feature rows with repeated keys and times (ties), times on both sides of 1970, null tags and values."""
    row = st.tuples(
        st.integers(0, 40),
        st.integers(-3 * 10**15, 3 * 10**15),  # microseconds: about 1875 to 2065
        st.one_of(st.none(), st.sampled_from(["a", "ab", "abc", "b", "zz"])),
        st.one_of(st.none(), st.floats(allow_nan=False, width=32)),
    )
    return st.lists(row, min_size=1, max_size=300).map(
        lambda rows: pa.table(
            {
                "key": pa.array([r[0] for r in rows], pa.int64()),
                "ts": pa.array([r[1] for r in rows], pa.int64()).cast(pa.timestamp("us", "UTC")),
                "tag": pa.array([r[2] for r in rows], pa.string()),
                "value": pa.array([r[3] for r in rows], pa.float64()),
            }
        )
    )


def _metadata(layout: list[str], arrow: pa.Schema) -> TableMetadata:
    schema = assign_fresh_schema_ids(schema_without_ids(new_table_schema(arrow, required=("key", "ts"))))
    return new_table_metadata(schema, partition_spec(layout, schema), UNSORTED_SORT_ORDER, "file:///nowhere", {})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=rows_strategy(),
    layout=st.sampled_from([*LAYOUTS, FALLBACK]),
    sort=st.booleans(),
    split=st.integers(1, 4),
)
def test_partitions_are_pyiceberg_s_with_the_same_rows_in_the_same_order(
    rows: pa.Table, layout: list[str], sort: bool, split: int
) -> None:
    """The put's partitioning (one sort, one take) gives what pyiceberg's filter per partition gave the sorted chunk:
    the same partitions, each with the same rows in the same order."""
    metadata = _metadata(layout, rows.schema)
    chunk = pa.Table.from_batches(
        rows.cast(table_arrow_schema(metadata.schema())).to_batches(max(1, len(rows) // split))
    )
    spec = SPEC if sort else None
    ours = partitioned_rows(metadata, chunk, spec)
    if metadata.spec().is_unpartitioned():
        expected = [(None, sort_rows(chunk, spec))]
    else:
        expected = partitions(metadata.spec(), metadata.schema(), sort_rows(chunk, spec))

    def by_path(parts: list[tuple[Any, pa.Table]]) -> dict[str | None, tuple[Any, list[dict[str, Any]]]]:
        # The order of the files does not matter (and pyiceberg's own is not stable for float partitions).
        return {p.to_path() if p else None: (p.partition if p else None, rows.to_pylist()) for p, rows in parts}

    assert len(ours) == len(expected)
    assert by_path(ours) == by_path(expected)


def keyed_rows_strategy() -> st.SearchStrategy[pa.Table]:
    """Rows whose key and time columns pack into one integer (narrow ranges) or not (the whole int64 range, string
    keys), with ties, both sides of 1970, and a small integer `group` (partitions whose first rows tie)."""

    def table(kind: str, rows: list[tuple[int, int, float, int]]) -> pa.Table:
        keys = [r[0] for r in rows]
        key = {
            "narrow": pa.array(keys, pa.int64()),
            "wide": pa.array(keys, pa.int64()),
            "string": pa.array([f"k{k % 1000:03d}" for k in keys]),
            "date": pa.array([k % 100_000 for k in keys], pa.int32()).cast(pa.date32()),
        }[kind]
        ts = pa.array([r[1] for r in rows], pa.int64()).cast(pa.timestamp("us", "UTC"))
        value = pa.array([r[2] for r in rows])
        return pa.table({"key": key, "ts": ts, "value": value, "group": pa.array([r[3] for r in rows], pa.int64())})

    def rows(kind: str) -> st.SearchStrategy[pa.Table]:
        keys = st.integers(-(2**63), 2**63 - 1) if kind == "wide" else st.integers(-50, 50)
        times = st.one_of(st.integers(-(10**12), 10**12), st.integers(-3 * 10**15, 3 * 10**15))  # days, or centuries
        row = st.tuples(keys, times, st.floats(allow_nan=False), st.integers(0, 3))
        tie = st.tuples(st.sampled_from([0, 1]), st.integers(0, 3))  # a row's key and time again, in any group
        repeated = st.lists(row, min_size=1, max_size=200).flatmap(
            lambda base: st.lists(st.tuples(st.sampled_from(base), tie), min_size=1, max_size=300).map(
                lambda picks: [(r[0], r[1], r[2], group if again else r[3]) for r, (again, group) in picks]
            )
        )
        return st.one_of(st.lists(row, min_size=1, max_size=300), repeated).map(lambda r: table(kind, r))

    return st.sampled_from(["narrow", "wide", "string", "date"]).flatmap(rows)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=keyed_rows_strategy(),
    layout=st.sampled_from([*LAYOUTS[:3], ["bucket(4, key)"], ["identity(group)"], ["day(ts)", "identity(group)"]]),
    sort=st.booleans(),
    split=st.integers(1, 4),
)
def test_partitions_and_their_rows_come_in_the_order_of_a_plain_sort(
    rows: pa.Table, layout: list[str], sort: bool, split: int
) -> None:
    """Exactly what a plain stable sort by key and time, then pyiceberg's partitioning gives: the partitions in the
    order of their first rows among the sorted rows, each with its rows in sorted order (the sort as packed integers
    or as Arrow's, whichever the rows allow)."""
    metadata = _metadata(layout, rows.schema)
    chunk = pa.Table.from_batches(
        rows.cast(table_arrow_schema(metadata.schema())).to_batches(max(1, len(rows) // split))
    )
    spec = SPEC if sort else None
    ordered = chunk.add_column(0, "_position", pa.array(range(len(chunk)), pa.int64()))
    if spec is not None:
        keys = [("key", "ascending"), ("ts", "ascending"), ("_position", "ascending")]
        ordered = ordered.take(pc.sort_indices(ordered, sort_keys=keys))
    ordered = ordered.add_column(0, "_rank", pa.array(range(len(chunk)), pa.int64())).drop_columns(["_position"])
    if metadata.spec().is_unpartitioned():
        expected = [(None, ordered)]
    else:
        expected = sorted(
            partitions(metadata.spec(), metadata.schema(), ordered),
            key=lambda part: pc.min(part[1].column("_rank")).as_py(),
        )
    ours = partitioned_rows(metadata, chunk, spec)
    assert [p.to_path() if p else None for p, _ in ours] == [p.to_path() if p else None for p, _ in expected]
    for (_, mine), (_, theirs) in zip(ours, expected, strict=True):
        assert mine.to_pylist() == theirs.sort_by("_rank").drop_columns(["_rank"]).to_pylist()


def test_partitions_whose_first_rows_tie_come_in_the_order_of_those_rows() -> None:
    """Partition 0 holds the first row of the chunk, but partition 1's least row (by key and time) comes before
    partition 0's equal one: sorted, partition 1's rows come first."""
    rows = pa.table(
        {
            "key": pa.array([5, 1, 1], pa.int64()),
            "ts": pa.array([0, 0, 0], pa.timestamp("us", "UTC")),
            "group": pa.array([0, 1, 0], pa.int64()),
        }
    )
    metadata = _metadata(["identity(group)"], rows.schema)
    parts = partitioned_rows(metadata, rows.cast(table_arrow_schema(metadata.schema())), SPEC)
    assert [(p.partition[0] if p else None, r.column("key").to_pylist()) for p, r in parts] == [(1, [1]), (0, [1, 5])]


def test_partitions_far_apart_keep_their_rows_together() -> None:
    """Months 256 apart (partition values of 9 bits) interleaved in key order: each month is one partition."""
    months = [0, 256, 0]
    times = [dt.datetime(1970 + m // 12, m % 12 + 1, 2, tzinfo=dt.timezone.utc) for m in months]
    rows = pa.table({"key": pa.array([1, 2, 3], pa.int64()), "ts": pa.array(times, pa.timestamp("us", "UTC"))})
    metadata = _metadata(["month(ts)"], rows.schema)
    parts = partitioned_rows(metadata, rows.cast(table_arrow_schema(metadata.schema())), SPEC)
    assert [(p.partition[0] if p else None, r.column("key").to_pylist()) for p, r in parts] == [(0, [1, 3]), (256, [2])]


@pytest.mark.parametrize("key_bits", [31, 32])
def test_keys_and_times_that_fill_64_bits_sort_as_arrow_sorts_them(key_bits: int) -> None:
    """Key and time ranges of 31 + 33 bits pack into one integer; 32 + 33 do not, and sorting them as packed would
    lose the key's top bit (the key 2**31 would sort as 0)."""
    keys = [0, 1, 2 ** (key_bits - 1), 2**key_bits - 1]
    times = [0, 2**33 - 1, 5, 0]
    rows = pa.table({"key": pa.array(keys, pa.int64()), "ts": pa.array(times, pa.timestamp("us", "UTC"))})
    expected = rows.sort_by([("key", "ascending"), ("ts", "ascending")])
    assert sort_rows(rows, SPEC).to_pylist() == expected.to_pylist()


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=200),
    int32=st.booleans(),
    buckets=st.one_of(st.integers(1, 20), st.integers(1, 2**31 - 1)),
)
def test_buckets_of_integers_are_iceberg_s(values: list[int], int32: bool, buckets: int) -> None:
    """The bucket partition values of integer columns are what pyiceberg's own transform gives value by value."""
    if int32:
        values = [v % 2**32 - 2**31 for v in values]
    key = pa.array(values, pa.int32() if int32 else pa.int64())
    metadata = _metadata([f"bucket({buckets}, key)"], pa.schema([pa.field("key", key.type)]))
    found = partition_values(metadata, pa.table({"key": key}))
    assert found is not None
    transform = metadata.spec().fields[0].transform.transform(IntegerType() if int32 else LongType())
    assert found.column(0).to_pylist() == [transform(v) for v in values]


@pytest.fixture(scope="module")
def catalog_properties(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("parquet-settings"))


@pytest.fixture(scope="module")
def small_chunks(catalog_properties: dict[str, str]) -> Iterator[str]:
    """A server whose puts write a file set every 1 KiB, in the background while the next chunk arrives."""
    server = start_server(catalog_properties, write_chunk_bytes=1 << 10)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture(scope="module")
def served(catalog_properties: dict[str, str]) -> Iterator[tuple[str, Catalog]]:
    """A server whose puts of a few thousand rows write one chunk, and the catalog it serves."""
    server = start_server(catalog_properties, write_chunk_bytes=64 << 20)
    yield f"grpc://127.0.0.1:{server.port}", load_catalog("default", **catalog_properties)
    server.shutdown()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy(), layout=st.sampled_from(LAYOUTS))
def test_a_put_reads_back_as_put(small_chunks: str, rows: pa.Table, layout: list[str]) -> None:
    location = small_chunks
    name = f"parquet.put_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        batches = pa.RecordBatchReader.from_batches(rows.schema, rows.to_batches(max_chunksize=16))
        client.write(name, batches, entity_keys=["key"], event_time="ts", partition_by=layout)
        back = client.scan(name).read_all()
    order = [("key", "ascending"), ("ts", "ascending"), ("tag", "ascending"), ("value", "ascending")]
    assert back.select(rows.column_names).sort_by(order).to_pylist() == rows.sort_by(order).to_pylist()


def test_a_put_of_many_chunks_commits_every_chunk_s_files(
    small_chunks: str, catalog_properties: dict[str, str]
) -> None:
    """Chunks written in the background while the next arrives: every one's files are committed, once."""
    name = f"parquet.chunks_{uuid.uuid4().hex[:8]}"
    data = _data(3_000)
    with FeatureClient(small_chunks) as client:
        batches = pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=50))
        result = client.write(name, batches, entity_keys=["key"], event_time="ts", partition_by=[])
        assert client.scan(name).read_all().sort_by("value").to_pylist() == data.to_pylist()
    assert result.files >= 20  # a file per chunk of 1 KiB
    assert len(_files(load_catalog("default", **catalog_properties), name)) == result.files


def test_a_put_that_fails_after_background_chunks_leaves_no_file(
    small_chunks: str, catalog_properties: dict[str, str]
) -> None:
    """A stream refused after several chunks were written in the background: their files are deleted, the
    chunk in flight included, and nothing is committed."""
    name = f"parquet.failed_{uuid.uuid4().hex[:8]}"
    data = _data(3_000)
    with FeatureClient(small_chunks) as client:
        client.write(name, data.slice(0, 1), entity_keys=["key"], event_time="ts", partition_by=[])
        location = load_catalog("default", **catalog_properties).load_table(name).location()
        before = local_files(location)
        null_key = pa.record_batch(
            [pa.array([None], pa.int64()), data.column("ts").chunk(0).slice(0, 1), pa.array([1.0])], schema=data.schema
        )

        def batches() -> Iterator[pa.RecordBatch]:
            yield from data.to_batches(max_chunksize=50)
            yield null_key  # the key is required: refused after 60 batches, some 20 chunks of 1 KiB written

        with pytest.raises(InvalidRequestError):
            client.write(name, pa.RecordBatchReader.from_batches(data.schema, batches()))
    assert local_files(location) == before
    assert load_catalog("default", **catalog_properties).load_table(name).scan().to_arrow().num_rows == 1


def _files(catalog: Catalog, name: str) -> list[pq.ParquetFile]:
    table = catalog.load_table(name)
    return [pq.ParquetFile(Path(t.file.file_path.removeprefix("file://"))) for t in table.scan().plan_files()]


def _data(rows: int) -> pa.Table:
    return pa.table(
        {
            "key": pa.array([i % 7 for i in range(rows)], pa.int64()),
            "ts": pa.array([EPOCH + dt.timedelta(seconds=i) for i in range(rows)], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in range(rows)]),
        }
    )


def test_new_tables_get_the_server_s_parquet_defaults(served: tuple[str, Catalog]) -> None:
    location, catalog = served
    name = f"parquet.defaults_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        client.write(name, _data(100), entity_keys=["key"], event_time="ts")
    properties = catalog.load_table(name).properties
    assert {k: properties.get(k) for k in PARQUET_DEFAULTS} == PARQUET_DEFAULTS
    codec = PARQUET_DEFAULTS.get("write.parquet.compression-codec", "zstd").upper()
    for file in _files(catalog, name):
        assert file.metadata.row_group(0).column(0).compression == codec


@pytest.mark.parametrize(
    ("properties", "codec", "groups"),
    [
        ({"write.parquet.compression-codec": "snappy", "write.parquet.row-group-limit": "1000"}, "SNAPPY", 5),
        ({"write.parquet.compression-codec": "uncompressed"}, "UNCOMPRESSED", 1),
        ({"write.parquet.compression-codec": "lz4"}, "LZ4", 1),
        ({"write.parquet.compression-codec": "zstd", "write.parquet.compression-level": "9"}, "ZSTD", 1),
        # 24 bytes of Arrow a row: 4,800 rows in row groups of 2,000 rows' bytes (the smaller of the two caps wins)
        ({"write.parquet.row-group-size-bytes": "48000"}, None, 3),
        ({"write.parquet.row-group-size-bytes": "48000", "write.parquet.row-group-limit": "1200"}, None, 4),
    ],
)
def test_table_properties_set_the_files_a_put_writes(
    served: tuple[str, Catalog], properties: dict[str, str], codec: str | None, groups: int
) -> None:
    location, catalog = served
    name = f"parquet.props_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        client.write(name, _data(1), entity_keys=["key"], event_time="ts", partition_by=[])
        with catalog.load_table(name).transaction() as transaction:
            transaction.set_properties(properties)
        client.write(name, _data(4_800), mode="overwrite")
    [file] = _files(catalog, name)
    assert file.metadata.num_rows == 4_800 and file.metadata.num_row_groups == groups
    if codec is not None:
        assert file.metadata.row_group(0).column(0).compression == codec


def _dictionaries(file: pq.ParquetFile) -> dict[str, bool]:
    group = file.metadata.row_group(0)
    return {group.column(i).path_in_schema: group.column(i).has_dictionary_page for i in range(group.num_columns)}


def test_columns_of_distinct_values_are_written_plain(served: tuple[str, Catalog]) -> None:
    """A put's file keeps a dictionary for the columns whose values repeat, and writes those of distinct values
    plain (`dictionary_columns`); both read back as put."""
    location, catalog = served
    name = f"parquet.plain_{uuid.uuid4().hex[:8]}"
    rows = 5_000
    data = _data(rows).append_column("category", pa.array([i % 5 for i in range(rows)], pa.int64()))
    with FeatureClient(location) as client:
        client.write(name, data, entity_keys=["key"], event_time="ts", partition_by=[])
    [file] = _files(catalog, name)
    assert _dictionaries(file) == {"key": True, "ts": False, "value": False, "category": True}
    back = catalog.load_table(name).scan().to_arrow().sort_by("ts")
    assert back.select(data.column_names).cast(data.schema).equals(data)


def _column(values: list[Any], kind: pa.DataType) -> pa.Table:
    return pa.table({"c": pa.array(values, kind)})


LIMIT = 256 << 10  # the server's dictionary limit


@pytest.mark.parametrize(
    ("values", "kind", "plain"),
    [
        ([i * 0.5 for i in range(3_000)], pa.float64(), True),
        # NaNs and nulls are one repeated value each: the rest still decides
        ([math.nan if i % 10 == 0 else (None if i % 7 == 0 else i / 3) for i in range(3_000)], pa.float64(), True),
        ([float(i % 100) for i in range(3_000)], pa.float32(), False),
        (list(range(10**6, 10**6 + 3_000)), pa.int32(), True),
        ([i // 20 for i in range(3_000)], pa.int64(), False),  # sorted keys, 20 rows each
        ([f"id-{i}" for i in range(3_000)], pa.string(), True),
        ([f"tag-{i % 40}" for i in range(3_000)], pa.large_string(), False),
        ([EPOCH + dt.timedelta(microseconds=i) for i in range(3_000)], pa.timestamp("us", "UTC"), True),
        ([i % 2 == 0 for i in range(3_000)], pa.bool_(), False),  # not a type a dictionary serves: left as Arrow's
        ([None] * 2_990 + [1.0 * i for i in range(10)], pa.float64(), False),  # too few values to judge
        ([math.nan] * 2_990 + [1.0 * i for i in range(10)], pa.float64(), False),
        ([None] * 2_990 + list(range(10)), pa.int64(), False),
        ([i % 2_000 for i in range(3_000)], pa.int64(), False),  # each value 1.5 times: a dictionary still pays
        ([i % 2_000 for i in range(2_000)] * 2, pa.int64(), False),  # each value twice
        (list(range(1_887)) + list(range(113)), pa.int64(), True),  # every row seen: 1.06 uses a value, exactly
    ],
)
def test_dictionaries_are_kept_for_repeated_values(values: list[Any], kind: pa.DataType, plain: bool) -> None:
    decided = dictionary_columns(_column(values, kind).append_column("repeats", pa.array([1] * len(values))), LIMIT)
    assert decided == (["repeats"] if plain else True)


@pytest.mark.parametrize(("limit", "plain"), [(2 << 20, False), (64 << 10, True)])
def test_dictionaries_that_would_outgrow_the_limit_are_not_started(limit: int, plain: bool) -> None:
    """200,000 rows of 25,000 values used 8 times each: 200 KB of dictionary, which pays under a 2 MB limit (the
    Iceberg default) and would be dropped past 64 KB anyway."""
    values = np.random.default_rng(3).permutation(np.repeat(np.arange(25_000, dtype=np.int64) * 7919, 8))
    assert dictionary_columns(pa.table({"c": values, "repeats": np.zeros(len(values))}), limit) == (
        ["repeats"] if plain else True
    )


def _categories(rows: int, values: list[Any], kind: pa.DataType) -> pa.Table:
    picked = np.random.default_rng(1).integers(0, len(values), rows)
    return pa.table({"c": pa.array([values[i] for i in picked], kind)})


@pytest.mark.parametrize(
    "table",
    [
        # a few thousand values, each used dozens of times: their dictionary fits and pays (a file a third the size)
        _categories(400_000, [f"category-{i:06d}-xyzab" for i in range(5_000)], pa.string()),
        # 30,000 prices of 9 digits, stored as 4-byte integers: 120 KB of dictionary, not 480 KB
        _categories(300_000, [Decimal(i) / 100 for i in range(30_000)], pa.decimal128(9, 2)),
        # 40,000 dates, stored as 4 bytes each: 160 KB of dictionary
        _categories(400_000, [dt.date(1900, 1, 1) + dt.timedelta(days=i) for i in range(40_000)], pa.date32()),
    ],
    ids=["strings", "decimals", "dates"],
)
def test_dictionaries_of_values_used_many_times_are_kept(table: pa.Table) -> None:
    assert dictionary_columns(table, LIMIT) is True


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 30_000),
    cardinality=st.sampled_from([1, 3, 50, 500, 2_000, 20_000, 10**9]),
    nulls=st.sampled_from([0.0, 0.2, 0.9]),
    limit=st.sampled_from([4 << 10, 64 << 10, 256 << 10, 2 << 20]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dictionary_decisions_match_the_whole_column_where_clear(
    rows: int, cardinality: int, nulls: float, limit: int, seed: int
) -> None:
    """Against the whole column (a plain reference: its distinct values and how often each is used): a column whose
    values are all distinct, or whose dictionary would be twice the limit, is plain; one whose values are used twice
    or more and whose dictionary fits half the limit keeps it; in between either may happen."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, cardinality, rows).astype(float)
    values[rng.random(rows) < nulls] = np.nan
    column = pa.array(values, from_pandas=True)  # NaN -> null
    valid = column.drop_null()
    distinct = len(set(valid.to_pylist()))
    decided = dictionary_columns(pa.table({"c": column}), limit)
    if len(valid) < LEAST_VALUES:
        assert decided is True
    elif rows > SAMPLE_ROWS and nulls > 0.2:
        pass  # the sample may hold too few values to judge
    elif distinct == len(valid) or distinct * 8 >= 2 * limit:
        assert decided == []
    elif len(valid) >= 2 * distinct and distinct * 8 <= limit / 2:
        assert decided is True


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(SAMPLE_ROWS + 1, 400_000), share=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
@example(rows=336_077, share=0.4293, seed=336_077)  # 236 values seen about 9 times each, 2 of them once
def test_distinct_values_are_estimated_within_half_to_twice(rows: int, share: float, seed: int) -> None:
    """From a sample of a column where each of `distinct` values is used about equally often (the plain reference:
    the column itself), the estimate is within half and twice the truth, from a sample of most of the rows or of a
    tiny part."""
    distinct = max(1, round(rows**share))
    rng = np.random.default_rng(seed)
    column = rng.permutation(np.arange(rows) % distinct)
    sample = np.sort(column[rng.choice(rows, SAMPLE_ROWS, replace=False)])
    counts = np.unique(sample, return_counts=True)[1]
    assert distinct / 2 <= _distinct_values(counts, rows) <= distinct * 2


def test_columns_of_many_chunks_are_sampled_alike() -> None:
    """A put's batches as they came (a table without sorting or partitioning): the same decision as one chunk."""
    rng = np.random.default_rng(5)
    table = pa.table({"f": rng.normal(size=50_000), "c": rng.integers(0, 30, 50_000)})
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=997))
    assert dictionary_columns(chunked, LIMIT) == dictionary_columns(table, LIMIT) == ["c"]


def test_nested_or_dotted_columns_keep_arrow_s_default() -> None:
    """A dictionary list names columns by dotted paths, which a nested or dotted name would not match."""
    floats = [i * 0.5 for i in range(3_000)]
    assert dictionary_columns(pa.table({"a.b": floats}), LIMIT) is True
    assert dictionary_columns(pa.table({"c": floats, "l": [[1.0]] * 3_000}), LIMIT) is True
    assert dictionary_columns(_column(floats[: LEAST_VALUES - 1], pa.float64()), LIMIT) is True


def test_each_property_reaches_the_parquet_writer() -> None:
    """What pyarrow cannot show in a file (page sizes, the dictionary limit) is checked where it is handed over."""
    options = parquet_options(
        {
            "write.parquet.compression-codec": "ZSTD",
            "write.parquet.compression-level": "7",
            "write.parquet.page-size-bytes": "65536",
            "write.parquet.page-row-limit": "5000",
            "write.parquet.dict-size-bytes": "4096",
            "write.parquet.row-group-limit": "1000",
        }
    )
    assert options.writer == {
        "compression": "zstd",
        "compression_level": 7,
        "data_page_size": 65536,
        "max_rows_per_page": 5000,
        "dictionary_pagesize_limit": 4096,
    }
    assert options.rows_per_group(_data(10)) == 1000 and options.row_group_bytes is None
    assert parquet_options({"write.parquet.compression-codec": "uncompressed"}).writer["compression"] == "none"


@pytest.mark.parametrize(
    ("properties", "says"),
    [
        ({"write.parquet.compression-codec": "lzo"}, "write.parquet.compression-codec='lzo' is not one of"),
        ({"write.parquet.compression-codec": "snappy", "write.parquet.compression-level": "3"}, "does not apply"),
        ({"write.parquet.page-size-bytes": "big"}, "write.parquet.page-size-bytes='big' is not a whole number"),
        ({"write.parquet.row-group-limit": "0"}, "write.parquet.row-group-limit='0' must be at least 1"),
    ],
)
def test_a_table_whose_properties_cannot_be_written_refuses_puts_up_front(
    served: tuple[str, Catalog], properties: dict[str, str], says: str
) -> None:
    location, catalog = served
    name = f"parquet.bad_{uuid.uuid4().hex[:8]}"
    with FeatureClient(location) as client:
        client.write(name, _data(10), entity_keys=["key"], event_time="ts")
        with catalog.load_table(name).transaction() as transaction:
            transaction.set_properties(properties)
        before = catalog.load_table(name).current_snapshot()
        with pytest.raises(InvalidRequestError, match=f"cannot write to .*{says}") as refused:
            client.write(name, _data(10))
        assert isinstance(refused.value, FeatureServerError)
    assert catalog.load_table(name).current_snapshot() == before


@settings(max_examples=40, deadline=None)
@given(rows=rows_strategy(), renamed=st.booleans(), nested=st.booleans(), split=st.integers(1, 4))
def test_every_batch_is_stored_as_pyiceberg_stores_it(rows: pa.Table, renamed: bool, nested: bool, split: int) -> None:
    """A file's batches take the file schema found for the first one (`_FileContext.file_batch`) only when that
    stores the columns as they are: the same schema, field ids and values as pyiceberg's projection of each batch,
    also with a column whose name files store rewritten and with a nested column (whose field ids are in its type)."""
    if renamed:
        rows = rows.rename_columns(["key", "ts", "tag-1", "value"])
    if nested:
        tags = pa.array([[str(k)] * (k % 3) for k in rows["key"].to_pylist()], pa.list_(pa.string()))
        rows = rows.append_column("tags", tags)
    metadata = _metadata([], rows.schema)
    chunk = rows.cast(table_arrow_schema(metadata.schema()))
    context = _FileContext.of(metadata, chunk.schema)
    model = FileFormatFactory.get(FileFormat.PARQUET)
    for batch in chunk.to_batches(max(1, len(rows) // split)) * 2:
        ours = context.file_batch(batch, model)
        theirs = to_file_schema(context.file_schema, context.batch_schema, batch, model)
        assert ours.schema.equals(theirs.schema, check_metadata=True)
        assert ours.equals(theirs)
    assert bool(context.renamed) != nested


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy(), layout=st.sampled_from([*LAYOUTS[:1], *LAYOUTS[2:], FALLBACK]), cuts=st.data())
def test_the_partitions_of_each_run_of_rows_are_pyiceberg_s(rows: pa.Table, layout: list[str], cuts: Any) -> None:
    """A group's puts, one after the other in its shared rows: how many partitions each put's rows fall in
    (`partition_counts`) is how many pyiceberg finds in that put's rows alone; None only where Arrow cannot work
    the values out (float identity partitions)."""
    metadata = _metadata(layout, rows.schema)
    chunk = rows.cast(table_arrow_schema(metadata.schema()))
    ends = sorted(set(cuts.draw(st.lists(st.integers(1, len(rows)), max_size=6)) + [len(rows)]))
    lengths = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]  # at least one row each
    counted = partition_counts(metadata, chunk, lengths)
    if layout == FALLBACK:
        assert counted is None
        return
    spec, schema = metadata.spec(), metadata.schema()
    expected = [len(partitions(spec, schema, chunk.slice(end - n, n))) for end, n in zip(ends, lengths, strict=True)]
    assert counted == expected


_STAT_TYPES: dict[str, tuple[pa.DataType, st.SearchStrategy[Any]]] = {
    "int": (pa.int32(), st.integers(-(2**31), 2**31 - 1)),
    "long": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "float": (pa.float32(), st.floats(width=32)),
    "double": (pa.float64(), st.floats()),
    "string": (pa.string(), st.text(max_size=40)),
    "binary": (pa.binary(), st.binary(max_size=40)),
    "flag": (pa.bool_(), st.booleans()),
    "day": (pa.date32(), st.dates()),
    "ts": (pa.timestamp("us"), st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1))),
    "ts_ms": (pa.timestamp("ms"), st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1))),  # not micros
    "tstz": (
        pa.timestamp("us", tz="UTC"),
        st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1), timezones=st.just(dt.timezone.utc)),
    ),
}
_MODES = st.sampled_from(["none", "counts", "full", "truncate(1)", "truncate(4)", "truncate(16)"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_file_statistics_are_pyicebergs(data: st.DataObject) -> None:
    """A one-row-group file's statistics read the quick way (`file_statistics`) are what pyiceberg reads from its
    footer, whatever the column types, values (nulls, NaN, long and non-ASCII strings) and metrics modes."""
    names = data.draw(st.lists(st.sampled_from(sorted(_STAT_TYPES)), min_size=1, max_size=6, unique=True))
    length = data.draw(st.integers(1, 5))
    columns = {
        name: pa.array(
            data.draw(st.lists(st.none() | _STAT_TYPES[name][1], min_size=length, max_size=length)),
            _STAT_TYPES[name][0],
        )
        for name in names
    }
    rows = pa.table(columns)
    properties = {"write.metadata.metrics.default": data.draw(_MODES)}
    for name in data.draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        properties[f"write.metadata.metrics.column.{name}"] = data.draw(_MODES)
    schema = assign_fresh_schema_ids(schema_without_ids(rows.schema))
    layout = StatisticsLayout.of(schema, properties)
    sink = pa.BufferOutputStream()
    pq.write_table(
        rows,
        sink,
        dictionary_pagesize_limit=data.draw(st.sampled_from([16, 1 << 20])),
        use_dictionary=data.draw(st.sampled_from([True, False, names[:1]])),  # plain columns: `dictionary_columns`
    )
    footer = pq.ParquetFile(pa.BufferReader(sink.getvalue())).metadata
    quick = file_statistics(footer, layout)
    reference = data_file_statistics_from_parquet_metadata(footer, layout.plan, layout.columns)
    assert quick.to_serialized_dict() == reference.to_serialized_dict()
    assert type(quick) is not type(reference)  # read the quick way, not left to pyiceberg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy(), layout=st.sampled_from([*LAYOUTS[:1], *LAYOUTS[2:], FALLBACK]), spread=st.booleans())
def test_data_files_go_where_the_location_provider_puts_them(rows: pa.Table, layout: list[str], spread: bool) -> None:
    """A file's location with its partition's path worked out once (`_FileContext.data_location`) is the table's
    location provider's for the partition key, twice over (the second time from the kept path), with the plain
    provider and with the object-store one (which hashes the file name into the path)."""
    metadata = _metadata(layout, rows.schema)
    if spread:
        metadata = metadata.model_copy(update={"properties": {"write.object-storage.enabled": "true"}})
    chunk = rows.cast(table_arrow_schema(metadata.schema()))
    context = _FileContext.of(metadata, chunk.schema)
    provider = load_location_provider(metadata.location, metadata.properties)
    for number, (key, _) in enumerate(partitions(metadata.spec(), metadata.schema(), chunk) * 2):
        name = f"00000-{number}-{uuid.uuid4()}.parquet"
        assert context.data_location(name, key) == provider.new_data_location(data_file_name=name, partition_key=key)
    name = f"00000-0-{uuid.uuid4()}.parquet"
    assert context.data_location(name, None) == provider.new_data_location(data_file_name=name)
