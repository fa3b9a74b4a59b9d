"""Whole-table scans split over parallel endpoints: the parts are disjoint, add up to the scan
exactly, and are stateless tickets that any replica redeems."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient, InvalidRequestError, read_flight
from tests.conftest import start_server
from tests.test_roundtrip import features, sorted_rows, write

WRITES, ROWS = 4, 250


@pytest.fixture
def multi_file(client: FeatureClient, table: str) -> str:
    """Several writes, each spread over the default partitioning's eight buckets: many data files."""
    for w in range(WRITES):
        write(client, table, features(ROWS, start=w * ROWS))
    return table


def data_files(backend: dict[str, str], table: str) -> dict[str, int]:
    """Rows of each data file of the table's current snapshot, as pyiceberg plans them."""
    tasks = load_catalog("default", **backend).load_table(table).scan().plan_files()
    return {task.file.file_path: task.file.record_count for task in tasks}


def fetch(location: str, endpoint: flight.FlightEndpoint) -> pa.Table:
    with flight.FlightClient(location) as raw:
        return raw.do_get(endpoint.ticket).read_all()


def test_parts_add_up_to_the_scan_on_any_replica(
    client: FeatureClient, second_server: str, backend: dict[str, str], multi_file: str
) -> None:
    files = data_files(backend, multi_file)
    assert len(files) >= 8
    whole = client.scan(multi_file).read_all()
    assert sorted_rows(whole) == sorted_rows(features(WRITES * ROWS))
    snapshot = whole.schema.metadata[b"flight.snapshot_id"]
    for count in (2, 3, 5):
        info = client.flight_info(multi_file, partitions=count)
        tickets = [json.loads(e.ticket.ticket) for e in info.endpoints]
        assert [t["part"] for t in tickets] == [[i, count] for i in range(count)]
        assert {str(t["snapshot_id"]).encode() for t in tickets} == {snapshot}
        assert info.total_records == WRITES * ROWS
        parts = [fetch(second_server, e) for e in info.endpoints]  # issued by one server, redeemed by another
        for part in parts:
            assert part.schema.metadata[b"flight.read_path"] == b"direct"
            assert part.schema.metadata[b"flight.snapshot_id"] == snapshot
            assert part.num_rows > 0
        ids = [set(part.column("user_id").to_pylist()) for part in parts]
        assert sum(map(len, ids)) == len(set().union(*ids)), "parts overlap"
        assert sorted_rows(pa.concat_tables(parts)) == sorted_rows(whole)
        # Balanced by rows: the heaviest part exceeds the lightest by less than one file.
        rows = [part.num_rows for part in parts]
        assert max(rows) - min(rows) <= max(files.values())


def test_never_more_endpoints_than_files(client: FeatureClient, backend: dict[str, str], multi_file: str) -> None:
    files = data_files(backend, multi_file)
    info = client.flight_info(multi_file, partitions=len(files) + 10)
    assert len(info.endpoints) == len(files)
    assert sorted(client._get(e.ticket.ticket).read_all().num_rows for e in info.endpoints) == sorted(files.values())


def test_same_snapshot_same_parts_whatever_was_written_since(
    client: FeatureClient, server: str, second_server: str, multi_file: str
) -> None:
    info = client.flight_info(multi_file, partitions=3)
    with FeatureClient(second_server) as other:
        assert [e.ticket for e in other.flight_info(multi_file, partitions=3).endpoints] == [
            e.ticket for e in info.endpoints
        ]
    before = [sorted_rows(fetch(server, e)) for e in info.endpoints]
    write(client, multi_file, features(ROWS, start=10_000))
    assert [sorted_rows(fetch(second_server, e)) for e in info.endpoints] == before


def test_projection_splits_too(client: FeatureClient, multi_file: str) -> None:
    info = client.flight_info(multi_file, columns=["f64", "user_id"], partitions=4)
    assert len(info.endpoints) == 4
    parts = pa.concat_tables([client._get(e.ticket.ticket).read_all() for e in info.endpoints])
    assert parts.schema.names == ["f64", "user_id"]
    assert sorted_rows(parts) == sorted_rows(client.scan(multi_file, columns=["f64", "user_id"]).read_all())


@pytest.mark.parametrize("options", [{"filter": "user_id < 500"}, {"limit": 10}, {"limit": 0}])
def test_scans_that_cannot_be_split_get_one_endpoint(
    client: FeatureClient, multi_file: str, options: dict[str, object]
) -> None:
    info = client.flight_info(multi_file, partitions=4, **options)
    assert len(info.endpoints) == 1
    ticket = json.loads(info.endpoints[0].ticket.ticket)
    assert "part" not in ticket and "partitions" not in ticket
    expected = client.scan(multi_file, **options).read_all().num_rows  # type: ignore[arg-type]
    assert client._get(info.endpoints[0].ticket.ticket).read_all().num_rows == expected


def test_part_that_can_no_longer_be_read_directly_is_refused(
    client: FeatureClient, backend: dict[str, str], multi_file: str
) -> None:
    """A rename after the info was made sends reads through DuckDB: a part ticket must not guess."""
    info = client.flight_info(multi_file, partitions=2)
    with load_catalog("default", **backend).load_table(multi_file).update_schema() as update:
        update.rename_column("f32", "f32_renamed")
    with pytest.raises(InvalidRequestError, match="cannot be read in parts"):
        client._get(info.endpoints[0].ticket.ticket).read_all()
    assert len(client.flight_info(multi_file, partitions=2).endpoints) == 1
    assert client.read_table(multi_file, partitions=2).num_rows == WRITES * ROWS


def test_client_reads_parts_in_parallel(client: FeatureClient, server: str, multi_file: str) -> None:
    whole = client.scan(multi_file).read_all()
    parallel = client.read_table(multi_file, partitions=3)
    assert sorted_rows(parallel) == sorted_rows(whole)
    assert parallel.schema.metadata == whole.schema.metadata
    frame = read_flight(server, multi_file, columns=["user_id"], partitions=3)
    assert sorted(frame["user_id"]) == list(range(WRITES * ROWS))
    assert client.read_table(multi_file, filter="user_id < 10", partitions=3).num_rows == 10


def test_server_default_partitions(backend: dict[str, str], multi_file: str) -> None:
    server = start_server(backend, scan_partitions=3)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            assert len(client.flight_info(multi_file).endpoints) == 3
            assert len(client.flight_info(multi_file, partitions=1).endpoints) == 1
            path = client._client.get_flight_info(flight.FlightDescriptor.for_path(multi_file))
            assert len(path.endpoints) == 3  # any Flight client gets the parts
            assert client.read_table(multi_file).num_rows == WRITES * ROWS
    finally:
        server.shutdown()
