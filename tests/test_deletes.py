"""Copy-on-write and merge-on-read tables (ours, and equality deletes as Flink writes them): every query
type returns the rows an independent reader sees; deletes, compaction, snapshot expiry and pins."""

from __future__ import annotations

import datetime as dt
import gc
import threading
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat, ManifestContent
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation
from pyiceberg.types import DoubleType

from flight_client import FeatureClient, FeatureServerError, InvalidRequestError, NotFoundError
from flight_server.base.filters import parse_filter, to_sql
from flight_server.base.schemas import table_arrow_schema
from flight_server.changes.commits import commit_rewrite, live_files
from flight_server.iceberg.lineage import VALUE_BYTES, files_weight
from flight_server.reads.caches import PlanCache, PositionCache
from flight_server.reads.duck import Engine, local_path
from flight_server.reads.plan import plan_tasks
from tests.conftest import local_files, sqlite_catalog, start_server, wait_until

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
KEYS = 40
ROWS_PER_KEY = 12
MODES = ("copy-on-write", "merge-on-read")
# Filters (nulls, NOT IN, negations, prefixes, timestamps) compared with DuckDB's iceberg_scan; pyiceberg's
# own reader keeps nulls for NOT IN (SQL does not), so it is compared on the others.
FILTERS = {
    "trips not in (1, 4) and ts >= '2025-02-01T00:00:00+00:00'": False,
    "not (trips < 3 or city like 'c2%') or driver_id = 7": True,
    "trips is null and driver_id in (2, 3, 5, 11, 13, 30, 31)": True,
}


def rows(keys: range = range(KEYS), start: int = 0) -> pa.Table:
    """Feature rows: every key every 7 days over three months (several partitions and files), some nulls."""
    pairs = [(k, start + i) for k in keys for i in range(ROWS_PER_KEY)]
    return pa.table(
        {
            "driver_id": pa.array([k for k, _ in pairs], pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(days=7 * s, hours=k) for k, s in pairs], pa.timestamp("us", "UTC")),
            "rate": pa.array([None if (k + s) % 5 == 0 else k + s / 100 for k, s in pairs], pa.float64()),
            "city": pa.array([f"c{k % 3}" for k, _ in pairs]),
            "trips": pa.array([None if (k * s) % 4 == 1 else (k + s) % 6 for k, s in pairs], pa.int64()),
        }
    )


def create(client: FeatureClient, table: str, data: pa.Table | None = None) -> None:
    client.write(table, rows() if data is None else data, entity_keys=["driver_id"], event_time="ts")


def key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["driver_id"], row["ts"])


def ordered(table: pa.Table) -> list[dict[str, Any]]:
    return sorted(table.select(["driver_id", "ts", "rate", "city", "trips"]).to_pylist(), key=key)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(memory_limit="512MB", threads=2)


def load(backend: dict[str, str], table: str) -> Table:
    return load_catalog("default", **backend).load_table(table)


def independent(
    backend: dict[str, str], engine: Engine, table: str, text: str | None = None
) -> tuple[pa.Table, pa.Table | None]:
    """The table's rows (those matching the filter `text`) as other engines read them: DuckDB's iceberg_scan,
    and pyiceberg where it can (it refuses equality deletes)."""
    loaded = load(backend, table)
    engine.use_storage(loaded.io.properties)
    where, params = to_sql(parse_filter(text, loaded.schema()), loaded.schema())
    sql = f"SELECT * FROM iceberg_scan(?) WHERE {where}"
    duck = engine.cursor().execute(sql, [local_path(loaded.metadata_location), *params])
    try:
        theirs = loaded.scan(row_filter=text or "true").to_arrow()
    except ValueError:
        theirs = None
    return duck.to_arrow_table(), theirs


def training_reference(expected: list[dict[str, Any]], entities: pa.Table) -> list[Any]:
    """The latest `rate` at or before each entity row's time, from the expected rows."""
    out = []
    for driver, when in zip(entities["driver_id"].to_pylist(), entities["ts"].to_pylist(), strict=True):
        found = [r for r in expected if r["driver_id"] == driver and r["ts"] <= when]
        out.append(max(found, key=lambda r: r["ts"])["rate"] if found else None)
    return out


