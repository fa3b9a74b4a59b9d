"""Writes and scans against each real catalog: values, types, time travel, idempotence, atomicity."""

from __future__ import annotations

import datetime as dt
import decimal
import subprocess
import sys
import textwrap
import threading

import pandas as pd
import pyarrow as pa
import pyarrow.flight  # noqa: F401  (pa.flight below)
import pytest

from flight_client import FeatureClient, InvalidRequestError, NotFoundError, read_flight
from tests.conftest import local_files, wait_until

UTC = dt.timezone.utc
ROOT = str(__import__("pathlib").Path(__file__).resolve().parents[1])
T0 = dt.datetime(2025, 3, 1, tzinfo=UTC)


def features(n: int, start: int = 0, extra: dict[str, pa.Array] | None = None) -> pa.Table:
    """A feature table with a composite key and every type Iceberg stores natively."""
    ids = list(range(start, start + n))
    columns = {
        "user_id": pa.array(ids, pa.int64()),
        "region": pa.array([f"r{i % 3}" for i in ids]),
        "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in ids], pa.timestamp("us", tz="UTC")),
        "i32": pa.array([i if i % 7 else None for i in ids], pa.int32()),
        "f32": pa.array([i / 4 for i in ids], pa.float32()),
        "f64": pa.array([i / 3 if i % 5 else None for i in ids], pa.float64()),
        "flag": pa.array([i % 2 == 0 for i in ids]),
        "name": pa.array([f"naïve {i}" if i % 4 else None for i in ids]),
        "blob": pa.array([bytes([i % 256]) * 3 for i in ids], pa.binary()),
        "day": pa.array([dt.date(2025, 1, 1) + dt.timedelta(days=i % 30) for i in ids], pa.date32()),
        "price": pa.array([decimal.Decimal(i) / 100 for i in ids], pa.decimal128(10, 2)),
        "tags": pa.array([[i, i + 1] if i % 3 else [] for i in ids], pa.list_(pa.int64())),
    }
    columns.update(extra or {})
    return pa.table(columns)


def write(client: FeatureClient, table: str, data: pa.Table, **kwargs: object):  # type: ignore[no-untyped-def]
    return client.write(table, data, entity_keys=["user_id", "region"], event_time="ts", **kwargs)


def sorted_rows(t: pa.Table) -> list[dict[str, object]]:
    return t.sort_by([("user_id", "ascending")]).to_pylist()


def test_round_trip_keeps_values_and_types(client: FeatureClient, backend: dict[str, str], table: str) -> None:
    data = features(3000)
    result = write(client, table, data)
    assert result.rows == 3000 and result.files >= 1 and result.snapshot_id > 0

    read = client.scan(table).read_all()
    assert read.schema.names == data.schema.names
    for f in data.schema:
        assert read.schema.field(f.name).type == f.type, f.name
    assert sorted_rows(read) == sorted_rows(data)
    assert read.schema.metadata[b"flight.snapshot_id"] == str(result.snapshot_id).encode()
    assert read.schema.metadata[b"flight.read_path"] == b"direct"  # a whole, delete-free table
    filtered = client.scan(table, filter="user_id < 100")
    assert filtered.schema.metadata[b"flight.read_path"] == b"iceberg_scan"
    assert sorted_rows(filtered.read_all()) == sorted_rows(data.slice(0, 100))
    # Another engine reads the same rows from the same catalog: the table is plain Iceberg.
    from pyiceberg.catalog import load_catalog

    theirs = load_catalog("default", **backend).load_table(table).scan().to_arrow()
    assert sorted_rows(theirs.cast(read.schema)) == sorted_rows(data)


