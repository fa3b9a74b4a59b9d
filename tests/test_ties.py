"""Full ties (rows of one entity with the same event time and created time) go to the row committed last, and
within one put to its last row: in training sets, `as_of` lookups and online lookups, before and after
compactions (whole or partial) and deletes (copy-on-write or merge-on-read). Random puts full of ties, checked
against a plain reference after every step."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.manifest import DataFileContent
from pyiceberg.table.snapshots import Operation

from flight_client import FeatureClient
from flight_server.changes.rewrite import Plan, SnapshotRows
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, wait_until

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
TIMES = [T0, T0 + dt.timedelta(minutes=1)]  # two event times: most rows of an id tie fully with another
IDS = list(range(8))
AFTER = T0 + dt.timedelta(hours=1)


class Reference:
    """What every read should answer: per id, the row of the latest event time, then of the last put, then the
    last of that put's rows."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[dt.datetime, int, int, float]] = {}
        self.puts = 0

    def put(self, ids: list[int], times: list[dt.datetime], values: list[float]) -> None:
        self.puts += 1
        for row, (i, t, v) in enumerate(zip(ids, times, values, strict=True)):
            self.rows[i] = max(self.rows.get(i, (t, -1, -1, v)), (t, self.puts, row, v))

    def delete(self, i: int) -> None:
        self.rows.pop(i, None)

    def values(self) -> list[float | None]:
        return [self.rows[i][3] if i in self.rows else None for i in IDS]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureFlightServer]:
    server = start_server(sqlite_catalog(Path(tmp_path_factory.mktemp("ties"))), online_refresh_seconds=0.05)
    yield server
    server.shutdown()


@pytest.fixture
def client(served: FeatureFlightServer) -> Iterator[FeatureClient]:
    with FeatureClient(f"grpc://127.0.0.1:{served.port}") as client:
        yield client


def check(client: FeatureClient, table: str, reference: Reference, step: str) -> None:
    expected = reference.values()
    entities = {"id": IDS, "event_timestamp": [AFTER] * len(IDS)}
    trained = client.get_historical_features(entities, [f"{table}:v"]).column("v").to_pylist()
    assert trained == expected, f"training set after {step}"
    as_of = client.get_online_features({"id": IDS}, [f"{table}:v"], apply_ttl=False, as_of=AFTER)
    assert as_of.column("v").to_pylist() == expected, f"as_of lookup after {step}"

    def online() -> list[float | None]:
        found = client.get_online_features({"id": IDS}, [f"{table}:v"], apply_ttl=False)
        return list(found.column("v").to_pylist())

    wait_until(lambda: online() == expected, timeout=20, what=f"online lookups after {step}: {online()} != {expected}")


@pytest.mark.parametrize("seed", range(6))
def test_full_ties_go_to_the_last_commit_through_rewrites(client: FeatureClient, seed: int) -> None:
    rng = random.Random(seed)
    table = f"ties.t{seed}"
    partition_by = ["bucket(2, id)"] if seed % 2 else []
    reference = Reference()
    value = 0.0

    def put() -> None:
        nonlocal value
        ids = [rng.choice(IDS) for _ in range(rng.randint(1, 12))]
        times = [rng.choice(TIMES) for _ in ids]
        values = [value + k for k in range(len(ids))]
        value += len(ids)
        data = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "ts": pa.array(times, pa.timestamp("us", "UTC")),
                "v": pa.array(values, pa.float64()),
            }
        )
        client.write(table, data, entity_keys=["id"], event_time="ts", partition_by=partition_by)
        reference.put(ids, times, values)

    for _ in range(5):
        put()
    check(client, table, reference, "the puts")
    for step in range(8):
        action = rng.choice(["put", "compact", "compact some", "copy-on-write", "merge-on-read"])
        if action == "put":
            for _ in range(rng.randint(1, 3)):
                put()
        elif action == "compact":
            client.compact(table)
        elif action == "compact some":
            client.compact(table, filter=f"id < {rng.randint(1, len(IDS) - 1)}")
        else:
            gone = rng.choice(IDS)
            client.delete(table, keys={"id": [gone]}, mode=action)
            reference.delete(gone)
        check(client, table, reference, f"step {step} ({action})")


def test_a_put_that_lands_during_a_compaction_wins_its_full_ties(
    served: FeatureFlightServer, client: FeatureClient
) -> None:
    """A correction put while a compaction rewrites the rows it corrects is committed after them: it still wins."""
    table = "ties.during"
    reference = Reference()

    def put(value: float) -> None:
        data = pa.table(
            {
                "id": pa.array(IDS, pa.int64()),
                "ts": pa.array([T0] * len(IDS), pa.timestamp("us", "UTC")),
                "v": pa.array([value] * len(IDS), pa.float64()),
            }
        )
        client.write(table, data, entity_keys=["id"], event_time="ts", partition_by=[])
        reference.put(IDS, [T0] * len(IDS), [value] * len(IDS))

    put(1.0)
    put(2.0)

    def compaction_with_a_put_meanwhile(rows: SnapshotRows) -> Plan:
        scope = [f for f in rows.files if f.content == DataFileContent.DATA]
        added, scope = rows.rewrite("TRUE", [], scope)
        put(3.0)  # commits between the rewrite's plan and its commit
        return Plan(Operation.REPLACE, scope, added, sum(f.record_count for f in added), tidy=True)

    assert served.parts.maintenance.rewrite_once(table, "compact", compaction_with_a_put_meanwhile).committed
    check(client, table, reference, "a compaction with a put meanwhile")
