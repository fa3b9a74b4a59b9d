"""Automatic maintenance (flight_server/changes/upkeep.py): a round compacts the small files of crowded partitions
and expires old snapshots, keeping pinned ones and those a running read or a cached training set uses, and the
oldest beyond the table's cap on their number (`choose_expired`, against a plain reference); a table can turn it
off; the background thread runs rounds by itself; two replicas maintaining one table while a writer puts lose and
double nothing."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import load_catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table.snapshots import Operation

from flight_client import FeatureClient, InvalidRequestError
from flight_server.changes.maintenance import (
    MIN_SNAPSHOTS_PROPERTY,
    ExpiryChoice,
    _commit_refs,
    choose_expired,
    small_file_groups,
)
from flight_server.changes.rewrite import Plan, SnapshotRows
from flight_server.changes.upkeep import (
    CAP_MIN_AGE_PROPERTY,
    COMPACT_MIN_FILES_PROPERTY,
    ENABLED_PROPERTY,
    MAX_SNAPSHOTS_PROPERTY,
)
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.training.sets import TrainingSets
from flight_server.transport import handlers
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import serve_replicas, sqlite_catalog, start_server, start_writing_server, wait_until, write_big

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


@pytest.mark.parametrize("step", ["open_scan", "scan_parts"])
def test_a_scan_keeps_its_snapshot_from_this_servers_expiry_from_planning_on(
    served: FeatureFlightServer, client: FeatureClient, table: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A scan holds its snapshot from right after planning, not only once its rows stream: `open_scan` (a ticket's
    read; DuckDB's `iceberg_scan` runs to its first batch there) and `scan_parts` (`get_flight_info` splitting a
    scan by file) read its manifests. An expiry brought into that moment (a put lands, then every snapshot but the
    newest expires, as a round on a table put to every few seconds does) keeps it; the expiry is real, only its
    moment is chosen, by wrapping the step that follows planning."""
    create(client, table, rows([0]))
    planned = client.write(table, rows([1])).snapshot_id
    expired: list[dict[str, Any]] = []
    real = getattr(handlers, step)

    def expired_after_planning(plan: Any, *args: Any, **kwargs: Any) -> Any:
        if not expired:  # once: the tickets of `scan_parts` come back here
            with FeatureClient(f"grpc://127.0.0.1:{served.port}") as other:
                other.write(table, rows([2]))
                now = dt.datetime.now(dt.timezone.utc)
                expired.append(other.expire_snapshots(table, older_than=now, retain_last=1))
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(handlers, step, expired_after_planning)
    if step == "open_scan":
        scanned = client.scan(table, filter="id >= 1").read_all()
    else:
        scanned = client.read_table(table, filter="id >= 0", partitions=2)
    assert sorted(scanned.column("id").to_pylist()) == ([1] if step == "open_scan" else [0, 1])  # as planned
    assert expired[0]["kept_in_use"] == [planned]


