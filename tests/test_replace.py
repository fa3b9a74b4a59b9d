"""Compactions commit Iceberg `replace` snapshots, and online indexes follow them without a rebuild: their rows are
the latest per key of the same table rows. A `replace` that changed rows (another writer's, mislabelled) still
rebuilds; `since_snapshot` scans still refuse to read across a compaction."""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.manifest import DataFileContent, ManifestContent, ManifestFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation

from flight_client import FeatureClient, InvalidRequestError
from flight_server.changes.commits import commit_rewrite, live_files
from flight_server.iceberg.internals import MemoTransaction, RewriteFiles
from flight_server.iceberg.lineage import appended_since
from flight_server.online.index import OnlineIndex
from flight_server.reads.duck import local_path
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import sqlite_catalog, start_server, start_writing_server, wait_until
from tests.test_deletes import equality_delete

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
KEYS = {"entity_keys": ["id"], "event_time": "ts"}
IDS = list(range(30))


def rows(ids: list[int], step: int, value: float) -> pa.Table:
    """One row per id at `step` hours (ids spread over months: several partitions), `value + id` as its value."""
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(days=7 * i, hours=step) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([value + i for i in ids], pa.float64()),
        }
    )


def load(catalog: dict[str, str], table: str) -> Table:
    return load_catalog("default", **catalog).load_table(table)


def lookups(client: FeatureClient, table: str) -> list[Any]:
    found = client.get_online_features({"id": IDS}, [f"{table}:value"], apply_ttl=False)
    return found.column("value").to_pylist()


def reference(client: FeatureClient, table: str) -> list[Any]:
    """The latest value per id of the table's rows as a scan returns them, worked out in Python."""
    latest: dict[int, tuple[dt.datetime, float]] = {}
    for row in client.scan(table).read_all().to_pylist():
        if row["id"] not in latest or row["ts"] > latest[row["id"]][0]:
            latest[row["id"]] = (row["ts"], row["value"])
    return [latest[i][1] if i in latest else None for i in IDS]


def fresh_lookups(catalog: dict[str, str], table: str) -> list[Any]:
    """What a newly built index answers (a server that never saw the table)."""
    other = start_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{other.port}") as client:
            return lookups(client, table)
    finally:
        other.shutdown()


def current(client: FeatureClient, table: str) -> int:
    return int(client.describe(table)["current_snapshot_id"])


@pytest.fixture
def catalog(tmp_path: Path) -> dict[str, str]:
    return sqlite_catalog(tmp_path)


@pytest.fixture
def writer(catalog: dict[str, str]) -> Iterator[FeatureClient]:
    """A client of a server that writes (and compacts); the index under test lives on another server."""
    server = start_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        server.shutdown()


def test_a_compaction_commits_replace_snapshots(catalog: dict[str, str], writer: FeatureClient) -> None:
    """Both snapshots of a compaction are `replace` (pyiceberg reads them so), with the totals of the same rows;
    automatic maintenance's compaction of small files too."""
    table = "r.ops"
    writer.write(table, rows(IDS, 0, 0.0), **KEYS)
    writer.write(table, rows(IDS[:10], 1, 100.0))
    writer.delete(table, keys={"id": [3]}, mode="merge-on-read")
    before = load(catalog, table).current_snapshot()
    assert before is not None and before.summary is not None
    compacted = writer.compact(table)
    assert compacted["compacted"] and compacted["rows"] == 38
    loaded = load(catalog, table)
    tidy = loaded.current_snapshot()
    assert tidy is not None and tidy.snapshot_id == compacted["snapshot_id"] and tidy.summary is not None
    rewrite = loaded.snapshot_by_id(tidy.parent_snapshot_id)  # type: ignore[arg-type]
    assert rewrite is not None and rewrite.summary is not None
    assert rewrite.summary.operation == tidy.summary.operation == Operation.REPLACE
    assert rewrite.summary["flight.operation"] == "compact"
    assert rewrite.summary["deleted-records"] == before.summary["total-records"] == "40"
    assert rewrite.summary["added-records"] == rewrite.summary["total-records"] == tidy.summary["total-records"] == "38"
    assert rewrite.summary["removed-position-deletes"] == "2" and rewrite.summary["total-delete-files"] == "0"
    assert writer.describe(table)["snapshots"][-2]["operation"] == "replace"

    small = "r.small"
    for step in range(6):  # one id: one partition gathers the small files
        writer.write(small, rows([0], step, float(step)), **KEYS)
    with load(catalog, small).transaction() as transaction:
        transaction.set_properties({"flight.maintenance.compact-min-files": "5"})
    assert writer.run_maintenance(small)["data_files_compacted"] == 6
    snapshots = load(catalog, small).snapshots()
    assert [s.summary.operation for s in snapshots[-2:] if s.summary] == [Operation.REPLACE, Operation.REPLACE]


