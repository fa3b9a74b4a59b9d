"""Review 17: tests for problems in what changed on main since 524407f (xfail, strict, until fixed)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from flight_server.changes.maintenance import MIN_SNAPSHOTS_PROPERTY
from flight_server.changes.upkeep import COMPACT_MIN_FILES_PROPERTY, MAX_SNAPSHOTS_PROPERTY
from flight_server.iceberg.catalog import FeatureCatalog
from tests.conftest import serve_replicas, sqlite_catalog

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def rows(ids: list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in ids]),
        }
    )


def set_properties(properties: dict[str, str], table: str, values: dict[str, str]) -> None:
    with FeatureCatalog("default", properties).load(table).transaction() as transaction:
        transaction.set_properties(values)


NO_AUTO = {"FLIGHT_SERVER_AUTO_MAINTENANCE": "false"}


@pytest.mark.xfail(
    strict=True,
    reason="the snapshot cap (choose_expired's `over`) expires snapshots whatever their age, and only this "
    "replica's running reads are `in_use`: a read another replica planned on a snapshot seconds old fails once "
    "this replica's round caps the table, although docs/operations.md ('Several replicas') and reads/inuse.py "
    "promise that another replica's expiry keeps a snapshot a read planned on while it is younger than the "
    "maximum age (a day here); the cap has no age floor",
)
def test_a_read_planned_on_another_replica_survives_the_cap(tmp_path: Path) -> None:
    properties = sqlite_catalog(tmp_path)
    table = "capped.read"
    with (
        serve_replicas(tmp_path, properties, lambda location, locations: NO_AUTO) as (here, there),
        FeatureClient(here) as writer,
        FeatureClient(there) as reader,
    ):
        writer.write(table, rows([0, 1]), entity_keys=["id"], event_time="ts", partition_by=[])
        set_properties(
            properties,
            table,
            {MAX_SNAPSHOTS_PROPERTY: "1", MIN_SNAPSHOTS_PROPERTY: "1", COMPACT_MIN_FILES_PROPERTY: "100000"},
        )
        planned = reader.flight_info(table)  # the other replica plans a read of the current snapshot
        writer.write(table, rows([2]), mode="overwrite")  # its files are the planned snapshot's alone now
        result = writer.run_maintenance(table)
        assert result["error"] is None, result
        # Seconds old, far younger than the day the age rule keeps: the planned read must still read.
        got = pa.concat_tables(reader.read_endpoint(e).read_all() for e in planned.endpoints)
        assert Counter(got.column("id").to_pylist()) == Counter([0, 1])
