"""The production topology without Docker: SeaweedFS (S3 + Iceberg REST catalog) and two server processes
configured only by environment variables, as docker-compose.yml configures them, each told of the other."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient
from tests.conftest import serve_replicas, sqlite_catalog, start_server, wait_until
from tests.services import free_ports

TOKEN = "replica-test-token-0123456789"
UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def replicas(seaweedfs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, Path]]]:
    """Two `flight-server serve` processes on SeaweedFS's REST catalog; yields (location, log file) pairs."""
    tmp = tmp_path_factory.mktemp("replicas")
    tokens = [{"name": "replica-test", "token": TOKEN, "permissions": ["read", "write"]}]

    def settings(location: str, locations: list[str]) -> dict[str, str]:
        return {
            "FLIGHT_SERVER_ADVERTISE": location,
            "FLIGHT_SERVER_PEERS": " ".join(loc for loc in locations if loc != location),
            "FLIGHT_SERVER_AUTH_TOKENS": json.dumps(tokens),
            "FLIGHT_SERVER_ONLINE_REFRESH_SECONDS": "0.2",
            "FLIGHT_SERVER_DUCKDB_MEMORY_LIMIT": "1GB",
            "FLIGHT_SERVER_LOG_LEVEL": "DEBUG",
        }

    with serve_replicas(tmp, seaweedfs, settings, token=TOKEN) as locations:
        yield [(location, tmp / f"replica-{i}.log") for i, location in enumerate(locations)]


def drivers(ids: range, hour: int, rate: float) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(list(ids), pa.int64()),
            "event_timestamp": pa.array([T0 + dt.timedelta(hours=hour)] * len(ids), pa.timestamp("us", "UTC")),
            "rate": pa.array([rate] * len(ids), pa.float64()),
        }
    )


def test_a_write_through_one_replica_is_read_through_the_other(replicas: list[tuple[str, Path]]) -> None:
    (a, _), (b, _) = replicas
    with FeatureClient(a, token=TOKEN) as first, FeatureClient(b, token=TOKEN) as second:
        written = first.write(
            "fleet.drivers", drivers(range(100), 0, 0.5), entity_keys=["driver_id"], event_time="event_timestamp"
        )
        scanned = second.scan("fleet.drivers").read_all()
        assert scanned.num_rows == 100
        assert int(scanned.schema.metadata[b"flight.snapshot_id"]) == written.snapshot_id
        assert second.describe("fleet.drivers")["current_snapshot_id"] == written.snapshot_id


def test_training_sets_from_one_replica_see_writes_through_the_other(replicas: list[tuple[str, Path]]) -> None:
    (a, _), (b, _) = replicas
    with FeatureClient(a, token=TOKEN) as first, FeatureClient(b, token=TOKEN) as second:
        first.write("fleet.rates", drivers(range(50), 0, 1.0), entity_keys=["driver_id"], event_time="event_timestamp")
        first.write("fleet.rates", drivers(range(50), 2, 2.0))
        labels = pa.table(
            {
                "driver_id": pa.array(list(range(50)) * 2, pa.int64()),
                "event_timestamp": pa.array(
                    [T0 + dt.timedelta(hours=1)] * 50 + [T0 + dt.timedelta(hours=3)] * 50, pa.timestamp("us", "UTC")
                ),
                "label": pa.array(range(100), pa.int64()),
            }
        )
        first.write("fleet.labels", labels, entity_keys=["driver_id"], event_time="event_timestamp")
        streamed = second.get_historical_features(labels, ["fleet.rates:rate"])
        assert streamed.column("rate").to_pylist() == [1.0] * 50 + [2.0] * 50
        on_server = second.get_historical_features("fleet.labels", ["fleet.rates:rate"], partitions=4)
        pairs = sorted(zip(on_server["label"].to_pylist(), on_server["rate"].to_pylist(), strict=True))
        assert pairs == list(zip(range(100), [1.0] * 50 + [2.0] * 50, strict=True))


def test_online_features_from_one_replica_follow_writes_through_the_other(replicas: list[tuple[str, Path]]) -> None:
    (a, _), (b, _) = replicas
    with FeatureClient(a, token=TOKEN) as first, FeatureClient(b, token=TOKEN) as second:
        first.write("fleet.online", drivers(range(10), 0, 1.0), entity_keys=["driver_id"], event_time="event_timestamp")

        def rate() -> float:
            result = second.get_online_features({"driver_id": [3]}, ["fleet.online:rate"], apply_ttl=False)
            return result.column("rate")[0].as_py()

        assert rate() == 1.0
        first.write("fleet.online", drivers(range(10), 1, 7.0))
        wait_until(lambda: rate() == 7.0, timeout=10, what="the other replica's online index to refresh")


def write_files(client: FeatureClient, table: str, files: int, rows: int) -> None:
    """`files` unpartitioned data files (one per write, hour i holding rate i): enough to split into parts."""
    definition = {"entity_keys": ["driver_id"], "event_time": "event_timestamp", "partition_by": []}
    for hour in range(files):
        client.write(table, drivers(range(rows), hour, float(hour)), **(definition if hour == 0 else {}))


def test_parallel_endpoints_are_spread_over_both_replicas(replicas: list[tuple[str, Path]]) -> None:
    (a, log_a), (b, log_b) = replicas
    with FeatureClient(a, token=TOKEN) as client:
        write_files(client, "fleet.wide", 8, 1000)
        info = client.flight_info("fleet.wide", partitions=4)
        firsts = [endpoint.locations[0].uri.decode() for endpoint in info.endpoints]
        assert len(firsts) == 4 and sorted(set(firsts)) == sorted([a, b])
        assert all({loc.uri.decode() for loc in e.locations} == {a, b} for e in info.endpoints)  # fallbacks too
        table = client.read_table("fleet.wide", partitions=4)
    assert table.num_rows == 8000
    assert sorted(set(table["rate"].to_pylist())) == [float(h) for h in range(8)]
    for log in (log_a, log_b):  # each replica served some of the parts
        assert "scan fleet.wide at snapshot" in log.read_text()


def test_an_endpoint_whose_replica_is_down_is_read_from_the_next(tmp_path: Path) -> None:
    catalog = sqlite_catalog(tmp_path)
    (port,) = free_ports(1)
    dead = f"grpc://127.0.0.1:{free_ports(1)[0]}"
    server = start_server(catalog, port=port, advertise=f"grpc://127.0.0.1:{port}", peers=[dead])
    try:
        with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
            write_files(client, "fleet.fallback", 4, 10)
            info = client.flight_info("fleet.fallback", partitions=4)
            assert dead in {e.locations[0].uri.decode() for e in info.endpoints}
            assert client.read_table("fleet.fallback", partitions=4).num_rows == 40
    finally:
        server.shutdown()
