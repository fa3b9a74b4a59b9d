"""Two replicas on SeaweedFS's REST catalog and S3, peers of each other with automatic maintenance on, put to the same
tables at once, as the production topology does (review 36 soaked it for 17 minutes): every row put once, the metadata
files bounded by the metadata log, and nothing left on S3 that the metadata does not reference once no kill cut a
commit. The soak found all three held; this keeps them in view (two replicas deleting the same old metadata files and
racing each other's commits and maintenance is what a single server never shows)."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from pyarrow.fs import FileSelector, FileType, S3FileSystem
from pyiceberg.catalog import load_catalog
from pyiceberg.table import Table

from flight_client import FeatureClient
from tests.conftest import replica_processes

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
RUN = uuid.uuid4().hex[:8]
TABLES = [f"soaked.a_{RUN}", f"soaked.b_{RUN}"]
PUTS = 24  # per client and table: well past the 5 metadata files kept below
POLICY = {
    "write.metadata.previous-versions-max": "5",
    "history.expire.max-snapshot-age-ms": "1000",
    "history.expire.min-snapshots-to-keep": "3",
    "flight.maintenance.compact-min-files": "3",
}


def peers(location: str, locations: list[str]) -> dict[str, str]:
    others = " ".join(other for other in locations if other != location)
    return {
        "FLIGHT_SERVER_AUTO_MAINTENANCE": "true",
        "FLIGHT_SERVER_MAINTENANCE_INTERVAL_SECONDS": "1",
        "FLIGHT_SERVER_ADVERTISE": location,
        "FLIGHT_SERVER_PEERS": others,
    }


def rows(tag: str, count: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(count), pa.int64()),
            "ts": pa.array([T0] * count, pa.timestamp("us", "UTC")),
            "tag": pa.array([f"{tag}:{i}" for i in range(count)], pa.string()),
        }
    )


def objects(properties: dict[str, str], location: str) -> set[str]:
    s3 = S3FileSystem(
        access_key=properties["s3.access-key-id"],
        secret_key=properties["s3.secret-access-key"],
        endpoint_override=properties["s3.endpoint"].removeprefix("http://"),
        scheme="http",
        region=properties["s3.region"],
    )
    listed = s3.get_file_info(FileSelector(location.removeprefix("s3://"), recursive=True))
    return {f"s3://{info.path}" for info in listed if info.type == FileType.File}


def referenced(table: Table) -> set[str]:
    """Every object the table's metadata names: its metadata files, and every snapshot's manifest list, manifests,
    data and delete files."""
    metadata, io = table.metadata, table.io
    paths = {table.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    for snapshot in metadata.snapshots:
        paths.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(io):
            paths.add(manifest.manifest_path)
            paths.update(e.data_file.file_path for e in manifest.fetch_manifest_entry(io, discard_deleted=True))
    return paths


def unreferenced(properties: dict[str, str], name: str) -> set[str] | None:
    """The objects under the table its metadata does not name (None while an expiry deletes what this reads)."""
    table = load_catalog("check", **properties).load_table(name)
    try:
        return objects(properties, table.metadata.location) - referenced(table)
    except FileNotFoundError:
        return None


def wait_referenced(properties: dict[str, str], name: str, timeout: float = 90) -> None:
    """Wait until every object under the table is referenced; fail naming those that are not."""
    deadline = time.monotonic() + timeout
    while (left := unreferenced(properties, name)) != set():
        if time.monotonic() > deadline:
            pytest.fail(f"objects of {name} that no metadata references after {timeout:.0f} s: {left and sorted(left)}")
        time.sleep(0.5)


def test_two_replicas_putting_to_one_table_on_rest_leave_every_object_referenced(
    tmp_path: Path, seaweedfs: dict[str, str]
) -> None:
    with replica_processes(tmp_path, seaweedfs, peers) as replicas:
        (a, _), (b, _) = replicas
        with FeatureClient(a, retry_seconds=30) as first:
            for table in TABLES:
                first.write(table, rows(f"{table}-0", 5), entity_keys=["id"], event_time="ts", partition_by=[])
        catalog = load_catalog("policies", **seaweedfs)
        for table in TABLES:
            with catalog.load_table(table).transaction() as transaction:
                transaction.set_properties(POLICY)
        put: dict[str, list[str]] = {table: [f"{table}-0"] for table in TABLES}
        failures: list[BaseException] = []

        def putting(location: str, who: str) -> None:
            try:
                with FeatureClient(location, retry_seconds=30) as client:
                    for i in range(PUTS):
                        for table in TABLES:
                            tag = f"{table}-{who}{i}"
                            client.write(table, rows(tag, 5), write_id=tag if i % 2 else None)
                            put[table].append(tag)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=putting, args=(loc, who)) for loc, who in ((a, "a"), (b, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        # maintenance goes on committing a while (compactions, expiries): what it writes is referenced once committed
        for table in TABLES:
            wait_referenced(seaweedfs, table)
        with FeatureClient(b) as client:
            for table in TABLES:
                tags = client.read_table(table, columns=["tag"]).column("tag").to_pylist()
                assert sorted(tags) == sorted(f"{tag}:{i}" for tag in put[table] for i in range(5)), table
                location = catalog.load_table(table).metadata.location
                metadata_files = {p for p in objects(seaweedfs, location) if p.endswith(".metadata.json")}
                assert len(metadata_files) <= 6, sorted(metadata_files)  # the log's 5 and the current one
