"""Review 19: production reality (tables written for a long time with automatic maintenance on, replicas, crashes).
Each test reproduces one bug found by a soak run and fails on main today (xfail, strict, until fixed)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient, FeatureServerError
from tests.conftest import sqlite_catalog, start_server

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
TABLE = "review19.features"


def rows(ids: list[int]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", "UTC")),
            "value": pa.array([float(i) for i in ids]),
        }
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A server (maintenance off, writes in process) on a fresh SQLite catalog (its properties), with `TABLE` of rows
    0 and 1."""
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties)
    location = f"grpc://127.0.0.1:{server.port}"
    with FeatureClient(location) as client:
        client.write(TABLE, rows([0]), entity_keys=["id"], event_time="ts", partition_by=[])
        client.write(TABLE, rows([1]))
    yield location, properties
    server.shutdown()


def lose_a_data_file(properties: dict[str, str]) -> str:
    """Delete one of `TABLE`'s data files from storage, as a storage fault or another replica's compaction and expiry
    (past `history.expire.max-snapshot-age-ms`) would; returns the folder the table's files are in."""
    table = load_catalog("default", **properties).load_table(TABLE)
    paths = sorted(task.file.file_path.removeprefix("file://") for task in table.scan().plan_files())
    assert len(paths) == 2, "a file per put"
    Path(paths[-1]).unlink()
    return str(Path(paths[-1]).parent)


@pytest.mark.xfail(
    strict=True,
    reason="FeatureClient._read_endpoints (flight_client/client.py) reads each endpoint's stream with read_all() "
    "outside any error mapping: a failure after the first message (a server error while streaming, or a replica "
    "killed mid-stream: 'Stream removed') reaches the caller as a bare OSError or pyarrow FlightError, not "
    "FeatureServerError/UnavailableError, so retry-on-UnavailableError code misses it",
)
def test_read_table_raises_a_feature_server_error_when_a_stream_fails_midway(
    served: tuple[str, dict[str, str]],
) -> None:
    location, properties = served
    lose_a_data_file(properties)
    with FeatureClient(location) as client, pytest.raises(FeatureServerError):
        client.read_table(TABLE, partitions=1)
