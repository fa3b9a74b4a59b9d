"""Rolling upgrades: a replica of the previous release and one of this release on one catalog, as every upgrade of a
StatefulSet or Compose deployment has them for minutes (docs/operations.md, "Upgrading").

The previous release runs for real: its `flight_server` and `flight_client` come from this repository's own history
(`git archive` of PREVIOUS_RELEASE into a temporary folder: no network, no worktree left behind, about a second) and
run as a server process and as a client process on the same virtual environment (its dependencies are this
release's). Move PREVIOUS_RELEASE, and the field sets pinned from its wire code, to each release as it lands.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.types import DoubleType

from flight_client import FeatureClient, InvalidRequestError
from flight_client.errors import SERVER_ERRORS
from flight_server.transport.service import FeatureFlightServer
from flight_server.wire.codec import PROTOCOL_VERSION
from flight_server.wire.errors import UnknownFieldsError
from flight_server.wire.reads import parse_ticket
from flight_server.wire.writes import WriteResult
from tests.conftest import ROOT, catalog_env, healthy, sqlite_catalog, start_server, wait_until
from tests.services import _stop_group, free_ports

PREVIOUS_RELEASE = "57c8edacbb978e7fb4a16bc3fcc9413ba3f44f2b"  # the last release deployed before this one

# The fields PREVIOUS_RELEASE's server takes in a ticket (its flight_server/wire/reads.py), besides "v" and "kind":
# what this release's tickets must keep to whenever the answer allows.
PREVIOUS_TICKET_FIELDS = {
    "scan": {
        "table", "columns", "filter", "limit", "snapshot_id", "as_of", "partitions", "part", "compression",
        "since_snapshot",
    },
    "historical": {
        "features", "entities", "entity_time", "full_feature_names", "snapshot_ids", "as_of", "partitions",
        "partition", "compression", "shard",
    },
    "entities": {"table", "filter", "snapshot_id", "rows"},
    "shard": {"key", "slots", "owned"},
    "online": {"features", "entities", "full_feature_names", "as_of", "request_time", "apply_ttl"},
}  # fmt: skip


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PREVIOUS_RELEASE's packages, from this clone's history (CI clones it whole; a shallow clone fetches the commit
    from its origin, and without one these tests cannot run: skipped, saying why)."""
    folder = tmp_path_factory.mktemp("previous-release")
    if not _has_commit(PREVIOUS_RELEASE):
        subprocess.run(["git", "-C", str(ROOT), "fetch", "--quiet", "origin", PREVIOUS_RELEASE], check=False)
    if not _has_commit(PREVIOUS_RELEASE):
        pytest.skip(f"this clone lacks the previous release {PREVIOUS_RELEASE} (shallow?): git fetch --unshallow")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE, "flight_server", "flight_client"],
        capture_output=True,
        check=False,
    )
    assert archive.returncode == 0, f"git archive {PREVIOUS_RELEASE}: {archive.stderr.decode()[-500:]}"
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def _has_commit(commit: str) -> bool:
    found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
    return found.returncode == 0


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("upgrade-warehouse"))


