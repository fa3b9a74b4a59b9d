"""Long histories: after many single-row puts a table's current snapshot still has few manifests, old
metadata files are deleted, a scan returns every row once, and `write_id` stays exactly-once for as long
as its snapshot is retained (and no longer: an id whose snapshot expired commits again)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from flight_server.iceberg.catalog import NEW_TABLE_HISTORY, FeatureCatalog
from tests.conftest import sqlite_catalog, start_server

PUTS = 200
KEEP_METADATA = 10  # this test's previous-versions-max (the default, 100, would need far more puts)
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def row(i: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([i], pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i)], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i)]),
        }
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FeatureClient, FeatureCatalog]]:
    properties = sqlite_catalog(tmp_path_factory.mktemp("history"))
    server = start_server(properties)
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        yield client, FeatureCatalog("default", properties)
    server.shutdown()


@pytest.fixture(scope="module")
def long_table(served: tuple[FeatureClient, FeatureCatalog]) -> str:
    """A table of `PUTS` single-row puts, each with a write id, created with the server's defaults except
    `write.metadata.previous-versions-max`."""
    client, catalog = served
    name = "history.long"
    client.write(name, row(0), entity_keys=["id"], event_time="ts", write_id="put-0")
    with catalog.load(name).transaction() as transaction:
        transaction.set_properties({"write.metadata.previous-versions-max": str(KEEP_METADATA)})
    for i in range(1, PUTS):
        client.write(name, row(i), write_id=f"put-{i}")
    return name


def metadata_files(catalog: FeatureCatalog, table: str) -> list[Path]:
    location = catalog.load(table).location()
    return sorted(Path(location.removeprefix("file://"), "metadata").glob("*.metadata.json"))


def test_new_tables_get_the_history_defaults(served: tuple[FeatureClient, FeatureCatalog], long_table: str) -> None:
    properties = served[1].load(long_table).metadata.properties
    assert {k: properties[k] for k in NEW_TABLE_HISTORY if k != "write.metadata.previous-versions-max"} == {
        k: v for k, v in NEW_TABLE_HISTORY.items() if k != "write.metadata.previous-versions-max"
    }


def test_manifests_stay_bounded(served: tuple[FeatureClient, FeatureCatalog], long_table: str) -> None:
    table = served[1].load(long_table)
    snapshot = table.current_snapshot()
    assert snapshot is not None
    limit = int(NEW_TABLE_HISTORY["commit.manifest.min-count-to-merge"])
    assert len(snapshot.manifests(table.io)) <= limit  # fast appends would have made PUTS of them


def test_old_metadata_files_are_deleted(served: tuple[FeatureClient, FeatureCatalog], long_table: str) -> None:
    catalog = served[1]
    table = catalog.load(long_table)
    kept = {entry.metadata_file for entry in table.metadata.metadata_log} | {table.metadata_location}
    files = metadata_files(catalog, long_table)
    assert len(table.metadata.metadata_log) == KEEP_METADATA
    assert {f.as_uri() for f in files} == kept  # every file that left the log was deleted, and only those


def test_a_scan_returns_every_row_once(served: tuple[FeatureClient, FeatureCatalog], long_table: str) -> None:
    ids = served[0].scan(long_table).read_all().column("id").to_pylist()
    assert Counter(ids) == Counter(range(PUTS))


def test_a_retry_of_an_old_put_is_a_duplicate(served: tuple[FeatureClient, FeatureCatalog], long_table: str) -> None:
    client = served[0]
    first = client.write(long_table, row(0), write_id="put-0")
    assert first.duplicate and first.rows == 1
    assert client.describe(long_table)["rows"] == PUTS


def test_write_ids_are_remembered_while_their_snapshot_is_retained(
    served: tuple[FeatureClient, FeatureCatalog],
) -> None:
    client = served[0]
    name = "history.expiring"
    old = client.write(name, row(0), entity_keys=["id"], event_time="ts", write_id="old")
    kept = client.write(name, row(1), write_id="kept")
    assert client.write(name, row(0), write_id="old").duplicate  # the server has now seen both ids
    expired = client.expire_snapshots(name, older_than=dt.datetime.now(dt.timezone.utc), retain_last=1)
    assert old.snapshot_id in expired["expired"] and kept.snapshot_id not in expired["expired"]
    again = client.write(name, row(1), write_id="kept")
    assert again.duplicate and again.snapshot_id == kept.snapshot_id
    # The snapshot that recorded "old" is gone, and with it the id: the same put commits once more.
    retried = client.write(name, row(0), write_id="old")
    assert not retried.duplicate and retried.snapshot_id != old.snapshot_id
    assert Counter(client.scan(name).read_all().column("id").to_pylist()) == Counter([0, 0, 1])
