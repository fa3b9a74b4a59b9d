"""Replicas whose clocks disagree (docs/operations.md, "Clocks"): real server processes on one catalog, one of them
minutes behind or hours ahead through libfaketime (scripts/test.sh installs Debian's `faketime`).

A snapshot's commit time is the committing machine's clock, and Iceberg's Java `TableMetadata` refuses to load
metadata whose snapshot log or metadata log goes back by more than a minute: a replica behind the others must still
commit in order (`ordered_snapshots` in flight_server/iceberg/internals.py), or Spark and Trino could no longer load
the table, and time travel by time would answer another snapshot once it committed."""

from __future__ import annotations

import datetime as dt
import glob
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.table.update import AddSnapshotUpdate, SetPropertiesUpdate

from flight_client import FeatureClient
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.iceberg.internals import commit_floor_ms, ordered_snapshots, updated_metadata
from tests.conftest import replica_processes, sqlite_catalog
from tests.services import free_ports
from tests.test_metrics import scrape, value

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
ONE_MINUTE = 60_000
MANUAL = {"FLIGHT_SERVER_AUTO_MAINTENANCE": "false"}
METRICS: list[int] = []  # the replicas' metrics ports
CLOCK_BEHIND = "flight_commit_clock_behind_total"


def faketime(offset: str) -> dict[str, str]:
    """The environment that sets a process's clock `offset` (libfaketime's "-5m", "+2h") from the machine's, its
    monotonic clock left alone (timeouts and idle watches keep real time)."""
    found = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    if not found:
        pytest.fail("libfaketime is needed to skew a replica's clock: run scripts/test.sh, which installs faketime")
    return {"LD_PRELOAD": found[0], "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def rows(ids: range) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in ids]),
        }
    )


def java_refusals(metadata: dict[str, Any]) -> list[str]:
    """What Iceberg Java's `TableMetadata` constructor refuses in a metadata file's times: a snapshot log or metadata
    log entry more than a minute before the one ahead of it, a last update more than a minute before either log's
    last entry."""
    refused = []
    for key in ("snapshot-log", "metadata-log"):
        times = [entry["timestamp-ms"] for entry in metadata.get(key, [])]
        pairs = zip(times, times[1:], strict=False)
        refused += [f"{key}: {after} after {before}" for before, after in pairs if after - before < -ONE_MINUTE]
        if times and metadata["last-updated-ms"] - times[-1] < -ONE_MINUTE:
            refused.append(f"last-updated-ms {metadata['last-updated-ms']} before {key}'s last entry {times[-1]}")
    return refused


def metadata_json(properties: dict[str, str], table: str) -> dict[str, Any]:
    location = FeatureCatalog("default", properties).load(table).metadata_location
    return json.loads(Path(location.removeprefix("file://")).read_text())


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], list[str]]]:
    """Three replicas on one SQLite catalog: on time, 5 minutes behind, 2 hours ahead (their metrics on
    `METRICS[i]`)."""
    tmp = tmp_path_factory.mktemp("clocks")
    properties = sqlite_catalog(tmp)
    skews = [{}, faketime("-5m"), faketime("+2h")]
    METRICS[:] = free_ports(3)

    def settings(location: str, locations: list[str]) -> dict[str, str]:
        i = locations.index(location)
        return {**MANUAL, **skews[i], "FLIGHT_SERVER_METRICS_PORT": str(METRICS[i])}

    with replica_processes(tmp, properties, settings, count=3) as started:
        yield properties, [location for location, _ in started]


def test_a_replica_five_minutes_behind_commits_in_order(replicas: tuple[dict[str, str], list[str]]) -> None:
    """Puts (one and grouped), a compaction, a pin and an expiry through a replica 5 minutes behind, between puts
    through one on time: every commit lands, and the table's logs stay in order, as Java loads them."""
    properties, (on_time, behind, _) = replicas
    table = "clocks.behind"
    before = [value(scrape(port), CLOCK_BEHIND) for port in METRICS[:2]]
    with FeatureClient(on_time) as right, FeatureClient(behind) as late:
        right.write(table, rows(range(0, 10)), entity_keys=["id"], event_time="ts")
        late.write(table, rows(range(10, 20)))
        right.write(table, rows(range(20, 30)))
        with ThreadPoolExecutor(3) as pool:  # queued behind one another: group commits
            list(pool.map(lambda i: late.write(table, rows(range(30 + 10 * i, 40 + 10 * i))), range(3)))
        late.compact(table)
        late.pin(table, name="kept")
        late.expire_snapshots(table, older_than=int(time.time() * 1000) + 3_600_000, retain_last=3)
        right.write(table, rows(range(60, 70)))
        assert late.scan(table).read_all().num_rows == 70
        record = late.describe(table)["last_expiry"]
    after = [value(scrape(port), CLOCK_BEHIND) for port in METRICS[:2]]
    # Counted by the replica behind (a put, a group, a compaction at least), not by the one on time.
    assert after[0] == before[0] and (after[1] or 0) - (before[1] or 0) >= 3
    metadata = metadata_json(properties, table)
    assert java_refusals(metadata) == []
    for key in ("snapshot-log", "metadata-log"):
        times = [entry["timestamp-ms"] for entry in metadata[key]]
        assert times == sorted(set(times)), key
    stamped = {s["snapshot-id"]: s["timestamp-ms"] for s in metadata["snapshots"]}
    assert all(stamped.get(e["snapshot-id"], e["timestamp-ms"]) == e["timestamp-ms"] for e in metadata["snapshot-log"])
    # The replica's clock was behind: the record its expiry left says so (the commit times do not).
    at = dt.datetime.fromisoformat(record["at"].replace("Z", "+00:00"))
    assert dt.timedelta(minutes=4) < dt.datetime.now(dt.timezone.utc) - at < dt.timedelta(minutes=6)


