"""Servers starting at the same moment on a new, empty SQL catalog (a fresh deployment of several replicas)
all start: pyiceberg creates the catalog's tables on first use, and the replicas that lose that race
try again instead of exiting."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy

from flight_server.iceberg.catalog import FeatureCatalog
from tests.conftest import sqlite_catalog

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
