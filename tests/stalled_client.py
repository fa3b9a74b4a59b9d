"""A client process that stops reading (or sending) mid-stream, for the idle-timeout tests.

`python -m tests.stalled_client MODE LOCATION TABLE`: prints "stalled" once it has stopped, waits for a
line on stdin, then carries on and prints what happened as JSON. Modes: `scan` (reads one batch of a
scan, then stops), `put` (sends one batch of a write, then stops), `exchange` (sends entity rows of a
training set, reads one result batch, then stops), `slow` (reads every batch, 0.04 s apart).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from flight_client import FeatureClient
from flight_server.wire.reads import HistoricalRequest


def stall() -> None:
    print("stalled", flush=True)
    sys.stdin.readline()


def read_rest(reader: pa.RecordBatchReader | flight.FlightStreamReader, rows: int) -> dict[str, object]:
    try:
        for batch in reader:
            rows += (batch.data if isinstance(batch, flight.FlightStreamChunk) else batch).num_rows
    except Exception as exc:  # what the resumed client sees is the point of the test
        return {"rows": rows, "error": f"{type(exc).__name__}: {exc}"}
    return {"rows": rows, "error": None}


def slowly(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """A slow consumer, not a stalled one: it takes a batch (192 KB in the tests) every 0.04 s."""
    for batch in reader:
        time.sleep(0.04)
        yield batch


def main(mode: str, location: str, table: str) -> dict[str, object]:
    client = FeatureClient(location)
    if mode in ("scan", "slow"):
        reader = client.scan(table)
        rows = reader.read_next_batch().num_rows
        if mode == "slow":
            return read_rest(slowly(reader), rows)
        stall()
        return read_rest(reader, rows)
    if mode == "put":
        schema = pa.schema([("id", pa.int64()), ("ts", pa.timestamp("us", "UTC"))])

        def batches() -> Iterator[pa.RecordBatch]:
            yield pa.record_batch([pa.array([1]), pa.array([0], schema.field("ts").type)], schema=schema)
            stall()
            yield pa.record_batch([pa.array([2]), pa.array([0], schema.field("ts").type)], schema=schema)

        try:
            client.write(
                table, pa.RecordBatchReader.from_batches(schema, batches()), entity_keys=["id"], event_time="ts"
            )
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"error": None}
    if mode == "exchange":
        entities = pa.table(
            {
                "id": pa.array(range(1_000_000), pa.int64()),
                "event_timestamp": pa.array([1] * 1_000_000, pa.timestamp("us", "UTC")),
            }
        )
        request = HistoricalRequest(features=[f"{table}:value"])
        writer, reader = client._client.do_exchange(flight.FlightDescriptor.for_command(request.to_bytes()))
        writer.begin(entities.schema)

        def send() -> None:  # the server answers as batches arrive: write while reading, as FeatureClient does
            with contextlib.suppress(pa.ArrowException):  # the call may be cut while this still writes
                writer.write_table(entities, max_chunksize=65536)
                writer.done_writing()

        threading.Thread(target=send, daemon=True).start()
        rows = reader.read_chunk().data.num_rows
        stall()
        return read_rest(reader, rows)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