def assert_reads_agree(
    client: FeatureClient,
    backend: dict[str, str],
    engine: Engine,
    table: str,
    expected: list[dict[str, Any]],
    read_path: bytes,
    filtered_path: bytes,
    online_path: bytes | None = None,
) -> None:
    """Scans (whole on `read_path`, in parts, filtered on `filtered_path`), a training set, the online index
    (last built on `online_path`, by default `read_path`) and two independent readers all return exactly
    `expected`."""
    whole = client.scan(table).read_all()
    assert whole.schema.metadata[b"flight.read_path"] == read_path
    assert ordered(whole) == expected
    assert ordered(client.read_table(table, partitions=2)) == expected
    filtered = client.scan(table, filter="driver_id < 10 and rate > 3").read_all()
    assert filtered.schema.metadata[b"flight.read_path"] == filtered_path
    assert ordered(filtered) == [r for r in expected if r["driver_id"] < 10 and (r["rate"] or 0) > 3]
    duck, theirs = independent(backend, engine, table)
    assert ordered(duck) == expected
    if theirs is not None:
        assert ordered(theirs) == expected
    for text, pyiceberg_agrees in FILTERS.items():
        ours = client.scan(table, filter=text).read_all()
        assert ours.schema.metadata[b"flight.read_path"] == filtered_path
        duck, theirs = independent(backend, engine, table, text)
        assert ordered(ours) == ordered(duck) and len(ours) > 0, text
        if theirs is not None and pyiceberg_agrees:
            assert ordered(theirs) == ordered(ours), text

    times = [T0 + dt.timedelta(days=40), T0 + dt.timedelta(days=200)]
    entities = pa.table(
        {
            "driver_id": pa.array([k for k in range(KEYS) for _ in times], pa.int64()),
            "ts": pa.array([t for _ in range(KEYS) for t in times], pa.timestamp("us", "UTC")),
        }
    )
    training = client.get_historical_features(entities, [f"{table}:rate"], entity_time="ts")
    assert training.column("rate").to_pylist() == training_reference(expected, entities)

    # The online index holds DuckDB's latest row per key of the table, built on the whole scan's read path.
    loaded = load(backend, table)
    engine.use_storage(loaded.io.properties)
    latest = engine.cursor().execute(
        "SELECT driver_id, ts, rate, city, trips FROM iceberg_scan(?) "
        "QUALIFY row_number() OVER (PARTITION BY driver_id ORDER BY ts DESC) = 1",
        [local_path(loaded.metadata_location)],
    )
    by_key = {row["driver_id"]: row for row in latest.to_arrow_table().to_pylist()}
    assert by_key == {r["driver_id"]: r for r in expected}  # expected is sorted by time within a key
    columns = ("ts", "rate", "city", "trips")
    want = [{c: by_key[k][c] for c in columns} if k in by_key else dict.fromkeys(columns) for k in range(KEYS)]
    current = loaded.current_snapshot().snapshot_id  # type: ignore[union-attr]
    wait_until(
        lambda: client.describe(table)["online"]["snapshot_id"] == current,
        what="the online index to reach the table's snapshot",
    )
    found = client.get_online_features(
        {"driver_id": list(range(KEYS))}, [f"{table}:{c}" for c in columns[1:]], apply_ttl=False
    )
    assert found.rename_columns(["driver_id", *columns[1:], "ts"]).select(columns).to_pylist() == want
    assert client.describe(table)["online"]["read_path"] == (online_path or read_path).decode()


def equality_delete(backend: dict[str, str], table: str, deleted: pa.Table, spec_id: int | None = None) -> None:
    """Delete rows as Flink does: an equality delete file (the key columns' values) per partition of the
    table's data files (those of partition spec `spec_id` only, if given), committed in one snapshot."""
    loaded = load(backend, table)
    schema = table_arrow_schema(loaded.schema())
    ids = [loaded.schema().find_field(name).field_id for name in deleted.column_names]
    fields = [
        schema.field(name).with_metadata({b"PARQUET:field_id": str(i).encode()})
        for name, i in zip(deleted.column_names, ids, strict=True)
    ]
    partitions = {
        (f.spec_id, f.partition): f
        for f in live_files(loaded.io, loaded.current_snapshot())
        if f.content == DataFileContent.DATA and spec_id in (None, f.spec_id)
    }
    written = []
    for (spec_id, partition), _ in partitions.items():
        location = loaded.location_provider().new_data_location(f"{uuid.uuid4()}-eq-deletes.parquet")
        output = loaded.io.new_output(location)
        with output.create() as stream:
            pq.write_table(deleted.cast(pa.schema(fields)), stream)
        file = DataFile.from_args(
            content=DataFileContent.EQUALITY_DELETES,
            file_path=location,
            file_format=FileFormat.PARQUET,
            partition=partition,
            record_count=deleted.num_rows,
            file_size_in_bytes=len(output),
            equality_ids=ids,
        )
        file.spec_id = spec_id
        written.append(file)
    commit_rewrite(threading.Lock(), loaded, Operation.DELETE, [], written, {})


def summary(client: FeatureClient, table: str) -> dict[str, str]:
    return client.describe(table)["snapshots"][-1]["summary"]


