"""What the table itself records of its maintenance (flight_server/changes/upkeep.py, maintenance.py): the last
expiry as a table property its own commit sets, the last compaction likewise, so that `describe`
shows both through any replica and after a restart; a round with nothing to do commits nothing; and a restarted
server takes up, by itself, a feature table nobody writes any more whose snapshots are past their age, and leaves
the catalog's other tables alone."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient
from flight_server.changes.upkeep import (
    CAP_MIN_AGE_PROPERTY,
    COMPACT_MIN_FILES_PROPERTY,
    ENABLED_PROPERTY,
    MAX_SNAPSHOTS_PROPERTY,
    Policy,
)
from flight_server.iceberg.catalog import LAST_EXPIRY_PROPERTY, FeatureCatalog
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import replica_processes, sqlite_catalog, start_server, wait_until

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
MANUAL = {"FLIGHT_SERVER_AUTO_MAINTENANCE": "false"}  # rounds only when a test asks for one


def rows(ids: range | list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in ids]),
        }
    )


def set_properties(properties: dict[str, str], table: str, values: dict[str, str]) -> None:
    with FeatureCatalog("default", properties).load(table).transaction() as transaction:
        transaction.set_properties(values)


def metadata_location(properties: dict[str, str], table: str) -> str:
    return FeatureCatalog("default", properties).load(table).metadata_location


def test_a_table_maintained_through_one_replica_shows_it_through_another_and_after_a_restart(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    table = "records.shared"
    with replica_processes(tmp_path, properties, lambda location, locations: MANUAL) as replicas:
        (a, a_process), (b, _) = replicas
        with FeatureClient(a) as client:
            client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
            set_properties(
                properties,
                table,
                {
                    COMPACT_MIN_FILES_PROPERTY: "3",
                    "history.expire.max-snapshot-age-ms": "1",
                    "history.expire.min-snapshots-to-keep": "1",
                },
            )
            for i in range(1, 3):
                client.write(table, rows([i]))
            done = client.run_maintenance(table)
        assert (done["data_files_compacted"], done["data_files_added"]) == (3, 1) and done["snapshots_expired"] > 0
        with FeatureClient(b) as client:
            seen = client.describe(table)
        assert seen["maintenance"] is None  # B ran no round of its own
        expiry = seen["last_expiry"]
        assert expiry is not None and expiry["snapshots_expired"] == done["snapshots_expired"]
        assert (expiry["kept_pinned"], expiry["kept_in_use"], expiry["snapshots_left"]) == (0, 0, 1)
        assert expiry["by"] and dt.datetime.fromisoformat(expiry["at"]) >= dt.datetime.fromisoformat(done["at"])
        compaction = seen["last_compaction"]
        assert compaction is not None and compaction["by"] == expiry["by"]
        assert dt.datetime.fromisoformat(done["at"]) <= dt.datetime.fromisoformat(compaction["at"])
        assert dt.datetime.fromisoformat(compaction["at"]) <= dt.datetime.fromisoformat(expiry["at"])
        assert (compaction["data_files_removed"], compaction["data_files_added"], compaction["rows"]) == (3, 1, 3)
        assert compaction["bytes_removed"] > 0 and compaction["bytes_added"] > 0
        os.killpg(a_process.pid, signal.SIGKILL)
        a_process.wait()
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    with (
        replica_processes(restarted, properties, lambda location, locations: MANUAL, count=1) as [(again, _)],
        FeatureClient(again) as client,
    ):
        after = client.describe(table)
    assert after["maintenance"] is None
    assert (after["last_expiry"], after["last_compaction"]) == (expiry, compaction)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FeatureFlightServer, dict[str, str]]]:
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties)
    yield server, properties
    server.shutdown()


def test_a_round_with_nothing_to_do_commits_nothing(served: tuple[FeatureFlightServer, dict[str, str]]) -> None:
    """The expiry record rides on the expiry's commit: no expiry, no commit, however many rounds."""
    server, properties = served
    table = "records.idle"
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
        client.write(table, rows([1]))
        before = metadata_location(properties, table)
        for _ in range(3):
            done = client.run_maintenance(table)  # the server's day of snapshots: none is old enough
            assert (done["snapshots_expired"], done["data_files_compacted"], done["error"]) == (0, 0, None)
        assert metadata_location(properties, table) == before
        described = client.describe(table)
        assert len(described["snapshots"]) == 2 and described["last_expiry"] is None
        assert described["last_compaction"] is None

        set_properties(
            properties, table, {"history.expire.max-snapshot-age-ms": "1", "history.expire.min-snapshots-to-keep": "1"}
        )
        assert client.run_maintenance(table)["snapshots_expired"] == 1
        expired = metadata_location(properties, table)
        record = client.describe(table)["last_expiry"]
        assert record is not None and record["snapshots_expired"] == 1
        assert LAST_EXPIRY_PROPERTY in FeatureCatalog("default", properties).load(table).metadata.properties
        for _ in range(2):  # one snapshot left, the newest: nothing more to expire
            assert client.run_maintenance(table)["snapshots_expired"] == 0
        assert metadata_location(properties, table) == expired
        assert client.describe(table)["last_expiry"] == record


