"""Exactly once: the same `write_id` put through two server processes at the same moment commits one snapshot,
on a SQLite catalog file both share and on PostgreSQL; different ids put at the same moment all land. A put
that fails after writing files (a lost overwrite race, a full disk) deletes them."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from flight_client import ConflictError, FeatureClient, ResourceExhaustedError
from flight_server.wire.writes import WriteResult
from tests.conftest import TEST_CHUNK_BYTES, local_files, serve_replicas, sqlite_catalog, start_server, wait_until

ROUNDS = 20
ROWS = 500
T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
WRITE_ID = "flight.write-id"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two `flight-server serve` processes on one catalog: a SQLite file both open, or PostgreSQL."""
    tmp = tmp_path_factory.mktemp(f"exactly-once-{request.param}")
    if request.param == "sqlite":
        properties = sqlite_catalog(tmp)
    else:
        properties = {"type": "sql", "uri": request.getfixturevalue("postgres_url"), "warehouse": tmp.as_uri()}
    with serve_replicas(tmp, properties, lambda *_: {"FLIGHT_SERVER_DUCKDB_MEMORY_LIMIT": "1GB"}) as locations:
        with FeatureClient(locations[0]) as client:  # the namespace exists before the races
            client.write("races.seed", rows(0), entity_keys=["driver_id"], event_time="event_timestamp")
        yield locations


def rows(start: int) -> pa.Table:
    ids = list(range(start, start + ROWS))
    return pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array([T0 + dt.timedelta(seconds=i) for i in ids], pa.timestamp("us", "UTC")),
            "rate": pa.array([i / 7 for i in ids], pa.float64()),
        }
    )


def put_together(locations: list[str], table: str, puts: list[tuple[pa.Table, str | None]]) -> list[WriteResult]:
    """Each put through its own replica, all released at the same moment by a barrier."""
    barrier = threading.Barrier(len(puts))
    definition = {"entity_keys": ["driver_id"], "event_time": "event_timestamp"}

    def put(location: str, data: pa.Table, write_id: str | None) -> WriteResult:
        with FeatureClient(location) as client:
            client.health()  # connected before the race starts
            barrier.wait(timeout=30)
            return client.write(table, data, write_id=write_id, **definition)

    with ThreadPoolExecutor(len(puts)) as pool:
        futures = [pool.submit(put, loc, data, wid) for loc, (data, wid) in zip(locations, puts, strict=True)]
        return [future.result() for future in futures]


def history(location: str, table: str) -> list[dict[str, Any]]:
    with FeatureClient(location) as client:
        snapshots: list[dict[str, Any]] = client.describe(table)["snapshots"]
        return snapshots


def scanned_ids(location: str, table: str) -> list[int]:
    with FeatureClient(location) as client:
        return sorted(client.scan(table).read_all().column("driver_id").to_pylist())


def test_the_same_write_id_on_two_replicas_at_once_commits_once(replicas: list[str]) -> None:
    table = f"races.same_{uuid.uuid4().hex[:8]}"
    committed = 0
    for round_ in range(ROUNDS):  # round 0 races to create the table as well
        write_id = f"run-{round_}"
        results = put_together(replicas, table, [(rows(round_ * ROWS), write_id)] * 2)
        first, again = sorted(results, key=lambda r: r.duplicate)
        assert (first.duplicate, again.duplicate) == (False, True), f"round {round_}: {results}"
        assert again.snapshot_id == first.snapshot_id and again.rows == first.rows == ROWS, f"round {round_}"
        committed += first.files
    snapshots = history(replicas[0], table)
    ids = Counter(s["summary"].get(WRITE_ID) for s in snapshots)
    assert ids == Counter({f"run-{r}": 1 for r in range(ROUNDS)})
    assert scanned_ids(replicas[1], table) == list(range(ROUNDS * ROWS))
    with FeatureClient(replicas[0]) as client:
        files = local_files(client.describe(table)["location"])
    assert files is not None and len(files) == committed  # the duplicates' files are deleted