def test_time_travel_by_time_answers_the_snapshot_log_and_again_the_same(
    replicas: tuple[dict[str, str], list[str]],
) -> None:
    """Each snapshot log entry's time answers that entry's snapshot (Iceberg's rule: the last entry at or before
    the time), through every replica, and the answers stay the same after a replica behind commits again."""
    properties, locations = replicas
    table = "clocks.travel"
    on_time, behind, _ = locations
    with FeatureClient(on_time) as right, FeatureClient(behind) as late:
        right.write(table, rows(range(0, 5)), entity_keys=["id"], event_time="ts")
        late.write(table, rows(range(5, 10)))
        right.write(table, rows(range(10, 15)))
        log = metadata_json(properties, table)["snapshot-log"]

        def answers() -> list[tuple[int, int]]:
            found = []
            for location in locations:
                with FeatureClient(location) as client:
                    for entry in log:
                        read = client.scan(table, as_of=entry["timestamp-ms"]).read_all()
                        found.append((int(read.schema.metadata[b"flight.snapshot_id"]), read.num_rows))
            return found

        first = answers()
        assert [sid for sid, _ in first] == [entry["snapshot-id"] for entry in log] * len(locations)
        assert [n for _, n in first[: len(log)]] == [5, 10, 15]
        late.write(table, rows(range(15, 20)))
        assert answers() == first


def test_a_replica_hours_ahead_expires_by_its_clock_but_keeps_the_floor_and_the_pins(
    replicas: tuple[dict[str, str], list[str]],
) -> None:
    """Expiry by age on a replica 2 hours ahead, with a 1-hour age: it expires the snapshots the others still see as
    young (documented: expiry needs clocks far closer than the ages it keeps), but never the newest
    `history.expire.min-snapshots-to-keep` nor a pinned one; the record it leaves is stamped by its clock, and the
    commits after it, through a replica on time, are ordered after it."""
    properties, (on_time, _, ahead) = replicas
    table = "clocks.ahead"
    with FeatureClient(on_time) as right, FeatureClient(ahead) as early:
        first = right.write(table, rows(range(0, 5)), entity_keys=["id"], event_time="ts")
        right.pin(table, first.snapshot_id, name="first")
        for start in range(5, 30, 5):
            right.write(table, rows(range(start, start + 5)))
        catalog = FeatureCatalog("default", properties)
        with catalog.load(table).transaction() as transaction:
            transaction.set_properties(
                {"history.expire.max-snapshot-age-ms": "3600000", "history.expire.min-snapshots-to-keep": "2"}
            )
        expired = early.expire_snapshots(table)
        assert len(expired["expired"]) == 3 and expired["kept_pinned"] == [first.snapshot_id]
        assert expired["snapshots_left"] == 3
        right.write(table, rows(range(30, 35)))
        described = right.describe(table)
        assert right.scan(table).read_all().num_rows == 35
    at = dt.datetime.fromisoformat(described["last_expiry"]["at"].replace("Z", "+00:00"))
    assert at - dt.datetime.now(dt.timezone.utc) > dt.timedelta(minutes=110)  # as the replica ahead saw it
    metadata = metadata_json(properties, table)
    assert java_refusals(metadata) == []
    assert [s["snapshot_id"] for s in described["snapshots"]][-1] == described["current_snapshot_id"]


