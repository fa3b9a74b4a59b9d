"""Snapshot ids (63-bit) are accepted as JSON strings as well as numbers, for clients whose JSON numbers are doubles."""

from __future__ import annotations

import json

import pyarrow.flight as flight
import pytest

from flight_client import FeatureClient
from flight_server.wire.actions import PinRequest
from flight_server.wire.errors import ProtocolError
from flight_server.wire.reads import HistoricalRequest, ScanRequest
from tests.test_roundtrip import features, write

BIG = 3774676913626879102  # above 2**53: a double cannot hold it


def test_every_snapshot_id_field_takes_a_string() -> None:
    scan = ScanRequest.from_body({"table": "a.t", "snapshot_id": str(BIG)})
    historical = HistoricalRequest.from_body(
        {
            "features": ["a.t:f"],
            "entities": {"table": "a.e", "snapshot_id": str(-BIG)},
            "snapshot_ids": {"a.t": str(BIG), "a.u": BIG},
        }
    )
    pin = PinRequest.from_body({"table": "a.t", "snapshot_id": str(BIG)})
    assert scan.snapshot_id == pin.snapshot_id == BIG
    assert historical.entities is not None and historical.entities.snapshot_id == -BIG
    assert historical.snapshot_ids == {"a.t": BIG, "a.u": BIG}
    assert json.loads(scan.to_bytes())["snapshot_id"] == BIG  # sent on as a number


@pytest.mark.parametrize("value", ["", "12a", "1.5", " 1", str(1 << 63), True, None, 1.5, [1]])
def test_a_snapshot_id_is_a_64_bit_integer(value: object) -> None:
    with pytest.raises(ProtocolError, match="must be a snapshot id"):
        HistoricalRequest.from_body({"features": ["a.t:f"], "snapshot_ids": {"a.t": value}})


def test_a_scan_reads_the_snapshot_a_string_names(client: FeatureClient, table: str) -> None:
    first = write(client, table, features(5))
    write(client, table, features(3))
    ticket = json.dumps({"v": 1, "kind": "scan", "table": table, "snapshot_id": str(first.snapshot_id)})
    rows = client._client.do_get(flight.Ticket(ticket.encode())).read_all()
    assert rows.num_rows == 5
