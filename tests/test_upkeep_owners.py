"""Automatic maintenance shared among replicas (flight_server/changes/upkeep.py `_runs`): with peers, each table is
maintained in the background by its owner only (rendezvous hashing of its name), another replica takes it over once
its owner leaves it due, and without peers (or with --no-shared-maintenance) every replica maintains every table it
writes, as before. `run_maintenance` runs wherever it is asked."""

from __future__ import annotations

import datetime as dt
import os
import signal
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from flight_server.base.shards import owner
from flight_server.changes.upkeep import TAKEOVER_INTERVALS
from tests.conftest import replica_processes, sqlite_catalog, start_server, wait_until
from tests.services import free_ports
from tests.test_metrics import scrape, value

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
TABLES = [f"owners.t{i}" for i in range(12)]
# Two puts make a table due (two small files of one partition); a short interval, so a takeover waits 3 s.
FAST = {
    "FLIGHT_SERVER_AUTO_MAINTENANCE": "true",
    "FLIGHT_SERVER_MAINTENANCE_INTERVAL_SECONDS": "1",
    "FLIGHT_SERVER_COMPACT_MIN_FILES": "2",
    "FLIGHT_SERVER_WRITE_PROCESS": "false",
}


def rows(i: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([i], pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i)], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i)]),
        }
    )


def peers(location: str, locations: list[str]) -> dict[str, str]:
    others = " ".join(other for other in locations if other != location)
    return {**FAST, "FLIGHT_SERVER_ADVERTISE": location, "FLIGHT_SERVER_PEERS": others}


def write_through_both(a: str, b: str, tables: list[str], first: int) -> None:
    with FeatureClient(a) as through_a, FeatureClient(b) as through_b:
        for table in tables:
            through_a.write(table, rows(first), entity_keys=["id"], event_time="ts", partition_by=[])
            through_b.write(table, rows(first + 1), entity_keys=["id"], event_time="ts", partition_by=[])


def compacted_at(client: FeatureClient, table: str) -> str | None:
    record = client.describe(table)["last_compaction"]
    return None if record is None else str(record["at"])


def compacted_by(client: FeatureClient, table: str, after: str | None = None) -> bool:
    """Whether the client's replica ran a round on the table since the one at `after` that compacted files."""
    last = client.describe(table)["maintenance"]
    return last is not None and last["at"] != after and last["data_files_compacted"] >= 2


