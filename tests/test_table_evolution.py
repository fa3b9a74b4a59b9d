"""Feature tables that evolve while in production use (review 26): another engine or an operator (pyiceberg in this
process, as Spark would) promotes a type, adds, moves or renames a column, evolves the partition spec or changes the
write properties and sort order between puts through the server. Every path (puts and their retries, whole,
filtered, incremental and time-travel scans, training sets with their cached indexes, online lookups with their
live indexes, deletes of both modes, compaction) is asked across the change and compared with pyiceberg's own read
of the same table. The bugs not fixed yet stay strict xfails, each saying why."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.table import Table
from pyiceberg.transforms import BucketTransform, DayTransform, IdentityTransform, MonthTransform
from pyiceberg.types import DecimalType, DoubleType, LongType

from flight_client import FeatureClient, InvalidRequestError, NotFoundError
from flight_client.plans import plan_training_set
from flight_server.wire.reads import ScanRequest
from tests.conftest import sqlite_catalog, start_server, wait_until

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
KEYS: dict[str, Any] = {"entity_keys": ["id"], "event_time": "ts"}
LATER = T0 + dt.timedelta(days=10)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("evolution"))


@pytest.fixture(scope="module")
def servers(catalog: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Two replicas on one catalog: the second serves from what it cached while the table changes."""
    first, second = start_server(catalog), start_server(catalog)
    yield f"grpc://127.0.0.1:{first.port}", f"grpc://127.0.0.1:{second.port}"
    first.shutdown()
    second.shutdown()


@pytest.fixture
def client(servers: tuple[str, str]) -> Iterator[FeatureClient]:
    with FeatureClient(servers[0]) as client:
        yield client


@pytest.fixture
def replica(servers: tuple[str, str]) -> Iterator[FeatureClient]:
    with FeatureClient(servers[1]) as client:
        yield client


def new_table() -> str:
    return f"evolution.t{uuid.uuid4().hex[:8]}"


def load(catalog: dict[str, str], table: str) -> Table:
    return load_catalog("default", **catalog).load_table(table)


def rows(ids: list[int], hours: int = 0, **columns: pa.Array) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(hours=hours)] * len(ids), pa.timestamp("us", "UTC")),
            **columns,
        }
    )


def ordered(found: pa.Table) -> list[dict[str, Any]]:
    return sorted(found.to_pylist(), key=lambda row: (row["id"], row["ts"]))


def reference(catalog: dict[str, str], table: str, snapshot_id: int | None = None) -> list[dict[str, Any]]:
    """pyiceberg's read of the table (matching files' columns by field id): what every path must agree with."""
    return ordered(load(catalog, table).scan(snapshot_id=snapshot_id).to_arrow())


def latest(reference_rows: list[dict[str, Any]], ids: list[int], column: str) -> list[Any]:
    """Each id's value of `column` in its latest row: what a training set after every row and a lookup answer."""
    found: dict[int, Any] = {}
    for row in sorted(reference_rows, key=lambda r: r["ts"]):
        found[row["id"]] = row[column]
    return [found.get(i) for i in ids]


def training(client: FeatureClient, table: str, ids: list[int], column: str) -> list[Any]:
    entities = {"id": ids, "event_timestamp": [LATER] * len(ids)}
    return client.get_historical_features(entities, [f"{table}:{column}"]).column(column).to_pylist()


def online(client: FeatureClient, table: str, ids: list[int], column: str) -> list[Any]:
    return client.get_online_features({"id": ids}, [f"{table}:{column}"], apply_ttl=False).column(column).to_pylist()


def served(lookup: Callable[[], list[Any]], expected: list[Any], what: str) -> None:
    """The online index follows the table within its refresh interval (until then, a column it does not have yet is
    not found)."""

    def caught_up() -> bool:
        try:
            return lookup() == expected
        except NotFoundError:
            return False

    wait_until(caught_up, what=what)


# Promotions Iceberg allows: int -> long, float -> double, decimal(P, S) -> decimal(P', S) with P' > P.
PROMOTIONS = [
    (pa.int32(), LongType(), pa.int64(), [1, 2], 2**40),
    (pa.float32(), DoubleType(), pa.float64(), [1.5, 2.5], 1e300),
    (pa.decimal128(5, 2), DecimalType(12, 2), pa.decimal128(12, 2), [Decimal("1.25"), Decimal("2.5")], Decimal("1e9")),
]


