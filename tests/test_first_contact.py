"""The mistakes of a first session with the client get one clear line each, or just work: a location
without a scheme, an HTTP location, a server that is not there, a null in an integer key column
(which pandas turns into a float column), and features given as one string. A stream that fails midway (the
server's error while streaming, or its replica going away) raises the client's own exception classes too, and
`read_table` reads an endpoint whose replica went away again at the endpoint's next replica."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient, FeatureServerError, InvalidRequestError, UnavailableError
from flight_client.plans import Endpoint, plan_table
from tests.conftest import replica_processes, sqlite_catalog, start_server, write_big
from tests.services import free_ports

UTC = dt.timezone.utc
BASE = dt.datetime(2026, 1, 1, tzinfo=UTC)
ROWS = pa.table(
    {
        "driver_id": pa.array([1, 2], pa.int64()),
        "event_timestamp": pa.array([BASE, BASE], pa.timestamp("us", "UTC")),
        "rate": [0.5, 0.7],
    }
)


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root: Path = tmp_path_factory.mktemp("first_contact")
    server = start_server(sqlite_catalog(root))
    yield server.port
    server.shutdown()


@pytest.fixture(scope="module")
def features(port: int) -> str:
    name = f"first.f_{uuid.uuid4().hex[:10]}"
    with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
        client.write(name, ROWS, entity_keys="driver_id", event_time="event_timestamp")
    return name


def test_a_location_without_a_scheme_means_grpc(port: int) -> None:
    with FeatureClient(f"127.0.0.1:{port}") as client:
        assert client.location == f"grpc://127.0.0.1:{port}"
        assert client.health()["status"] == "ok"
    with FeatureClient(flight.Location.for_grpc_tcp("127.0.0.1", port)) as client:
        assert client.health()["status"] == "ok"


@pytest.mark.parametrize("scheme", ["http", "https", "HTTP"])
def test_an_http_location_says_which_schemes_to_use(scheme: str) -> None:
    with pytest.raises(ValueError, match=r"Arrow Flight speaks gRPC, not HTTP; use grpc://host:port, or grpc\+tls://"):
        FeatureClient(f"{scheme}://localhost:8815")


def test_a_server_that_is_not_there_is_one_clear_line() -> None:
    (port,) = free_ports(1)
    with FeatureClient(f"grpc://127.0.0.1:{port}") as client, pytest.raises(UnavailableError) as caught:
        client.tables()
    message = str(caught.value)
    assert message == "cannot reach the feature server (connection refused): is it running, and is the location right?"
    assert "\n" not in message and "gRPC client debug context" not in message
    assert isinstance(caught.value, ConnectionError) and isinstance(caught.value, FeatureServerError)
    assert caught.value.code == "UNAVAILABLE"


def test_a_host_that_does_not_resolve_is_one_clear_line() -> None:
    with FeatureClient("grpc://no-such-host.invalid:8815", timeout=10) as client, pytest.raises(UnavailableError) as e:
        client.tables()
    assert str(e.value).startswith("cannot reach the feature server: host no-such-host.invalid:8815 does not resolve")
    assert "\n" not in str(e.value)


def entity_frame(driver_ids: list[int | None]) -> pd.DataFrame:
    return pd.DataFrame({"driver_id": driver_ids, "event_timestamp": [BASE + dt.timedelta(hours=1)] * len(driver_ids)})


def test_a_null_in_an_integer_key_column_is_named_as_such(port: int, features: str) -> None:
    frame = entity_frame([1, None])
    assert frame["driver_id"].dtype == "float64"  # what pandas makes of it: the server would see a 'double' key
    nulls = "key column 'driver_id' has nulls, which turned its integers into double"
    with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
        with pytest.raises(InvalidRequestError, match=nulls):
            client.get_online_features(frame[["driver_id"]], [f"{features}:rate"])
        with pytest.raises(InvalidRequestError, match=nulls):
            client.get_historical_features(frame, [f"{features}:rate"])
        # Without nulls a float key column is the server's plain type error, and the nullable dtype just works.
        with pytest.raises(InvalidRequestError, match="entity column 'driver_id' is double"):
            floats = entity_frame([1, 2]).astype({"driver_id": "float64"})
            client.get_online_features(floats[["driver_id"]], [f"{features}:rate"])
        nullable = frame.astype({"driver_id": "Int64"})
        result = client.get_historical_features(nullable, [f"{features}:rate"])
        assert result.column("rate").to_pylist() == [0.5, None]  # a null key matches nothing
        online = client.get_online_features(nullable[["driver_id"]], [f"{features}:rate"])
        assert online.column("rate").to_pylist() == [0.5, None]


def test_features_given_as_one_string_are_one_feature(port: int, features: str) -> None:
    reference = f"{features}:rate"
    with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
        online = client.get_online_features({"driver_id": [2, 1]}, reference)
        assert online.equals(client.get_online_features({"driver_id": [2, 1]}, [reference]))
        assert online.column_names[:2] == ["driver_id", "rate"]
        frame = entity_frame([1, 2])
        historical = client.get_historical_features(frame, reference)
        assert historical.equals(client.get_historical_features(frame, [reference]))
        streamed = list(client.iter_historical_features(frame, reference))
        assert pa.Table.from_batches(streamed).column("rate").to_pylist() == [0.5, 0.7]
        not_names: Any = [reference, 3]
        with pytest.raises(TypeError, match="features must be a string or a list of strings"):
            client.get_online_features({"driver_id": [1]}, not_names)


def test_one_entity_as_a_dict_of_values_is_one_row(port: int, features: str) -> None:
    with FeatureClient(f"grpc://127.0.0.1:{port}") as client:
        online = client.get_online_features({"driver_id": 2}, f"{features}:rate")
        assert online.column("rate").to_pylist() == [0.7]
        row = {"driver_id": 1, "event_timestamp": BASE + dt.timedelta(hours=1)}
        assert client.get_historical_features(row, f"{features}:rate").column("rate").to_pylist() == [0.5]
        with pytest.raises(TypeError, match="give every column of the rows as a list"):
            client.get_online_features({"driver_id": [1, 2], "region": "eu"}, f"{features}:rate")


# Ways to read a whole-table scan: each reads its stream in a way of its own.
READS: dict[str, Callable[[FeatureClient, str], object]] = {
    "read_table": lambda client, table: client.read_table(table, partitions=1),
    "scan": lambda client, table: client.scan(table).read_all(),
    "read_endpoint": lambda client, table: client.read_endpoint(client.flight_info(table).endpoints[0]).read_all(),
    "plan (PyTorch, Ray)": lambda client, table: list(
        (plan := plan_table(client.location, table, partitions=1)).batches(plan.endpoints)
    ),
    "get_historical_features": lambda client, table: client.get_historical_features(
        {"driver_id": [1, 2], "event_timestamp": [BASE] * 2}, f"{table}:rate"
    ),
    "iter_historical_features": lambda client, table: list(
        client.iter_historical_features({"driver_id": [1, 2], "event_timestamp": [BASE] * 2}, f"{table}:rate")
    ),
    "iter_historical_features (exchange)": lambda client, table: list(
        client.iter_historical_features(entity_frame([1, 2]), f"{table}:rate")
    ),
}


@pytest.mark.parametrize("read", list(READS))
def test_read_table_raises_a_feature_server_error_when_a_stream_fails_midway(read: str, tmp_path: Path) -> None:
    """A server error after the stream began (a data file lost from storage: the server fails reading it) is the
    client's FeatureServerError, as it would be at the call's start, not pyarrow's bare OSError."""
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties)
    table = "midway.features"
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            client.write(table, ROWS.slice(0, 1), entity_keys="driver_id", event_time="event_timestamp")
            client.write(table, ROWS.slice(1, 1))
            files = load_catalog("default", **properties).load_table(table).scan().plan_files()
            Path(sorted(task.file.file_path for task in files)[-1].removeprefix("file://")).unlink()
            with pytest.raises(FeatureServerError) as caught:
                READS[read](client, table)
        assert caught.value.code == "INTERNAL"
    finally:
        server.shutdown()


