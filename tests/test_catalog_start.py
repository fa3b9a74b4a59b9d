"""Servers starting at the same moment on a new, empty SQL catalog (a fresh deployment of several replicas)
all start: pyiceberg creates the catalog's tables on first use, and the replicas that lose that race
try again instead of exiting. A SQLite catalog file is switched to write-ahead logging as it is opened."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy

from flight_client import FeatureClient
from flight_server.iceberg.catalog import FeatureCatalog
from tests.conftest import sqlite_catalog, start_server

STARTS = 6


def fresh_postgres(url: str, root: Path) -> dict[str, str]:
    """Catalog properties of a new, empty database on the test PostgreSQL server."""
    database = f"race_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    engine.dispose()
    return {"type": "sql", "uri": url.rsplit("/", 1)[0] + f"/{database}", "warehouse": root.as_uri()}


def start_at_once(properties: dict[str, str]) -> list[BaseException]:
    """Open the catalog from `STARTS` threads released together; what each one raised."""
    start_line = threading.Barrier(STARTS)
    failures: list[BaseException] = []

    def start() -> None:
        start_line.wait()
        try:
            FeatureCatalog("default", dict(properties)).catalog.list_namespaces()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(STARTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_servers_starting_at_once_on_a_new_catalog_all_open_it(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    for attempt in range(5):  # each a new catalog: the race does not happen every time
        root = tmp_path / str(attempt)
        root.mkdir()
        properties = (
            sqlite_catalog(root) if kind == "sqlite" else fresh_postgres(request.getfixturevalue("postgres_url"), root)
        )
        failures = start_at_once(properties)
        assert not failures, failures[0]


def journal_mode(database: Path) -> str:
    with sqlite3.connect(database) as connection:
        return str(connection.execute("PRAGMA journal_mode").fetchone()[0])


def test_a_sqlite_catalog_file_is_switched_to_write_ahead_logging(tmp_path: Path) -> None:
    """Each commit then appends to one log instead of creating, syncing and deleting a journal file; the mode stays
    in the file, every connection (other servers, the write process, a user's own) uses it, and commits stay synced
    before they are acknowledged."""
    properties = sqlite_catalog(tmp_path)
    database = tmp_path / "catalog.db"
    server = start_server(properties)
    try:
        assert journal_mode(database) == "wal"
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            rows = pa.table({"id": [1, 2], "ts": pa.array([0, 1], pa.timestamp("us", "UTC")), "v": [0.5, 1.5]})
            written = client.write("wal.t", rows, entity_keys=["id"], event_time="ts")
        other = FeatureCatalog("default", dict(properties))  # another process would open it the same way
        assert other.catalog.load_table(("wal", "t")).metadata.current_snapshot_id == written.snapshot_id
        with server.parts.catalog.catalog.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: synced at each commit
    finally:
        server.shutdown()
    assert journal_mode(database) == "wal"  # kept in the file


def test_a_catalog_in_memory_keeps_its_journal(tmp_path: Path) -> None:
    """A database in memory has no journal file to save: it stays as it is, and the catalog opens."""
    catalog = FeatureCatalog("default", {"type": "sql", "uri": "sqlite:///:memory:", "warehouse": tmp_path.as_uri()})
    with catalog.catalog.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "memory"
