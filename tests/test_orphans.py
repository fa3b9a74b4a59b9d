"""Orphan files: a server killed during a put leaves Parquet files no metadata references; `remove_orphan_files`
deletes exactly those (older than its margin), never a file the table's metadata references."""

from __future__ import annotations

import datetime as dt
import functools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from pyiceberg.catalog import load_catalog
from pyiceberg.manifest import ManifestFile

from flight_client import FeatureClient, FeatureServerError, InvalidRequestError, NotFoundError, PermissionDeniedError
from flight_server.changes import rewrite
from flight_server.changes.orphans import holds_files
from flight_server.cli import main
from flight_server.iceberg.internals import RewriteFiles
from flight_server.transport.actions import ACTIONS
from flight_server.transport.auth import ADMIN
from tests.conftest import healthy, sqlite_catalog, start_server, start_writing_server, two_replicas, wait_until
from tests.services import _stop_group, free_ports

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 6, 1, tzinfo=UTC)
NOW = dt.datetime.now(UTC)
MARGIN = dt.timedelta(days=1)


def rows(ids: range | list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(seconds=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([i / 7 for i in ids], pa.float64()),
        }
    )


def create(client: FeatureClient, table: str, data: pa.Table, partition_by: list[str] | None = None) -> None:
    client.write(table, data, entity_keys=["id"], event_time="ts", partition_by=partition_by)


def folder(client: FeatureClient, table: str) -> Path:
    location = client.describe(table)["location"]
    assert location.startswith("file://")
    return Path(location[len("file://") :])