@pytest.mark.parametrize("mode", MODES)
def test_deletes_read_the_same_everywhere(
    client: FeatureClient, backend: dict[str, str], engine: Engine, table: str, mode: str
) -> None:
    create(client, table)
    client.get_online_features({"driver_id": [0]}, [f"{table}:rate"])  # the index exists before the deletes
    expected = ordered(rows())

    # Rows after the first month of keys below 20; null rates do not match (SQL semantics).
    by_filter = client.delete(table, filter="driver_id < 20 and ts >= '2025-02-01T00:00:00+00:00' and rate > 0")
    doomed = [r for r in expected if r["driver_id"] < 20 and r["ts"] >= dt.datetime(2025, 2, 1, tzinfo=UTC)]
    doomed = [r for r in doomed if r["rate"] is not None and r["rate"] > 0]
    expected = [r for r in expected if r not in doomed]
    assert by_filter["rows_deleted"] == len(doomed) > 0 and by_filter["mode"] == "copy-on-write"  # the default
    assert by_filter["data_files_removed"] >= 1 and by_filter["delete_files_added"] == 0
    assert_reads_agree(client, backend, engine, table, expected, b"direct", b"iceberg_scan")

    by_keys = client.delete(table, keys={"driver_id": [3, 25, 99]}, mode=mode)
    remaining = [r for r in expected if r["driver_id"] not in (3, 25)]
    assert by_keys["rows_deleted"] == len(expected) - len(remaining) and by_keys["mode"] == mode
    expected = remaining
    if mode == "merge-on-read":
        assert by_keys["delete_files_added"] >= 1 and by_keys["data_files_removed"] == 0
    else:
        assert by_keys["data_files_removed"] >= 1 and by_keys["delete_files_added"] == 0
    # Arrow applies position deletes itself; filtered scans anti-join them in DuckDB's read_parquet.
    paths = (b"direct", b"read_parquet" if mode == "merge-on-read" else b"iceberg_scan")
    assert_reads_agree(client, backend, engine, table, expected, *paths)

    # The table property sets the default mode, as for Spark.
    with load(backend, table).transaction() as transaction:
        transaction.set_properties({"write.delete.mode": mode})
    assert client.describe(table)["delete_mode"] == mode
    again = client.delete(table, keys={"driver_id": [30]})
    expected = [r for r in expected if r["driver_id"] != 30]
    assert again["mode"] == mode and again["rows_deleted"] == ROWS_PER_KEY
    assert_reads_agree(client, backend, engine, table, expected, *paths)
    nothing = client.delete(table, keys={"driver_id": [30]})
    assert nothing["rows_deleted"] == 0 and nothing["snapshot_id"] == again["snapshot_id"]


def test_position_deletes_across_batches_and_row_groups(
    client: FeatureClient, backend: dict[str, str], engine: Engine, table: str
) -> None:
    """Positions count from the start of each data file, over its row groups and the scan's batches."""
    n = 300_000  # in files of 65,536 rows (the client's batches), in row groups of 50,000
    data = pa.table(
        {
            "driver_id": pa.array(np.arange(n) % 1000, pa.int64()),
            "ts": pa.array(np.arange(n) * 1_000_000, pa.int64()).cast(pa.timestamp("us", "UTC")),
            "rate": pa.array(np.arange(n) / 7, pa.float64()),
        }
    )
    client.write(table, data.slice(0, 1), entity_keys=["driver_id"], event_time="ts", partition_by=[])
    with load(backend, table).transaction() as transaction:
        transaction.set_properties({"write.parquet.row-group-limit": "50000"})
    client.write(table, data.slice(1))
    deleted = client.delete(table, filter="rate < 20000 and driver_id in (1, 500, 999)", mode="merge-on-read")
    client.delete(table, filter="ts >= '1970-01-04T00:00:00+00:00'", mode="merge-on-read")  # the last ~40,000
    keep = np.ones(n, dtype=bool)
    ids, rates = np.arange(n) % 1000, np.arange(n) / 7
    keep[np.isin(ids, [1, 500, 999]) & (rates < 20000)] = False
    keep[np.arange(n) >= 3 * 86400] = False
    assert deleted["rows_deleted"] == int((np.isin(ids, [1, 500, 999]) & (rates < 20000)).sum())
    read = client.scan(table).read_all()
    assert read.schema.metadata[b"flight.read_path"] == b"direct"
    assert read.sort_by("ts").column("ts").equals(data.filter(pa.array(keep)).column("ts"))
    duck, theirs = independent(backend, engine, table)
    assert duck.num_rows == theirs.num_rows == int(keep.sum())  # type: ignore[union-attr]


