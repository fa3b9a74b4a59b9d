"""A client's record-batch stream and the writer back to it, within `--max-batch-mb` and the idle timeout."""

from __future__ import annotations

import contextlib

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.transport.idle import WatchedCall
from flight_server.wire.errors import LimitError


class ClientReader:
    """The client's stream (`do_put`, `do_exchange`) as handlers read it, within the server's limits:
    no record batch above `max_batch_bytes` (0: any), and reads count as waiting for the idle timeout."""

    def __init__(self, reader: flight.MetadataRecordBatchReader, call: WatchedCall | None, max_batch_bytes: int):
        self._reader, self._call, self._max = reader, call, max_batch_bytes

    @property
    def schema(self) -> pa.Schema:
        with _waiting(self._call, "send its stream"):
            return self._reader.schema

    def read_chunk(self) -> flight.FlightStreamChunk:
        with _waiting(self._call, "send its stream"):
            chunk = self._reader.read_chunk()
        size = chunk.data.nbytes if chunk.data is not None else 0
        if self._max and size > self._max:
            # gRPC has received it already (pyarrow cannot set its message limit): refuse before it is used.
            raise LimitError(
                f"a record batch of {size:,} bytes passed this server's limit of {self._max:,} bytes a batch "
                "(--max-batch-mb): send smaller batches"
            )
        return chunk


class ClientWriter:
    """Results written to the client (`do_put`'s metadata, `do_exchange`'s batches); each write counts as
    waiting for the idle timeout, since it blocks while the client does not read."""

    def __init__(self, writer: flight.MetadataRecordBatchWriter | flight.FlightMetadataWriter, call: WatchedCall):
        self._writer, self._call = writer, call

    def begin(self, schema: pa.Schema, options: pa.ipc.IpcWriteOptions | None = None) -> None:
        with self._call.waiting("read results"):
            self._writer.begin(schema, options)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        with self._call.waiting("read results"):
            self._writer.write_batch(batch)

    def write(self, buffer: pa.Buffer) -> None:
        with self._call.waiting("read results"):
            self._writer.write(buffer)


class CompressedWriter:
    """`do_exchange`'s writer back to a client that asked for compressed results (`compression`): every
    stream it begins uses `options`, whatever the handler passes."""

    def __init__(self, writer: flight.MetadataRecordBatchWriter | ClientWriter, options: pa.ipc.IpcWriteOptions):
        self._writer, self._options = writer, options

    def begin(self, schema: pa.Schema, options: pa.ipc.IpcWriteOptions | None = None) -> None:
        self._writer.begin(schema, self._options)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def write(self, buffer: pa.Buffer) -> None:
        self._writer.write(buffer)


def _waiting(call: WatchedCall | None, what: str) -> contextlib.AbstractContextManager[None]:
    return call.waiting(what) if call is not None else contextlib.nullcontext()