def test_another_writer_behind_leaves_a_log_out_of_order_that_describe_and_time_travel_read_in_commit_order(
    tmp_path: Path, replicas: tuple[dict[str, str], list[str]]
) -> None:
    """An engine whose clock is 30 seconds behind (pyiceberg's own append, which stamps the snapshot with its clock
    and checks nothing; Java allows a minute) commits after this server: `describe` lists the history in commit
    order, with the current snapshot last, and time travel follows the snapshot log as Iceberg does."""
    properties, (on_time, _, _) = replicas
    table = "clocks.other_engine"
    with FeatureClient(on_time) as client:
        client.write(table, rows(range(0, 5)), entity_keys=["id"], event_time="ts")
        script = (
            "import sys, datetime as dt, pyarrow as pa\n"
            "from pyiceberg.catalog import load_catalog\n"
            "catalog = load_catalog('default', **dict(a.split('=', 1) for a in sys.argv[1:]))\n"
            f"table = catalog.load_table({table!r})\n"
            "t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)\n"
            "table.append(pa.table({'id': pa.array([99], pa.int64()), 'ts': pa.array([t0], pa.timestamp('us', 'UTC')),"
            " 'value': pa.array([9.0])}).cast(table.schema().as_arrow()))\n"
        )
        subprocess.run(
            [sys.executable, "-c", script, *(f"{k}={v}" for k, v in properties.items())],
            env={**faketime("-30s"), "PATH": "/usr/bin:/bin"},
            check=True,
            timeout=120,
        )
        described = client.describe(table)
        log = metadata_json(properties, table)["snapshot-log"]
        assert log[1]["timestamp-ms"] < log[0]["timestamp-ms"]  # the other engine's clock: back by 30 s
        assert [s["snapshot_id"] for s in described["snapshots"]] == [entry["snapshot-id"] for entry in log]
        assert described["snapshots"][-1]["snapshot_id"] == described["current_snapshot_id"]
        # Iceberg's rule: the last log entry at or before the time; the other engine's snapshot from its time on.
        assert client.scan(table, as_of=log[1]["timestamp-ms"]).read_all().num_rows == 6
        assert client.scan(table, as_of=log[0]["timestamp-ms"]).read_all().num_rows == 6
        entities = {"id": [99], "event_timestamp": [T0 + dt.timedelta(days=1)]}
        for entry in log:  # a training set as of a time: the same rule
            trained = client.get_historical_features(entities, [f"{table}:value"], as_of=entry["timestamp-ms"])
            assert json.loads(trained.schema.metadata[b"flight.snapshots"])["features"] == {
                table: log[1]["snapshot-id"]
            }
            assert trained.column("value").to_pylist() == [9.0]
        # The next commit through this server is ordered after both.
        client.write(table, rows(range(5, 10)))
    times = [entry["timestamp-ms"] for entry in metadata_json(properties, table)["snapshot-log"]]
    assert times[2] > max(times[:2])


def test_a_commit_is_ordered_after_the_tables_last_update_however_far_ahead(tmp_path: Path) -> None:
    """The pure rule: a snapshot stamped before the table's last update, its snapshot log's or its metadata log's
    last entry takes the time just after it, the next snapshot of the same commit after that; a change without a
    snapshot (an expiry, a pin) records a last update after it too; a snapshot stamped later keeps its time."""
    catalog = load_catalog("default", **sqlite_catalog(tmp_path))
    catalog.create_namespace("ns")
    table = catalog.create_table("ns.t", pa.schema([pa.field("x", pa.int64())]))
    table.append(pa.table({"x": pa.array([1], pa.int64())}))
    current = table.current_snapshot()
    assert current is not None
    ahead = table.metadata.last_updated_ms + 7_200_000  # another writer two hours ahead
    metadata = table.metadata.model_copy(update={"last_updated_ms": ahead})
    assert commit_floor_ms(metadata) == ahead + 1
    snapshots = [current.model_copy(update={"snapshot_id": n}) for n in (1, 2)]
    ordered = ordered_snapshots(metadata, tuple(AddSnapshotUpdate(snapshot=s) for s in snapshots))
    assert [u.snapshot.timestamp_ms for u in ordered if isinstance(u, AddSnapshotUpdate)] == [ahead + 1, ahead + 2]
    later = current.model_copy(update={"snapshot_id": 3, "timestamp_ms": ahead + 10})
    assert ordered_snapshots(metadata, (AddSnapshotUpdate(snapshot=later),))[0] == AddSnapshotUpdate(snapshot=later)
    properties_only = updated_metadata(metadata, (SetPropertiesUpdate(updates={"a": "b"}),))
    assert properties_only.last_updated_ms == ahead + 1


def test_a_step_of_a_replicas_wall_clock_leaves_its_online_index_lag_alone(tmp_path: Path) -> None:
    """NTP correcting a drifted clock, or a VM resumed, steps the wall clock: the online index's lag
    (`flight_online_index_lag_seconds`, which FlightOnlineIndexStale alerts on) is measured on the monotonic clock,
    so a step of two hours neither shows as two hours of lag nor hides one."""
    offset = tmp_path / "offset"
    offset.write_text("+0\n")
    stepped = {**faketime("+0"), "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1"}
    del stepped["FAKETIME"]
    port = free_ports(1)[0]
    settings = {
        **MANUAL,
        **stepped,
        "FLIGHT_SERVER_METRICS_PORT": str(port),
        "FLIGHT_SERVER_ONLINE_REFRESH_SECONDS": "3600",  # no refresh of its own meanwhile
    }
    properties = sqlite_catalog(tmp_path)
    with (
        replica_processes(tmp_path, properties, lambda location, locations: settings, count=1) as [(location, _)],
        FeatureClient(location) as client,
    ):
        client.write("clocks.lag", rows(range(5)), entity_keys=["id"], event_time="ts")
        found = client.get_online_features({"id": [1]}, ["clocks.lag:value"], apply_ttl=False)
        assert found.column("value").to_pylist() == [1.0]

        def lag() -> float:
            found = value(scrape(port), "flight_online_index_lag_seconds", table="clocks.lag")
            assert found is not None
            return found

        assert lag() < 60
        offset.write_text("+2h\n")
        assert lag() < 60