@pytest.fixture(scope="module")
def replicas(
    previous_release: Path, catalog: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(previous release's location, this release's): peers of each other, as the Kubernetes manifest sets them, so
    that split reads name both replicas."""
    old, new = (f"grpc://127.0.0.1:{port}" for port in free_ports(2))
    log = tmp_path_factory.mktemp("previous-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    env.update(catalog_env(catalog))
    env.update(
        PYTHONPATH=str(previous_release),
        FLIGHT_SERVER_PORT=old.rsplit(":", 1)[1],
        FLIGHT_SERVER_ADVERTISE=old,
        FLIGHT_SERVER_PEERS=f"{old} {new}",
        FLIGHT_SERVER_AUTO_MAINTENANCE="false",  # rounds run by the tests, on each replica
    )
    with log.open("wb") as out:  # in its folder: `python -m` puts the working directory first on sys.path
        process = subprocess.Popen(
            [sys.executable, "-m", "flight_server", "serve"],
            cwd=previous_release,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server: FeatureFlightServer | None = None
    try:
        server = start_server(catalog, port=int(new.rsplit(":", 1)[1]), advertise=new, peers=[old, new])
        wait_until(lambda: healthy(old) or process.poll() is not None, timeout=90, what="the previous release")
        assert process.poll() is None, log.read_text()[-3000:]
        # It runs the previous release's code (not this checkout's, installed in the environment): a ticket field that
        # came after it is unknown there.
        with pytest.raises(SERVER_ERRORS, match=r"unknown field\(s\) \['schema_id'\]"):
            flight.connect(old).do_get(flight.Ticket(b'{"table": "t.t", "schema_id": 0}')).read_all()
        yield old, new
    finally:
        if server is not None:
            server.shutdown()
        _stop_group(process)


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def feature_rows(ids: list[int], hours: int = 0, value: float = 1.0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([NOW + dt.timedelta(hours=hours)] * len(ids), pa.timestamp("us", "UTC")),
            "v": pa.array([value + i for i in ids], pa.float64()),
        }
    )


@pytest.fixture(scope="module")
def tables(replicas: tuple[str, str]) -> dict[str, Any]:
    """A feature table written through both replicas (two snapshots), and an entity table."""
    old, new = replicas
    with FeatureClient(new) as client:
        first = client.write("up.features", feature_rows(list(range(40))), entity_keys=["id"], event_time="ts")
        entities = pa.table(
            {
                "id": pa.array(range(0, 40, 3), pa.int64()),
                "event_timestamp": pa.array([NOW + dt.timedelta(days=1)] * 14, pa.timestamp("us", "UTC")),
                "label": pa.array(range(14)),
            }
        )
        client.write("up.entities", entities, entity_keys=["id"], event_time="event_timestamp")
    with FeatureClient(old) as client:
        client.write("up.features", feature_rows(list(range(20)), hours=2, value=100.0))
    return {"first": first.snapshot_id}


def requests(first: int) -> dict[str, dict[str, Any]]:
    """get_flight_info commands of every kind a client sends, in the forms a rolling upgrade must serve."""
    inline = {"id": [1, 4, 7], "event_timestamp": ["2026-01-01T03:00:00+00:00"] * 3}
    return {
        "scan": {"table": "up.features"},
        "scan split, filtered, some columns": {
            "table": "up.features",
            "filter": "v > 5",
            "columns": ["id", "v"],
            "partitions": 3,
        },
        "scan at a snapshot": {"table": "up.features", "snapshot_id": first},
        "scan as of now": {"table": "up.features", "as_of": dt.datetime.now(dt.timezone.utc).isoformat()},
        "scan since a snapshot": {"table": "up.features", "since_snapshot": first, "compression": "zstd"},
        "training set of an entity table": {
            "kind": "historical",
            "features": ["up.features:v"],
            "entities": {"table": "up.entities", "filter": "label >= 0"},
            "partitions": 3,
        },
        "training set at pinned snapshots": {
            "kind": "historical",
            "features": ["up.features:v"],
            "entities": {"table": "up.entities"},
            "snapshot_ids": {"up.features": first},
        },
        "training set of inline rows": {
            "kind": "historical",
            "features": ["up.features:v"],
            "entities": {"rows": inline},
        },
        "training set asked with end_marker": {  # a do_exchange field, which no ticket carries on
            "kind": "historical",
            "features": ["up.features:v"],
            "entities": {"table": "up.entities"},
            "end_marker": True,
        },
        "online lookup": {"kind": "online", "features": ["up.features:v"], "entities": {"id": [1, 2, 99]}},
        "online lookup asked with end_marker": {
            "kind": "online",
            "features": ["up.features:v"],
            "entities": {"id": [3]},
            "end_marker": True,
        },
    }


def info(location: str, command: dict[str, Any]) -> flight.FlightInfo:
    descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    return flight.connect(location).get_flight_info(descriptor)


def redeemed(location: str, endpoints: list[flight.FlightEndpoint]) -> pa.Table:
    """Every endpoint's rows, read at `location` whatever replicas the endpoint names, sorted for comparison."""
    connection = flight.connect(location)
    parts = [connection.do_get(endpoint.ticket).read_all() for endpoint in endpoints]
    rows = pa.concat_tables([part.replace_schema_metadata() for part in parts])
    return rows.sort_by([(name, "ascending") for name in rows.column_names if name in ("id", "v", "label")])


def test_tickets_of_this_release_are_read_by_the_previous_one(
    replicas: tuple[str, str], tables: dict[str, Any]
) -> None:
    """A rolling upgrade's commonest mix: get_flight_info at a new replica, the endpoints read at an old one (a
    client behind one address, or an endpoint naming the old replica first). Every ticket of an unchanged schema
    is read there, to the same rows; `schema_id` was in every ticket of this release before, and every one failed."""
    old, new = replicas
    for name, command in requests(tables["first"]).items():
        endpoints = info(new, command).endpoints
        assert redeemed(old, endpoints) == redeemed(new, endpoints), name


def test_tickets_of_this_release_keep_to_the_fields_the_previous_one_takes(
    replicas: tuple[str, str], tables: dict[str, Any]
) -> None:
    """The contract behind the test above, field by field (PREVIOUS_TICKET_FIELDS, from its wire code)."""
    _, new = replicas
    for name, command in requests(tables["first"]).items():
        for endpoint in info(new, command).endpoints:
            ticket = json.loads(endpoint.ticket.ticket)
            assert ticket.pop("v") == PROTOCOL_VERSION
            kind = ticket.pop("kind", "scan")
            assert ticket.keys() <= PREVIOUS_TICKET_FIELDS[kind], name
            entities = ticket.get("entities")
            if kind == "historical" and "table" in (entities or {}):
                assert entities.keys() <= PREVIOUS_TICKET_FIELDS["entities"], name
            assert ticket.get("shard", {}).keys() <= PREVIOUS_TICKET_FIELDS["shard"], name


def test_tickets_of_the_previous_release_are_read_by_this_one(
    replicas: tuple[str, str], tables: dict[str, Any]
) -> None:
    """The other direction: the previous release's tickets (no schema fields) read here, to the same rows."""
    old, new = replicas
    for name, command in requests(tables["first"]).items():
        if command.get("end_marker"):
            continue  # a field the previous release does not take at all
        endpoints = info(old, command).endpoints
        assert redeemed(new, endpoints) == redeemed(old, endpoints), name


def test_after_a_schema_change_without_a_write_the_previous_release_refuses_the_ticket(
    replicas: tuple[str, str], catalog: dict[str, str]
) -> None:
    """Another engine adds a column and writes nothing: this release reads the current state in the table's
    current schema, which the ticket must pin; the previous release cannot, and refuses it rather than answer
    without the column (the message says what to do). Its own tickets, in the snapshot's schema, read here alike."""
    old, new = replicas
    with FeatureClient(new) as client:
        client.write("up.evolved", feature_rows([1, 2]), entity_keys=["id"], event_time="ts")
    table = SqlCatalog("default", **catalog).load_table("up.evolved")
    with table.update_schema() as update:
        update.add_column("extra", DoubleType())
    (endpoint,) = info(new, {"table": "up.evolved"}).endpoints
    assert "schema_id" in json.loads(endpoint.ticket.ticket)
    with pytest.raises(SERVER_ERRORS, match=r"unknown field\(s\) \['schema_id'\]"):
        flight.connect(old).do_get(endpoint.ticket).read_all()
    assert redeemed(new, [endpoint]).column_names == ["id", "ts", "v", "extra"]
    (endpoint,) = info(old, {"table": "up.evolved"}).endpoints
    assert redeemed(new, [endpoint]).column_names == ["id", "ts", "v"]  # what the old replica described


@pytest.mark.xfail(
    strict=True,
    reason="the previous release reads a table's current state in its current snapshot's schema, this one in the "
    "table's current schema: after a schema change with no write since, the two answer with different columns "
    "until the next write (docs/operations.md, 'Upgrading')",
)
def test_both_releases_read_the_current_state_in_the_same_schema(replicas: tuple[str, str]) -> None:
    old, new = replicas
    with FeatureClient(old) as before, FeatureClient(new) as after:
        assert before.scan("up.evolved").read_all().column_names == after.scan("up.evolved").read_all().column_names


def test_puts_are_exactly_once_across_releases(replicas: tuple[str, str], tables: dict[str, Any]) -> None:
    """A put retried at the other replica with its write_id commits nothing more, either way; concurrent puts through
    both replicas into one table (each replica's group commit) all land, once."""
    old, new = replicas
    with FeatureClient(old) as before, FeatureClient(new) as after:
        table = "up.puts"
        after.write(table, feature_rows([0]), entity_keys=["id"], event_time="ts")
        for first, retry, write_id in ((before, after, "old-first"), (after, before, "new-first")):
            done = first.write(table, feature_rows([1, 2, 3]), write_id=write_id)
            again = retry.write(table, feature_rows([1, 2, 3]), write_id=write_id)
            assert again.duplicate and (again.snapshot_id, again.rows) == (done.snapshot_id, done.rows)

        def put(client: FeatureClient, tag: str) -> None:
            for i in range(4):
                client.write(table, feature_rows([100 + i], hours=i), write_id=f"{tag}-{i}")

        threads = [threading.Thread(target=put, args=(c, t)) for c, t in ((before, "a"), (after, "b"), (before, "c"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for client, tag in ((after, "a"), (before, "b"), (after, "c")):  # every one retried at the other release
            for i in range(4):
                assert client.write(table, feature_rows([100 + i], hours=i), write_id=f"{tag}-{i}").duplicate
        assert after.scan(table).read_all().num_rows == 1 + 3 + 3 + 12


def test_maintenance_records_and_pins_are_shared_across_releases(replicas: tuple[str, str]) -> None:
    """Expiry, compaction and pins by either release: each describes what the other recorded in the table's
    properties, each one's expiry keeps the other's pins, and a maintenance round runs on both."""
    old, new = replicas
    table = "up.kept"
    with FeatureClient(old) as before, FeatureClient(new) as after:
        after.write(table, feature_rows([0]), entity_keys=["id"], event_time="ts")
        for i in range(1, 6):
            (before if i % 2 else after).write(table, feature_rows([i]))
        snapshots = [s["snapshot_id"] for s in after.describe(table)["snapshots"]]
        pins = {"by-new": snapshots[1], "by-old": snapshots[2]}
        after.pin(table, pins["by-new"], name="by-new")
        before.pin(table, pins["by-old"], name="by-old")
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        expired = before.expire_snapshots(table, older_than=now, retain_last=1)
        assert set(expired["kept_pinned"]) == set(pins.values()) and len(expired["expired"]) == 3
        assert after.describe(table)["last_expiry"] == before.describe(table)["last_expiry"]
        assert after.describe(table)["last_expiry"]["snapshots_expired"] == 3
        assert after.compact(table)["compacted"]
        assert before.describe(table)["last_compaction"] == after.describe(table)["last_compaction"]
        assert before.describe(table)["last_compaction"]["data_files_removed"] == 6
        for client in (before, after):
            assert client.run_maintenance(table)["error"] is None
            assert client.describe(table)["pins"] == pins
            assert client.health()["status"] == "ok"
        assert set(after.expire_snapshots(table, older_than=now, retain_last=1)["kept_pinned"]) == set(pins.values())
        assert before.scan(table, snapshot_id=pins["by-new"]).read_all().num_rows == 2


# The previous release's client, run by the previous release's code against this release's replica: every call a
# pipeline, a training job or a service makes, its result printed as JSON.
PREVIOUS_CLIENT = """
import json, sys
import pandas as pd
from flight_client import FeatureClient
from flight_client.plans import plan_training_set

client = FeatureClient(sys.argv[1])
entities = pd.DataFrame({"id": [1, 2, 3], "event_timestamp": pd.to_datetime(["2026-01-02"] * 3, utc=True)})
plan = plan_training_set(sys.argv[1], "up.entities", ["up.features:v"], partitions=2)
put = client.write("up.features", client.scan("up.features", filter="id = 1").read_all(), write_id="previous-client")
print(json.dumps({
    "read_table": client.read_table("up.features", partitions=3).num_rows,
    "scan": client.scan("up.features", filter="id < 10", columns=["id", "v"]).read_all().num_rows,
    "training set streamed": client.get_historical_features(entities, ["up.features:v"]).num_rows,
    "training set of a table": client.get_historical_features("up.entities", ["up.features:v"], partitions=2).num_rows,
    "planned training set": sum(batch.num_rows for batch in plan.batches(plan.endpoints)),
    "online": client.get_online_features({"id": [1, 2, 99]}, ["up.features:v"]).num_rows,
    "online again": client.get_online_features({"id": [5]}, ["up.features:v"]).num_rows,
    "put retried": client.write("up.features", client.scan("up.features", filter="id = 1").read_all(),
                                write_id="previous-client").duplicate,
    "describe": client.describe("up.features")["table"],
    "health": client.health()["status"],
}))
"""


def test_the_previous_client_against_this_release(
    replicas: tuple[str, str], tables: dict[str, Any], previous_release: Path
) -> None:
    """Clients upgrade on their own schedule: the previous release's client works against this release's replica
    (its split reads name both replicas)."""
    _, new = replicas
    env = {**os.environ, "PYTHONPATH": str(previous_release)}
    run = subprocess.run(
        [sys.executable, "-c", PREVIOUS_CLIENT, new], cwd=previous_release, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    answers = json.loads(run.stdout.strip().splitlines()[-1])
    with FeatureClient(new) as client:  # this release's client, for the same calls
        rows = client.scan("up.features").read_all().num_rows
        below_ten = client.scan("up.features", filter="id < 10").read_all().num_rows
    assert answers == {
        "read_table": rows,
        "scan": below_ten,
        "training set streamed": 3,
        "training set of a table": 14,
        "planned training set": 14,
        "online": 3,
        "online again": 1,
        "put retried": True,
        "describe": "up.features",
        "health": "ok",
    }


def test_this_client_against_the_previous_release_says_to_upgrade_the_servers(replicas: tuple[str, str]) -> None:
    """This client's do_exchange carries `end_marker`, which the previous release refuses at once: the error says
    why and what to do. Everything else works."""
    old, _ = replicas
    entities = feature_rows([1, 2]).rename_columns(["id", "event_timestamp", "v"])  # streamed: do_exchange
    with FeatureClient(old) as client:
        with pytest.raises(InvalidRequestError, match="upgrade the servers before the clients") as refused:
            client.get_historical_features(entities, ["up.features:v"])
        assert "runs an older release than this client" in str(refused.value) and old in str(refused.value)
        assert client.read_table("up.features", partitions=3).num_rows > 0
        assert client.get_online_features({"id": [1]}, ["up.features:v"]).num_rows == 1


def test_a_ticket_a_newer_release_made_says_so() -> None:
    """The next upgrade's mix, from this release's side: a ticket with a field this release does not know is
    refused (ignoring a field that pins the answer would answer something else) with a message that says where it
    may come from; a descriptor is the client's own, and is told only its unknown field."""
    ticket = json.dumps({"table": "t.t", "pinned_somehow": 1}).encode()
    with pytest.raises(UnknownFieldsError, match="a replica of a newer release made it"):
        parse_ticket(ticket)
    with pytest.raises(UnknownFieldsError) as refused:
        parse_ticket(ticket, "descriptor")
    assert "newer release" not in str(refused.value)


def test_replies_of_a_newer_release_are_read() -> None:
    """Replies may grow: a put's reply with a field this release does not know is read, the field left out."""
    reply = {"table": "t.t", "snapshot_id": 1, "rows": 2, "files": 1, "write_id": None, "duplicate": False}
    assert WriteResult.from_bytes(json.dumps({**reply, "added_later": 1}).encode()) == WriteResult(**reply)
