"""A column dropped and added again under its name (or another renamed to it) is another column (field id): the
files written before hold the old one under that name (review 15). Reads of the current state take the table's
current schema and match files by field id (DuckDB's `iceberg_scan`), with or without a write since: they answer
as pyiceberg does, in scans, training sets, online lookups and rewrites alike. Time travel to a snapshot from
before reads its own schema, where the name holds the old column: it answers the old column's values, as
pyiceberg's `scan(snapshot_id=...)` does, in scans and training sets pinned to the snapshot or `as_of` it."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.types import DoubleType

from flight_client import FeatureClient, NotFoundError
from tests.conftest import wait_until
from tests.test_review15 import catalog, client  # fixtures: a catalog in tmp_path, a client of a server on it

__all__ = ["catalog", "client"]

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
KEYS = {"entity_keys": ["id"], "event_time": "ts", "partition_by": []}


def rows(ids: list[int], values: list[float]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
            "v": pa.array(values, pa.float64()),
            "w": pa.array(values, pa.float64()),
        }
    )


def training_set(client: FeatureClient, table: str, feature: str) -> list[float]:
    entities = {"id": [1, 2], "event_timestamp": [T0 + dt.timedelta(hours=1)] * 2}
    return client.get_historical_features(entities, [f"{table}:{feature}"]).column(feature).to_pylist()


def online(client: FeatureClient, table: str, feature: str) -> list[float]:
    return (
        client.get_online_features({"id": [1, 2]}, [f"{table}:{feature}"], apply_ttl=False).column(feature).to_pylist()
    )


def refreshed(client: FeatureClient, table: str, feature: str) -> list[float] | None:
    """`online`, None while the index has not the column yet: a refresh between the drop and the add built it in
    the schema without it."""
    try:
        return online(client, table, feature)
    except NotFoundError:
        return None


def drop_and_add(catalog: dict[str, str], table: str) -> None:
    for change in ("drop", "add"):
        with load_catalog("default", **catalog).load_table(table).update_schema() as update:
            update.delete_column("v") if change == "drop" else update.add_column("v", DoubleType())


def test_a_column_added_again_reads_as_new_and_time_travel_from_before_reads_the_old_one(
    client: FeatureClient, catalog: dict[str, str]
) -> None:
    """No write since the column came back: reads of the current state take the table's current schema, the new
    (empty) column, plans, training sets and the online index cached before the change included. Time travel to the
    snapshot reads its own schema, where the name holds the old column, by field id on the `iceberg_scan` path: the
    old values, as pyiceberg answers, in scans and in training sets pinned to it or `as_of` it, whichever was read
    first at the same snapshot (nothing cached in one schema is served in the other). A filter names the columns
    the read returns, the old `v` (pyiceberg 0.12 binds a scan's row filter to the current schema instead, while
    it returns the snapshot's: its `v > 1` finds no row, yet returns the old `v`)."""
    table = "readded.features"
    old = client.write(table, rows([1, 2], [1.0, 2.0]), **KEYS).snapshot_id
    assert training_set(client, table, "v") == [1.0, 2.0] and online(client, table, "v") == [1.0, 2.0]
    assert client.flight_info(table, filter="v is null").total_records == 0  # its plan: no file has a null `v`
    after = dt.datetime.now(dt.timezone.utc)
    drop_and_add(catalog, table)
    assert pyiceberg_reads(catalog, table, "v") == [None, None]
    travelled = pyiceberg_reads(catalog, table, "v", old)
    assert travelled == [1.0, 2.0]
    entities = {"id": [1, 2], "event_timestamp": [T0 + dt.timedelta(hours=1)] * 2}
    pinned = client.get_historical_features(entities, [f"{table}:v"], snapshot_ids={table: old}).column("v")
    assert pinned.to_pylist() == travelled  # before any read of the current state at this snapshot
    # Planned again in the new schema (not the cached plan, pruned by the old column's statistics): an upper bound.
    assert client.flight_info(table, filter="v is null").total_records == 2
    assert client.scan(table).read_all().sort_by("id").column("v").to_pylist() == [None, None]
    assert client.scan(table, filter="v > 0", columns=["id"]).read_all().num_rows == 0
    assert training_set(client, table, "v") == [None, None]
    wait_until(lambda: refreshed(client, table, "v") == [None, None], what="the online index in the new schema")
    reference = load_catalog("default", **catalog).load_table(table).scan(snapshot_id=old).to_arrow().sort_by("id")
    assert client.scan(table, snapshot_id=old).read_all().sort_by("id") == reference
    assert client.scan(table, as_of=after).read_all().sort_by("id") == reference
    assert client.scan(table, snapshot_id=old, filter="v > 1", columns=["id", "v"]).read_all().to_pylist() == [
        {"id": 2, "v": 2.0}
    ]
    assert client.scan(table, snapshot_id=old, filter="w > 0", columns=["id"]).read_all().num_rows == 2
    as_of = client.get_historical_features(entities, [f"{table}:v", f"{table}:w"], as_of=after)
    assert as_of.column("v").to_pylist() == travelled and as_of.column("w").to_pylist() == [1.0, 2.0]
    assert training_set(client, table, "v") == [None, None]  # the current state still reads the new column
    assert client.scan(table).read_all().sort_by("id").column("v").to_pylist() == [None, None]


def pyiceberg_reads(
    catalog: dict[str, str], table: str, column: str, snapshot_id: int | None = None
) -> list[float | None]:
    """The reference: pyiceberg matches files' columns by field id (a snapshot's in its own schema)."""
    loaded = load_catalog("default", **catalog).load_table(table)
    found = loaded.scan(snapshot_id=snapshot_id).to_arrow().sort_by("id")
    return found.column(column).to_pylist()


@pytest.mark.parametrize("renamed_to", [False, True])
def test_a_snapshot_written_since_reads_the_new_column_by_field_id(
    client: FeatureClient, catalog: dict[str, str], renamed_to: bool
) -> None:
    """After a write, in scans (whole and filtered), training sets, online lookups and compaction alike. The name
    comes back as a new column, or as another column renamed to it (whose values the old files then give)."""
    table = "readded.written"
    first = client.write(table, rows([1, 2], [1.0, 2.0]), **KEYS).snapshot_id
    assert online(client, table, "v") == [1.0, 2.0]  # an index built before the change, brought to the write's
    if renamed_to:
        with load_catalog("default", **catalog).load_table(table).update_schema() as update:
            update.delete_column("v")
        with load_catalog("default", **catalog).load_table(table).update_schema() as update:
            update.rename_column("w", "v")
        written = rows([3], [3.0]).drop_columns(["v"]).rename_columns(["id", "ts", "v"])
    else:
        drop_and_add(catalog, table)
        written = rows([3], [3.0])
    client.write(table, written, **KEYS)
    expected = pyiceberg_reads(catalog, table, "v")
    assert expected == ([1.0, 2.0, 3.0] if renamed_to else [None, None, 3.0])
    entities = {"id": [1, 2, 3], "event_timestamp": [T0 + dt.timedelta(hours=1)] * 3}
    assert client.scan(table).read_all().sort_by("id").column("v").to_pylist() == expected
    filtered = client.scan(table, filter="v > 0").read_all().sort_by("id").column("v").to_pylist()
    assert filtered == [v for v in expected if v is not None]
    assert client.get_historical_features(entities, [f"{table}:v"]).column("v").to_pylist() == expected
    wait_until(
        lambda: (
            client.get_online_features({"id": [1, 2, 3]}, [f"{table}:v"], apply_ttl=False).column("v").to_pylist()
            == expected
        ),
        what="the online index at the new snapshot",
    )
    travelled = client.scan(table, snapshot_id=first).read_all().sort_by("id")  # in its schema: the old `v`, `w`
    reference = load_catalog("default", **catalog).load_table(table).scan(snapshot_id=first).to_arrow()
    assert travelled == reference.sort_by("id") and travelled.column("v").to_pylist() == [1.0, 2.0]
    client.compact(table)
    assert pyiceberg_reads(catalog, table, "v") == expected
    assert client.scan(table).read_all().sort_by("id").column("v").to_pylist() == expected


def test_rewrites_after_the_column_came_back_write_the_new_column(
    client: FeatureClient, catalog: dict[str, str]
) -> None:
    """No write since the column came back: compaction and deletes of both modes read the rows in the table's
    current schema, so the files they write hold the new (empty) column, never the old column's values."""
    table = "readded.rewritten"
    client.write(table, rows([1], [1.0]), **KEYS)
    client.write(table, rows([2], [2.0]), **KEYS)
    client.write(table, rows([3], [3.0]), **KEYS)
    drop_and_add(catalog, table)
    assert client.compact(table)["compacted"]
    assert pyiceberg_reads(catalog, table, "v") == [None, None, None]
    client.delete(table, filter="id = 1", mode="copy-on-write")
    client.delete(table, filter="id = 2", mode="merge-on-read")
    assert pyiceberg_reads(catalog, table, "v") == [None]
    assert pyiceberg_reads(catalog, table, "w") == [3.0]
    assert client.scan(table).read_all().to_pylist() == [{"id": 3, "ts": T0, "w": 3.0, "v": None}]
