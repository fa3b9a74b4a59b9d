"""The mistakes of a first session with the client get one clear line each, or just work: a location
without a scheme, an HTTP location, a server that is not there, a null in an integer key column
(which pandas turns into a float column), and features given as one string."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, FeatureServerError, InvalidRequestError, UnavailableError
from tests.conftest import sqlite_catalog, start_server
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
