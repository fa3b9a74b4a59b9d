"""Scans with `since_snapshot`: exactly the rows appended after an older snapshot, or a clear refusal when rows were
deleted or overwritten in between, a snapshot in between expired, or the snapshot is not an ancestor."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient, FeatureServerError
from flight_server.reads import plan
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


def test_a_pinned_snapshot_whose_followers_were_expired_is_refused_as_such(client: FeatureClient) -> None:
    """A pipeline pins the snapshot it last read (expiry keeps it) and reads on from it; once the appends after it
    are expired, what they changed is no longer known: refused, saying so (review 21: it said "not an ancestor",
    since expiry drops the parent id of the snapshot it keeps after them), not as no ancestor."""
    table = f"tests.inc_{uuid.uuid4().hex[:12]}"
    since = write(client, table, rows(range(0, 10)))
    client.pin(table, since)
    write(client, table, rows(range(10, 20)))
    last = write(client, table, rows(range(20, 30)))
    expired = client.expire_snapshots(table, older_than=dt.datetime.now(dt.timezone.utc), retain_last=1)
    assert len(expired["expired"]) == 1 and expired["kept_pinned"] == [since]
    refused = (
        rf"since_snapshot {since}: snapshot {last} of table .* follows snapshots that were expired \(or does not "
        r"descend from it\); re-read in full"
    )
    with pytest.raises(FeatureServerError, match=refused) as info:
        client.scan(table, since_snapshot=since).read_all()
    assert info.value.code == "INVALID_ARGUMENT"


def test_snapshots_in_between_that_expire_meanwhile_are_refused_as_expired_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lineage is read from the manifests of the snapshots in between (another writer's: this server knows its own
    appends without reading them back). An expiry that deletes them while they are read (brought into that moment by
    wrapping `appended_since`; the expiry is real) is refused like one that ended before: re-read in full, not
    INTERNAL."""
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties)
    table = f"tests.inc_{uuid.uuid4().hex[:12]}"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            a = write(client, table, rows(range(0, 10)))
            iceberg = load_catalog("default", **properties).load_table(table)
            for first in (10, 20):  # appends by another writer (another engine, say)
                iceberg.append(rows(range(first, first + 10)).cast(iceberg.schema().as_arrow()))
            b = iceberg.history()[1].snapshot_id
            expired: list[dict[str, Any]] = []
            real = plan.appended_since

            def expired_meanwhile(*args: Any, **kwargs: Any) -> Any:
                if not expired:
                    now = dt.datetime.now(dt.timezone.utc)
                    expired.append(client.expire_snapshots(table, older_than=now, retain_last=1))
                return real(*args, **kwargs)

            monkeypatch.setattr(plan, "appended_since", expired_meanwhile)
            refused = rf"since_snapshot {a}: snapshot {b} .* lost its manifests \(expired meanwhile.*; re-read in full"
            with pytest.raises(FeatureServerError, match=refused) as info:
                client.scan(table, since_snapshot=a).read_all()
            assert info.value.code == "INVALID_ARGUMENT" and b in expired[0]["expired"]
    finally:
        server.shutdown()