@pytest.mark.parametrize(("before", "promoted", "after", "values", "wide"), PROMOTIONS, ids=["long", "double", "dec"])
def test_a_promoted_type_is_read_alike_on_every_path(
    client: FeatureClient,
    replica: FeatureClient,
    catalog: dict[str, str],
    before: pa.DataType,
    promoted: Any,
    after: pa.DataType,
    values: list[Any],
    wide: Any,
) -> None:
    """Files written before the promotion hold the narrow type, those after it values only the wide one holds: whole
    and filtered scans (before a write too: the table's current schema), time travel to before, a training-set
    index and online indexes built before the change (brought forward, on both replicas), merge-on-read deletes
    and compaction all answer as pyiceberg reads."""
    table = new_table()
    first = client.write(table, rows([1, 2], v=pa.array(values, before)), **KEYS).snapshot_id
    assert training(client, table, [1, 2, 3], "v") == [*values, None]  # indexes cached before the change
    assert online(client, table, [1, 2, 3], "v") == online(replica, table, [1, 2, 3], "v") == [*values, None]
    with load(catalog, table).update_schema() as update:
        update.update_column("v", promoted)
    unwritten = reference(catalog, table)  # the promotion alone, no snapshot: the old files read in the wide type
    scanned = client.scan(table).read_all()
    assert scanned.schema.field("v").type == after and ordered(scanned) == unwritten
    assert ordered(replica.scan(table, filter="v > 0").read_all()) == unwritten
    assert training(client, table, [1, 2, 3], "v") == [*values, None]
    client.write(table, rows([3], 1, v=pa.array([wide], after)))
    replica.write(table, rows([1], 2, v=pa.array([wide], after)))  # from the replica's cached metadata
    expected = reference(catalog, table)
    assert [r["v"] for r in expected] == [values[0], wide, values[1], wide]
    assert ordered(client.scan(table).read_all()) == expected
    assert ordered(client.scan(table, filter="v > 0").read_all()) == expected
    assert ordered(client.scan(table, snapshot_id=first).read_all()) == reference(catalog, table, first)
    assert (
        training(client, table, [1, 2, 3], "v") == training(replica, table, [1, 2, 3], "v") == [wide, values[1], wide]
    )
    for lookups in (client, replica):
        served(lambda c=lookups: online(c, table, [1, 2, 3], "v"), [wide, values[1], wide], "the promoted rows")
    client.delete(table, filter="id = 2", mode="merge-on-read")
    expected = reference(catalog, table)
    assert ordered(client.scan(table, filter="v > 0").read_all()) == expected
    assert training(client, table, [1, 2, 3], "v") == [wide, None, wide]
    client.compact(table)
    assert reference(catalog, table) == expected
    assert ordered(client.scan(table).read_all()) == expected


def test_a_partition_spec_evolved_twice_mid_history(client: FeatureClient, catalog: dict[str, str]) -> None:
    """Files under three specs (the server's month and bucket, then day alone, then another bucket): scans, a
    training-set index brought forward, the online index, deletes of both modes, compaction across the specs and
    time travel to the first spec agree with pyiceberg."""
    table = new_table()
    ids = [1, 2, 3, 4, 5]
    first = client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), **KEYS).snapshot_id
    assert training(client, table, ids, "v") == [1.0, 2.0, None, None, None]
    assert online(client, table, ids, "v") == [1.0, 2.0, None, None, None]
    with load(catalog, table).update_spec() as update:
        update.remove_field("ts_month")
        update.remove_field("id_bucket")
        update.add_field("ts", DayTransform(), "ts_day")
    client.write(table, rows([3, 4], 25, v=pa.array([3.0, 4.0])))
    with load(catalog, table).update_spec() as update:
        update.remove_field("ts_day")
        update.add_field("id", BucketTransform(4), "id_b4")
    client.write(table, rows([5, 1], 49, v=pa.array([5.0, 10.0])))
    assert len(load(catalog, table).specs()) == 3
    expected = reference(catalog, table)
    assert ordered(client.scan(table).read_all()) == expected
    assert ordered(client.scan(table, filter="id = 3 or v > 4").read_all()) == [
        r for r in expected if r["id"] == 3 or r["v"] > 4
    ]
    assert training(client, table, ids, "v") == latest(expected, ids, "v")
    served(lambda: online(client, table, ids, "v"), latest(expected, ids, "v"), "the rows under the new specs")
    client.delete(table, filter="id = 4", mode="merge-on-read")
    client.delete(table, keys={"id": [2]}, mode="copy-on-write")
    expected = reference(catalog, table)
    assert ordered(client.scan(table).read_all()) == expected
    assert training(client, table, ids, "v") == [10.0, None, 3.0, None, 5.0]
    client.compact(table)
    assert reference(catalog, table) == expected
    assert ordered(client.scan(table).read_all()) == expected
    assert training(client, table, ids, "v") == [10.0, None, 3.0, None, 5.0]
    served(lambda: online(client, table, ids, "v"), [10.0, None, 3.0, None, 5.0], "the compacted table")
    assert ordered(client.scan(table, snapshot_id=first).read_all()) == reference(catalog, table, first)