def test_a_restarted_server_expires_a_table_nobody_writes_any_more(tmp_path: Path) -> None:
    """Two replicas restarted at once both find the table due and expire it: one gives way, neither fails."""
    properties = sqlite_catalog(tmp_path)
    table = "records.forgotten"
    with replica_processes(tmp_path, properties, lambda location, locations: MANUAL, count=1) as [(a, process)]:
        with FeatureClient(a) as client:
            client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
            for i in range(1, 4):
                client.write(table, rows([i]))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    aged = {"history.expire.max-snapshot-age-ms": "1", "history.expire.min-snapshots-to-keep": "1"}
    set_properties(properties, table, aged)
    other = load_catalog("default", **properties).create_table(  # another engine's table, not a feature table
        "records.aaa_other", rows([0]).schema, properties=aged
    )
    for i in range(2):
        other.append(rows([i]))
    before = FeatureCatalog("default", properties).load(table).metadata
    assert len(before.snapshots) == 4
    automatic = {"FLIGHT_SERVER_AUTO_MAINTENANCE": "true", "FLIGHT_SERVER_MAINTENANCE_INTERVAL_SECONDS": "0.2"}
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    with replica_processes(restarted, properties, lambda location, locations: automatic) as replicas:
        clients = [FeatureClient(location) for location, _ in replicas]
        try:
            wait_until(lambda: len(clients[0].describe(table)["snapshots"]) == 1, what="the forgotten table's expiry")
            described = clients[1].describe(table)
            assert described["last_expiry"] is not None and described["last_expiry"]["snapshots_left"] == 1
            assert described["current_snapshot_id"] == before.current_snapshot_id
            assert sorted(clients[1].scan(table).read_all().column("id").to_pylist()) == [0, 1, 2, 3]
            for client in clients:
                assert client.health()["maintenance"]["errors"] == 0
            # A survey takes up tables in name order and rounds on them in that order: had the replica that expired
            # the feature table taken up the other one, it would have expired that first.
            assert len(other.refresh().metadata.snapshots) == 2
        finally:
            for client in clients:
                client.close()


def test_a_table_is_due_by_its_metadata_alone(served: tuple[FeatureFlightServer, dict[str, str]]) -> None:
    """What the survey of the tables nobody writes here takes up: snapshots past the age or the count, or many small
    files; not a table whose round would do nothing."""
    server, properties = served
    table = "records.surveyed"
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        older = client.write(table, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[]).snapshot_id
        client.write(table, rows([1]))

        def due(values: dict[str, str], now_ms: int | None = None) -> bool:
            if values:
                set_properties(properties, table, values)
            metadata = FeatureCatalog("default", properties).load(table).metadata
            return Policy.of(metadata, server.parts.config).due(metadata, now_ms or int(time.time() * 1000))

        assert not due({})  # two young snapshots, two small files: below every threshold
        assert due({"history.expire.max-snapshot-age-ms": "1", "history.expire.min-snapshots-to-keep": "1"})
        made = FeatureCatalog("default", properties).load(table).metadata.snapshot_by_id(older)
        assert made is not None and not due({}, made.timestamp_ms)  # not yet older than the age
        client.pin(table, older)
        assert not due({})  # pinned; the other is the current snapshot
        client.unpin(table, f"pin-{older}")
        assert due({})
        assert not due({"history.expire.max-snapshot-age-ms": str(1 << 62)})
        assert due({MAX_SNAPSHOTS_PROPERTY: "1", CAP_MIN_AGE_PROPERTY: "0"})  # two snapshots, one allowed
        assert not due({MAX_SNAPSHOTS_PROPERTY: "0"})
        assert due({COMPACT_MIN_FILES_PROPERTY: "2"})  # two small files
        assert not due({COMPACT_MIN_FILES_PROPERTY: "3"})
        assert not due({COMPACT_MIN_FILES_PROPERTY: "2", ENABLED_PROPERTY: "false"})
