"""Configured limits: concurrent calls, inline request size; stalled readers give their slot back."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient, FeatureServerError, ResourceExhaustedError
from flight_server.transport.service import FeatureFlightServer
from flight_server.wire.reads import OnlineRequest
from tests.conftest import answers, sqlite_catalog, start_server, takes_calls, wait_until, write_big

# Large enough that the stream cannot fit into gRPC's flow-control window: the server blocks writing it.
BIG_ROWS = 2_000_000


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return sqlite_catalog(tmp_path_factory.mktemp("limits-warehouse"))


@pytest.fixture(scope="module")
def limited(catalog: dict[str, str]) -> Iterator[FeatureFlightServer]:
    # No training-set cache: streamed training sets are joined by DuckDB, which is what --max-exchange-mb limits.
    server = start_server(
        catalog,
        max_concurrent_requests=1,
        max_request_bytes=4096,
        max_exchange_bytes=1 << 20,
        batch_rows=8192,
        historical_cache_bytes=0,
    )
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        write_big(client, "limits.big", BIG_ROWS)
    yield server
    server.shutdown()


def test_inline_requests_above_the_limit_are_refused_and_streaming_works(limited: FeatureFlightServer) -> None:
    entities = {"id": list(range(1000))}
    request = OnlineRequest(["limits.big:value"], entities)
    with FeatureClient(f"grpc://127.0.0.1:{limited.port}") as client:
        with pytest.raises(flight.FlightError, match="at most 4096 bytes inline: stream entity rows"):
            client._client.do_get(flight.Ticket(request.to_bytes())).read_all()
        streamed = client.get_online_features(entities, ["limits.big:value"])  # refused inline: streamed instead
    assert streamed.column("value").to_pylist() == [float(i) for i in range(1000)]


def test_concurrent_calls_above_the_limit_are_refused_until_a_stream_ends(limited: FeatureFlightServer) -> None:
    location = f"grpc://127.0.0.1:{limited.port}"
    wait_until(lambda: answers(location), what="no call in progress")
    with FeatureClient(location) as reader:
        stream = reader.scan("limits.big")
        stream.read_next_batch()  # ...and stop reading: the server blocks on flow control, its call still open
        with FeatureClient(location) as other:
            with pytest.raises(ResourceExhaustedError) as e:
                other.flight_info("limits.big")
            assert "maximum of 1 concurrent requests (--max-concurrent-requests)" in str(e.value)
            assert other.health()["status"] == "ok"  # actions run beyond the limit
        del stream  # dropping an unfinished stream cancels its call: the slot comes back
        wait_until(lambda: answers(location), what="the slot of the abandoned stream")


def test_a_stalled_reader_with_a_deadline_gives_its_slot_back(limited: FeatureFlightServer) -> None:
    location = f"grpc://127.0.0.1:{limited.port}"
    wait_until(lambda: answers(location), what="no call in progress")
    with FeatureClient(location, timeout=1) as stalled:
        stream = stalled.scan("limits.big")
        stream.read_next_batch()
        assert not answers(location)
        wait_until(lambda: answers(location), timeout=30, what="the deadline to end the stalled stream")
        with pytest.raises(FeatureServerError, match="Deadline Exceeded"):
            stream.read_all()  # the stream was ended by its deadline, not completed (the client's error class)


def test_training_sets_streaming_more_than_the_limit_are_refused(limited: FeatureFlightServer) -> None:
    def entities(rows: int) -> pa.Table:
        return pa.table(
            {
                "id": pa.array(range(rows), pa.int64()),
                "event_timestamp": pa.array([1] * rows, pa.timestamp("us", "UTC")),
            }
        )

    with FeatureClient(f"grpc://127.0.0.1:{limited.port}") as client:
        assert client.get_historical_features(entities(1000), ["limits.big:value"]).num_rows == 1000
        with pytest.raises(ResourceExhaustedError) as e:
            client.get_historical_features(entities(200_000), ["limits.big:value"])  # 3.2 MB
    assert "passed 1,048,576 bytes" in str(e.value) and "--max-exchange-mb" in str(e.value)


def test_refused_calls_take_no_slot(catalog: dict[str, str]) -> None:
    """Calls the authentication or the handler refuses end at once and give their slot back."""
    token = "limits-writer-token-0123456789"
    server = start_server(
        catalog, max_concurrent_requests=1, auth_tokens=[{"name": "writer", "token": token, "permissions": ["write"]}]
    )
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        for caller in (None, "wrong-token-0123456789", token):  # no token, a wrong one, one without `read`
            for _ in range(3):
                with FeatureClient(location, token=caller) as client, pytest.raises(FeatureServerError) as e:
                    client.health()
                assert not isinstance(e.value, ResourceExhaustedError)
        with FeatureClient(location, token=token) as client:
            data = pa.table({"id": [1], "ts": pa.array([0], pa.timestamp("us", "UTC"))})
            assert client.write("limits.refused", data, entity_keys=["id"], event_time="ts").rows == 1
    finally:
        server.shutdown()


def test_one_caller_cannot_take_every_slot(catalog: dict[str, str], limited: FeatureFlightServer) -> None:
    tokens = [
        {"name": name, "token": f"{name}-limits-token-0123456789", "permissions": ["read"]} for name in ("alice", "bob")
    ]
    server = start_server(catalog, max_concurrent_requests=4, max_concurrent_per_caller=1, auth_tokens=tokens)
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        with (
            FeatureClient(location, token=tokens[0]["token"]) as alice,
            FeatureClient(location, token=tokens[1]["token"]) as bob,
        ):
            stream = alice.scan("limits.big")
            stream.read_next_batch()  # ...and stop reading: alice's one call stays open
            with pytest.raises(ResourceExhaustedError) as e:
                alice.flight_info("limits.big")
            assert "'alice' is running its maximum of 1 concurrent requests (--max-concurrent-per-caller)" in str(
                e.value
            )
            assert alice.health()["status"] == "ok"  # actions run beyond the limits
            assert takes_calls(bob)  # other callers keep their share
            del stream
            wait_until(lambda: takes_calls(alice), what="alice's slot back once her stream is dropped")
    finally:
        server.shutdown()


def test_record_batches_above_the_limit_are_refused(catalog: dict[str, str]) -> None:
    server = start_server(catalog, max_batch_bytes=1 << 20)
    rows = 50_000  # 3.2 MB in one batch of 8 columns (the client cuts batches above 65,536 rows, not bytes)
    features = {f"x{i}": pa.array([float(i)] * rows) for i in range(6)}
    data = pa.table(
        {"id": pa.array(range(rows), pa.int64()), "ts": pa.array([0] * rows, pa.timestamp("us", "UTC")), **features}
    )
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            one_batch = pa.RecordBatchReader.from_batches(data.schema, data.combine_chunks().to_batches())
            with pytest.raises(ResourceExhaustedError) as e:
                client.write("limits.batches", one_batch, entity_keys=["id"], event_time="ts")
            assert "a record batch of 3,200,000 bytes passed this server's limit of 1,048,576 bytes" in str(e.value)
            assert "limits.batches" not in {t["table"] for t in client.tables()}
            small = pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=5_000))
            assert client.write("limits.batches", small, entity_keys=["id"], event_time="ts").rows == rows
    finally:
        server.shutdown()
