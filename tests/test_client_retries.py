"""`FeatureClient(retry_seconds=...)`: reads ride through a server that goes away and comes back on its address, as
a replica does in a rolling restart; without it they fail at once."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from flight_client import FeatureClient, UnavailableError
from flight_server.transport.service import FeatureFlightServer
from tests.conftest import free_ports, sqlite_catalog, start_server

TABLE = "tests.drivers"
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def drivers(n: int) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(range(n), pa.int64()),
            "event_timestamp": pa.array([T0] * n, pa.timestamp("us", "UTC")),
            "rate": pa.array([float(i) for i in range(n)], pa.float64()),
        }
    )


class _Retried(logging.Handler):
    """Set once the client says it will try again: the moment to bring the server back."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "trying again" in record.getMessage():
            self.event.set()


def back_once_retried(start: Callable[[], FeatureFlightServer]) -> tuple[threading.Thread, list[FeatureFlightServer]]:
    """A thread that starts the server again once the client has been refused and said it retries."""
    retried = _Retried()
    logger = logging.getLogger("flight_client.client")
    logger.addHandler(retried)
    logger.setLevel(logging.INFO)
    started: list[FeatureFlightServer] = []

    def restart() -> None:
        try:
            if retried.event.wait(60):
                started.append(start())
        finally:
            logger.removeHandler(retried)

    thread = threading.Thread(target=restart)
    thread.start()
    return thread, started


def test_reads_are_tried_again_until_the_server_is_back(tmp_path: Path) -> None:
    """A server stops and a new one starts on its address (a replica restarting): a ticket planned before, a
    training set's plan and a whole-table read each succeed with `retry_seconds`, tried again once refused; without
    it the same read fails at once, and with a short one it fails once the time is up."""
    catalog = sqlite_catalog(tmp_path)
    port = free_ports(1)[0]

    def start() -> FeatureFlightServer:
        return start_server(catalog, port=port)

    server = start()
    location = f"grpc://127.0.0.1:{port}"
    with FeatureClient(location, retry_seconds=60) as client:
        client.write(TABLE, drivers(5), entity_keys=["driver_id"], event_time="event_timestamp")
        info = client.flight_info(TABLE)
        server.shutdown()
        with FeatureClient(location) as impatient, pytest.raises(UnavailableError):
            impatient.read_endpoint(info.endpoints[0])
        with FeatureClient(location, retry_seconds=0.3) as brief, pytest.raises(UnavailableError):
            brief.read_table(TABLE)

        thread, started = back_once_retried(start)
        try:
            rows = client.read_endpoint(info.endpoints[0]).read_all()
        finally:
            thread.join(60)
        assert sorted(rows.column("driver_id").to_pylist()) == [0, 1, 2, 3, 4]
        started.pop().shutdown()

        entities = {"driver_id": [1, 2], "event_timestamp": ["2025-01-02T00:00:00Z"] * 2}
        thread, started = back_once_retried(start)
        try:
            planned = client.training_set_info(entities, [f"{TABLE}:rate"])
        finally:
            thread.join(60)
        assert client.read_endpoint(planned.endpoints[0]).read_all().column("rate").to_pylist() == [1.0, 2.0]
        started.pop().shutdown()

        thread, started = back_once_retried(start)
        try:
            assert client.read_table(TABLE).num_rows == 5
        finally:
            thread.join(60)
        started.pop().shutdown()


def test_retry_seconds_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="retry_seconds"):
        FeatureClient("grpc://127.0.0.1:1", retry_seconds=-1)