def test_types_are_normalised_on_the_way_in(client: FeatureClient, table: str) -> None:
    naive_ns = pa.array([dt.datetime(2025, 1, 1, 12, 0, 0, 123456)], pa.timestamp("ns"))
    data = pa.table({"k": pa.array([1], pa.int16()), "ts": naive_ns, "s": pa.array(["x"], pa.large_string())})
    client.write(table, data, entity_keys=["k"], event_time="ts")
    read = client.scan(table).read_all()
    assert read.schema.field("k").type == pa.int32()
    assert read.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert read.schema.field("s").type == pa.string()
    assert read.column("ts")[0].as_py() == dt.datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def test_pandas_in_and_out(server: str, table: str) -> None:
    frame = pd.DataFrame(
        {"k": ["a", "b"], "ts": pd.to_datetime(["2025-01-01", "2025-01-02"], utc=True), "x": [1.5, 2.5]}
    )
    with FeatureClient(server) as client:
        client.write(table, frame, entity_keys=["k"], event_time="ts")
    out = read_flight(server, table, columns=["k", "x"], filter="x > 2")
    assert out.to_dict("list") == {"k": ["b"], "x": [2.5]}


def test_scan_options(client: FeatureClient, table: str) -> None:
    write(client, table, features(500))
    got = client.scan(table, columns=["user_id", "f32"], filter="user_id >= 100 and user_id < 110 and region = 'r1'")
    rows = got.read_all()
    assert rows.schema.names == ["user_id", "f32"]
    assert sorted(rows.column("user_id").to_pylist()) == [i for i in range(100, 110) if i % 3 == 1]
    assert client.scan(table, limit=7).read_all().num_rows == 7
    assert client.scan(table, limit=0).read_all().num_rows == 0
    info = client.flight_info(table, filter="user_id < 10")
    assert 10 <= info.total_records <= 500
    assert info.schema.names == features(1).schema.names
    assert len(info.endpoints) == 1
    fetched = client._client.do_get(info.endpoints[0].ticket).read_all()
    assert fetched.num_rows == 10
    descriptor = pa.flight.FlightDescriptor.for_path(table)
    assert client._client.get_schema(descriptor).schema.names == features(1).schema.names


def test_time_travel_by_snapshot_and_time(client: FeatureClient, table: str) -> None:
    first = write(client, table, features(100))
    second = write(client, table, features(50, start=100))
    assert client.scan(table).read_all().num_rows == 150
    old = client.scan(table, snapshot_id=first.snapshot_id).read_all()
    assert sorted_rows(old) == sorted_rows(features(100))

    snapshots = {s["snapshot_id"]: s["timestamp_ms"] for s in client.describe(table)["snapshots"]}
    at_first = dt.datetime.fromtimestamp(snapshots[first.snapshot_id] / 1000, tz=UTC)
    assert client.scan(table, as_of=at_first).read_all().num_rows == 100
    assert client.scan(table, as_of=snapshots[second.snapshot_id]).read_all().num_rows == 150
    with pytest.raises(NotFoundError, match="no snapshot at or before"):
        client.scan(table, as_of=at_first - dt.timedelta(days=1))


def test_retry_with_write_id_commits_once(client: FeatureClient, second_server: str, table: str) -> None:
    first = write(client, table, features(100), write_id="batch-42")
    again = write(client, table, features(100), write_id="batch-42")
    with FeatureClient(second_server) as other:
        elsewhere = write(other, table, features(100), write_id="batch-42")
    assert not first.duplicate and again.duplicate and elsewhere.duplicate
    assert again.snapshot_id == elsewhere.snapshot_id == first.snapshot_id
    assert again.rows == 100
    assert client.scan(table).read_all().num_rows == 100
    assert len(client.describe(table)["snapshots"]) == 1


def test_overwrite_is_one_snapshot(client: FeatureClient, table: str) -> None:
    write(client, table, features(100))
    result = write(client, table, features(10, start=1000), mode="overwrite")
    assert sorted(client.scan(table).read_all().column("user_id").to_pylist()) == list(range(1000, 1010))
    snapshots = client.describe(table)["snapshots"]
    assert len(snapshots) == 2 and snapshots[-1]["snapshot_id"] == result.snapshot_id
    assert snapshots[-1]["operation"] == "overwrite"


