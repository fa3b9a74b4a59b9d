"""Reading a client's record-batch stream (`do_put`, `do_exchange`), one way for every handler, within the
server's limits on batch size and idle time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.wire.errors import RequestError
from flight_server.wire.writes import parse_end_marker


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


def entity_chunks(
    reader: flight.MetadataRecordBatchReader, what: str, marked: bool
) -> Iterator[flight.FlightStreamChunk]:
    """A `do_exchange` client's chunks up to the end of its rows: its end-of-stream marker when the request
    promised one (`marked`), else its half-close. A client reading the answer on one thread while another writes
    ends its rows with the marker, since a half-close from the writing thread can race the reader's own when the
    call ends (Arrow Flight then lets gRPC abort the client's process); so the rows end where the marker is,
    and its row count must be the rows received. A promised marker that never came is a cut-off stream."""
    rows = 0
    for chunk in chunks(reader, what):
        if chunk.data is not None:
            rows += chunk.data.num_rows
        elif marked and chunk.app_metadata is not None:
            declared = parse_end_marker(chunk.app_metadata.to_pybytes(), what)
            if declared != rows:
                raise RequestError(f"the client says it sent {declared} {what} rows but {rows} arrived")
            return
        yield chunk
    if marked:
        raise RequestError(
            f"the {what} stream ended after {rows} rows without its end-of-stream marker (the client was cut off?)"
        )
