"""The `calls` action and `flight-server calls`: what a server is running now, as an operator asks it."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from click.testing import CliRunner

from flight_client import FeatureClient, PermissionDeniedError
from flight_server.cli import main
from tests.conftest import free_ports, sqlite_catalog, start_server, wait_until

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
WRITER_TOKEN = "writer-" + uuid.uuid4().hex
READER_TOKEN = "reader-" + uuid.uuid4().hex
TOKENS = [
    {"name": "ops", "token": ADMIN_TOKEN, "permissions": ["read", "write", "admin"]},
    {"name": "pipeline", "token": WRITER_TOKEN, "permissions": ["write"]},
    {"name": "notebooks", "token": READER_TOKEN, "permissions": ["read"]},
]
TABLE = "shared.drivers"
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def drivers(ids: range) -> pa.Table:
    return pa.table(
        {
            "driver_id": pa.array(ids, pa.int64()),
            "event_timestamp": pa.array([T0] * len(ids), pa.timestamp("us", "UTC")),
            "rate": pa.array([1.0] * len(ids), pa.float64()),
        }
    )


def puts(calls: dict[str, Any]) -> list[dict[str, Any]]:
    return [call for call in calls["calls"] if call["method"] == "do_put"]


def test_a_put_in_flight_is_listed_with_its_caller_table_and_rows_until_it_ends(tmp_path: Path) -> None:
    """A pipeline's put has sent its first batch and waits: the admin's `calls` lists it first (the longest
    running), with the token's name, its table, the rows received so far and its client's address, beside the
    `calls` call itself; `flight-server calls` prints the same as a table. Once the put ends it is gone. A token
    without the admin permission is refused."""
    server = start_server(sqlite_catalog(tmp_path), auth_tokens=TOKENS, metrics_port=free_ports(1)[0])
    location = f"grpc://127.0.0.1:{server.port}"
    release = threading.Event()

    def batches() -> Iterator[pa.RecordBatch]:
        yield from drivers(range(3)).to_batches()
        release.wait(60)
        yield from drivers(range(3, 5)).to_batches()

    try:
        with FeatureClient(location, token=ADMIN_TOKEN) as admin, FeatureClient(location, token=WRITER_TOKEN) as pipe:
            admin.write(TABLE, drivers(range(1)), entity_keys=["driver_id"], event_time="event_timestamp")
            stream = pa.RecordBatchReader.from_batches(drivers(range(0)).schema, batches())
            written: list[Any] = []
            putting = threading.Thread(target=lambda: written.append(pipe.write(TABLE, stream)))
            putting.start()
            try:
                wait_until(
                    lambda: [c["rows_received"] for c in puts(admin.calls())] == [3], what="the put's first batch"
                )
                listed = admin.calls()
                assert listed["tracked"] is True
                put, own = listed["calls"]  # the longest running first
                assert put["kind"] == "write" and put["caller"] == "pipeline" and put["tables"] == [TABLE]
                assert put["rows_received"] == 3 and put["bytes_received"] > 0 and put["rows_sent"] == 0
                assert put["seconds"] >= own["seconds"] >= 0 and put["peer"] and put["request_id"]
                assert (own["method"], own["kind"], own["caller"], own["tables"]) == ("do_action", "calls", "ops", [])

                printed = CliRunner().invoke(
                    main, ["calls", "--location", location], env={"FLIGHT_SERVER_HEALTH_TOKEN": ADMIN_TOKEN}
                )
                assert printed.exit_code == 0, printed.output
                header, first, *_ = printed.output.splitlines()
                assert header.split()[:5] == ["seconds", "method", "kind", "caller", "tables"]
                assert first.split()[1:5] == ["do_put", "write", "pipeline", TABLE]
            finally:
                release.set()
                putting.join(60)
            assert written and written[0].rows == 5
            assert puts(admin.calls()) == []
        with FeatureClient(location, token=READER_TOKEN) as reader, pytest.raises(PermissionDeniedError) as refused:
            reader.calls()
        assert "admin" in str(refused.value)
    finally:
        server.shutdown()


def test_a_server_that_does_not_track_calls_says_so(tmp_path: Path) -> None:
    """Without metrics and JSON logs a server tracks no calls (a Python middleware costs every call): `calls` says
    so rather than listing none as if none ran, and so does `flight-server calls`."""
    server = start_server(sqlite_catalog(tmp_path))
    location = f"grpc://127.0.0.1:{server.port}"
    try:
        with FeatureClient(location) as client:
            assert client.calls() == {"tracked": False, "calls": []}
        printed = CliRunner().invoke(main, ["calls", "--location", location])
        assert printed.exit_code == 0 and "does not track calls" in printed.output, printed.output
        as_json = CliRunner().invoke(main, ["calls", "--location", location, "--json"])
        assert as_json.exit_code == 0 and '"tracked": false' in as_json.output, as_json.output
    finally:
        server.shutdown()