def test_an_online_lookup_into_history_keeps_its_snapshot_from_this_servers_expiry(
    served: FeatureFlightServer, client: FeatureClient, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An online lookup `as_of` a time is a training set run inline (`lookup_as_of`): it holds the snapshots it
    planned while DuckDB reads them, as a scan does."""
    create(client, table, rows([0]))
    planned = client.write(table, rows([1])).snapshot_id
    expired: list[dict[str, Any]] = []
    real = TrainingSets.run_inline

    def expired_after_planning(self: TrainingSets, *args: Any, **kwargs: Any) -> Any:
        if not expired:
            with FeatureClient(f"grpc://127.0.0.1:{served.port}") as other:
                other.write(table, rows([2]))
                now = dt.datetime.now(dt.timezone.utc)
                expired.append(other.expire_snapshots(table, older_than=now, retain_last=1))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainingSets, "run_inline", expired_after_planning)
    answer = client.get_online_features({"id": [0, 1]}, [f"{table}:value"], as_of=T0 + dt.timedelta(days=1))
    assert answer.column("value").to_pylist() == [0.0, 1.0]
    assert expired[0]["kept_in_use"] == [planned]


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


# The snapshot cap: beyond the age rule, the oldest snapshots expire until at most max-snapshots remain.

NO_COMPACTION = {COMPACT_MIN_FILES_PROPERTY: "100000"}


def capped(client: FeatureClient, catalog: dict[str, str], table: str, count: int, policy: dict[str, str]) -> list[int]:
    """A table of `count` puts of one row each (ids 0 ..) under the maintenance `policy`: its snapshots, oldest
    first. The age rule is the server's day: none of them is old enough for it; the cap may take any of them unless
    the `policy` sets its own floor (`CAP_MIN_AGE_PROPERTY`, an hour by default)."""
    made = [create(client, table, rows([0]))]
    set_properties(catalog, table, {**NO_COMPACTION, CAP_MIN_AGE_PROPERTY: "0", **policy})
    return made + [client.write(table, rows([i])).snapshot_id for i in range(1, count)]


def commits(catalog: dict[str, str], table: str) -> int:
    """How many commits the table's metadata log records (each commit adds one)."""
    return len(FeatureCatalog("default", catalog).load(table).metadata.metadata_log)


def test_a_round_expires_the_oldest_snapshots_beyond_the_cap(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    made = capped(client, catalog, table, 12, {MAX_SNAPSHOTS_PROPERTY: "5", MIN_SNAPSHOTS_PROPERTY: "1"})
    before = commits(catalog, table)
    result = client.run_maintenance(table)
    assert (result["snapshots_expired"], result["kept_pinned"], result["kept_in_use"]) == (7, 0, 0), result
    assert result["files_deleted"] >= 7 and result["error"] is None and result["gave_way"] == []
    assert snapshot_ids(client, table) == set(made[-5:])
    assert commits(catalog, table) == before + 1
    assert ids(client, table) == Counter(range(12))
    assert client.describe(table)["maintenance"] == result
    assert client.health()["maintenance"]["snapshots_expired"] >= 7
    assert client.run_maintenance(table)["snapshots_expired"] == 0  # at the cap: nothing more to do


def test_the_cap_takes_no_snapshot_younger_than_its_floor(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    """By default the cap leaves snapshots younger than an hour alone: reads, puts and compactions that other replicas
    planned on them find their files (tests/test_review17.py); past the floor it takes them as before."""
    made = capped(client, catalog, table, 8, {MAX_SNAPSHOTS_PROPERTY: "3", MIN_SNAPSHOTS_PROPERTY: "1"})
    set_properties(catalog, table, {CAP_MIN_AGE_PROPERTY: str(3600 * 1000)})
    assert client.run_maintenance(table)["snapshots_expired"] == 0
    set_properties(catalog, table, {CAP_MIN_AGE_PROPERTY: "0"})
    assert client.run_maintenance(table)["snapshots_expired"] == 5
    assert snapshot_ids(client, table) == set(made[-3:])


def test_a_read_another_replica_planned_survives_the_cap(tmp_path: Path) -> None:
    """Only this replica's reads are known to its expiry: a read another replica planned on a snapshot seconds old
    still reads after this replica's round caps the table (the floor; review 17 found it taken)."""
    properties = sqlite_catalog(tmp_path)
    table = "capped.read"
    no_auto = {"FLIGHT_SERVER_AUTO_MAINTENANCE": "false"}
    with (
        serve_replicas(tmp_path, properties, lambda location, locations: no_auto) as (here, there),
        FeatureClient(here) as writer,
        FeatureClient(there) as reader,
    ):
        create(writer, table, rows([0, 1]))
        set_properties(properties, table, {**NO_COMPACTION, MAX_SNAPSHOTS_PROPERTY: "1", MIN_SNAPSHOTS_PROPERTY: "1"})
        planned = reader.flight_info(table)  # the other replica plans a read of the current snapshot
        writer.write(table, rows([2]), mode="overwrite")  # its files are the planned snapshot's alone now
        result = writer.run_maintenance(table)
        assert result["error"] is None and result["snapshots_expired"] == 0, result
        got = pa.concat_tables(reader.read_endpoint(e).read_all() for e in planned.endpoints)
        assert Counter(got.column("id").to_pylist()) == Counter([0, 1])


def test_the_cap_keeps_pinned_snapshots_and_counts_them(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    made = capped(client, catalog, table, 12, {MAX_SNAPSHOTS_PROPERTY: "5", MIN_SNAPSHOTS_PROPERTY: "1"})
    client.pin(table, made[2])
    result = client.run_maintenance(table)
    assert (result["snapshots_expired"], result["kept_pinned"], result["kept_in_use"]) == (7, 1, 0), result
    assert snapshot_ids(client, table) == {made[2], *made[-4:]}
    assert ids(client, table, made[2]) == Counter(range(3))
    assert ids(client, table) == Counter(range(12))


def test_the_minimum_kept_wins_over_a_lower_cap_and_zero_turns_the_cap_off(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    made = capped(client, catalog, table, 12, {MAX_SNAPSHOTS_PROPERTY: "0", MIN_SNAPSHOTS_PROPERTY: "1"})
    assert client.run_maintenance(table)["snapshots_expired"] == 0
    set_properties(catalog, table, {MAX_SNAPSHOTS_PROPERTY: "3", MIN_SNAPSHOTS_PROPERTY: "6"})
    assert client.run_maintenance(table)["snapshots_expired"] == 6
    assert snapshot_ids(client, table) == set(made[-6:])
    assert ids(client, table) == Counter(range(12))


def test_expire_snapshots_caps_the_count_when_asked(client: FeatureClient, catalog: dict[str, str], table: str) -> None:
    made = capped(client, catalog, table, 12, {})
    client.pin(table, made[1], name="kept")
    assert client.expire_snapshots(table)["expired"] == []  # no cap unless asked, and none is 5 days old
    before = commits(catalog, table)
    result = client.expire_snapshots(table, max_snapshots=4)
    assert result["expired"] == [made[0], *made[2:9]] and result["kept_pinned"] == [made[1]], result
    assert result["snapshots_left"] == 4 and commits(catalog, table) == before + 1
    assert snapshot_ids(client, table) == {made[1], *made[-3:]}
    forced = client.expire_snapshots(table, max_snapshots=3, force=True)
    assert forced["expired"] == [made[1]] and forced["unpinned"] == ["kept"] and forced["snapshots_left"] == 3
    assert ids(client, table) == Counter(range(12))


def test_a_table_hammered_past_the_servers_cap_comes_back_to_it_in_one_round(tmp_path: Path) -> None:
    """Four writers at once put far past the server's cap (`expire_max_snapshots`, 10: at least 20 snapshots, as the
    puts of one writer never share a group commit); one round, whose expiry runs in the write process, leaves the
    newest 10 and every row. The cap of `expire_snapshots` crosses to the write process too."""
    properties = sqlite_catalog(tmp_path)
    server = start_writing_server(properties, expire_max_snapshots=10, expire_min_snapshots=1, expire_cap_min_age_ms=0)
    table, writers, each = "hammer.t", 4, 20
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, table, rows([0]))
            set_properties(properties, table, NO_COMPACTION)

            def put(writer: int) -> None:
                for i in range(each):
                    client.write(table, rows([1 + writer * each + i]))

            threads = [threading.Thread(target=put, args=(w,)) for w in range(writers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            before = client.describe(table)["snapshots"]
            assert len(before) > 20
            result = client.run_maintenance(table)
            assert result["snapshots_expired"] == len(before) - 10 and result["error"] is None, result
            left = snapshot_ids(client, table)
            assert len(left) == 10 and client.describe(table)["current_snapshot_id"] in left
            times = {s["snapshot_id"]: s["timestamp_ms"] for s in before}
            assert min(times[s] for s in left) >= max(times[s] for s in times if s not in left)  # the newest
            assert ids(client, table) == Counter(range(1 + writers * each))
            assert client.expire_snapshots(table, max_snapshots=3)["snapshots_left"] == 3
    finally:
        server.shutdown()


def reference_expiry(
    snapshots: list[tuple[int, int]],
    older_than: int,
    retain_last: int,
    max_snapshots: int | None,
    capped_before: int | None,
    heads: set[int],
    pinned: dict[str, int],
    in_use: set[int],
    force: bool,
    cap_expiries: int,
) -> ExpiryChoice:
    """The rules as the docs state them, one at a time: the age rule, then the oldest one by one while too many
    remain (`cap_expiries` of them at most); the pinned and in-use snapshots a rule reached are reported."""
    newest_first = [sid for sid, _ in sorted(snapshots, key=lambda s: s[1], reverse=True)]
    age = {sid: newest_first.index(sid) for sid, _ in snapshots}  # 0: the newest
    spared = set(newest_first[:retain_last]) | heads

    def stays(sid: int) -> bool:
        return sid in spared or sid in in_use or (not force and sid in pinned.values())

    old = {sid for sid, timestamp in snapshots if timestamp < older_than}
    expired = {sid for sid in old if not stays(sid)}
    cap = None if max_snapshots is None else max(max_snapshots, retain_last)
    times = dict(snapshots)

    def cappable(sid: int) -> bool:  # old enough for the cap
        return capped_before is None or times[sid] < capped_before

    while cap is not None and len(snapshots) - len(expired) > cap and len(expired - old) < cap_expiries:
        candidates = [sid for sid, _ in snapshots if sid not in expired and not stays(sid) and cappable(sid)]
        if not candidates:
            break
        expired.add(max(candidates, key=age.__getitem__))

    def reached(sid: int) -> bool:  # a rule chose it: the age, or too many left once those older went
        if sid not in age or sid in spared:
            return False
        older_expired = {e for e in expired if age[e] > age[sid]}
        over = cap is not None and len(snapshots) - len(older_expired) > cap
        return sid in old or (over and len(older_expired - old) < cap_expiries and cappable(sid))

    kept_pinned = set() if force else {sid for sid in pinned.values() if reached(sid)}
    return ExpiryChoice(
        expired=[sid for sid, _ in snapshots if sid in expired],
        kept_pinned=sorted(kept_pinned),
        kept_in_use=sorted(sid for sid in in_use if reached(sid) and sid not in kept_pinned),
        unpinned=sorted(name for name, sid in pinned.items() if reached(sid)) if force else [],
    )


@st.composite
def expiries(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(0, 30))
    times = draw(st.lists(st.integers(0, 40), min_size=count, max_size=count))  # ties and clock skew too
    snapshots = list(zip(range(100, 100 + count), times, strict=True))
    sids = st.integers(97, 99 + count)  # mostly this table's, a few of none of its snapshots
    return {
        "snapshots": snapshots,
        "older_than": draw(st.integers(-1, 42)),
        "retain_last": draw(st.integers(1, 8)),
        "max_snapshots": draw(st.none() | st.integers(1, 25)),
        "capped_before": draw(st.none() | st.integers(-1, 42)),
        "heads": draw(st.sets(sids, max_size=2)),
        "pinned": draw(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), sids, max_size=4)),
        "in_use": draw(st.sets(sids, max_size=6)),
        "force": draw(st.booleans()),
        "cap_expiries": draw(st.integers(1, 30)),
    }


@settings(max_examples=500, deadline=None)
@given(case=expiries())
def test_the_expiry_choice_is_the_rules_applied_one_at_a_time(case: dict[str, Any]) -> None:
    assert choose_expired(**case) == reference_expiry(**case)


def test_a_pin_decided_on_metadata_since_expired_elsewhere_gives_way(tmp_path: Path) -> None:
    """A pin commits on the metadata it was decided on: when another replica expired its snapshot meanwhile, the
    commit fails as a lost race (the `pin` action then decides again and answers NOT_FOUND), where pyiceberg's own
    commit applied it again on the new metadata and failed with a ValueError (INTERNAL)."""
    properties = sqlite_catalog(tmp_path)
    catalog = load_catalog("default", **properties)
    catalog.create_namespace("ns")
    created = catalog.create_table("ns.t", schema=rows([0]).schema)
    for i in range(3):
        created.append(rows([i]))
    stale = FeatureCatalog("default", properties).load("ns.t")
    oldest = stale.metadata.snapshots[0].snapshot_id
    catalog.load_table("ns.t").maintenance.expire_snapshots().by_id(oldest).commit()  # another replica's expiry
    with pytest.raises(CommitFailedException):
        _commit_refs(stale, lambda manage: manage.create_tag(oldest, "kept"), "gone")
    assert "kept" not in catalog.load_table("ns.t").metadata.refs


def test_a_huge_cap_floor_leaves_the_age_rule_working(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    """`flight.maintenance.max-snapshots-min-age-ms` set to Java's Long.MAX_VALUE ("the cap never takes anything", as
    Iceberg's own age properties are often set) is accepted by `int_property`, but `now - timedelta(that)` raises
    OverflowError outside `done.step`: the whole round fails (INTERNAL for run_maintenance, a logged exception in the
    background loop), so the age rule, the cap and orphan removal never run for that table again."""
    client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
    set_properties(
        catalog,
        table,
        {
            COMPACT_MIN_FILES_PROPERTY: "100000",
            MAX_SNAPSHOTS_PROPERTY: "1",
            CAP_MIN_AGE_PROPERTY: str(2**63 - 1),
            "history.expire.max-snapshot-age-ms": "1",
            "history.expire.min-snapshots-to-keep": "1",
        },
    )
    client.write(table, rows([1]))
    result = client.run_maintenance(table)
    assert result["error"] is None and result["snapshots_expired"] >= 1, result


def test_expire_snapshots_on_a_table_whose_age_property_is_not_a_number(
    client: FeatureClient, catalog: dict[str, str], table: str
) -> None:
    """Automatic maintenance reads `history.expire.max-snapshot-age-ms` with `int_property` (a warning, the default),
    but the `expire_snapshots` action without `older_than` does `int(properties.get(...))` (maintenance.py
    `_expire_locked`, before this change too): a property another engine's user set to "a day" makes it INTERNAL
    instead of the default or an INVALID_ARGUMENT naming the property."""
    client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
    set_properties(catalog, table, {"history.expire.max-snapshot-age-ms": "a day"})
    client.write(table, rows([1]))
    assert client.run_maintenance(table)["error"] is None  # the round takes the default
    try:
        client.expire_snapshots(table)
    except InvalidRequestError as exc:
        assert "history.expire.max-snapshot-age-ms" in str(exc)