def test_each_table_is_maintained_by_its_owner_and_taken_over_when_the_owner_is_gone(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    with replica_processes(tmp_path, properties, peers) as replicas:
        (a, a_process), (b, _) = replicas
        locations = [a, b]
        mine = {table: locations[owner(locations, table)] for table in TABLES}
        of_a = [table for table in TABLES if mine[table] == a]
        assert 0 < len(of_a) < len(TABLES)  # the hash spreads the dozen over both
        write_through_both(a, b, TABLES, 0)
        with FeatureClient(a) as client_a, FeatureClient(b) as client_b:
            clients = {a: client_a, b: client_b}
            wait_until(
                lambda: all(compacted_at(client_a, table) for table in TABLES), timeout=40, what="every table compacted"
            )
            for table in TABLES:
                other = b if mine[table] == a else a
                assert clients[mine[table]].describe(table)["maintenance"] is not None, table
                assert clients[other].describe(table)["maintenance"] is None, table  # no round there
            health = {location: clients[location].health(catalog=False)["maintenance"] for location in locations}
            for location in locations:
                figures = health[location]
                assert figures["replicas"] == 2 and figures["tables"] == len(TABLES)
                owned = sum(mine[table] == location for table in TABLES)
                assert figures["owned_tables"] == owned
                assert figures["taken_over"] == 0 and figures["skipped_not_owned"] > 0
            # A's table written through B alone: A sees the puts in its metadata and compacts them, B does not.
            # (A round's record follows its compaction's commit: the round is waited for, not the table's record.)
            table_of_a = of_a[0]
            last_round = client_a.describe(table_of_a)["maintenance"]["at"]
            client_b.write(table_of_a, rows(1000))
            client_b.write(table_of_a, rows(1001))
            wait_until(lambda: compacted_by(client_a, table_of_a, last_round), timeout=20, what="A compacts")
            assert client_b.health(catalog=False)["maintenance"]["taken_over"] == 0
            # A round asked for runs on a replica that does not own the table.
            asked = client_b.run_maintenance(table_of_a)
            assert asked["table"] == table_of_a and asked["error"] is None
            assert client_b.describe(table_of_a)["maintenance"] == asked

            os.killpg(a_process.pid, signal.SIGKILL)
            a_process.wait()
            rounds = {table: (client_b.describe(table)["maintenance"] or {}).get("at") for table in of_a}
            for i, table in enumerate(of_a):  # two more small files each: due again, and A is gone
                client_b.write(table, rows(100 + 2 * i))
                client_b.write(table, rows(101 + 2 * i))
            wait_until(
                lambda: all(compacted_by(client_b, table, rounds[table]) for table in of_a),
                timeout=40,
                what="B to take over A's tables",
            )
            assert client_b.health(catalog=False)["maintenance"]["taken_over"] >= len(of_a)


@pytest.mark.parametrize("setting", ["no peers", "--no-shared-maintenance"])
def test_without_sharing_every_replica_maintains_every_table_it_writes(tmp_path: Path, setting: str) -> None:
    properties = sqlite_catalog(tmp_path)

    def settings(location: str, locations: list[str]) -> dict[str, str]:
        if setting == "no peers":
            return FAST
        return {**peers(location, locations), "FLIGHT_SERVER_SHARED_MAINTENANCE": "false"}

    tables = TABLES[:4]
    with replica_processes(tmp_path, properties, settings) as replicas:
        (a, _), (b, _) = replicas
        write_through_both(a, b, tables, 0)
        with FeatureClient(a) as client_a, FeatureClient(b) as client_b:
            for client in (client_a, client_b):
                wait_until(
                    lambda client=client: all(client.describe(table)["maintenance"] is not None for table in tables),
                    timeout=30,
                    what="a round on every table on each replica",
                )
                figures = client.health(catalog=False)["maintenance"]
                assert figures["replicas"] == 1 and figures["owned_tables"] == len(tables)
                assert (figures["skipped_not_owned"], figures["taken_over"]) == (0, 0)


def test_another_replicas_table_is_taken_over_only_when_due_that_long_and_not_maintained_as_long(
    tmp_path: Path,
) -> None:
    """The rule itself, on one server whose peer never answers and whose background never runs a pass (an hour's
    interval): how long the table has been due is moved back instead of waited for. No pointers: the table is looked
    at because it was written here, or found due before."""
    me, peer = "grpc://127.0.0.1:1", "grpc://127.0.0.1:2"
    metrics_port = free_ports(1)[0]
    server = start_server(
        sqlite_catalog(tmp_path),
        metrics_port=metrics_port,
        advertise=me,
        peers=[peer],
        auto_maintenance=True,
        maintenance_interval_seconds=3600.0,
        compact_min_files=2,
    )
    wait = TAKEOVER_INTERVALS * 3600.0
    upkeep = server.parts.upkeep
    table = next(name for name in (f"owners.p{i}" for i in range(100)) if owner([me, peer], name) == 1)
    assert not upkeep.owns(table)

    def due_for(seconds: float) -> None:
        watched = upkeep._tables[table]
        assert watched.due_since is not None
        watched.due_since -= seconds

    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, rows(0), entity_keys=["id"], event_time="ts", partition_by=[])
            assert not upkeep._runs(table, None)  # one file: not due
            assert upkeep._tables[table].due_since is None
            client.write(table, rows(1))
            assert not upkeep._runs(table, None)  # due from now: its owner has its time
            due_for(wait - 60)
            assert not upkeep._runs(table, None)
            due_for(60)
            assert upkeep._runs(table, None)  # due that long, never maintained: taken over
            assert upkeep._tables[table].due_since is None  # the next takeover waits as long again
            assert client.run_maintenance(table)["data_files_compacted"] == 2  # records the compaction
            client.write(table, rows(2))
            client.write(table, rows(3))
            assert not upkeep._runs(table, None)
            due_for(wait)
            assert not upkeep._runs(table, None)  # due that long, but compacted just now (by its owner, for all we see)
        figures = upkeep.stats()
        assert (figures["taken_over"], figures["skipped_not_owned"], figures["owned_tables"]) == (1, 5, 0)
        samples = scrape(metrics_port)
        assert value(samples, "flight_maintenance_taken_over_rounds_total") == 1
        assert value(samples, "flight_maintenance_skipped_not_owned_rounds_total") == 5
    finally:
        server.shutdown()


def test_on_a_rest_catalog_the_owner_maintains_puts_made_through_another_replica(seaweedfs: dict[str, str]) -> None:
    """On a REST catalog (SeaweedFS) too, the owner sees puts made through another replica at its next pass (one
    loadTable request a watched table: `_changed`), not at its hourly look, and compacts them; the writing replica
    never takes the table over (it would, 3 intervals after the puts, if the owner had not seen them)."""
    ports = free_ports(2)
    locations = [f"grpc://127.0.0.1:{port}" for port in ports]
    servers = [
        start_server(
            seaweedfs,
            port=port,
            advertise=location,
            peers=[other for other in locations if other != location],
            auto_maintenance=True,
            maintenance_interval_seconds=2.0,  # a takeover waits 6 s: room for a round on SeaweedFS
            compact_min_files=2,
        )
        for port, location in zip(ports, locations, strict=True)
    ]
    a, b = locations
    prefix = f"owners_rest.t{uuid.uuid4().hex[:8]}_"
    table = next(name for name in (f"{prefix}{i}" for i in range(100)) if owner(locations, name) == 0)
    try:
        write_through_both(a, b, [table], 0)  # each replica watches it; A owns it
        with FeatureClient(a) as client_a, FeatureClient(b) as client_b:
            # A round's record follows its compaction's commit: the round is waited for, not the table's record.
            wait_until(lambda: compacted_by(client_a, table), timeout=60, what="A compacts the first puts")
            last_round = client_a.describe(table)["maintenance"]["at"]
            client_b.write(table, rows(1000))
            client_b.write(table, rows(1001))
            wait_until(lambda: compacted_by(client_a, table, last_round), timeout=60, what="A compacts the puts via B")
            assert client_b.health(catalog=False)["maintenance"]["taken_over"] == 0
            assert client_b.describe(table)["maintenance"] is None  # B ran no round on it
    finally:
        for server in servers:
            server.shutdown()