def test_different_write_ids_and_none_on_two_replicas_at_once_all_land(replicas: list[str]) -> None:
    table = f"races.different_{uuid.uuid4().hex[:8]}"
    for round_ in range(ROUNDS // 2):
        start = round_ * 3 * ROWS
        puts = [(rows(start), f"a-{round_}"), (rows(start + ROWS), f"b-{round_}")]
        results = put_together(replicas, table, puts)
        assert not any(r.duplicate for r in results) and len({r.snapshot_id for r in results}) == 2
        results = put_together(replicas, table, [(rows(start + 2 * ROWS), None), (rows(start + 2 * ROWS), None)])
        assert not any(r.duplicate for r in results) and len({r.snapshot_id for r in results}) == 2
    assert len(history(replicas[0], table)) == 4 * (ROUNDS // 2)
    expected = sorted(
        [
            *range(ROUNDS // 2 * 3 * ROWS),
            *(i for r in range(ROUNDS // 2) for i in range((3 * r + 2) * ROWS, (3 * r + 3) * ROWS)),
        ]
    )
    assert scanned_ids(replicas[1], table) == expected


def test_an_overwrite_that_loses_to_an_append_deletes_its_files(tmp_path: Path) -> None:
    """An overwrite staged before a concurrent append commits would drop the appended rows unseen: it is
    refused with CONFLICT, and the files it had written are deleted."""
    server = start_server(sqlite_catalog(tmp_path))
    location, table = f"grpc://127.0.0.1:{server.port}", "races.overwrite"
    try:
        with FeatureClient(location) as client, FeatureClient(location) as other:
            client.write(table, rows(0), entity_keys=["driver_id"], event_time="event_timestamp", partition_by=[])
            where = client.describe(table)["location"]
            files_before = local_files(where)
            assert files_before is not None
            data = rows(0)
            while data.nbytes < 4 * TEST_CHUNK_BYTES:  # several chunks, so files are written mid-stream
                data = pa.concat_tables([data, data])
            appended: list[WriteResult] = []

            def overwrite_racing_an_append() -> Iterator[pa.RecordBatch]:
                yield from data.to_batches(max_chunksize=ROWS)
                wait_until(lambda: local_files(where) != files_before, what="the overwrite to write files")
                appended.append(other.write(table, rows(ROWS)))

            stream = pa.RecordBatchReader.from_batches(data.schema, overwrite_racing_an_append())
            with pytest.raises(ConflictError, match="added rows .* while this overwrite was written"):
                client.write(table, stream, mode="overwrite")
            assert client.describe(table)["current_snapshot_id"] == appended[0].snapshot_id
            assert client.scan(table).read_all().num_rows == 2 * ROWS
            files_after = local_files(where) or set()
            assert files_after > files_before and len(files_after) == len(files_before) + appended[0].files
    finally:
        server.shutdown()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Catalog properties of a warehouse on a 4 MiB tmpfs."""
    warehouse = tmp_path / "small-disk"
    warehouse.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(warehouse)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield {"type": "sql", "uri": f"sqlite:///{tmp_path / 'catalog.db'}", "warehouse": warehouse.as_uri()}
    finally:
        subprocess.run(["umount", str(warehouse)], check=True)


def random_rows(n: int, seed: int) -> pa.Table:
    """Rows that do not compress: `n` of them take about 16 bytes each in Parquet."""
    return pa.table(
        {
            "driver_id": pa.array(range(n), pa.int64()),
            "event_timestamp": pa.array([T0] * n, pa.timestamp("us", "UTC")),
            "rate": pa.array(np.random.default_rng(seed).random(n), pa.float64()),
        }
    )


def test_a_full_disk_is_resource_exhausted_and_leaves_no_files(small_disk: dict[str, str]) -> None:
    """A put of 16 MB runs out of space midway; the client gets RESOURCE_EXHAUSTED, the files it wrote are
    deleted (those of the chunk's other partitions, written in parallel, included), and the next put has the
    room back."""
    server = start_server(small_disk)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            first = client.write("disk.full", rows(0), entity_keys=["driver_id"], event_time="event_timestamp")
            where = client.describe("disk.full")["location"]
            files_before = local_files(where)
            big = random_rows(2_000_000, 0)
            with pytest.raises(ResourceExhaustedError, match="the warehouse ran out of space .* files were deleted"):
                client.write("disk.full", big)
            assert local_files(where) == files_before
            assert client.describe("disk.full")["current_snapshot_id"] == first.snapshot_id
            second = client.write("disk.full", rows(ROWS))
            assert client.scan("disk.full").read_all().num_rows == 2 * ROWS and second.snapshot_id != first.snapshot_id
    finally:
        server.shutdown()


def test_a_compaction_that_runs_out_of_space_leaves_no_files(small_disk: dict[str, str]) -> None:
    """The disk is filled to 32 KiB short of full after three puts, so the compaction's first file fails in its
    first write: the compaction fails with RESOURCE_EXHAUSTED, nothing it began is left, and the table reads as
    before."""
    server = start_server(small_disk)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for seed in range(3):
                client.write(
                    "disk.compact",
                    random_rows(20_000, seed),
                    entity_keys=["driver_id"],
                    event_time="event_timestamp",
                    partition_by=[],
                )
            where = client.describe("disk.compact")["location"]
            files_before = local_files(where)
            snapshot = client.describe("disk.compact")["current_snapshot_id"]
            disk = Path(small_disk["warehouse"].removeprefix("file://"))
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "filler").write_bytes(b"\0" * (free - (32 << 10)))
            with pytest.raises(ResourceExhaustedError, match="ran out of space"):
                client.compact("disk.compact")
            assert local_files(where) == files_before
            assert client.describe("disk.compact")["current_snapshot_id"] == snapshot
            assert client.scan("disk.compact").read_all().num_rows == 60_000
    finally:
        server.shutdown()