def test_delete_manifests_are_merged(client: FeatureClient, backend: dict[str, str], table: str) -> None:
    """Each merge-on-read delete adds a delete manifest; past `commit.manifest.min-count-to-merge` they
    are folded into one, so planning a read does not slow down with every delete."""
    create(client, table, rows())
    with load(backend, table).transaction() as transaction:
        transaction.set_properties({"commit.manifest.min-count-to-merge": "3"})
    counts = []
    for k in range(5):
        client.delete(table, keys={"driver_id": [k]}, mode="merge-on-read")
        loaded = load(backend, table)
        manifests = loaded.current_snapshot().manifests(loaded.io)  # type: ignore[union-attr]
        counts.append(sum(m.content == ManifestContent.DELETES for m in manifests))
    assert counts == [1, 2, 2, 2, 2]  # the third delete folds the first two into one
    assert int(summary(client, table)["total-delete-files"]) >= 5
    assert ordered(client.scan(table).read_all()) == [r for r in ordered(rows()) if r["driver_id"] >= 5]
    assert load(backend, table).scan().to_arrow().num_rows == (KEYS - 5) * ROWS_PER_KEY


def test_position_cache_keeps_the_recently_used() -> None:
    cache = PositionCache(max_bytes=3 * 80)  # three arrays of ten int64
    for name in "abcd":
        cache.put((name, "data.parquet"), np.arange(10, dtype=np.int64))
        if name == "b":
            assert cache.get(("a", "data.parquet")) is not None  # "a" is now the most recently used
    assert cache.get(("b", "data.parquet")) is None  # the least recently used went
    assert [cache.get((n, "data.parquet")) is not None for n in "acd"] == [True, True, True]


def test_plans_are_kept_per_table_snapshot_and_filter(
    client: FeatureClient, backend: dict[str, str], table: str
) -> None:
    create(client, table)
    client.delete(table, keys={"driver_id": [3]}, mode="merge-on-read")
    loaded = load(backend, table)
    snapshot = loaded.current_snapshot().snapshot_id  # type: ignore[union-attr]
    schema = loaded.schema()
    plans = PlanCache(max_bytes=100_000 * VALUE_BYTES)
    first = plan_tasks(loaded, snapshot, parse_filter("driver_id < 10", schema), plans)
    assert first is not None and plan_tasks(loaded, snapshot, parse_filter("driver_id < 10", schema), plans) is first
    # Kept without the statistics that pruned them: a task weighs 16, its file 8 (`files_weight`) and the task 8, its
    # delete files their own.
    assert all(t.file.lower_bounds is None and t.file.value_counts is None for t in first)
    assert all(t.file.record_count > 0 and t.file.file_path for t in first)
    deletes = {id(d): d for t in first for d in t.delete_files}
    assert deletes and all(d.lower_bounds for d in deletes.values())  # the data file each applies to
    filter_weight = len(repr(parse_filter("driver_id < 10", schema))) // 70
    weight = 4 + filter_weight + 16 * len(first) + files_weight(list(deletes.values()))
    assert plans.total == weight * VALUE_BYTES
    assert plan_tasks(loaded, snapshot, parse_filter("driver_id < 20", schema), plans) is not first
    parent = loaded.current_snapshot().parent_snapshot_id  # type: ignore[union-attr]
    older = plan_tasks(loaded, parent, parse_filter("driver_id < 10", schema), plans)
    assert older is not first and all(not t.delete_files for t in older or [])
    # A schema change commits no snapshot, and pyiceberg binds the filter in the new schema: planned again.
    with loaded.update_schema() as update:
        update.add_column("added", DoubleType())
    changed = load(backend, table)
    assert changed.current_snapshot().snapshot_id == snapshot  # type: ignore[union-attr]
    assert plan_tasks(changed, snapshot, parse_filter("driver_id < 10", schema), plans) is not first
    # A table dropped and created again under the same name is another table (another uuid).
    load_catalog("default", **backend).drop_table(tuple(table.split(".")))
    create(client, table)
    again = load(backend, table)
    assert plan_tasks(again, snapshot, parse_filter("driver_id < 10", schema), plans) is not first
    cache = PlanCache(max_bytes=8 * VALUE_BYTES)  # a plan of no file weighs 4 values (an entry; its filter is short)
    cache.keep(("t", 1, 0, "a"), [])
    cache.keep(("t", 2, 0, "a"), None)  # a plan too (pyiceberg cannot plan it), no miss
    cache.keep(("t", 3, 0, "a"), first[:1])  # too heavy to keep: 4 and a task's 16
    cache.keep(("t", 4, 0, "a"), [])
    plans_kept = [cache.plan(("t", n, 0, "a")) for n in (1, 2, 3, 4)]
    assert plans_kept == [(False, None), (True, None), (False, None), (True, [])]


