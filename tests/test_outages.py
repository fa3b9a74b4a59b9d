"""Outages of what the server depends on, and what clients see during and after them: a PostgreSQL catalog restarted
(every pooled session ends) or refusing connections for a while, a commit whose outcome the catalog never confirmed,
and the object store (SeaweedFS's S3) stopped in the middle of a put and of a scan, then started again. The server
stays up throughout and serves again as soon as the service is back: calls that need the missing service answer
UNAVAILABLE with a message naming it (no traceback, server path or password), online lookups keep answering from
their index, and a put retried with its write_id commits once (docs/operations.md, "Failure behaviour")."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy

from flight_client import FeatureClient
from tests.conftest import start_writing_server
from tests.services import (
    pg_ctl,
    postgres_server,
)

UTC = dt.UTC
TABLE = "tests.drivers"
PASSWORD = "pg-s3cret-word"  # in the catalog's URI (trust authentication ignores it): never in a client's message
DAY = dt.datetime(2026, 1, 1, tzinfo=UTC)


def drivers(ids: range, rate: float = 1.0) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array([DAY] * len(ids), pa.timestamp("us", "UTC")),
            "rate": pa.array([rate] * len(ids), pa.float64()),
        }
    )


def first_write(client: FeatureClient, table: str = TABLE) -> None:
    client.write(table, drivers(range(3)), entity_keys=["driver_id"], event_time="event_timestamp")


def entities(*ids: int) -> pa.Table:
    later = DAY + dt.timedelta(days=1)
    return pa.table({"driver_id": pa.array(ids, pa.int64()), "event_timestamp": pa.array([later] * len(ids))})


def sql_catalog(url: str, warehouse: str) -> dict[str, str]:
    return {"type": "sql", "uri": url.replace("postgres@", f"postgres:{PASSWORD}@"), "warehouse": warehouse}


def admin(url: str) -> sqlalchemy.Engine:
    """A superuser's connection to the cluster's `postgres` database, outside the catalog's database."""
    return sqlalchemy.create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")


def rows_of(client: FeatureClient, table: str = TABLE) -> list[int]:
    return sorted(client.read_table(table).column("driver_id").to_pylist())


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def database(postgres: str) -> Iterator[str]:
    """The URL of a fresh catalog database of the module's cluster, so that each test starts from no tables."""
    name = f"outage_{uuid.uuid4().hex[:12]}"
    with admin(postgres).connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield postgres.rsplit("/", 1)[0] + "/" + name


def test_a_restarted_postgresql_catalog_is_used_again_at_once_by_both_processes(database: str, tmp_path: Path) -> None:
    """`pg_ctl restart` ends every session the serving process and the write process pooled. The next calls of
    each kind succeed at the first try: pooled connections are tested before use (`pool_pre_ping`, which the server
    sets on a SQL catalog of a database server), so no call fails on a dead one. Without it the first call of each
    process failed INTERNAL (`OperationalError: server closed the connection unexpectedly`)."""
    server = start_writing_server(sql_catalog(database, (tmp_path / "wh").as_uri()))
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}", timeout=30) as client:
            first_write(client)  # in the write process: its pool holds a session now
            assert rows_of(client) == [0, 1, 2]  # and the serving process's
            pg_ctl(database, "restart", "-m", "fast")
            assert client.health()["status"] == "ok"  # the serving process first: nothing warmed its pool
            assert client.describe(TABLE)["rows"] == 3
            assert rows_of(client) == [0, 1, 2]
            assert client.get_historical_features(entities(1), [f"{TABLE}:rate"]).column("rate").to_pylist() == [1.0]
            assert client.write(TABLE, drivers(range(3, 5))).rows == 2  # the write process's first call since
            assert client.run_maintenance(TABLE)["table"] == TABLE
            assert rows_of(client) == [0, 1, 2, 3, 4]
    finally:
        server.shutdown()
