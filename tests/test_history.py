"""Long histories: after many single-row puts a table's current snapshot still has few manifests, a merge rewrites
a bounded amount however large the table grows, merges and lost races leave no file that nothing references, old
metadata files are deleted, a scan returns every row once, and `write_id` stays exactly-once for as long as its
snapshot is retained (and no longer: an id whose snapshot expired commits again)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.table import Table, Transaction

from flight_client import FeatureClient
from flight_server.changes import history
from flight_server.iceberg.catalog import NEW_TABLE_HISTORY, FeatureCatalog
from flight_server.iceberg.internals import ListingProducer
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


MERGED_BYTES = 128 << 10  # the most a merge folds into one manifest on the tables the server creates


def wide_rows(put: int) -> pa.Table:
    """64 rows of 120 feature columns: about 2 KB a manifest entry, and a file in each of 16 buckets or so."""
    ids = range(put * 64, (put + 1) * 64)
    columns = {
        "id": pa.array(ids, pa.int64()),
        "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
    }
    return pa.table(columns | {f"f{k}": pa.array([float(i * k) for i in ids]) for k in range(120)})


def test_a_merge_rewrites_a_bounded_amount_however_large_the_table(
    served: tuple[FeatureClient, FeatureCatalog],
) -> None:
    """Tables the server creates merge into manifests of at most `MERGED_BYTES`
    (`commit.manifest.target-size-bytes`): a put's merge rewrites at most about that, however many files the table
    has, where Iceberg's 8 MB made one manifest that each merge wrote again whole (every ninth put's cost grew with
    the table). The manifests stay few all the same: one per target size of entries or so, and the small ones of
    the last puts, fewer than `commit.manifest.min-count-to-merge`."""
    client, catalog = served
    name = "history.wide"
    puts = 24
    client.write(name, wide_rows(0), entity_keys=["id"], event_time="ts", partition_by=["bucket(16, id)"])
    for put in range(1, puts):
        client.write(name, wide_rows(put))
    table = catalog.load(name)
    written = []  # the bytes of the manifests each put wrote (its own, or the merged ones it folded it into)
    for snapshot in table.snapshots():
        manifests = snapshot.manifests(table.io)
        written.append(sum(m.manifest_length for m in manifests if m.added_snapshot_id == snapshot.snapshot_id))
    current = table.current_snapshot()
    assert current is not None
    manifests = current.manifests(table.io)
    live = sum(m.manifest_length for m in manifests)
    assert live > 4 * MERGED_BYTES  # a merge of them all would write more than twice the bound below
    # A merge packs manifests, oldest first, into bins of at most the target size: a put rewrites at most the bin
    # of the newest ones, and the older bin they filled.
    assert max(written) <= 2 * MERGED_BYTES, written
    limit = int(NEW_TABLE_HISTORY["commit.manifest.min-count-to-merge"])
    assert len(manifests) <= live // (MERGED_BYTES // 2) + limit  # merged ones are over half full
    assert client.describe(name)["rows"] == puts * 64


def test_puts_that_merge_manifests_leave_no_manifest_that_nothing_references(
    served: tuple[FeatureClient, FeatureCatalog],
) -> None:
    """A merge-append writes the put's own manifest, then folds it into the merged one: once committed, the first is
    deleted (orphan removal would find it only days later, never with maintenance off)."""
    client, catalog = served
    name = "history.merged"
    client.write(name, row(0), entity_keys=["id"], event_time="ts")
    for i in range(1, 12):  # tables the server creates merge manifests once 10 would be live
        client.write(name, row(i))
    table = catalog.load(name)
    current = table.current_snapshot()
    assert current is not None and len(current.manifests(table.io)) < 12  # merged: 12 puts, fewer manifests
    orphans = client.remove_orphan_files(name, older_than=dt.datetime.now(dt.timezone.utc), dry_run=True)
    assert orphans["files"] == []  # nothing unreferenced: nothing runs, nothing failed


def test_a_put_that_loses_the_race_to_another_server_leaves_none_of_its_attempts_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers on one catalog: a put's first commit (a merge: every commit merges here) loses to the other
    server's put, committed between its planning and its compare-and-swap. The lost attempt's manifests, manifest
    list and metadata file are deleted, the retry commits, and no file of the table is unreferenced."""
    properties = sqlite_catalog(tmp_path)
    servers = [start_server(properties) for _ in range(2)]
    name = "history.raced"
    lost: list[ListingProducer] = []
    real = history.commit_on_base

    def losing_once(transaction: Transaction, producer: ListingProducer) -> Table:
        if not lost:
            lost.append(producer)
            other.write(name, row(99))  # the other server commits first (its commit passes through here too)
        return real(transaction, producer)

    try:
        with (
            FeatureClient(f"grpc://127.0.0.1:{servers[0].port}") as client,
            FeatureClient(f"grpc://127.0.0.1:{servers[1].port}") as other,
        ):
            client.write(name, row(0), entity_keys=["id"], event_time="ts")
            with FeatureCatalog("default", properties).load(name).transaction() as transaction:
                transaction.set_properties({"commit.manifest.min-count-to-merge": "2"})
            other.write(name, row(1))
            monkeypatch.setattr(history, "commit_on_base", losing_once)
            client.write(name, row(2))
            table = FeatureCatalog("default", properties).load(name)
            assert len(lost) == 1 and len(lost[0].listed) == 1  # it merged: its own manifest folded into another
            assert lost[0].snapshot_id not in {s.snapshot_id for s in table.snapshots()}  # it lost, and was retried
            folder = Path(table.location().removeprefix("file://"))
            assert [f for f in folder.rglob("*") if str(lost[0].commit_uuid) in f.name] == []
            assert sorted(client.scan(name).read_all().column("id").to_pylist()) == [0, 1, 2, 99]
            orphans = client.remove_orphan_files(name, older_than=dt.datetime.now(dt.timezone.utc), dry_run=True)
            assert orphans["files"] == []
    finally:
        for server in servers:
            server.shutdown()


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
