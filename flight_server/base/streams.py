"""Reading a client's record-batch stream (`do_put`, `do_exchange`), one way for every handler, within the
server's limits on batch size and idle time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.wire.errors import RequestError


def stream_schema(reader: flight.MetadataRecordBatchReader, what: str) -> pa.Schema:
    """The schema the client began its stream with; a stream ended before it began is a `RequestError`."""
    try:
        return reader.schema
    except (flight.FlightError, pa.ArrowException, OSError) as exc:
        raise RequestError(f"the {what} stream ended before its schema: begin it with the columns ({exc})") from None


def chunks(
    reader: flight.MetadataRecordBatchReader, what: str, consequence: str = ""
) -> Iterator[flight.FlightStreamChunk]:
    """The stream's chunks until it ends; a broken stream is a `RequestError` saying how far it got."""
    rows = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        except (flight.FlightError, pa.ArrowException) as exc:
            raise RequestError(f"the {what} stream broke after {rows} rows: {exc}{consequence}") from None
        if chunk.data is not None:
            rows += chunk.data.num_rows
        yield chunk