@pytest.mark.parametrize("write_process", [False, True])
def test_online_index_follows_compactions_without_a_rebuild(
    catalog: dict[str, str], writer: FeatureClient, write_process: bool
) -> None:
    """Puts before and after compactions, position and equality deletes compacted away: the index's rebuild count
    does not move across a compaction, and its lookups equal a fresh index's and the plain reference's."""
    table = f"r.follow_{int(write_process)}"
    start = start_writing_server if write_process else start_server
    server = start(catalog, online_refresh_seconds=0.05)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, rows(IDS, 0, 0.0), **KEYS)
            assert lookups(client, table) == reference(client, table)
            index = server.parts.store.peek(table)
            assert index is not None

            def settled() -> list[Any]:
                snapshot = current(client, table)
                wait_until(lambda: index.state.snapshot_id == snapshot, what="the index to reach the table")
                found = lookups(client, table)
                assert found == reference(client, table) == fresh_lookups(catalog, table)
                return found

            client.write(table, rows(IDS[:10], 1, 100.0))
            client.delete(table, keys={"id": [3, 4]}, mode="merge-on-read")  # position deletes: a rebuild
            settled()
            rebuilds = index.rebuilds
            client.write(table, rows(IDS[5:15], 2, 200.0))
            assert writer.compact(table)["compacted"]  # compacts the position deletes away
            client.write(table, rows(IDS[10:20], 3, 300.0))
            found = settled()
            assert index.rebuilds == rebuilds and found[3] is None and found[12] == 312.0

            equality_delete(catalog, table, pa.table({"id": pa.array([7], pa.int64())}))  # a rebuild
            settled()
            rebuilds = index.rebuilds
            assert writer.compact(table)["compacted"]  # compacts the equality deletes away
            client.write(table, rows([7, 25], 4, 400.0))
            found = settled()
            assert index.rebuilds == rebuilds and found[7] == 407.0 and found[8] == 208.0
            assert index.error is None
    finally:
        server.shutdown()


def quiet_index(catalog: dict[str, str], write_process: bool = False) -> FeatureFlightServer:
    """A server whose index refreshes only when a test says so (it polls hourly; the writes go elsewhere)."""
    start = start_writing_server if write_process else start_server
    return start(catalog, online_refresh_seconds=3600.0)


def refresh(server: FeatureFlightServer, table: str) -> str:
    store = server.parts.store
    with store._building(table):
        return store.refresh(table)


@pytest.mark.parametrize("write_process", [False, True])
def test_files_appended_then_compacted_away_are_read_or_else_rebuilt(
    catalog: dict[str, str], writer: FeatureClient, write_process: bool
) -> None:
    """A refresh that finds appends, a compaction of them and appends after applies the appended files (read though
    compacted away); once such a file is gone (snapshot expiry racing the refresh), it rebuilds instead."""
    table = "r.gone"
    server = quiet_index(catalog, write_process)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, rows(IDS, 0, 0.0), **KEYS)  # through the write process, which plans refreshes
            assert (server.parts.writes is not None) == write_process
            assert lookups(client, table) == reference(client, table)
            index = server.parts.store.peek(table)
            assert index is not None
            writer.write(table, rows(IDS[:10], 1, 100.0))
            writer.write(table, rows(IDS[5:15], 2, 200.0))
            assert writer.compact(table)["compacted"]
            writer.write(table, rows([1, 20], 3, 300.0))
            assert re.fullmatch(r"appended \d+ file\(s\), 16 key\(s\) changed", refresh(server, table))
            assert index.rebuilds == 0 and index.state.snapshot_id == current(writer, table)
            assert lookups(client, table) == reference(client, table) == fresh_lookups(catalog, table)

            put = writer.write(table, rows([2], 4, 400.0))
            loaded = load(catalog, table)
            assert writer.compact(table)["compacted"]
            appended = appended_since(loaded, index.state.snapshot_id, put.snapshot_id).files  # type: ignore[arg-type]
            assert appended is not None and len(appended) == 1
            Path(local_path(appended[0].file_path)).unlink()  # what expiry deletes once no snapshot uses it
            assert refresh(server, table).startswith("rebuilt") and index.rebuilds == 1
            assert lookups(client, table)[2] == 402.0
            assert lookups(client, table) == reference(client, table) == fresh_lookups(catalog, table)
    finally:
        server.shutdown()