def test_columns_added_and_moved_with_new_write_settings(client: FeatureClient, catalog: dict[str, str]) -> None:
    """A column added, puts carrying it and puts leaving it out, the columns reordered, then the Parquet codec,
    target file size and sort order changed: a write id retried across the changes stays one write, indexes built
    before follow, and every read agrees with pyiceberg."""
    table = new_table()
    ids = [1, 2, 3, 4, 5]
    client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), write_id="first", **KEYS)
    assert training(client, table, ids, "v") == [1.0, 2.0, None, None, None]
    with load(catalog, table).update_schema() as update:
        update.add_column("x", DoubleType())
    assert client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), write_id="first").duplicate
    client.write(table, rows([3], 1, v=pa.array([3.0])))
    client.write(table, rows([4], 2, v=pa.array([4.0]), x=pa.array([0.5])))
    assert training(client, table, ids, "x") == [None, None, None, 0.5, None]
    served(lambda: online(client, table, ids, "x"), [None, None, None, 0.5, None], "the added column")
    with load(catalog, table).update_schema() as update:
        update.move_first("x")
        update.move_after("id", "v")
    client.write(table, rows([5], 3, v=pa.array([5.0]), x=pa.array([1.5])))
    assert client.scan(table).read_all().schema.names == ["x", "ts", "v", "id"]
    with load(catalog, table).transaction() as change:
        change.set_properties({"write.parquet.compression-codec": "gzip", "write.target-file-size-bytes": "1000"})
    with load(catalog, table).update_sort_order() as order:
        order.desc("v", IdentityTransform())
    client.write(table, rows([1, 2], 4, v=pa.array([7.0, 8.0]), x=pa.array([2.0, 3.0])))
    expected = reference(catalog, table)
    assert ordered(client.scan(table).read_all()) == expected
    assert ordered(client.scan(table, filter="x > 0").read_all()) == [r for r in expected if (r["x"] or 0) > 0]
    assert training(client, table, ids, "x") == latest(expected, ids, "x")
    served(lambda: online(client, table, ids, "x"), latest(expected, ids, "x"), "the moved column")
    client.compact(table)
    assert reference(catalog, table) == expected
    assert ordered(client.scan(table).read_all()) == expected


def test_a_renamed_feature_column_is_followed(
    client: FeatureClient, replica: FeatureClient, catalog: dict[str, str]
) -> None:
    """A feature column renamed: puts name it anew (the old name is refused, clearly), and every path reads the
    old files' values under the new name, on both replicas."""
    table = new_table()
    client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), **KEYS)
    assert online(replica, table, [1, 2, 3], "v") == [1.0, 2.0, None]
    with load(catalog, table).update_schema() as update:
        update.rename_column("v", "w")
    with pytest.raises(InvalidRequestError, match=r"\['v'\] are not in the table"):
        client.write(table, rows([3], 1, v=pa.array([3.0])))
    client.write(table, rows([3], 1, w=pa.array([3.0])))
    expected = reference(catalog, table)
    assert ordered(client.scan(table).read_all()) == ordered(client.scan(table, filter="w > 0").read_all()) == expected
    assert training(replica, table, [1, 2, 3], "w") == [1.0, 2.0, 3.0]
    served(lambda: online(replica, table, [1, 2, 3], "w"), [1.0, 2.0, 3.0], "the renamed column")
    client.compact(table)
    assert ordered(client.scan(table).read_all()) == reference(catalog, table) == expected