def stored(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def referenced(properties: dict[str, str], table: str) -> set[Path]:
    """Every file the table's metadata references, found with pyiceberg alone (not the code under test)."""
    loaded = load_catalog("default", **properties).load_table(table)
    metadata = loaded.metadata
    locations = {loaded.metadata_location, *(entry.metadata_file for entry in metadata.metadata_log)}
    locations |= {snapshot.manifest_list for snapshot in metadata.snapshots}
    locations |= set(loaded.inspect.all_manifests().column("path").to_pylist())
    locations |= set(loaded.inspect.all_files().column("file_path").to_pylist())
    return {Path(location.removeprefix("file://")) for location in locations}


def paths(locations: list[str]) -> set[Path]:
    """Files of a reply as paths (pyiceberg writes `file://` locations without percent-encoding)."""
    return {Path(location.removeprefix("file://")) for location in locations}


def age(path: Path, by: dt.timedelta) -> None:
    stamp = (NOW - by).timestamp()
    os.utime(path, (stamp, stamp))


def scanned_ids(client: FeatureClient, table: str) -> list[int]:
    return sorted(client.read_table(table).column("id").to_pylist())


# The crash


@contextmanager
def serving(warehouse: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`flight-server serve` on the embedded SQLite catalog in `warehouse`, writing 1 MB chunks as files."""
    port = free_ports(1)[0]
    location = f"grpc://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHT_SERVER_")}
    command = ["serve", "--port", str(port), "--warehouse", str(warehouse), "--write-chunk-mb", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flight_server", *command],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: proc.poll() is not None or healthy(location), timeout=60, what="the server")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc, location
    finally:
        _stop_group(proc)


def test_a_server_killed_during_a_put_leaks_files_that_remove_orphan_files_removes(tmp_path: Path) -> None:
    warehouse, table = tmp_path / "warehouse", "crash.features"
    properties = sqlite_catalog(warehouse)  # the catalog `serve --warehouse` makes
    acknowledged: list[int] = []
    with serving(warehouse, tmp_path / "first.log") as (proc, location), FeatureClient(location) as client:
        for put in range(5):
            ids = range(put * 20_000, (put + 1) * 20_000)
            create(client, table, rows(ids))
            acknowledged += ids
        root = folder(client, table)
        before = stored(root)
        # The last put streams batches of 1.5 MB, then waits for the kill: the server has written files by then.
        sent, killed, failure = threading.Event(), threading.Event(), []

        def batches() -> Iterator[pa.RecordBatch]:
            for i in range(12):
                yield from rows(range(10**6 + i * 65_536, 10**6 + (i + 1) * 65_536)).to_batches()
            sent.set()
            killed.wait(timeout=120)

        def put() -> None:
            try:
                client.write(table, pa.RecordBatchReader.from_batches(rows([]).schema, batches()))
            except FeatureServerError as exc:
                failure.append(exc)

        writer = threading.Thread(target=put)
        writer.start()
        wait_until(lambda: sent.is_set() and len(stored(root) - before) >= 5, timeout=120, what="the put's files")
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its write process, which wrote the files, at once
        proc.wait()
        killed.set()
        writer.join(timeout=60)
        assert failure and not writer.is_alive(), "the put was never acknowledged"

    leaked = stored(root) - referenced(properties, table)
    assert leaked and all(root / "data" in path.parents and path.suffix == ".parquet" for path in leaked)
    leaked_bytes = sum(path.stat().st_size for path in leaked)
    assert leaked_bytes > 0

    with serving(warehouse, tmp_path / "second.log") as (_, location), FeatureClient(location) as client:
        listed = client.remove_orphan_files(table, dry_run=True)  # the default margin: the files are too new
        assert (listed["orphan_files"], listed["recent_files"]) == (0, len(leaked))
        now = dt.datetime.now(UTC)
        dry = client.remove_orphan_files(table, older_than=now, dry_run=True)
        assert paths(dry["files"]) == leaked
        assert (dry["orphan_files"], dry["orphan_bytes"], dry["files_deleted"]) == (len(leaked), leaked_bytes, 0)
        assert leaked <= stored(root)
        removed = client.remove_orphan_files(table, older_than=now)
        assert (removed["files_deleted"], removed["bytes_deleted"]) == (len(leaked), leaked_bytes)
        assert stored(root) == referenced(properties, table)
        assert scanned_ids(client, table) == sorted(acknowledged)
        assert client.remove_orphan_files(table, older_than=dt.datetime.now(UTC))["orphan_files"] == 0


# One server in this process for the rest


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("orphans"))


@pytest.fixture(scope="module")
def location(catalog: dict[str, str]) -> Iterator[str]:
    server = start_server(catalog)
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


def plant(path: Path, size: int, old: bool) -> Path:
    """An unreferenced file, older than the margin or newer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    age(path, MARGIN * 3 if old else MARGIN / 2)
    return path


def test_dry_run_deletes_nothing_and_newer_files_stay(location: str) -> None:
    table = f"tests.t_{uuid.uuid4().hex[:12]}"
    with FeatureClient(location) as client:
        create(client, table, rows(range(100)))
        root = folder(client, table)
        old = plant(root / "data" / "old.parquet", 100, old=True)
        new = plant(root / "metadata" / "new-m0.avro", 10, old=False)
        before = stored(root)
        older_than = NOW - MARGIN
        dry = client.remove_orphan_files(table, older_than=older_than, dry_run=True)
        assert paths(dry["files"]) == {old} and (dry["orphan_bytes"], dry["files_deleted"]) == (100, 0)
        assert stored(root) == before
        done = client.remove_orphan_files(table, older_than=older_than)
        assert (paths(done["files"]), done["files_deleted"], done["recent_files"]) == ({old}, 1, 1)
        assert stored(root) == before - {old}
        kept = client.remove_orphan_files(table)  # the default margin, 3 days, keeps a file of 12 hours
        assert (kept["orphan_files"], kept["recent_files"]) == (0, 1) and new.exists()
        assert scanned_ids(client, table) == list(range(100))


ORPHAN_NAMES = [
    "data/{u}.parquet",
    "data/00000-0-{u}.parquet",
    "data/ts_month=2025-06/id_bucket=3/00001-1-{u}.parquet",
    "metadata/{u}-m0.avro",
    "metadata/snap-123-0-{u}.avro",
    "metadata/00042-{u}.metadata.json",
    "metadata/{u}.stats",
]


@pytest.mark.parametrize("seed", range(6))
def test_referenced_files_are_never_deleted(location: str, catalog: dict[str, str], seed: int) -> None:
    """Random histories (puts, deletes, compactions, expiry) and random orphan files, every file aged past the
    margin: the old orphans go, the new ones stay, every referenced file stays and the table reads the same."""
    rng = random.Random(seed)
    table = f"tests.t_{uuid.uuid4().hex[:12]}"
    ids: set[int] = set()
    with FeatureClient(location) as client:
        for put in range(rng.randint(1, 4)):
            batch = range(put * 1000, put * 1000 + rng.randint(1, 300))
            create(client, table, rows(batch), partition_by=rng.choice([None, []]) if put == 0 else None)
            ids |= set(batch)
            if rng.random() < 0.4:
                gone = rng.sample(sorted(ids), k=min(3, len(ids)))
                client.delete(table, keys={"id": gone}, mode=rng.choice(["copy-on-write", "merge-on-read"]))
                ids -= set(gone)
        if rng.random() < 0.4:
            client.compact(table)
        if rng.random() < 0.3:
            client.expire_snapshots(table, older_than=dt.datetime.now(UTC), retain_last=1)
        root = folder(client, table)
        kept = referenced(catalog, table)
        assert kept <= stored(root)
        for path in stored(root):
            age(path, MARGIN * 10)  # age protects no referenced file
        orphans = {
            plant(root / rng.choice(ORPHAN_NAMES).format(u=uuid.uuid4()), rng.randint(0, 5000), rng.random() < 0.6)
            for _ in range(rng.randint(0, 12))
        }
        old = {path for path in orphans if path.stat().st_mtime < (NOW - MARGIN).timestamp()}
        dry = client.remove_orphan_files(table, older_than=NOW - MARGIN, dry_run=True)
        assert paths(dry["files"]) == old and dry["orphan_files"] == len(old)
        assert stored(root) == kept | orphans
        done = client.remove_orphan_files(table, older_than=NOW - MARGIN)
        assert done["files_deleted"] == len(old) and done["recent_files"] == len(orphans - old)
        assert done["bytes_deleted"] == dry["orphan_bytes"]
        assert stored(root) == kept | (orphans - old)
        assert scanned_ids(client, table) == sorted(ids)


def test_bad_requests_are_refused(location: str) -> None:
    with FeatureClient(location) as client:
        with pytest.raises(NotFoundError, match="does not exist"):
            client.remove_orphan_files("tests.no_such_table")
        with pytest.raises(InvalidRequestError, match="'older_than' is not an ISO-8601 timestamp"):
            client.remove_orphan_files("tests.no_such_table", older_than="yesterday")


# Other tables' files


def test_a_table_put_under_the_name_of_one_renamed_away_gets_a_location_of_its_own(
    location: str, catalog: dict[str, str]
) -> None:
    """The reviewer's case: a table renamed (a backup) and a new one put under its old name. The new table is created
    beside the backup's folder, not in it, so its orphan removal, every file aged past the margin, deletes nothing
    of the backup's."""
    table, backup = (f"tests.t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    with FeatureClient(location) as client:
        create(client, table, rows(range(10)))
        kept = folder(client, table)
        load_catalog("default", **catalog).rename_table(table, backup)
        create(client, table, rows(range(100, 105)))
        new = folder(client, table)
        assert folder(client, backup) == kept and re.fullmatch(re.escape(kept.name) + "-[0-9a-f]{8}", new.name)
        backup_files = stored(kept)
        assert backup_files == referenced(catalog, backup)
        for path in backup_files | stored(new):
            age(path, MARGIN * 10)
        orphan = plant(new / "data" / "orphan.parquet", 10, old=True)
        done = client.remove_orphan_files(table, older_than=NOW - MARGIN)
        assert paths(done["files"]) == {orphan} and done["files_deleted"] == 1
        assert client.remove_orphan_files(backup, older_than=NOW - MARGIN)["orphan_files"] == 0
        assert stored(kept) == backup_files
        assert (scanned_ids(client, backup), scanned_ids(client, table)) == (list(range(10)), list(range(100, 105)))


def test_a_new_table_whose_default_location_is_free_takes_it(location: str) -> None:
    """The catalog's default location (the folder named as the table, beside its namespace's others) stays a new
    table's when nothing is there, even beside a table whose name starts with the same letters."""
    table = f"tests.t_{uuid.uuid4().hex[:12]}"
    with FeatureClient(location) as client:
        create(client, f"{table}2", rows(range(5)))
        create(client, table, rows(range(5)))
        assert folder(client, table) == folder(client, f"{table}2").with_name(table.split(".")[1])


def test_a_default_location_that_cannot_be_listed_fails_the_put_with_a_clear_error(tmp_path: Path) -> None:
    """A put that creates a table first lists its default location for files; when that listing fails, the put fails
    INTERNAL (a fault of the server's storage) with a message that names the table and the fault, no server path,
    through the write process, and no table is created. The fault: a file where the folder goes (a folder the server
    may not read would do too, but tests run as root, who reads any folder)."""
    catalog = sqlite_catalog(tmp_path)
    default = tmp_path / "faulty" / "t"  # the SQL catalog's default location of `faulty.t`
    default.parent.mkdir()
    default.write_bytes(b"not a folder")
    server = start_writing_server(catalog)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client, pytest.raises(FeatureServerError) as raised:
            create(client, "faulty.t", rows(range(3)))
        message = str(raised.value)
        assert raised.value.code == "INTERNAL"
        assert "could not list the files at the location of table 'faulty.t'" in message
        assert "NotADirectoryError" in message
        assert str(tmp_path) not in message and "Traceback" not in message
        assert not load_catalog("default", **catalog).table_exists("faulty.t")
    finally:
        server.shutdown()


def test_orphan_removal_leaves_a_table_nested_in_the_location_alone(location: str, catalog: dict[str, str]) -> None:
    """Another table whose location is inside this one's data folder (made by another engine: the server makes no
    such table): its data and metadata folders are skipped, every file aged past the margin, while a stray file
    beside them is this table's orphan."""
    outer, inner = (f"tests.t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    with FeatureClient(location) as client:
        create(client, outer, rows(range(20)))
        root = folder(client, outer)
        nested = load_catalog("default", **catalog).create_table(
            inner, schema=rows([0]).schema, location=f"file://{root}/data/nested"
        )
        nested.append(rows(range(7)))
        inner_files = stored(root / "data" / "nested")
        assert inner_files == referenced(catalog, inner) and len(inner_files) >= 4
        for path in stored(root):
            age(path, MARGIN * 10)
        stray = plant(root / "data" / "nested" / "stray.parquet", 10, old=True)
        done = client.remove_orphan_files(outer, older_than=NOW - MARGIN)
        assert paths(done["files"]) == {stray} and done["files_deleted"] == 1
        assert stored(root / "data" / "nested") == inner_files
        assert sorted(load_catalog("default", **catalog).load_table(inner).scan().to_arrow()["id"].to_pylist()) == list(
            range(7)
        )
        assert scanned_ids(client, outer) == list(range(20))


def test_orphan_removal_of_a_location_another_table_shares_is_refused(tmp_path: Path) -> None:
    """A table at the very location of another (made by another engine), or a table whose location cannot be
    read: orphan removal refuses, by hand and in automatic maintenance, and deletes nothing."""
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, "ops.t", rows(range(10)))
            root = folder(client, "ops.t")
            other = load_catalog("default", **properties).create_table(
                "ops.other", schema=rows([0]).schema, location=f"file://{root}"
            )
            other.append(rows(range(3)))
            for path in stored(root):
                age(path, MARGIN * 10)
            before = stored(root)
            with pytest.raises(InvalidRequestError, match="refused: table 'ops.other' has the same location"):
                client.remove_orphan_files("ops.t", older_than=NOW - MARGIN)
            assert "refused: table 'ops.other' has the same location" in client.run_maintenance("ops.t")["error"]
            load_catalog("default", **properties).drop_table("ops.other")
            create(client, "ops.broken", rows(range(3)))
            Path(load_catalog("default", **properties).load_table("ops.broken").metadata_location[7:]).unlink()
            with pytest.raises(InvalidRequestError, match="refused: table 'ops.broken' cannot be read"):
                client.remove_orphan_files("ops.t", older_than=NOW - MARGIN)
            assert stored(root) == before
    finally:
        server.shutdown()


ADMIN_TOKEN, WRITER_TOKEN, TEAM_ADMIN_TOKEN = (f"{name}-{uuid.uuid4().hex}" for name in ("admin", "writer", "team"))


def test_removing_orphan_files_needs_admin(tmp_path: Path) -> None:
    assert ACTIONS["remove_orphan_files"].permission == ADMIN
    tokens = [
        {"name": "ops", "token": ADMIN_TOKEN, "permissions": ["read", "write", "admin"]},
        {"name": "pipeline", "token": WRITER_TOKEN, "permissions": ["read", "write"]},
        {"name": "team-ops", "token": TEAM_ADMIN_TOKEN, "permissions": ["read", "admin"], "namespaces": ["team_a"]},
    ]
    server = start_server(sqlite_catalog(tmp_path), auth_tokens=tokens)
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        with FeatureClient(location, token=ADMIN_TOKEN) as admin:
            create(admin, "shared.t", rows(range(10)))
            orphan = plant(folder(admin, "shared.t") / "data" / "x.parquet", 10, old=True)
            assert admin.remove_orphan_files("shared.t", dry_run=True)["orphan_files"] == 1
        writer = FeatureClient(location, token=WRITER_TOKEN)
        with writer, pytest.raises(PermissionDeniedError, match="lacks the 'admin' permission"):
            writer.remove_orphan_files("shared.t")
        team = FeatureClient(location, token=TEAM_ADMIN_TOKEN)
        with team, pytest.raises(PermissionDeniedError, match="may not use namespace 'shared'"):
            team.remove_orphan_files("shared.t")
        assert orphan.exists()
    finally:
        server.shutdown()


def test_the_command_opens_the_catalog_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FLIGHT_SERVER_")]:
        monkeypatch.delenv(name)
    server = start_server(sqlite_catalog(tmp_path))  # the catalog `--warehouse tmp_path` opens
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, "ops.t", rows(range(10)))
            orphan = plant(folder(client, "ops.t") / "data" / "x.parquet", 10, old=True)
    finally:
        server.shutdown()
    command = ["remove-orphan-files", "ops.t", "--warehouse", str(tmp_path)]
    listed = CliRunner().invoke(main, [*command, "--dry-run"])
    assert listed.exit_code == 0 and f'"files": ["file://{orphan}"]' in listed.output and orphan.exists()
    removed = CliRunner().invoke(main, command)
    assert removed.exit_code == 0 and '"files_deleted": 1' in removed.output and not orphan.exists()
    missing = CliRunner().invoke(main, ["remove-orphan-files", "ops.nope", "--warehouse", str(tmp_path)])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_object_storage(seaweedfs: dict[str, str]) -> None:
    """On S3 (SeaweedFS behind its REST catalog) the files are listed and deleted through the table's FileIO."""
    table = f"tests.t_{uuid.uuid4().hex[:12]}"
    server = start_server(seaweedfs)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, table, rows(range(50)))
            client.delete(table, keys={"id": [1, 2]}, mode="merge-on-read")
            loaded = load_catalog("s3", **seaweedfs).load_table(table)
            location = loaded.metadata.location.rstrip("/")
            orphans = {f"{location}/data/{uuid.uuid4()}.parquet", f"{location}/metadata/{uuid.uuid4()}-m0.avro"}
            for orphan in orphans:
                with loaded.io.new_output(orphan).create() as out:
                    out.write(b"orphan")
            assert client.remove_orphan_files(table, dry_run=True)["recent_files"] == len(orphans)
            future = dt.datetime.now(UTC) + dt.timedelta(minutes=1)  # S3 keeps its own times: none are older
            listed = client.remove_orphan_files(table, older_than=future, dry_run=True)
            assert set(listed["files"]) == orphans and all(loaded.io.new_input(o).exists() for o in orphans)
            removed = client.remove_orphan_files(table, older_than=future)
            assert (removed["files_deleted"], removed["bytes_deleted"]) == (2, 12)
            assert not any(loaded.io.new_input(orphan).exists() for orphan in orphans)
            assert client.remove_orphan_files(table, older_than=future)["orphan_files"] == 0
            assert scanned_ids(client, table) == [i for i in range(50) if i not in (1, 2)]
    finally:
        server.shutdown()


def test_object_storage_locations(seaweedfs: dict[str, str]) -> None:
    """On S3: a new table beside `<name>2` keeps its default location (the prefix `.../<name>` of `.../<name>2` is no
    file of its folder); one put under the name of a table renamed away gets a location of its own, and neither
    table's orphan removal deletes an object of the other. A folder holds files when an object lies under it, at
    any depth, and not when only a longer name starts like it."""
    table, backup = (f"tests.t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    server = start_server(seaweedfs)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, f"{table}2", rows(range(5)))
            create(client, table, rows(range(10)))
            s3 = load_catalog("s3", **seaweedfs)
            first = s3.load_table(table).metadata.location.rstrip("/")
            assert first + "2" == s3.load_table(f"{table}2").metadata.location.rstrip("/")
            s3.rename_table(table, backup)
            create(client, table, rows(range(100, 105)))
            # SeaweedFS's catalog, too, gives a table a location of its own when objects are at the default one
            assert s3.load_table(table).metadata.location.startswith(first + "-")
            io = s3.load_table(table).io
            stray = f"{first}x/data/ts_month=2025-06/{uuid.uuid4()}.parquet"
            with io.new_output(stray).create() as out:
                out.write(b"stray")
            held = functools.partial(holds_files, io, table=table)
            assert held(f"{first}x") and held(f"{first}x/") and held(first)
            assert not held(first[:-1]) and not held(f"{first}x/metadata")
            future = dt.datetime.now(UTC) + dt.timedelta(minutes=1)  # S3 keeps its own times: none are older
            for name in (table, backup, f"{table}2"):
                assert client.remove_orphan_files(name, older_than=future)["orphan_files"] == 0, name
            assert (scanned_ids(client, backup), scanned_ids(client, table)) == (list(range(10)), list(range(100, 105)))
    finally:
        server.shutdown()


def test_a_put_that_fails_midway_leaves_no_objects(seaweedfs: dict[str, str]) -> None:
    """On S3 a put's chunks are uploaded as it streams; when a later batch is bad, the put fails and every object
    it uploaded is deleted: no orphan is left for `remove_orphan_files` to find."""
    table = f"tests.t_{uuid.uuid4().hex[:12]}"
    server = start_server(seaweedfs)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            create(client, table, rows(range(10)), partition_by=["bucket(4, id)"])
            good = rows(range(200_000))  # several chunks of the test server's 256 KiB, each 4 partitions' files
            bad = good.slice(0, 1).set_column(0, "id", pa.array([None], pa.int64()))
            stream = pa.RecordBatchReader.from_batches(good.schema, [*good.to_batches(20_000), *bad.to_batches()])
            with pytest.raises(InvalidRequestError, match="null"):
                client.write(table, stream)
            future = dt.datetime.now(UTC) + dt.timedelta(minutes=1)  # S3 keeps its own times: none are older
            assert client.remove_orphan_files(table, older_than=future, dry_run=True)["orphan_files"] == 0
            assert scanned_ids(client, table) == list(range(10))
    finally:
        server.shutdown()


def four_puts_expiring_at_once(client: FeatureClient, properties: dict[str, str], table: str) -> None:
    """A table of four puts of 10 rows (ids 0-39), small files to compact, whose old snapshots an expiry removes."""
    create(client, table, rows(range(0, 10)))
    for start in range(10, 40, 10):
        client.write(table, rows(range(start, start + 10)))
    with load_catalog("default", **properties).load_table(table).transaction() as transaction:
        transaction.set_properties({"history.expire.max-snapshot-age-ms": "1"})


def test_a_compaction_raced_by_another_replicas_compaction_and_expiry_leaves_no_manifests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction through one replica is about to commit on the snapshot it planned on; meanwhile the other replica
    compacts the same files and its expiry deletes the manifests only that snapshot used. The first compaction's
    commit had written its new manifest when it failed reading those: it gives way, and leaves no file behind (its
    manifests stayed before, unreferenced: what two replicas racing on SeaweedFS left now and then)."""
    properties = sqlite_catalog(tmp_path)
    table = "orphans.compaction_raced"
    with two_replicas(properties) as (_, first, other):
        four_puts_expiring_at_once(first, properties, table)
        raced: list[dict[str, object]] = []
        racing = threading.Event()  # the other replica's own compaction (same module, same process) goes through
        real = rewrite.commit_rewrite

        def race_then_commit(*args: object, **kwargs: object) -> int:
            if not racing.is_set():
                racing.set()
                raced.append(other.compact(table))
                raced.append(other.expire_snapshots(table))
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(rewrite, "commit_rewrite", race_then_commit)
        assert first.compact(table)["compacted"] is False  # nothing left to do on the other's snapshot
        assert raced[0]["compacted"] and raced[1]["expired"], raced
        assert sorted(first.read_table(table).column("id").to_pylist()) == list(range(40))
        assert stored(folder(first, table)) == referenced(properties, table)


def test_a_compaction_whose_retry_finds_its_new_base_expired_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction's commit loses to the other replica's put, and pyiceberg builds its retry on that put's snapshot,
    which the other replica's next put and expiry remove meanwhile (its manifest list deleted). No attempt landed:
    every file the compaction wrote goes, and it plans again and commits. Taken for an unknown outcome before, its
    data file, manifests and manifest lists stayed, unreferenced (seen on SeaweedFS with two replicas racing)."""
    properties = sqlite_catalog(tmp_path)
    table = "orphans.compaction_retry_raced"
    with two_replicas(properties) as (_, first, other):
        four_puts_expiring_at_once(first, properties, table)
        builds: list[int] = []  # the snapshot each build of the compaction's snapshot is based on
        expired: list[dict[str, object]] = []
        real = RewriteFiles._existing_manifests

        def racing(producer: RewriteFiles) -> list[ManifestFile]:
            builds.append(producer._parent_snapshot_id or 0)
            if len(builds) == 1:  # the first attempt will lose to this put
                other.write(table, rows(range(40, 50)))
            elif len(builds) == 2:  # the retry's base: replaced and expired before the retry reads it
                other.write(table, rows(range(50, 60)))
                expired.append(other.expire_snapshots(table))
            return real(producer)

        monkeypatch.setattr(RewriteFiles, "_existing_manifests", racing)
        assert first.compact(table)["compacted"]
        assert len(builds) == 3 and builds[1] in expired[0]["expired"], (builds, expired)  # type: ignore[operator]
        assert sorted(first.read_table(table).column("id").to_pylist()) == list(range(60))
        assert stored(folder(first, table)) == referenced(properties, table)
