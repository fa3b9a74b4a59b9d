"""Scans with `since_snapshot`: exactly the rows appended after an older snapshot, or a clear refusal when rows were
deleted or overwritten in between, or the snapshot is not an ancestor."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, FeatureServerError
from tests.conftest import sqlite_catalog, start_server


@pytest.fixture(scope="module")
def location(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_server(sqlite_catalog(tmp_path_factory.mktemp("incremental-scan")))
    yield f"grpc://127.0.0.1:{server.port}"
    server.shutdown()


@pytest.fixture
def client(location: str) -> Iterator[FeatureClient]:
    with FeatureClient(location) as c:
        yield c


def rows(ids: range, value: float = 0.0) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "ts": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)] * len(ids), pa.timestamp("us", "UTC")),
            "value": pa.array([value + i for i in ids], pa.float64()),
        }
    )


def write(client: FeatureClient, table: str, data: pa.Table) -> int:
    return client.write(table, data, entity_keys=["id"], event_time="ts").snapshot_id


def ids(reader: pa.RecordBatchReader) -> list[int]:
    return sorted(reader.read_all().column("id").to_pylist())


def test_rows_appended_since_a_snapshot(client: FeatureClient, location: str) -> None:
    """Two appends after A: both come back from A to the current snapshot, one of them up to the snapshot between,
    none from a snapshot to itself; columns, filters and limits apply to those rows only."""
    table = f"tests.inc_{uuid.uuid4().hex[:12]}"
    a = write(client, table, rows(range(0, 100)))
    b = write(client, table, rows(range(100, 130)))
    c = write(client, table, rows(range(130, 135)))
    assert ids(client.scan(table, since_snapshot=a)) == list(range(100, 135))
    assert ids(client.scan(table, since_snapshot=a, snapshot_id=b)) == list(range(100, 130))
    assert ids(client.scan(table, since_snapshot=b, snapshot_id=c)) == list(range(130, 135))
    assert ids(client.scan(table, since_snapshot=c)) == []
    filtered = client.scan(table, columns=["id"], filter="id >= 125", since_snapshot=a).read_all()
    assert filtered.column_names == ["id"] and sorted(filtered.column("id").to_pylist()) == list(range(125, 135))
    assert client.scan(table, since_snapshot=a, limit=3).read_all().num_rows == 3
    info = client.flight_info(table, since_snapshot=a, partitions=2)  # one endpoint per appended file here
    assert info.total_records == 35 and len(info.endpoints) == 2
    reader = flight.connect(location)
    parts = [reader.do_get(endpoint.ticket).read_all() for endpoint in info.endpoints]
    assert sorted(pa.concat_tables(parts).column("id").to_pylist()) == list(range(100, 135))


def test_deletes_in_between_are_refused(client: FeatureClient) -> None:
    """A delete (either mode) or an overwrite after A: the rows since A are no longer just the appended ones."""
    table = f"tests.inc_{uuid.uuid4().hex[:12]}"
    a = write(client, table, rows(range(0, 50)))
    write(client, table, rows(range(50, 60)))
    for mode in ("merge-on-read", "copy-on-write"):
        deleted = client.delete(table, keys={"id": [3]}, mode=mode)["snapshot_id"]
        with pytest.raises(FeatureServerError, match=rf"since_snapshot {a}: snapshot {deleted} .* deletes"):
            client.scan(table, since_snapshot=a).read_all()
    write(client, table, rows(range(60, 70)))
    assert ids(client.scan(table, since_snapshot=deleted)) == list(range(60, 70))  # appends after it: fine


def test_not_an_ancestor_is_refused(client: FeatureClient) -> None:
    """A snapshot after the one read, or one of an overwritten history, is no ancestor; an unknown one is not found."""
    table = f"tests.inc_{uuid.uuid4().hex[:12]}"
    a = write(client, table, rows(range(0, 10)))
    b = write(client, table, rows(range(10, 20)))
    with pytest.raises(FeatureServerError, match=rf"since_snapshot {b}: not an ancestor of snapshot {a}") as info:
        client.scan(table, since_snapshot=b, snapshot_id=a).read_all()
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(FeatureServerError, match="has no snapshot 12345") as missing:
        client.scan(table, since_snapshot=12345).read_all()
    assert missing.value.code == "NOT_FOUND"
