"""Puts whose buffers sit at addresses their values' width does not divide, as Flight hands them over: pyiceberg-core
(arrow-rs) panics on those, so every array it transforms is `aligned` first, and the partitions stay the same."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import assign_fresh_schema_ids
from pyiceberg.table.metadata import TableMetadata, new_table_metadata
from pyiceberg.table.sorting import UNSORTED_SORT_ORDER
from pyiceberg.transforms import BucketTransform, DayTransform, IdentityTransform

from flight_client import FeatureClient
from flight_server.base.buffers import aligned
from flight_server.base.schemas import new_table_schema, table_arrow_schema
from flight_server.base.shards import key_slots
from flight_server.changes.files import partitioned_rows
from flight_server.iceberg.catalog import partition_spec
from flight_server.iceberg.internals import partitions, schema_without_ids
from tests.conftest import sqlite_catalog, start_server

ROWS = 40
PUTS = 12


def _rows() -> pa.Table:
    """A column of each kind a transform takes, most with nulls (pyiceberg-core, not numpy, buckets those)."""
    n = range(ROWS)
    return pa.table(
        {
            "key": pa.array([i % 7 for i in n], pa.int64()),
            "ts": pa.array([dt.datetime(2025, 12, 30, tzinfo=dt.UTC) + dt.timedelta(hours=7 * i) for i in n]),
            "i": pa.array([None if i % 9 == 0 else i * 37 - 500 for i in n], pa.int32()),
            "l": pa.array([None if i % 11 == 0 else (i * 7919) << 20 for i in n], pa.int64()),
            "d": pa.array([i % 4 * 0.5 for i in n], pa.float64()),
            "s": pa.array([None if i % 8 == 0 else f"v{i % 5}{'x' * (i % 3)}" for i in n], pa.string()),
            "day": pa.array([dt.date(1969, 12, 1) + dt.timedelta(days=13 * i) for i in n], pa.date32()),
            "dec": pa.array([None if i % 6 == 0 else Decimal(i * 123) / 100 for i in n], pa.decimal128(10, 2)),
        }
    )


def _misaligned(array: pa.Array, by: int) -> pa.Array:
    """`array` with every buffer copied to an address `by` past a 64-byte boundary (as Flight may leave it)."""
    moved = []
    for buffer in array.buffers():
        if buffer is None:
            moved.append(None)
            continue
        raw = bytearray(buffer.size + 128)
        start = -pa.py_buffer(raw).address % 64 + by
        raw[start : start + buffer.size] = buffer.to_pybytes()
        moved.append(pa.py_buffer(raw)[start : start + buffer.size])  # the slice keeps `raw` alive
    copy = pa.Array.from_buffers(array.type, len(array), moved, array.null_count, array.offset)
    assert copy.equals(array) and all(b is None or b.address % 64 == by for b in copy.buffers())
    return copy


def _table(rows: pa.Table, by: int) -> pa.Table:
    """`rows` with each buffer at `by` past a 64-byte boundary, in two chunks (the second at an offset)."""
    columns = {name: _misaligned(rows.column(name).combine_chunks(), by) for name in rows.column_names}
    return pa.table(
        {name: pa.chunked_array([a.slice(0, ROWS // 3), a.slice(ROWS // 3)]) for name, a in columns.items()}
    )


def _metadata(layout: list[str], arrow: pa.Schema) -> TableMetadata:
    schema = assign_fresh_schema_ids(schema_without_ids(new_table_schema(arrow, required=("key", "ts"))))
    return new_table_metadata(schema, partition_spec(layout, schema), UNSORTED_SORT_ORDER, "file:///nowhere", {})


def _described(parts: list[tuple[Any, pa.Table]]) -> dict[str, list[dict[str, Any]]]:
    return {key.to_path(): rows.to_pylist() for key, rows in parts}


TRANSFORMS = [
    *(f"identity({c})" for c in ("i", "l", "s", "day", "ts", "dec")),
    *(f"bucket(4, {c})" for c in ("key", "i", "l", "s", "day", "ts", "dec")),
    *(f"truncate(3, {c})" for c in ("i", "l", "s", "dec")),
    *(f"{unit}({c})" for unit in ("year", "month", "day") for c in ("day", "ts")),
    "hour(ts)",
]


@pytest.mark.parametrize("by", [1, 4, 8])  # 8: aligned for all but decimals (i128: 16 bytes)
@pytest.mark.parametrize("fallback", [False, True], ids=["ours", "pyiceberg"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_misaligned_columns_partition_as_aligned_ones(transform: str, fallback: bool, by: int) -> None:
    """Each transform of misaligned columns gives the partitions, with the same rows, that it gives of the same
    columns aligned: by this server's partitioning, and by pyiceberg's (which identity of a double falls back to)."""
    rows = _rows()
    layout = [transform, "identity(d)"] if fallback else [transform]
    metadata = _metadata(layout, rows.schema)
    arrow = table_arrow_schema(metadata.schema())
    expected = _described(partitioned_rows(metadata, rows.cast(arrow), None))
    assert _described(partitioned_rows(metadata, _table(rows.cast(arrow), by), None)) == expected
    assert _described(partitions(metadata.spec(), metadata.schema(), _table(rows.cast(arrow), by))) == expected


def test_aligned_copies_only_the_misaligned_buffers() -> None:
    """Validity bitmaps and bytes are read at any address, so those are shared; a column aligned already is itself."""
    strings = _misaligned(pa.array(["a", None, "bcd"], pa.large_string()), 4)  # int64 offsets
    validity, offsets, data = strings.buffers()
    fixed = aligned(pa.chunked_array([strings])).chunk(0)
    assert fixed.equals(strings)
    assert fixed.buffers()[0].address == validity.address and fixed.buffers()[2].address == data.address
    assert fixed.buffers()[1].address != offsets.address and fixed.buffers()[1].address % 8 == 0
    decimals = pa.chunked_array([_misaligned(pa.array([Decimal("1.5"), None], pa.decimal128(4, 1)), 8)])
    assert aligned(decimals).chunk(0).buffers()[1].address % 16 == 0
    column = pa.chunked_array([pa.array([1, 2, 3], pa.int64())])
    assert aligned(column) is column


@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("nulls", [False, True])
def test_a_source_inside_a_struct_partitions_as_aligned(nulls: bool, start: int) -> None:
    """A table made elsewhere may partition by a struct's field (`bucket(4, info.id)`): the struct is aligned field by
    field, at its offset and with its nulls, and pyiceberg's partitioning of it reads as that of aligned rows."""
    ids = pa.array([i * 1_000_003 for i in range(ROWS)], pa.int64())
    mask = pa.array([nulls and i % 5 == 0 for i in range(ROWS)])
    rows = pa.table(
        {
            "key": pa.array(range(ROWS), pa.int64()),
            "ts": pa.array(range(ROWS), pa.timestamp("us", "UTC")),
            "info": pa.StructArray.from_arrays([ids], ["id"], mask=mask),
        }
    )
    schema = _metadata([], rows.schema).schema()
    source = schema.find_field("info.id").field_id
    spec = PartitionSpec(PartitionField(source_id=source, field_id=1000, transform=BucketTransform(4), name="b"))
    arrow = table_arrow_schema(schema)
    good = rows.cast(arrow).slice(start)
    info = rows.cast(arrow).column("info").chunk(0)
    moved = pa.StructArray.from_arrays(
        [_misaligned(info.field(0), 1)], fields=list(info.type), mask=info.is_null() if nulls else None
    )
    bad = good.set_column(2, arrow.field("info"), pa.chunked_array([moved.slice(start)]))  # one batch, as put
    assert bad.column("info").chunk(0).field(0).buffers()[1].address % 8 != 0
    assert _described(partitions(spec, schema, bad)) == _described(partitions(spec, schema, good))
    fixed = aligned(bad.column("info"))
    assert fixed.equals(bad.column("info")) and fixed.chunk(0).flatten()[0].buffers()[1].address % 8 == 0