def test_the_plan_cache_weighs_its_plans_as_they_take_memory(
    client: FeatureClient, backend: dict[str, str], table: str
) -> None:
    """What the plan cache reckons its plans take (their weight in values of `VALUE_BYTES`) is what tracemalloc sees
    them take, within a third: a soak found tasks of about 1,100 bytes weighed as 560, so that its cap of "about
    140 MB" held twice that."""
    for start in range(0, 40, 8):
        create(client, table, rows(range(start, start + 8)))
    loaded = load(backend, table)
    snapshot = loaded.current_snapshot().snapshot_id  # type: ignore[union-attr]
    plans = PlanCache(max_bytes=10_000_000 * VALUE_BYTES)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = sum(
            len(plan_tasks(loaded, snapshot, parse_filter(f"rate > {-i}", loaded.schema()), plans) or ())
            for i in range(20)
        )
        gc.collect()
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tasks >= 200
    reckoned = plans.total
    assert 0.75 <= reckoned / taken <= 1.5, f"{tasks} tasks take {taken} bytes, reckoned {reckoned}"


def test_the_plan_cache_bounds_the_filters_it_keeps_plans_for() -> None:
    """Plans of no file under long filters (an IN list of absent keys) weigh their filters' text too: the cache keeps
    no more of it than its limit allows (review 22: each weighed 1, so 2M such plans could have been kept)."""
    limit = 20_000 * VALUE_BYTES  # about 1.4 MB
    plans = PlanCache(limit)
    in_list = ",".join(f"'{'n' * 40}{i}'" for i in range(1_000))
    for i in range(200):
        plans.keep(("table-uuid", 1, 0, f"In(term=Reference(name='name'), literals={{{in_list}}}) #{i}"), [])
    kept = sum(len(key[3]) for key, _ in plans.newest_first())
    assert kept <= limit, f"{kept} bytes of filter text kept under a limit of {limit} bytes"


def test_merge_on_read_needs_format_v2(client: FeatureClient, backend: dict[str, str], table: str) -> None:
    catalog = load_catalog("default", **backend)
    catalog.create_namespace_if_not_exists("tests")
    data = rows(range(3))
    properties = {"format-version": "1", "feature.entity-keys": "driver_id", "feature.event-time": "ts"}
    catalog.create_table(table, schema=data.schema, properties=properties).append(data)
    before = client.describe(table)["current_snapshot_id"]
    with pytest.raises(InvalidRequestError, match="merge-on-read deletes need a format v2 table"):
        client.delete(table, keys={"driver_id": [1]}, mode="merge-on-read")
    with load(backend, table).transaction() as transaction:
        transaction.set_properties({"write.delete.mode": "sometimes"})
    with pytest.raises(InvalidRequestError, match="write.delete.mode='sometimes'"):
        client.delete(table, keys={"driver_id": [1]})
    assert client.describe(table)["current_snapshot_id"] == before
    assert client.delete(table, keys={"driver_id": [1]}, mode="copy-on-write")["rows_deleted"] == ROWS_PER_KEY
    assert ordered(client.scan(table).read_all()) == [r for r in ordered(data) if r["driver_id"] != 1]


def test_equality_deletes_as_flink_writes_them(
    client: FeatureClient, backend: dict[str, str], engine: Engine, table: str
) -> None:
    create(client, table)
    client.get_online_features({"driver_id": [0]}, [f"{table}:rate"])
    equality_delete(backend, table, pa.table({"driver_id": pa.array([1, 7], pa.int64())}))
    expected = [r for r in ordered(rows()) if r["driver_id"] not in (1, 7)]
    assert int(summary(client, table)["total-equality-deletes"]) > 0
    assert client.flight_info(table, filter="driver_id < 3").total_records > 0
    assert_reads_agree(client, backend, engine, table, expected, b"iceberg_scan", b"iceberg_scan")

    # Our deletes work on top of them, in both modes.
    client.delete(table, keys={"driver_id": [2]}, mode="merge-on-read")
    client.delete(table, keys={"driver_id": [4]}, mode="copy-on-write")
    expected = [r for r in expected if r["driver_id"] not in (2, 4)]
    assert_reads_agree(client, backend, engine, table, expected, b"iceberg_scan", b"iceberg_scan")

    compacted = client.compact(table)
    assert compacted["compacted"] and compacted["rows"] == len(expected)
    assert summary(client, table)["total-delete-files"] == "0"
    # The online index follows the compaction (the same rows) without reading them again on the direct path.
    assert_reads_agree(client, backend, engine, table, expected, b"direct", b"iceberg_scan", b"iceberg_scan")


