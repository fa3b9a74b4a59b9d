"""Each kind of error reaches clients with its gRPC status (one row of `transport.errors.ROUTES` each), its
structured code where pyarrow can send one, and a message without tracebacks or server paths."""

from __future__ import annotations

import concurrent.futures
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import sqlalchemy
from pyiceberg.catalog import load_catalog

from flight_client import FeatureClient
from flight_client.errors import SERVER_ERRORS, error_code, from_flight_error
from flight_server.base.logs import CallFilter
from flight_server.transport.errors import ROUTES, plain_error_messages, to_flight_error
from flight_server.wire import errors
from flight_server.wire.codec import REQUEST_ID_HEADER
from flight_server.wire.reads import ScanRequest
from tests.conftest import sqlite_catalog, start_server

LEAKS = ("Traceback", "/work", '.py"', 'File "', "/tmp/")

# An exception of each kind, the message a client sees, and what pyarrow's client raises (the gRPC status).
KINDS: dict[str, tuple[Exception, str, type[Exception]]] = {
    "INVALID_ARGUMENT": (errors.ProtocolError("bad field"), "bad field", pa.ArrowInvalid),
    "NOT_FOUND": (errors.NotFoundError("no table 'x'"), "no table 'x'", pa.ArrowKeyError),
    "CONFLICT": (errors.ConflictError("lost a race"), "lost a race", flight.FlightUnavailableError),
    "RESOURCE_EXHAUSTED": (errors.LimitError("too big"), "too big", flight.FlightUnavailableError),
    "UNAUTHENTICATED": (errors.UnauthenticatedError("no token"), "no token", flight.FlightUnauthenticatedError),
    "PERMISSION_DENIED": (errors.PermissionDeniedError("not yours"), "not yours", flight.FlightUnauthorizedError),
    "CANCELLED": (concurrent.futures.CancelledError(), "the request was cancelled", flight.FlightCancelledError),
    "DEADLINE_EXCEEDED": (
        TimeoutError("/work/secret/path"),
        "the server timed out working on the request",
        flight.FlightTimedOutError,
    ),
    "UNAVAILABLE": (  # the catalog away (`base/outages.py`), as SQLAlchemy and psycopg2 say it
        sqlalchemy.exc.OperationalError(
            "SELECT 1",
            {},
            psycopg2.OperationalError(
                'connection to server at "127.0.0.1", port 9 failed: Connection refused\n\tIs the server running?'
            ),
        ),
        "the catalog is unavailable (connection refused); retry once it answers again",
        flight.FlightUnavailableError,
    ),
    "INTERNAL": (
        FileNotFoundError("/work/secret/file.py"),
        "internal error (FileNotFoundError); the server's log has the details",
        flight.FlightInternalError,
    ),
}


class Raising(flight.FlightServerBase):
    """Answers every action, get_flight_info and do_get with the error of the kind it names."""

    def _raise(self, kind: str) -> Any:
        try:
            raise KINDS[kind][0]
        except Exception as exc:
            logging.getLogger("tests.raising").exception("failed")
            raise to_flight_error(exc) from None

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
        return self._raise(action.type)

    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> Any:
        return self._raise(descriptor.command.decode())

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> Any:
        return self._raise(ticket.ticket.decode())


@pytest.fixture(scope="module")
def raising() -> Iterator[flight.FlightClient]:
    plain_error_messages()  # as FeatureFlightServer does
    server = Raising("grpc://127.0.0.1:0")
    with flight.connect(f"grpc://127.0.0.1:{server.port}") as client:
        yield client
    server.shutdown()


CALLS = {
    "do_action": lambda c, kind: list(c.do_action(flight.Action(kind, b""))),
    "get_flight_info": lambda c, kind: c.get_flight_info(flight.FlightDescriptor.for_command(kind)),
    "do_get": lambda c, kind: c.do_get(flight.Ticket(kind.encode())).read_all(),
}


def test_every_kind_has_a_row() -> None:
    assert set(KINDS) == set(ROUTES)


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_travels_with_its_status(
    raising: flight.FlightClient, kind: str, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, message, status = KINDS[kind]
    with caplog.at_level(logging.ERROR, logger="tests.raising"), pytest.raises(SERVER_ERRORS) as caught:
        CALLS[call](raising, kind)
    exc = caught.value
    assert type(exc) is status is ROUTES[kind].error
    assert str(exc).startswith(message), str(exc)
    assert not [leak for leak in LEAKS if leak in str(exc)], str(exc)
    assert error_code(exc) == kind  # from the structured detail, or (INVALID_ARGUMENT, NOT_FOUND) from the status
    client_error = from_flight_error(exc)
    assert (client_error.code, str(client_error)) == (kind, message)
    # The server's log keeps the whole traceback, whatever sys.tracebacklimit says.
    assert 'File "' in caplog.text and "in _raise" in caplog.text


def test_a_server_that_is_down_is_unavailable() -> None:
    with flight.connect("grpc://127.0.0.1:9") as client, pytest.raises(flight.FlightUnavailableError) as caught:
        list(client.do_action(flight.Action("health", b""), flight.FlightCallOptions(timeout=5)))
    assert error_code(caught.value) == "UNAVAILABLE"


def test_the_documented_table_is_the_one_in_the_code() -> None:
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([A-Z_]+) \|", section, re.MULTILINE)
    assert dict(rows) == {kind: route.status for kind, route in ROUTES.items()}


def test_a_scan_that_fails_while_streaming_answers_internal_without_the_servers_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Flight reads a `do_get`'s batches after the handler returned, beyond `_flight_errors`: an error then (a data file
    lost from storage, as a storage fault or another replica's compaction and expiry would lose it, found missing
    when its turn comes) is answered and logged the same way, its log line tagged with the call's request id. Flight
    sends an error raised while streaming as UNKNOWN whatever its class: the message is what can be right."""
    properties = sqlite_catalog(tmp_path)
    server = start_server(properties, log_format="json")  # which tags a call's lines with its request id
    try:
        with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
            for i in range(2):  # a file each
                rows = pa.table({"id": [i], "ts": pa.array([i], pa.timestamp("us", "UTC"))})
                client.write("t.lost", rows, entity_keys=["id"], event_time="ts", partition_by=[])
        table = load_catalog("default", **properties).load_table("t.lost")
        lost = Path(sorted(task.file.file_path for task in table.scan().plan_files())[-1].removeprefix("file://"))
        lost.unlink()
        ticket = flight.Ticket(ScanRequest(table="t.lost").to_bytes())
        caplog.handler.addFilter(CallFilter())  # as the server's own log handler tags its lines
        options = flight.FlightCallOptions(headers=[(REQUEST_ID_HEADER.encode(), b"job-7.lost-file")])
        with flight.connect(f"grpc://127.0.0.1:{server.port}") as raw, pytest.raises(SERVER_ERRORS) as caught:
            raw.do_get(ticket, options).read_all()
    finally:
        server.shutdown()
    assert "internal error (FileNotFoundError); the server's log has the details" in str(caught.value)
    assert str(lost.parent) not in str(caught.value) and not [leak for leak in LEAKS if leak in str(caught.value)]
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert [r.getMessage() for r in logged] == ["do_get (while streaming) failed"] and str(lost) in caplog.text
    assert logged[0].request_id == "job-7.lost-file"  # the line names its call, as a handler's error's line does
