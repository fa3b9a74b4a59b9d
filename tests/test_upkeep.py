"""Automatic maintenance (flight_server/changes/upkeep.py): a round compacts the small files of crowded partitions
and expires old snapshots, keeping pinned ones and those a running read or a cached training set uses; a table
can turn it off; the background thread runs rounds by itself; two replicas maintaining one table while a writer
puts lose and double nothing."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.table.snapshots import Operation

from flight_client import FeatureClient
from flight_server.changes.maintenance import small_file_groups
from flight_server.changes.rewrite import Plan, SnapshotRows
from flight_server.changes.upkeep import COMPACT_MIN_FILES_PROPERTY, ENABLED_PROPERTY
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import serve_replicas, sqlite_catalog, start_server, wait_until, write_big

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
EXPIRE_AT_ONCE = {"history.expire.max-snapshot-age-ms": "1", "history.expire.min-snapshots-to-keep": "1"}


def rows(ids: range | list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in ids]),
        }
    )


def create(client: FeatureClient, table: str, data: pa.Table) -> int:
    return client.write(table, data, entity_keys=["id"], event_time="ts", partition_by=[]).snapshot_id


def set_properties(properties: dict[str, str], table: str, values: dict[str, str]) -> None:
    with FeatureCatalog("default", properties).load(table).transaction() as transaction:
        transaction.set_properties(values)


def ids(client: FeatureClient, table: str, snapshot_id: int | None = None) -> Counter[int]:
    return Counter(client.scan(table, snapshot_id=snapshot_id).read_all().column("id").to_pylist())


def snapshot_ids(client: FeatureClient, table: str) -> set[int]:
    return {s["snapshot_id"] for s in client.describe(table)["snapshots"]}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("upkeep"))


@pytest.fixture(scope="module")
def served(catalog: dict[str, str]) -> Iterator[FeatureFlightServer]:
    """A server whose background maintenance is off: the tests run rounds with `run_maintenance`."""
    server = start_server(catalog, batch_rows=1000)
    yield server
    server.shutdown()


@pytest.fixture
def client(served: FeatureFlightServer) -> Iterator[FeatureClient]:
    with FeatureClient(f"grpc://127.0.0.1:{served.port}") as c:
        yield c


def test_a_round_compacts_the_small_files_of_a_crowded_partition(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    create(client, table, rows([0]))
    set_properties(catalog, table, {COMPACT_MIN_FILES_PROPERTY: "5"})
    for i in range(1, 4):
        client.write(table, rows([i]))
    below = client.run_maintenance(table)  # 4 small files: fewer than 5
    assert below["enabled"] and below["data_files_compacted"] == 0 and below["error"] is None
    for i in range(4, 6):
        client.write(table, rows([i]))
    result = client.run_maintenance(table)
    assert (result["data_files_compacted"], result["data_files_added"]) == (6, 1)
    assert result["snapshots_expired"] == 0 and result["gave_way"] == [] and result["error"] is None
    assert ids(client, table) == Counter(range(6))
    assert client.describe(table)["maintenance"] == result
    assert client.run_maintenance(table)["data_files_compacted"] == 0  # one file now: nothing to do
    totals = client.health()["maintenance"]
    assert totals["data_files_compacted"] >= 6 and totals["rounds"] >= 3 and not totals["enabled"]


def test_a_compaction_commits_over_a_put_that_landed_while_it_rewrote(
    served: FeatureFlightServer, client: FeatureClient, table: str
) -> None:
    """Without this, a table put to every few seconds would never be compacted: each round would lose."""
    create(client, table, rows([0]))
    for i in range(1, 4):
        client.write(table, rows([i]))

    def plan_with_a_put_meanwhile(snapshot: SnapshotRows) -> Plan:
        scope = small_file_groups(snapshot.files, 2, 1 << 30, 1 << 30)
        added, scope = snapshot.rewrite("filename IN (SELECT unnest(?))", [[f.file_path for f in scope]], scope)
        client.write(table, rows([4]))  # commits between the rewrite's plan and its commit
        return Plan(Operation.OVERWRITE, scope, added, 4, tidy=True)

    done = served.parts.maintenance.rewrite_once(table, "compact", plan_with_a_put_meanwhile)
    assert done.committed and (done.data_files_removed, done.data_files_added) == (4, 1)
    assert ids(client, table) == Counter(range(5))
    assert client.describe(table)["current_snapshot_id"] == done.snapshot_id


def test_a_table_can_turn_maintenance_off(client: FeatureClient, catalog: dict[str, str], table: str) -> None:
    create(client, table, rows([0]))
    for i in range(1, 4):
        client.write(table, rows([i]))
    set_properties(catalog, table, {ENABLED_PROPERTY: "false", COMPACT_MIN_FILES_PROPERTY: "2", **EXPIRE_AT_ONCE})
    before = client.describe(table)["snapshots"]
    result = client.run_maintenance(table)
    assert not result["enabled"] and result["data_files_compacted"] == 0 and result["snapshots_expired"] == 0
    assert client.describe(table)["snapshots"] == before


def test_expiry_keeps_pinned_snapshots_and_those_in_use(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    write_big(client, table, 1_000_000)  # many batches of 1000 rows: a scan of it streams for a while
    big = client.describe(table)["current_snapshot_id"]
    pinned = client.write(table, rows([2_000_000])).snapshot_id
    cached = client.write(table, rows([2_000_001])).snapshot_id
    # A training set at `cached` (then the current snapshot) leaves its sorted index in the server's cache.
    entities = pa.table({"id": pa.array([5], pa.int64()), "event_timestamp": pa.array([T0], pa.timestamp("us", "UTC"))})
    client.get_historical_features(entities, [f"{table}:value"])
    current = client.write(table, rows([2_000_002])).snapshot_id
    client.pin(table, pinned)
    set_properties(catalog, table, {COMPACT_MIN_FILES_PROPERTY: "100000", **EXPIRE_AT_ONCE})

    scan = client.scan(table, snapshot_id=big)  # running: the server holds `big` until the stream ends
    first = scan.read_next_batch()
    during = client.run_maintenance(table)
    assert (during["snapshots_expired"], during["kept_pinned"], during["kept_in_use"]) == (0, 1, 2)
    assert snapshot_ids(client, table) == {big, pinned, cached, current}
    assert first.num_rows + scan.read_all().num_rows == 1_000_000  # the files of `big` are all still there

    after = client.run_maintenance(table)  # the scan ended: `big` goes, the cached training set's stays
    assert (after["snapshots_expired"], after["kept_pinned"], after["kept_in_use"]) == (1, 1, 1)
    assert after["files_deleted"] >= 1 and after["bytes_freed"] > 0
    assert snapshot_ids(client, table) == {pinned, cached, current}
    assert ids(client, table, pinned) == Counter([*range(1_000_000), 2_000_000])
    assert sum(ids(client, table).values()) == 1_000_003


def test_a_followed_table_put_to_often_keeps_few_snapshots_in_use(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    """A table put to again and again, its training-set index brought forward ahead of every put, and a training
    set at its current snapshot after every third put (jobs that may ask again): expiry keeps the current snapshot
    and those of the last `_RECENT_GENERATIONS` (4) indexes a request asked for before it, and the cache holds no
    other index of the table, however many puts. Without a bound every generation stayed and kept its snapshot."""
    entities = pa.table({"id": pa.array([5], pa.int64()), "event_timestamp": pa.array([T0], pa.timestamp("us", "UTC"))})
    asked = [create(client, table, rows([0]))]
    set_properties(catalog, table, {COMPACT_MIN_FILES_PROPERTY: "100000", **EXPIRE_AT_ONCE})
    client.get_historical_features(entities, [f"{table}:value"])  # at the current snapshot: followed from now on
    stats = client.health()["training_set_cache"]
    for n in range(1, 31):
        snapshot = client.write(table, rows([n])).snapshot_id
        wait_until(
            lambda n=n: client.health()["training_set_cache"]["refreshed_ahead"] >= stats["refreshed_ahead"] + n,  # type: ignore[misc]
            what="the index brought forward",
        )
        if n % 3 == 0:
            client.get_historical_features(entities, [f"{table}:value"])
            asked.append(snapshot)
    done = client.run_maintenance(table)
    assert (done["snapshots_expired"], done["kept_in_use"]) == (26, 4), done
    assert snapshot_ids(client, table) == set(asked[-5:])
    assert client.health()["training_set_cache"]["snapshots"] == stats["snapshots"] + 4


def test_the_background_thread_runs_rounds_by_itself(catalog: dict[str, str], table: str) -> None:
    server = start_server(catalog, auto_maintenance=True, maintenance_interval_seconds=0.05)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, table, rows([0]))
            set_properties(catalog, table, {COMPACT_MIN_FILES_PROPERTY: "3"})
            for i in range(1, 3):
                client.write(table, rows([i]))

            def compacted() -> bool:
                last = client.describe(table)["maintenance"]
                return last is not None and last["data_files_compacted"] > 0

            wait_until(compacted, what="a background round that compacts the table")
            assert ids(client, table) == Counter(range(3))
            health = client.health()["maintenance"]
            assert health["enabled"] and health["rounds"] >= 1 and health["last"] is not None
    finally:
        server.shutdown()


def test_two_replicas_maintaining_one_table_lose_nothing(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    fast = {"FLIGHT_SERVER_MAINTENANCE_INTERVAL_SECONDS": "0.05"}
    table, puts = "fleet.upkeep", 40
    # Snapshots expire 1.5 s after they are made: far longer than a put or a compaction runs here, which
    # the age must be (operations.md), and short enough for many to expire during the test.
    policy = {
        COMPACT_MIN_FILES_PROPERTY: "3",
        "history.expire.max-snapshot-age-ms": "1500",
        "history.expire.min-snapshots-to-keep": "3",
    }
    with serve_replicas(tmp_path, properties, lambda location, locations: fast) as locations:
        clients = [FeatureClient(location) for location in locations]
        try:
            create(clients[0], table, rows([0]))
            pinned = clients[0].pin(table)["snapshot_id"]
            set_properties(properties, table, policy)
            writing = threading.Event()
            writing.set()
            results: list[dict[str, Any]] = []

            def maintain(client: FeatureClient) -> None:
                while writing.is_set():  # rounds on demand as well as in the background, on both replicas
                    results.append(client.run_maintenance(table))

            threads = [threading.Thread(target=maintain, args=(c,)) for c in clients]
            for thread in threads:
                thread.start()
            try:
                for i in range(1, puts):
                    clients[i % 2].write(table, rows([i]), write_id=f"put-{i}")
            finally:
                writing.clear()
                for thread in threads:
                    thread.join()

            def expired() -> bool:
                results.append(clients[0].run_maintenance(table))
                return sum(r["snapshots_expired"] for r in results) > 0

            wait_until(expired, what="an expiry")
            assert sum(r["data_files_compacted"] for r in results) > 0
            for client in clients:
                assert ids(client, table) == Counter(range(puts))  # no row lost, none doubled
                assert ids(client, table, pinned) == Counter([0])  # the pinned snapshot still reads
                assert client.health()["maintenance"]["rounds"] > 0
        finally:
            for client in clients:
                client.close()