def test_compaction_is_atomic_for_readers(client: FeatureClient, backend: dict[str, str], table: str) -> None:
    create(client, table)
    for k in range(0, KEYS, 4):  # many small merge-on-read deletes
        client.delete(table, keys={"driver_id": [k]}, mode="merge-on-read")
    expected = [r for r in ordered(rows()) if r["driver_id"] % 4]
    before = client.describe(table)
    assert int(before["snapshots"][-1]["summary"]["total-delete-files"]) >= KEYS // 4

    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(client.scan(table, columns=["driver_id"]).read_all().num_rows)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        result = client.compact(table)
        wait_until(lambda: len(seen) >= 3, what="reads after the compaction")
    finally:
        stop.set()
        reader.join()
    assert set(seen) == {len(expected)}  # every read saw a whole snapshot, old or new
    assert result["compacted"] and result["rows"] == len(expected)
    assert result["delete_files_removed"] >= KEYS // 4
    after = client.describe(table)
    assert after["snapshots"][-1]["summary"]["total-delete-files"] == "0"
    assert after["snapshots"][-1]["summary"]["flight.operation"] == "compact"
    read = client.scan(table).read_all()
    assert read.schema.metadata[b"flight.read_path"] == b"direct" and ordered(read) == expected
    # The old snapshot still reads as it was; a second compaction finds nothing to do.
    assert ordered(client.scan(table, snapshot_id=before["current_snapshot_id"]).read_all()) == expected
    assert not client.compact(table)["compacted"]


def layout(backend: dict[str, str], table: str) -> list[tuple[Any, ...]]:
    """Each data file's Parquet layout (rows, row groups, columns with their field ids, compression,
    encodings, dictionaries, statistics, sort order), by partition."""
    loaded = load(backend, table)
    files = []
    for task in loaded.scan().plan_files():
        with loaded.io.new_input(task.file.file_path).open() as stream:
            meta = pq.ParquetFile(stream).metadata
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        columns = [g.column(i) for g in groups for i in range(meta.num_columns)]
        files.append(
            (
                str(task.file.partition),
                meta.num_rows,
                [(g.num_rows, g.total_byte_size, str(g.sorting_columns)) for g in groups],
                str(meta.schema.to_arrow_schema()),
                [(c.path_in_schema, c.compression, c.encodings, c.has_dictionary_page, c.statistics) for c in columns],
                len(task.delete_files),
            )
        )
    return sorted(files)