def test_a_write_may_repeat_the_partitioning_but_not_change_it(client: FeatureClient, table: str) -> None:
    """A pipeline sends its table's definition with every write (and a replica that lost the race to create
    the table does the same): the same partitioning is a no-op, another one is refused."""
    write(client, table, features(10), partition_by=["month(ts)", "bucket(4, user_id)"])
    write(client, table, features(10, start=10), partition_by=["month(ts)", "bucket(4, user_id)"])
    assert client.describe(table)["partition_spec"] == ["month(ts)", "bucket[4](user_id)"]
    with pytest.raises(InvalidRequestError, match="exists with another partitioning"):
        write(client, table, features(10, start=20), partition_by=["day(ts)"])
    assert client.scan(table).read_all().num_rows == 20


def test_schema_evolution(client: FeatureClient, table: str) -> None:
    first = write(client, table, features(10))
    wider = features(5, start=10, extra={"score": pa.array([0.5] * 5)})
    with pytest.raises(InvalidRequestError, match=r"\['score'\].*evolve"):
        write(client, table, wider)
    write(client, table, wider, evolve=True)
    read = client.scan(table).read_all().sort_by("user_id")
    assert read.column("score").to_pylist() == [None] * 10 + [0.5] * 5
    # A missing nullable column becomes nulls; the old snapshot keeps the old schema.
    write(client, table, features(2, start=20))
    assert client.scan(table, filter="user_id >= 20").read_all().column("score").to_pylist() == [None, None]
    assert "score" not in client.scan(table, snapshot_id=first.snapshot_id).schema.names


def test_concurrent_writers_on_two_replicas_lose_nothing(server: str, second_server: str, table: str) -> None:
    with FeatureClient(server) as c:
        write(c, table, features(1, start=-1))
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            with FeatureClient(server if worker % 2 else second_server) as c:
                for put in range(10):
                    write(c, table, features(20, start=worker * 1000 + put * 20))
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with FeatureClient(server) as c:
        ids = c.scan(table, columns=["user_id"]).read_all().column("user_id").to_pylist()
        # 41 puts, each in one snapshot; puts that meet on a server may share one (group commit)
        assert sum(int(s["summary"]["flight.puts"]) for s in c.describe(table)["snapshots"]) == 41
    assert sorted(ids) == [-1] + sorted(w * 1000 + i for w in range(4) for i in range(200))


def _health(location: str) -> dict[str, object]:
    with FeatureClient(location) as c:
        return c.health()


BROKEN_WRITER = textwrap.dedent(
    """
    import os, sys
    import pyarrow as pa, pyarrow.flight as flight
    from flight_server.wire.writes import WriteRequest
    from tests.test_roundtrip import features
    location, table = sys.argv[1], sys.argv[2]
    request = WriteRequest(table=table, entity_keys=["user_id", "region"], event_time="ts", end_marker=True)
    client = flight.FlightClient(location)
    data = features(40_000)
    writer, _ = client.do_put(flight.FlightDescriptor.for_command(request.to_bytes()), data.schema)
    for batch in data.to_batches(max_chunksize=4000):
        writer.write_batch(batch)
    print("sent", flush=True)
    sys.stdin.readline()
    os._exit(1)
    """
)