def incremental_table(
    client: FeatureClient, catalog: dict[str, str], change: Callable[[Table], None]
) -> tuple[str, int]:
    """A table written twice, then changed by `change`; and the snapshot of the first write."""
    table = new_table()
    since = client.write(table, rows([1], v=pa.array([1], pa.int32())), **KEYS).snapshot_id
    client.write(table, rows([2], 1, v=pa.array([2], pa.int32())))
    change(load(catalog, table))
    return table, since


def widen(table: Table) -> None:
    with table.update_schema() as update:
        update.update_column("v", LongType())


def add(table: Table) -> None:
    with table.update_schema() as update:
        update.add_column("x", DoubleType())


@pytest.mark.parametrize("change", [widen, add], ids=["promoted", "added"])
def test_an_incremental_read_with_a_filter_across_a_schema_change(
    client: FeatureClient, catalog: dict[str, str], change: Callable[[Table], None]
) -> None:
    """`since_snapshot` with a filter or a limit over files appended before and after a type promotion or a column
    added (Spark or an operator between two puts): it answered INTERNAL (DuckDB's ConversionException, or a
    BinderException: column not found), where the whole incremental read answers. The appended files were read by
    `read_parquet` with the first file's columns (`read_parquet_sql` in reads/paths.py); now matched by name
    across files (`union_by_name`), as the whole read's Arrow dataset does."""
    table, since = incremental_table(client, catalog, change)
    wide = {"v": pa.array([2**40], pa.int64())} if change is widen else {"v": pa.array([3], pa.int32())}
    extra = {} if change is widen else {"x": pa.array([0.5])}
    client.write(table, rows([3], 2, **wide, **extra))
    expected = [r for r in reference(catalog, table) if r["id"] > 1]
    assert ordered(client.scan(table, since_snapshot=since).read_all()) == expected
    assert ordered(client.scan(table, since_snapshot=since, filter="v > 0").read_all()) == expected
    assert ordered(client.scan(table, since_snapshot=since, limit=10).read_all()) == expected
    if change is add:
        assert ordered(client.scan(table, since_snapshot=since, filter="x > 0").read_all()) == expected[1:]


def renamed_definition(client: FeatureClient, catalog: dict[str, str], column: str) -> tuple[str, str]:
    """A feature table whose key (`id`) or event-time column (`ts`) an operator renamed, then appended to under the
    new name by another engine: the table's feature definition (its `feature.*` properties) still names the old
    column."""
    table = new_table()
    client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), **KEYS)
    new = {"id": "entity", "ts": "event_time"}[column]
    with load(catalog, table).update_schema() as update:
        update.rename_column(column, new)
    iceberg = load(catalog, table)
    iceberg.append(renamed(rows([3], 1, v=pa.array([3.0])), column, new).cast(iceberg.schema().as_arrow()))
    return table, new


def renamed(written: pa.Table, column: str, new: str) -> pa.Table:
    return written.rename_columns([new if name == column else name for name in written.column_names])


