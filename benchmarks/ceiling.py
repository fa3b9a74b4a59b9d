"""The raw Flight ceiling: a minimal server streaming an in-memory Arrow table, in its own process; its `do_put`
receives a put's rows and answers as the feature server does, committing nothing (the floor of a put).

Its own process, like the feature server, so both pay the same process boundary and neither
shares an allocator or gRPC threads with the client (in the benchmark's process the ceiling
measured 5-25% lower here). Run as `python -m benchmarks.ceiling FILE BATCH_ROWS`: it loads the
Arrow IPC file into memory and prints its port once it serves.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.wire.writes import WriteResult

START_TIMEOUT_SECONDS = 60.0


class MemoryFlightServer(flight.FlightServerBase):
    """The least work a Flight `do_get` can do: stream a table already in memory, from C++."""

    def __init__(self, table: pa.Table, batch_rows: int):
        super().__init__("grpc://127.0.0.1:0")
        # Rebatched like the feature server's results (0: its batches as they are, those the server sent), so only
        # the work behind the stream differs.
        batches = table.combine_chunks().to_batches(max_chunksize=batch_rows) if batch_rows else table.to_batches()
        self._table = pa.Table.from_batches(batches, table.schema)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.RecordBatchStream:
        return flight.RecordBatchStream(self._table)

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """Receive the rows (and the client's end-of-stream marker) and answer with a put's reply: what a put costs
        without the work behind it."""
        rows = reader.read_all().num_rows
        writer.write(pa.py_buffer(WriteResult("ceiling", 0, rows, 0).to_bytes()))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[flight.Result]:
        """Any action answered with an empty object: a client's `health` connects it before a timed run."""
        yield flight.Result(b"{}")

    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        """Answer every batch the client writes with the table: the floor of a lookup on an open stream."""
        writer.begin(self._table.schema)
        for _ in reader:
            writer.write_table(self._table)


@contextlib.contextmanager
def ceiling_server(table: pa.Table, batch_rows: int = 0) -> Iterator[str]:
    """Serve `table` from a separate process, in batches of `batch_rows` (0: in its own batches); yields its
    location and stops it afterwards."""
    with tempfile.TemporaryDirectory(prefix="flight-bench-ceiling-") as tmp:
        path = Path(tmp) / "table.arrow"
        with pa.ipc.new_file(path, table.schema) as sink:
            sink.write_table(table)
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ceiling", str(path), str(batch_rows)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the child prints its port only once it serves, or exits
            if not line.strip().isdigit():
                raise RuntimeError(f"the ceiling server did not start (exit code {proc.wait(START_TIMEOUT_SECONDS)})")
            yield f"grpc://127.0.0.1:{int(line)}"
        finally:
            proc.terminate()
            proc.wait(START_TIMEOUT_SECONDS)


def read(client: flight.FlightClient) -> pa.Table:
    """One full read of the ceiling table: what the feature server's scan is compared with."""
    return client.do_get(flight.Ticket(b"table")).read_all()


class Stream:
    """An open `do_exchange` with the ceiling server: each `ask` writes a batch and reads one answer."""

    def __init__(self, client: flight.FlightClient, keys: pa.RecordBatch):
        self._keys = keys
        self._writer, self._reader = client.do_exchange(flight.FlightDescriptor.for_command(b"stream"))
        self._writer.begin(keys.schema)

    def ask(self) -> pa.Table:
        self._writer.write_batch(self._keys)
        return pa.Table.from_batches([self._reader.read_chunk().data])

    def close(self) -> None:
        self._writer.done_writing()
        self._writer.close()


def main(argv: list[str]) -> None:
    path, batch_rows = argv
    with pa.OSFile(path) as source:
        table = pa.ipc.open_file(source).read_all()  # copied into memory, not mapped: no disk in the stream
    server = MemoryFlightServer(table, int(batch_rows))
    print(server.port, flush=True)
    server.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