@pytest.mark.parametrize("how", ["killed", "closed_early"])
def test_broken_stream_commits_nothing(client: FeatureClient, server: str, table: str, how: str) -> None:
    base = write(client, table, features(10))
    location = client.describe(table)["location"]
    files_before = local_files(location)
    if how == "killed":
        proc = subprocess.Popen(
            [sys.executable, "-c", BROKEN_WRITER, server, table],
            stdin=subprocess.PIPE,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "sent"
        wait_until(lambda: _health(server)["writes_in_progress"] == 1, what="the server to receive the stream")
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    else:
        # A client that stops midway but ends the call cleanly: without the end marker it promised,
        # the server must not take the partial stream for a whole one.
        import pyarrow.flight as flight

        from flight_server.wire.writes import WriteRequest

        request = WriteRequest(table=table, end_marker=True)
        data = features(40_000)
        with flight.FlightClient(server) as raw:
            writer, _ = raw.do_put(flight.FlightDescriptor.for_command(request.to_bytes()), data.schema)
            for batch in data.to_batches(max_chunksize=4000):
                writer.write_batch(batch)
            writer.done_writing()
            with pytest.raises(pa.ArrowInvalid, match="without its end-of-stream marker"):  # INVALID_ARGUMENT
                writer.close()
    wait_until(lambda: _health(server)["writes_in_progress"] == 0, what="the broken write to be abandoned")
    assert client.describe(table)["current_snapshot_id"] == base.snapshot_id
    assert client.scan(table).read_all().num_rows == 10
    if files_before is not None:
        assert local_files(location) == files_before


def test_batch_failing_validation_midstream_leaves_nothing(client: FeatureClient, table: str) -> None:
    base = write(client, table, features(10))
    location = client.describe(table)["location"]
    files_before = local_files(location)
    good = features(30_000, start=100)
    bad = features(1, start=99).set_column(0, "user_id", pa.array([None], pa.int64()))
    stream = pa.RecordBatchReader.from_batches(good.schema, [*good.to_batches(max_chunksize=5000), *bad.to_batches()])
    with pytest.raises(InvalidRequestError, match="'user_id' is required but has 1 null"):
        write(client, table, stream)
    assert client.describe(table)["current_snapshot_id"] == base.snapshot_id
    if files_before is not None:
        assert local_files(location) == files_before


def test_list_flights_and_actions(client: FeatureClient, table: str) -> None:
    result = client.write(
        table,
        features(5),
        entity_keys=["user_id", "region"],
        event_time="ts",
        created_time=None,
        ttl=dt.timedelta(hours=6),
    )
    listed = {t["table"]: t for t in client.tables()}
    assert listed[table]["feature"] == {
        "entity_keys": ["user_id", "region"],
        "event_time": "ts",
        "created_time": None,
        "ttl_seconds": 21600,
    }
    assert listed[table]["rows"] == 5
    infos = {info.descriptor.path[0].decode(): info for info in client._client.list_flights(b"tests.")}
    assert infos[table].total_records == 5
    description = client.describe(table)
    assert description["current_snapshot_id"] == result.snapshot_id
    assert description["partition_spec"] == ["month(ts)", "bucket[8](user_id)"]
    assert [c["name"] for c in description["schema"]][:3] == ["user_id", "region", "ts"]
    assert client.health()["status"] == "ok"


def test_tables_made_by_other_engines(client: FeatureClient, backend: dict[str, str], table: str) -> None:
    """A plain Iceberg table (no feature properties, a zone-naive timestamp) is read and appended to."""
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("default", **backend)
    namespace, name = table.split(".")
    catalog.create_namespace_if_not_exists(namespace)
    schema = pa.schema([("id", pa.int64()), ("at", pa.timestamp("us")), ("note", pa.string())])
    theirs = pa.table({"id": [1], "at": [dt.datetime(2025, 1, 1)], "note": ["from pyiceberg"]}, schema=schema)
    catalog.create_table((namespace, name), schema=schema).append(theirs)

    ours = pa.table({"id": [2], "at": pa.array([T0], pa.timestamp("us", tz="UTC")), "note": ["from flight"]})
    client.write(table, ours)
    read = client.scan(table).read_all().sort_by("id")
    assert read.schema.field("at").type == pa.timestamp("us")
    assert read.to_pylist() == [
        {"id": 1, "at": dt.datetime(2025, 1, 1), "note": "from pyiceberg"},
        {"id": 2, "at": T0.replace(tzinfo=None), "note": "from flight"},
    ]
    assert catalog.load_table((namespace, name)).scan().to_arrow().num_rows == 2