@pytest.mark.parametrize("column", ["id", "ts"], ids=["key", "event_time"])
def test_a_renamed_key_or_event_time_column_is_refused_clearly(
    client: FeatureClient, replica: FeatureClient, catalog: dict[str, str], column: str
) -> None:
    """An operator renames a feature table's entity key or event-time column. The server reads `feature.entity-keys`
    and `feature.event-time` by name and never checks them against the schema: a put of two rows (sorting by the
    keys, `_sort_indices` in changes/files.py), a training set after that put (`Run.build`/`_usable` in
    training/asof.py, or `plan_historical` taking the old key's type), an online index built by a replica that
    had none (`OnlineStore.build`), a copy-on-write delete and compaction (`write_reader` sorting again) answered
    INTERNAL. Now refused with INVALID_ARGUMENT saying the definition names a column the table does not have, and
    how to fix it (`FeatureSpec.require_columns`); the table still scans, and merge-on-read deletes still work. Once
    the property names the new column, every path serves the table again."""
    table, new = renamed_definition(client, catalog, column)
    two = rows([4, 5], 2, v=pa.array([4.0, 5.0]))
    refused = rf"feature definition names column\(s\) \['{column}'\], which the table does not have"
    for call in (
        lambda: client.write(table, renamed(two, column, new)),
        lambda: training(client, table, [1, 2, 3], "v"),
        lambda: online(replica, table, [1, 2, 3], "v"),
        lambda: client.delete(table, filter="v > 1.5", mode="copy-on-write"),
    ):
        with pytest.raises(InvalidRequestError, match=refused):
            call()
    client.delete(table, filter="v > 0.5", mode="merge-on-read")  # three files, one with deletes: all compacted
    with pytest.raises(InvalidRequestError, match=refused):
        client.compact(table)
    expected = load(catalog, table).scan().to_arrow().rename_columns(["id", "ts", "v"])
    assert ordered(client.scan(table).read_all().rename_columns(["id", "ts", "v"])) == ordered(expected)
    # The remedy the refusal names: the definition set to the new name serves every path again, on both replicas.
    with load(catalog, table).transaction() as change:
        change.set_properties({"feature.entity-keys" if column == "id" else "feature.event-time": new})
    client.write(table, renamed(two, column, new))
    key = "entity" if column == "id" else "id"
    entities = {key: [1, 2, 3, 4], "event_timestamp": [LATER] * 4}
    assert replica.get_historical_features(entities, [f"{table}:v"]).column("v").to_pylist() == [None, None, None, 4.0]
    wait_until(
        lambda: (
            replica.get_online_features({key: [3, 4, 5]}, [f"{table}:v"]).column("v").to_pylist() == [None, 4.0, 5.0]
        ),
        what="the replica's index under the new definition",
    )


def test_a_partition_spec_with_two_fields_of_one_column_is_refused_clearly(
    client: FeatureClient, catalog: dict[str, str]
) -> None:
    """An operator adds `identity(id)` beside the server's `bucket(8, id)` (Java's Iceberg allows both, and so does
    pyiceberg's `update_spec`). pyiceberg, with which the server partitions the files it writes, cannot key a row by
    them (`PartitionKey.partition`: 'Cannot have redundant partitions'): every put, and compaction into the new
    spec, answered INTERNAL. Now INVALID_ARGUMENT up front (`writable_partitioning`), saying the spec is the cause."""
    table = new_table()
    client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), **KEYS)
    client.write(table, rows([1, 2], 1, v=pa.array([1.0, 2.0])))  # small files of the old spec, to compact
    with load(catalog, table).update_spec() as update:
        update.add_field("id", IdentityTransform(), "id_identity")
    snapshots = len(load(catalog, table).snapshots())
    for call in (lambda: client.write(table, rows([3, 4], 2, v=pa.array([3.0, 4.0]))), lambda: client.compact(table)):
        with pytest.raises(InvalidRequestError, match="partition spec has 2 fields of column 'id'"):
            call()
    assert len(load(catalog, table).snapshots()) == snapshots
    assert ordered(client.scan(table).read_all()) == reference(catalog, table)


def test_a_merge_on_read_delete_of_rows_written_under_an_older_spec(
    client: FeatureClient, catalog: dict[str, str]
) -> None:
    """An operator adds a partition field (`identity(s)`); a merge-on-read delete then removes rows of a file written
    under the old spec (two fields). The delete file is rightly filed under the data file's spec, but pyiceberg's
    summary of the commit (`SnapshotSummaryCollector.add_file` with `partition_spec=default_spec` for every added
    file, in pyiceberg/table/update/snapshot.py) renders its two-value partition with the current three-field spec:
    IndexError, INTERNAL, nothing committed (copy-on-write deletes of the same rows worked). `RewriteFiles._summary`
    (iceberg/internals.py) now summarises each added file under the spec its manifest has."""
    table = new_table()
    client.write(table, rows([1, 2], s=pa.array(["a", "b"])), **KEYS)
    with load(catalog, table).update_spec() as update:
        update.add_field("s", IdentityTransform(), "s_identity")
    done = client.delete(table, filter="id = 1", mode="merge-on-read")
    assert done["rows_deleted"] == 1 and done["delete_files_added"] == 1
    assert ordered(client.scan(table).read_all()) == reference(catalog, table)
    summary = load(catalog, table).current_snapshot().summary  # type: ignore[union-attr]
    assert summary["added-position-deletes"] == summary["total-position-deletes"] == "1"
    assert [r["id"] for r in reference(catalog, table)] == [2]


