"""Idle timeout: a real client process that stops reading (or sending) loses its call after
`--idle-timeout-seconds`; the server gives the slot back, and a slow but steady client is left alone."""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient
from flight_server.transport.idle import parse_peer
from flight_server.transport.service import FeatureFlightServer
from flight_server.wire.codec import ONLINE_SESSION_HEADER
from flight_server.wire.reads import HistoricalRequest
from tests.conftest import answers, sqlite_catalog, start_server, wait_until, write_big

ROWS = 1_000_000  # far more than gRPC's flow-control window: the server blocks writing to a stalled reader
# gRPC lets a blocked write go on once the client has read about its flow-control window (~8 MB here):
# the slow reader below, at ~5 MB/s, waits under 2 s a time; the stalled ones wait for ever.
IDLE_SECONDS = 4.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureFlightServer]:
    catalog = sqlite_catalog(tmp_path_factory.mktemp("idle-warehouse"))
    server = start_server(catalog, max_concurrent_requests=1, idle_timeout_seconds=IDLE_SECONDS, batch_rows=8192)
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        write_big(client, "idle.big", ROWS)
    yield server
    server.shutdown()


class Client:
    """`tests/stalled_client.py` in its own process (its own connection), and its output lines."""

    def __init__(self, mode: str, location: str, table: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stalled_client", mode, location, table],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def line(self, timeout: float = 90) -> str:
        try:
            return self.lines.get(timeout=timeout).strip()
        except queue.Empty:
            pytest.fail(f"the client process said nothing for {timeout}s")

    def resume(self) -> dict[str, object]:
        self.proc.stdin.write("go\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.line())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the idle watch logged."""
    return [r.getMessage() for r in caplog.records if r.name == "flight_server.transport.idle"]


def stalled(server: FeatureFlightServer, mode: str, table: str, caplog: pytest.LogCaptureFixture) -> dict[str, object]:
    """Stall a client, check it holds the only slot until the idle timeout ends its call, then resume it."""
    location = f"grpc://127.0.0.1:{server.port}"
    wait_until(lambda: answers(location), what="no call in progress")
    client = Client(mode, location, table)
    try:
        with caplog.at_level(logging.WARNING, logger="flight_server.transport.idle"):
            assert client.line() == "stalled"
            assert not answers(location), "the stalled call holds the server's only slot"
            # The watch ends the call, then logs it: wait for both (the slot can be free before the line is logged).
            wait_until(lambda: answers(location) and logged(caplog), timeout=30, what="the idle watch")
        ended = logged(caplog)
        assert len(ended) == 1 and f"for {IDLE_SECONDS:.0f} s (--idle-timeout-seconds)" in ended[0], ended
        wait_until(lambda: server.idle is not None and server.idle.active == 0, what="the ended call to be forgotten")
        return {"log": ended[0], **client.resume()}
    finally:
        client.close()


def test_a_client_that_stops_reading_a_scan_loses_its_call(
    server: FeatureFlightServer, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = stalled(server, "scan", "idle.big", caplog)
    assert "ended do_get of 'anonymous'" in outcome["log"] and "did not read results" in outcome["log"]
    # Resumed, it reads what had reached it, then learns the call was ended: never a silently short result.
    assert outcome["error"] is not None and "UNAVAILABLE" in outcome["error"].upper(), outcome
    assert 0 < outcome["rows"] < ROWS  # type: ignore[operator]


def test_a_client_that_stops_sending_a_write_loses_it_and_nothing_is_committed(
    server: FeatureFlightServer, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = stalled(server, "put", "idle.unfinished", caplog)
    assert "ended do_put" in outcome["log"] and "did not send its stream" in outcome["log"]
    assert outcome["error"] is not None, outcome
    with FeatureClient(f"grpc://127.0.0.1:{server.port}") as client:
        assert "idle.unfinished" not in {t["table"] for t in client.tables()}


def test_a_client_that_stops_reading_a_training_set_loses_its_call(
    server: FeatureFlightServer, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = stalled(server, "exchange", "idle.big", caplog)
    assert "ended do_exchange" in outcome["log"] and "did not read results" in outcome["log"]
    assert outcome["error"] is not None and 0 < outcome["rows"] < ROWS, outcome  # type: ignore[operator]


def test_a_slow_but_steady_reader_is_not_cut(server: FeatureFlightServer, caplog: pytest.LogCaptureFixture) -> None:
    """The call lasts longer than the timeout (122 batches, 0.04 s apart), but no wait does: it completes."""
    client = Client("slow", f"grpc://127.0.0.1:{server.port}", "idle.big")
    try:
        with caplog.at_level(logging.WARNING, logger="flight_server.transport.idle"):
            assert json.loads(client.line()) == {"rows": ROWS, "error": None}
        assert not [r for r in caplog.records if r.name == "flight_server.transport.idle"]
    finally:
        client.close()


def test_online_lookups_are_answered_under_the_idle_watch(server: FeatureFlightServer) -> None:
    """Online answers are whole tables, not readers: the watch must stream them as batches."""
    with FeatureClient(f"grpc://127.0.0.1:{server.port}", online_sessions=False) as client:  # do_get
        wait_until(lambda: answers(f"grpc://127.0.0.1:{server.port}"), what="no call in progress")
        answer = client.get_online_features({"id": [3, 7, -1]}, ["idle.big:value"], apply_ttl=False)
    assert answer.column("value").to_pylist() == [3.0, 7.0, None]


def test_an_online_session_waits_for_keys_without_a_slot_or_an_idle_clock(
    server: FeatureFlightServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A session (an online do_exchange kept open between lookups) waits on its client by design."""
    location = f"grpc://127.0.0.1:{server.port}"
    wait_until(lambda: answers(location), what="no call in progress")
    with caplog.at_level(logging.WARNING, logger="flight_server.transport.idle"), FeatureClient(location) as client:

        def value(key: int) -> list[float]:
            return client.get_online_features({"id": [key]}, ["idle.big:value"], apply_ttl=False)["value"].to_pylist()

        assert value(5) == [5.0]
        assert server.idle is not None and server.idle.active >= 1  # the session's call is open
        # It holds none of the server's single slot, and its wait for the next keys is not idle time.
        assert answers(location)
        wait_until(
            lambda: all(c.idle_seconds(time.monotonic() + 3600) == 0 for c in list(server.idle._calls)),  # type: ignore[union-attr]
            timeout=IDLE_SECONDS / 2,  # before the watch could cut a call waiting on its client
            what="no call waiting on its client",
        )
        assert value(6) == [6.0]
    assert not [r for r in caplog.records if r.name == "flight_server.transport.idle"]
    # The session header lets only online lookups through without a slot.
    headers = flight.FlightCallOptions(headers=[(ONLINE_SESSION_HEADER.encode(), b"1")])
    request = HistoricalRequest(["idle.big:value"], entity_time="ts")
    with flight.FlightClient(location) as raw:
        writer, reader = raw.do_exchange(flight.FlightDescriptor.for_command(request.to_bytes()), headers)
        # The refusal may reach the client while it still writes its schema, or when it reads.
        with pytest.raises(pa.ArrowInvalid, match="header is for online lookups only"):  # INVALID_ARGUMENT
            writer.begin(pa.schema([("id", pa.int64()), ("ts", pa.timestamp("us", "UTC"))]))
            reader.read_chunk()


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:50123", ("127.0.0.1", 50123)),
        ("ipv6:[::1]:50123", ("::1", 50123)),
        ("ipv6:%5B::ffff:10.0.0.7%5D:443", ("10.0.0.7", 443)),  # an IPv4 client of a dual-stack listener
    ],
)
def test_peers_name_their_connection(peer: str, address: tuple[str, int]) -> None:
    host, port = parse_peer(peer)
    assert (str(host), port) == address