def test_a_compaction_whose_commit_outcome_is_unknown_keeps_its_new_files(
    tmp_path: Path, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog applies a compaction's commit and its answer is lost (a dropped connection at COMMIT: a fault no
    real catalog here produces on demand): the compaction fails, and the files it wrote stay, since the table may
    reference them (review 20). It does: every row reads from them."""
    server = start_server(sqlite_catalog(tmp_path))
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, table)
            for k in range(0, KEYS, 4):
                client.delete(table, keys={"driver_id": [k]}, mode="merge-on-read")
            expected = [r for r in ordered(rows()) if r["driver_id"] % 4]
            real = SqlCatalog.commit_table

            def applied_then_lost(catalog: SqlCatalog, *args: Any, **kwargs: Any) -> Any:
                real(catalog, *args, **kwargs)
                raise ConnectionResetError("the catalog's answer was lost")

            monkeypatch.setattr(SqlCatalog, "commit_table", applied_then_lost)
            with pytest.raises(FeatureServerError):
                client.compact(table)
            monkeypatch.undo()
            assert summary(client, table)["total-delete-files"] == "0"  # it landed
            assert ordered(client.scan(table).read_all()) == expected  # and its files are there
    finally:
        server.shutdown()


def test_compaction_writes_the_files_copy_on_write_writes(
    client: FeatureClient, backend: dict[str, str], table: str
) -> None:
    """One writer: a compacted table reads as fast as a copy-on-write one because its files are laid out alike."""
    cow = f"{table}_cow"
    create(client, table)
    create(client, cow)
    client.delete(cow, keys={"driver_id": [3, 4]}, mode="copy-on-write")
    for k in (3, 4):
        client.delete(table, keys={"driver_id": [k]}, mode="merge-on-read")
    client.compact(table)
    assert layout(backend, table) == layout(backend, cow)
    assert ordered(client.scan(table).read_all()) == ordered(client.scan(cow).read_all())


def test_compaction_keeps_its_record_of_removed_files_out_of_the_current_snapshot(
    client: FeatureClient, backend: dict[str, str], engine: Engine, table: str
) -> None:
    """The compaction snapshot records the files it removed (as Iceberg's writers do, for other engines'
    expiry); a `replace` snapshot in the same commit leaves those manifests out of what readers plan."""
    create(client, table)
    client.delete(table, keys={"driver_id": [3, 4]}, mode="merge-on-read")
    client.get_online_features({"driver_id": [1]}, [f"{table}:rate"])  # indexed before: refreshed after
    before = ordered(client.scan(table).read_all())
    compacted = client.compact(table)
    loaded = load(backend, table)
    current = loaded.current_snapshot()
    assert current is not None and current.snapshot_id == compacted["snapshot_id"]
    assert current.summary is not None and current.summary.operation == Operation.REPLACE
    parent = loaded.snapshot_by_id(current.parent_snapshot_id)  # type: ignore[arg-type]
    assert parent is not None and parent.summary is not None and parent.summary.operation == Operation.REPLACE

    def removed_only(snapshot: Any) -> list[Any]:
        return [m for m in snapshot.manifests(loaded.io) if not (m.has_added_files() or m.has_existing_files())]

    assert {m.content for m in removed_only(parent)} == {ManifestContent.DATA, ManifestContent.DELETES}
    assert removed_only(current) == []
    for total in ("total-records", "total-data-files", "total-delete-files", "total-files-size"):
        assert current.summary[total] == parent.summary[total], total
    assert current.summary["total-delete-files"] == "0"
    # Both snapshots read the same rows everywhere; the table history stays one commit longer.
    assert ordered(client.scan(table).read_all()) == before
    assert ordered(client.scan(table, snapshot_id=parent.snapshot_id).read_all()) == before
    assert_reads_agree(client, backend, engine, table, before, b"direct", b"iceberg_scan")


def data_files(backend: dict[str, str], table: str) -> list[DataFile]:
    loaded = load(backend, table)
    return [f for f in live_files(loaded.io, loaded.current_snapshot()) if f.content == DataFileContent.DATA]


def test_compaction_packs_files_to_the_target_size(
    client: FeatureClient, backend: dict[str, str], engine: Engine, table: str
) -> None:
    """Many small files of a partition become one; with a small `write.target-file-size-bytes`, files of
    about that size (Parquet bytes), however the stream was chunked, with every row kept."""
    n, appends = 60_000, 12
    by_key_and_time = [("driver_id", "ascending"), ("ts", "ascending")]
    data = pa.table(
        {
            "driver_id": pa.array(np.arange(n) % 5000, pa.int64()),
            "ts": pa.array(np.arange(n) * 1_000_000, pa.int64()).cast(pa.timestamp("us", "UTC")),
            "rate": pa.array(np.sin(np.arange(n)), pa.float64()),
        }
    )
    step = n // appends
    client.write(table, data.slice(0, step), entity_keys=["driver_id"], event_time="ts", partition_by=[])
    for start in range(step, n, step):
        client.write(table, data.slice(start, step))
    before = data_files(backend, table)
    assert len(before) == appends
    expected = client.scan(table).read_all().sort_by(by_key_and_time).to_pydict()
    assert len(expected["ts"]) == n

    packed = client.compact(table)
    assert packed["data_files_removed"] == appends and packed["data_files_added"] == 1 and packed["rows"] == n
    assert client.scan(table).read_all().sort_by(by_key_and_time).to_pydict() == expected

    total = data_files(backend, table)[0].file_size_in_bytes
    target = total // 5
    with load(backend, table).transaction() as transaction:
        transaction.set_properties({"write.target-file-size-bytes": str(target)})
    client.delete(table, keys={"driver_id": [7]}, mode="merge-on-read")  # something to compact
    expected = {c: [v for v, k in zip(vs, expected["driver_id"], strict=True) if k != 7] for c, vs in expected.items()}
    split = client.compact(table)
    files = data_files(backend, table)
    sizes = sorted(f.file_size_in_bytes for f in files)
    assert split["data_files_added"] == len(files) >= 4, sizes
    # The first file is cut on the estimate from the files compacted, the others on the Parquet bytes per row
    # of those written; the last is smaller.
    assert all(0.75 * target <= size <= 1.25 * target for size in sizes[1:]), (target, sizes)
    assert sum(f.record_count for f in files) == len(expected["ts"])
    read = client.scan(table).read_all()
    assert read.schema.metadata[b"flight.read_path"] == b"direct"
    assert read.sort_by(by_key_and_time).to_pydict() == expected
    duck, theirs = independent(backend, engine, table)
    assert duck.sort_by(by_key_and_time).to_pydict() == expected
    assert theirs is not None and theirs.num_rows == len(expected["ts"])


def test_compaction_of_a_filter_touches_only_its_files(client: FeatureClient, table: str) -> None:
    create(client, table, rows())
    client.write(table, rows(start=1))  # a second file in every partition
    client.delete(table, keys={"driver_id": [0, 1]}, mode="merge-on-read")
    january = "ts < '2025-02-01T00:00:00+00:00'"
    result = client.compact(table, filter=january)
    assert result["compacted"] and 0 < result["data_files_removed"] < int(summary(client, table)["total-data-files"])
    files = client.flight_info(table).total_records
    expected = ordered(pa.concat_tables([rows(), rows(start=1)]))
    expected = [r for r in expected if r["driver_id"] not in (0, 1)]
    assert ordered(client.scan(table).read_all()) == expected and files >= len(expected)
    assert int(summary(client, table)["total-delete-files"]) > 0  # later months keep theirs


def test_concurrent_deletes_and_appends_through_two_replicas(
    client: FeatureClient, second_server: str, table: str
) -> None:
    create(client, table)
    errors: list[BaseException] = []

    def run(action: Any) -> threading.Thread:
        def target() -> None:
            try:
                action()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    with FeatureClient(second_server) as other:
        threads = [
            run(lambda: client.delete(table, keys={"driver_id": [1, 2]}, mode="merge-on-read")),
            run(lambda: other.delete(table, keys={"driver_id": [3]}, mode="copy-on-write")),
            run(lambda: other.delete(table, filter="driver_id = 4", mode="merge-on-read")),
            run(lambda: client.write(table, rows(range(KEYS, KEYS + 5)))),
        ]
        for thread in threads:
            thread.join()
    assert not errors, errors
    expected = [r for r in ordered(pa.concat_tables([rows(), rows(range(KEYS, KEYS + 5))])) if r["driver_id"] > 4]
    expected += [r for r in ordered(rows()) if r["driver_id"] == 0]
    assert ordered(client.scan(table).read_all()) == sorted(expected, key=key)


def test_expiry_keeps_pins_and_deletes_unreachable_files(
    client: FeatureClient, backend: dict[str, str], table: str
) -> None:
    first = client.write(table, rows(), entity_keys=["driver_id"], event_time="ts").snapshot_id
    second = client.write(table, rows(start=1)).snapshot_id
    client.delete(table, keys={"driver_id": [1]}, mode="merge-on-read")
    client.compact(table)
    last = client.write(table, rows(range(KEYS, KEYS + 2))).snapshot_id
    location = client.describe(table)["location"]
    files_before = local_files(location)

    pin = client.pin(table, second, name="training-2025-01")
    assert pin == {"table": table, "name": "training-2025-01", "snapshot_id": second}
    assert client.pin(table, second, name="training-2025-01") == pin  # idempotent
    assert client.describe(table)["pins"] == {"training-2025-01": second}

    now = dt.datetime.now(UTC)
    result = client.expire_snapshots(table, older_than=now, retain_last=1)
    assert result["kept_pinned"] == [second] and first in result["expired"] and second not in result["expired"]
    assert result["snapshots_left"] == 2 and result["files_deleted"] > 0
    snapshots = [s["snapshot_id"] for s in client.describe(table)["snapshots"]]
    assert sorted(snapshots) == sorted([second, last])
    # Time travel to the pinned snapshot still works; to an expired one it is refused.
    both = pa.concat_tables([rows(), rows(start=1)])
    assert ordered(client.scan(table, snapshot_id=second).read_all()) == ordered(both)
    with pytest.raises(NotFoundError, match=f"no snapshot {first}"):
        client.scan(table, snapshot_id=first)
    if files_before is not None:  # on local disk: the files only expired snapshots used are gone
        files_after = local_files(location)
        assert files_after is not None and files_after < files_before
        loaded = load(backend, table)
        for snapshot_id in (second, last):
            for file in live_files(loaded.io, loaded.snapshot_by_id(snapshot_id)):
                assert local_path(file.file_path) in {str(p) for p in files_after}

    forced = client.expire_snapshots(table, older_than=dt.datetime.now(UTC), retain_last=1, force=True)
    assert forced["expired"] == [second] and forced["unpinned"] == ["training-2025-01"]
    assert client.describe(table)["pins"] == {}
    assert [s["snapshot_id"] for s in client.describe(table)["snapshots"]] == [last]
    expected = ordered(pa.concat_tables([rows(), rows(start=1), rows(range(KEYS, KEYS + 2))]))
    assert ordered(client.scan(table).read_all()) == [r for r in expected if r["driver_id"] != 1]


def test_unpin_lets_the_snapshot_expire(client: FeatureClient, table: str) -> None:
    first = client.write(table, rows(), entity_keys=["driver_id"], event_time="ts").snapshot_id
    client.write(table, rows(start=1))
    client.pin(table, first)
    assert client.describe(table)["pins"] == {f"pin-{first}": first}
    kept = client.expire_snapshots(table, older_than=dt.datetime.now(UTC))
    assert kept["expired"] == [] and kept["kept_pinned"] == [first]
    assert client.unpin(table, f"pin-{first}")["snapshot_id"] == first
    assert client.expire_snapshots(table, older_than=dt.datetime.now(UTC))["expired"] == [first]