@pytest.mark.xfail(
    strict=True,
    reason="pyiceberg's PartitionKey counts the void field a format-1 table keeps for a removed one: the put is "
    "refused (writable_partitioning)",
)
def test_a_format_1_table_whose_time_partition_was_replaced(client: FeatureClient, catalog: dict[str, str]) -> None:
    """A format-1 feature table (as older Spark jobs create them) whose `month(ts)` an operator replaced with `day(ts)`
    (Spark's `REPLACE PARTITION FIELD`): format 1 keeps the removed field as `void(ts)` beside the new one, and
    pyiceberg, with which the server files rows, refuses two fields of one column, void or not (its own `append`
    fails the same way). The put is refused clearly (it answered INTERNAL before); right would be to write it, the
    void field always null (`_partition_key` in changes/files.py, and the paths `PartitionKey.to_path` makes)."""
    table = new_table()
    catalog_ = load_catalog("default", **catalog)
    schema = pa.schema([pa.field("id", pa.int64(), False), pa.field("ts", pa.timestamp("us", "UTC"), False)])
    created = catalog_.create_table(
        table,
        schema.append(pa.field("v", pa.float64())),
        properties={"format-version": "1", "feature.entity-keys": "id", "feature.event-time": "ts"},
    )
    with created.update_spec() as update:
        update.add_field("ts", DayTransform(), "ts_day")
    client.write(table, rows([1], v=pa.array([1.0])))
    with load(catalog, table).update_spec() as update:
        update.remove_field("ts_day")
        update.add_field("ts", MonthTransform(), "ts_month")
    client.write(table, rows([2], 1, v=pa.array([2.0])))
    assert ordered(client.scan(table).read_all()) == reference(catalog, table)


def test_a_schema_change_without_a_snapshot_is_served_past_every_cache(
    client: FeatureClient, catalog: dict[str, str], servers: tuple[str, str]
) -> None:
    """The same server caches everything at the current snapshot (decoded files: a whole scan twice; a plan: a
    filtered scan; a training set's sorted index; the online index), then pyiceberg changes the schema without a
    write, which keeps the snapshot id every cache is keyed by: promotes `v` and adds `x` (the direct path, files
    matched by name), then renames `v` to `w` (DuckDB's `iceberg_scan`, by field id). Every read answers the new
    schema at once, parts of a split read and incremental reads too; time travel to the snapshot still its own."""
    table = new_table()
    ids = [1, 2, 3]
    since = client.write(table, rows([1, 2], v=pa.array([1, 2], pa.int32())), **KEYS).snapshot_id
    snapshot = client.write(table, rows([1, 3], 1, v=pa.array([3, 4], pa.int32()))).snapshot_id
    old = reference(catalog, table)

    def every_read(column: str, renamed: bool) -> None:
        expected = reference(catalog, table)
        assert expected != old
        for _ in range(2):
            assert ordered(client.scan(table).read_all()) == expected
        schema_id = str(load(catalog, table).metadata.current_schema_id).encode()
        assert client.scan(table).read_all().schema.metadata[b"flight.schema_id"] == schema_id
        assert ordered(client.read_table(table, partitions=2)) == expected
        assert ordered(client.scan(table, filter=f"{column} > 1").read_all()) == [r for r in expected if r[column] > 1]
        assert ordered(client.scan(table, filter="x is null", columns=["id", "ts", "x"]).read_all()) == [
            {"id": r["id"], "ts": r["ts"], "x": None} for r in expected
        ]
        if not renamed:  # an incremental read matches files by name (refused once a column was renamed)
            later = [r for r in expected if r["ts"] > T0]
            assert ordered(client.scan(table, since_snapshot=since, filter="x is null").read_all()) == later
        assert training(client, table, ids, column) == latest(expected, ids, column)
        assert training(client, table, ids, "x") == [None] * len(ids)
        # The table as its own entity rows, read on the server in parts (tickets pin its snapshot and schema).
        request = {"entity_time": "ts", "full_feature_names": True, "partitions": 2}
        joined = client.get_historical_features(table, [f"{table}:{column}"], **request)
        joined = joined.sort_by([("id", "ascending"), ("ts", "ascending")])
        assert joined.column(column).to_pylist() == [r[column] for r in expected]
        assert joined.column("x").to_pylist() == [None] * len(expected)
        # Local entity rows cut into ranges, each pinned to what the plan resolved (snapshot and schema).
        entities = {"id": ids, "event_timestamp": [LATER] * len(ids)}
        plan = plan_training_set(servers[0], entities, [f"{table}:{column}", f"{table}:x"], partitions=2)
        trained = pa.Table.from_batches(list(plan.batches(plan.endpoints)), plan.schema)
        assert trained.column(column).to_pylist() == latest(expected, ids, column)
        assert trained.column("x").to_pylist() == [None] * len(ids)
        served(lambda: online(client, table, ids, column), latest(expected, ids, column), "the index in the new schema")
        served(lambda: online(client, table, ids, "x"), [None] * len(ids), "the index in the new schema")
        travelled = client.scan(table, snapshot_id=snapshot).read_all()
        assert travelled.schema.names == ["id", "ts", "v"] and travelled.schema.field("v").type == pa.int32()
        assert ordered(travelled) == old
        assert client.describe(table)["snapshots"][-1]["snapshot_id"] == snapshot  # no write in between

    for _ in range(2):
        assert ordered(client.scan(table).read_all()) == old
    assert ordered(client.read_table(table, partitions=2)) == old
    assert ordered(client.scan(table, filter="v > 1").read_all()) == [r for r in old if r["v"] > 1]
    assert training(client, table, ids, "v") == [3, 2, 4]
    assert online(client, table, ids, "v") == [3, 2, 4]
    with load(catalog, table).update_schema() as update:
        update.update_column("v", LongType())
        update.add_column("x", DoubleType())
    every_read("v", renamed=False)
    assert client.scan(table).read_all().schema.field("v").type == pa.int64()
    with load(catalog, table).update_schema() as update:
        update.rename_column("v", "w")
    every_read("w", renamed=True)