@contextmanager
def indexed(
    catalog: dict[str, str], writer: FeatureClient, table: str
) -> Iterator[tuple[FeatureFlightServer, FeatureClient, OnlineIndex]]:
    """The table written through `writer`, and a `quiet_index` server with its client and its index of the table."""
    writer.write(table, rows(IDS, 0, 0.0), **KEYS)
    server = quiet_index(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            assert lookups(client, table) == reference(client, table)
            index = server.parts.store.peek(table)
            assert index is not None
            yield server, client, index
    finally:
        server.shutdown()


def test_a_replace_that_changes_rows_still_rebuilds(catalog: dict[str, str], writer: FeatureClient) -> None:
    """Another writer's `replace` that dropped a data file, a position delete file or an equality delete file is
    no compaction: the index rebuilds, and answers as a fresh one does."""
    table = "r.mislabelled"
    with indexed(catalog, writer, table) as (server, client, index):
        later = writer.write(table, rows(IDS[:5], 1, 100.0)).snapshot_id
        loaded = load(catalog, table)
        data = [f for f in live_files(loaded.io, loaded.current_snapshot()) if f.content == DataFileContent.DATA]
        appended = appended_since(loaded, index.state.snapshot_id, later).files  # type: ignore[arg-type]
        assert appended is not None
        dropped = next(f for f in data if f.partition not in {a.partition for a in appended})
        commit_rewrite(threading.Lock(), loaded, Operation.REPLACE, [dropped], [], {})
        assert refresh(server, table) == "rebuilt" and index.rebuilds == 1
        found = lookups(client, table)
        assert found == reference(client, table) == fresh_lookups(catalog, table)
        assert found.count(None) > 0

        writer.delete(table, keys={"id": [2]}, mode="merge-on-read")
        assert refresh(server, table) == "rebuilt" and lookups(client, table)[2] is None
        loaded = load(catalog, table)
        deletes = [f for f in live_files(loaded.io, loaded.current_snapshot()) if f.content != DataFileContent.DATA]
        assert deletes
        commit_rewrite(threading.Lock(), loaded, Operation.REPLACE, deletes, [], {})  # the deleted row is back
        before = index.rebuilds
        assert refresh(server, table) == "rebuilt" and index.rebuilds == before + 1
        found = lookups(client, table)
        assert found[2] == 102.0
        assert found == reference(client, table) == fresh_lookups(catalog, table)

        equality_delete(catalog, table, pa.table({"id": pa.array([9], pa.int64())}))
        assert refresh(server, table) == "rebuilt" and lookups(client, table)[9] is None
        loaded = load(catalog, table)
        deletes = [f for f in live_files(loaded.io, loaded.current_snapshot()) if f.content != DataFileContent.DATA]
        commit_rewrite(threading.Lock(), loaded, Operation.REPLACE, deletes, [], {})  # id 9 is back
        before = index.rebuilds
        assert refresh(server, table) == "rebuilt" and index.rebuilds == before + 1
        found = lookups(client, table)
        assert found[9] == 9.0
        assert found == reference(client, table) == fresh_lookups(catalog, table)


class DropsAManifest(RewriteFiles):
    """A writer that leaves a manifest of live data files out of its snapshot without recording their removal."""

    def _existing_manifests(self) -> list[ManifestFile]:
        manifests = super()._existing_manifests()
        dropped = next(m for m in manifests if m.content == ManifestContent.DATA)
        return [m for m in manifests if m is not dropped]


def test_a_replace_that_drops_files_unrecorded_still_rebuilds(catalog: dict[str, str], writer: FeatureClient) -> None:
    """A `replace` with no entries of its own whose manifest list lost live files (its manifests do not add up) is no
    compaction: the index rebuilds, and answers as a fresh one does."""
    table = "r.unrecorded"
    with indexed(catalog, writer, table) as (server, client, index):
        writer.write(table, rows(IDS[:5], 1, 100.0))
        before = reference(client, table)
        transaction = MemoTransaction(load(catalog, table))
        DropsAManifest(transaction, Operation.REPLACE, [], [], {}).commit()
        transaction.commit_transaction()
        assert refresh(server, table) == "rebuilt" and index.rebuilds == 1
        found = lookups(client, table)
        assert found == reference(client, table) == fresh_lookups(catalog, table) != before


def test_since_snapshot_scans_still_refuse_across_a_compaction(writer: FeatureClient) -> None:
    table = "r.since"
    first = writer.write(table, rows(IDS, 0, 0.0), **KEYS).snapshot_id
    writer.write(table, rows(IDS[:5], 1, 100.0))
    assert writer.compact(table)["compacted"]
    with pytest.raises(InvalidRequestError, match="removes data files"):
        writer.scan(table, since_snapshot=first).read_all()
