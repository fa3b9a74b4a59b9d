"""Results compressed on the wire on request (`compression`): the same rows, fewer bytes through a real
socket, and an unknown codec refused."""

from __future__ import annotations

import datetime as dt
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient

from .conftest import sqlite_catalog, start_server

ROWS = 20_000
TABLE = "wire.features"


class Relay:
    """A loopback TCP relay in front of the server that counts the bytes the server sends back."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(near, far, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(far, near, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if count:
                    with self._lock:
                        self.received += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = start_server(sqlite_catalog(tmp_path_factory.mktemp("compression")))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    data = pa.table(
        {
            "id": pa.array([i % 500 for i in range(ROWS)], pa.int64()),
            "ts": pa.array([start + dt.timedelta(minutes=i) for i in range(ROWS)], pa.timestamp("us", "UTC")),
            "score": pa.array([float(i % 7) for i in range(ROWS)]),
            "label": pa.array(["category-" + str(i % 3) for i in range(ROWS)]),
        }
    )
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        client.write(TABLE, data, entity_keys=["id"], event_time="ts")
    yield server.port
    server.shutdown()


def through_relay(
    port: int, compression: str | None, read: Callable[[FeatureClient], pa.Table]
) -> tuple[pa.Table, int]:
    """`read`'s result over a fresh relay, and the bytes the server sent."""
    relay = Relay(port)
    try:
        with FeatureClient(f"grpc://127.0.0.1:{relay.port}", compression=compression) as client:
            return read(client), relay.received
    finally:
        relay.close()


def whole_table(client: FeatureClient) -> pa.Table:
    return client.read_table(TABLE).sort_by([("id", "ascending"), ("ts", "ascending")])


def training_set(client: FeatureClient) -> pa.Table:
    """Entity rows streamed (`do_exchange`): 10 times per entity."""
    times = [dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc) + dt.timedelta(days=d) for d in range(10)]
    entities = pa.table(
        {
            "id": pa.array([i for i in range(500) for _ in times], pa.int64()),
            "event_timestamp": pa.array(times * 500, pa.timestamp("us", "UTC")),
        }
    )
    result = client.get_historical_features(entities, [f"{TABLE}:score", f"{TABLE}:label"])
    return result.sort_by([("id", "ascending"), ("event_timestamp", "ascending")])


@pytest.mark.parametrize("read", [whole_table, training_set])
def test_compressed_results_are_the_same_rows_in_fewer_bytes(
    served: int, read: Callable[[FeatureClient], pa.Table]
) -> None:
    plain, plain_bytes = through_relay(served, None, read)
    assert plain.num_rows == ROWS if read is whole_table else 5_000
    for codec in ("lz4", "zstd"):
        result, received = through_relay(served, codec, read)
        assert result.equals(plain), codec
        assert received < 0.6 * plain_bytes, (codec, received, plain_bytes)


def test_an_unknown_codec_is_refused(served: int) -> None:
    with pytest.raises(ValueError, match="compression must be one of"):
        FeatureClient(f"grpc://127.0.0.1:{served}", compression="gzip")
    raw = flight.connect(f"grpc://127.0.0.1:{served}")
    ticket = json.dumps({"kind": "scan", "table": TABLE, "compression": "gzip"}).encode()
    with pytest.raises(pa.ArrowInvalid, match="'compression' must be one of"):  # INVALID_ARGUMENT
        raw.do_get(flight.Ticket(ticket)).read_all()
    raw.close()