def test_a_schema_change_without_a_snapshot_in_training_sets_joined_by_duckdb(
    client: FeatureClient, catalog: dict[str, str]
) -> None:
    """A server without a training-set cache joins in DuckDB over `iceberg_scan` of the snapshot, which answers in
    the schema the snapshot was written with: after a rename and an added column without a write, it takes the
    current schema's columns by field id, as the sorted indexes do."""
    table = new_table()
    ids = [1, 2, 3]
    client.write(table, rows([1, 2], v=pa.array([1.0, 2.0])), **KEYS)
    client.write(table, rows([1, 3], 1, v=pa.array([3.0, 4.0])))
    with load(catalog, table).update_schema() as update:
        update.rename_column("v", "w")
        update.add_column("x", DoubleType())
    server = start_server(catalog, historical_cache_bytes=0)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as duckdb:
            assert training(duckdb, table, ids, "w") == [3.0, 2.0, 4.0]
            assert training(duckdb, table, ids, "x") == [None] * len(ids)
    finally:
        server.shutdown()


def test_a_ticket_reads_in_the_schema_it_names(client: FeatureClient, catalog: dict[str, str]) -> None:
    """An endpoint ticket pins the schema with the snapshot: a ticket of the old schema, redeemed after a rename,
    still reads `v`; one naming a schema the table never had is NOT_FOUND."""
    table = new_table()
    snapshot = client.write(table, rows([1], v=pa.array([1.0])), **KEYS).snapshot_id
    old = load(catalog, table).metadata.current_schema_id
    with load(catalog, table).update_schema() as update:
        update.rename_column("v", "w")

    def redeemed(schema_id: int) -> pa.Table:
        ticket = ScanRequest(table=table, snapshot_id=snapshot, schema_id=schema_id).to_bytes()
        return client._open_endpoint(flight.FlightEndpoint(ticket, [])).read_all()

    assert redeemed(old).column_names == ["id", "ts", "v"]
    assert redeemed(load(catalog, table).metadata.current_schema_id).column_names == ["id", "ts", "w"]
    with pytest.raises(NotFoundError, match="has no schema 99"):
        redeemed(99)