BIG = "midway.big"
BIG_ROWS = 1_000_000  # 24 MB, more than gRPC and the sockets hold: a replica killed mid-stream leaves rows unsent
# Clients whose flow-control window stays at gRPC's 64 KB (no growing it to the measured bandwidth, which on loopback
# can reach megabytes): the server can be no further ahead of the reader than that, and the batch being read.
WINDOW: dict[str, Any] = {"generic_options": [("grpc.http2.bdp_probe", 0)]}


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """A server in this process and a replica process on its catalog, which the server's split scans list too
    (`--peers`), with the table `BIG`; yields the server's location, the replica's and its process (to kill)."""
    properties = sqlite_catalog(tmp_path)
    with replica_processes(tmp_path, properties, count=1) as [(replica, process)]:
        (port,) = free_ports(1)
        location = f"grpc://127.0.0.1:{port}"
        server = start_server(properties, port=port, advertise=location, peers=[replica])
        try:
            with FeatureClient(location) as client:
                write_big(client, BIG, BIG_ROWS)
            yield location, replica, process
        finally:
            server.shutdown()


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a replica, and wait until it is gone."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_read_table_reads_an_endpoint_again_at_its_next_replica_when_its_replica_goes_away_midway(
    replicated: tuple[str, str, subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica is killed as soon as an endpoint's stream there has begun (its schema arrived): that endpoint is
    read again, whole, at the server, and no row comes twice."""
    location, replica, process = replicated
    opened: list[tuple[list[str], int]] = []
    lock = threading.Lock()
    real = FeatureClient._open

    def killed_once_begun(self: FeatureClient, ticket: bytes, locations: Sequence[str]) -> Any:
        stream, at = real(self, ticket, locations)
        with lock:
            opened.append((list(locations), at))
            if locations[at] == replica and process.poll() is None:
                kill(process)
        return stream, at

    monkeypatch.setattr(FeatureClient, "_open", killed_once_begun)
    with FeatureClient(location, **WINDOW) as client:
        table = client.read_table(BIG, partitions=2)
    assert ([replica, location], 0) in opened, "an endpoint began at the replica"
    assert ([location], 0) in opened, "and was read again at the server"
    assert table.num_rows == BIG_ROWS
    assert sorted(table.column("id").to_pylist()) == list(range(BIG_ROWS))


def endpoint_at(client: FeatureClient, replica: str) -> flight.FlightEndpoint:
    """An endpoint of `BIG` split in two, to be read at `replica` alone (a stream begun elsewhere proves nothing)."""
    return flight.FlightEndpoint(client.flight_info(BIG, partitions=2).endpoints[0].ticket, [replica])


# Ways to stream rows read at the replica, batch by batch, given clients of the server and of the replica.
STREAMS: dict[str, Callable[[FeatureClient, FeatureClient], Iterator[pa.RecordBatch]]] = {
    "scan": lambda client, at_replica: iter(at_replica.scan(BIG)),
    "read_endpoint": lambda client, at_replica: iter(client.read_endpoint(endpoint_at(client, at_replica.location))),
    "plan (PyTorch, Ray)": lambda client, at_replica: (
        plan := plan_table(client.location, BIG, partitions=2, client_options=WINDOW)
    ).batches(
        [Endpoint(plan.endpoints[0].ticket, (at_replica.location,))]  # type: ignore[union-attr]
    ),
}


@pytest.mark.parametrize("stream", list(STREAMS))
def test_a_stream_whose_replica_goes_away_after_handing_out_batches_raises_unavailable(
    stream: str, replicated: tuple[str, str, subprocess.Popen[bytes]]
) -> None:
    """Once some of a stream's batches are the caller's, reading the rest elsewhere would hand rows out twice: the
    caller gets UnavailableError (retry the whole read), not the rest from another replica."""
    location, replica, process = replicated
    with FeatureClient(location, **WINDOW) as client, FeatureClient(replica, **WINDOW) as at_replica:
        batches = STREAMS[stream](client, at_replica)
        rows = next(batches).num_rows
        kill(process)
        with pytest.raises(UnavailableError):
            for batch in batches:
                rows += batch.num_rows
    assert rows < BIG_ROWS // 2