def test_misaligned_keys_take_the_slots_of_aligned_ones() -> None:
    for keys in (pa.array(range(-20, 20), pa.int64()), pa.array([f"k{i}" for i in range(40)], pa.large_string())):
        assert key_slots(_misaligned(keys, 1), 16).tolist() == key_slots(keys, 16).tolist()


def test_puts_of_flight_s_buffers_to_the_reviewer_s_partitioning(tmp_path: Any) -> None:
    """Identity of a double makes a put partition as pyiceberg does, and a small put of one batch hands it the batch
    as Flight received it. Those buffers are where gRPC left the message, aligned or not by chance (about half were
    not), so 12 such puts are all but sure to meet misaligned ones: each commits, its rows in their partitions."""
    props = sqlite_catalog(tmp_path)
    server = start_server(props)
    catalog = load_catalog("default", **props)
    try:
        rows = _rows().select(["key", "ts", "s", "d"])
        catalog.create_namespace_if_not_exists("p")
        table = catalog.create_table("p.t", schema=rows.schema, properties={"format-version": "1"})
        with table.update_spec() as update:
            update.add_field("s", IdentityTransform(), "s_p")
            update.add_field("ts", DayTransform(), "ts_day")
            update.add_field("key", BucketTransform(4), "key_b")
            update.add_field("d", IdentityTransform(), "d_id")
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for _ in range(PUTS):
                client.write("p.t", rows)
        table = catalog.load_table("p.t")
        expected = partitions(table.spec(), table.schema(), rows.cast(table.schema().as_arrow()))
        counts: dict[Any, int] = {}
        for task in table.scan().plan_files():
            counts[task.file.partition] = counts.get(task.file.partition, 0) + task.file.record_count
        assert counts == {key.partition: PUTS * len(part) for key, part in expected}
        assert sorted(table.scan().to_arrow().to_pylist(), key=str) == sorted(rows.to_pylist() * PUTS, key=str)
    finally:
        server.shutdown()
