"""Write requests on the wire: the `do_put` descriptor, its end-of-stream marker and its reply."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from flight_server.wire.codec import MAX_REQUEST_BYTES, Fields, Reply, decode, encode
from flight_server.wire.errors import ProtocolError

WRITE_MODES = ("append", "overwrite")


@dataclass(frozen=True)
class WriteRequest:
    """`do_put` descriptor: where the stream goes and how it is committed."""

    table: str
    mode: str = "append"
    entity_keys: list[str] | None = None
    event_time: str | None = None
    created_time: str | None = None
    ttl_seconds: int | None = None
    partition_by: list[str] | None = None
    write_id: str | None = None
    evolve: bool = False
    end_marker: bool = False
    kind: str = field(default="write", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> WriteRequest:
        f = Fields(
            body,
            "write request",
            {
                "table",
                "mode",
                "entity_keys",
                "event_time",
                "created_time",
                "ttl_seconds",
                "partition_by",
                "write_id",
                "evolve",
                "end_marker",
            },
        )
        mode = f.str("mode") or "append"
        if mode not in WRITE_MODES:
            raise ProtocolError(f"write request: unknown mode {mode!r}; use one of {list(WRITE_MODES)}")
        partition_by = body.get("partition_by")
        if partition_by is not None and not (
            isinstance(partition_by, list) and all(isinstance(p, str) for p in partition_by)
        ):
            raise ProtocolError("write request: field 'partition_by' must be a list of strings")
        return cls(
            table=f.required_str("table"),
            mode=mode,
            entity_keys=f.str_list("entity_keys"),
            event_time=f.str("event_time"),
            created_time=f.str("created_time"),
            ttl_seconds=f.int("ttl_seconds", minimum=1),
            partition_by=partition_by,
            write_id=f.str("write_id"),
            evolve=f.bool("evolve"),
            end_marker=f.bool("end_marker"),
        )

    def to_bytes(self) -> bytes:
        body = asdict(self)
        for flag in ("evolve", "end_marker"):
            if not body[flag]:
                body[flag] = None
        return encode(body)


def parse_write(raw: bytes, limit: int = MAX_REQUEST_BYTES) -> WriteRequest:
    """A `do_put` descriptor command."""
    body = decode(raw, "write descriptor", limit)
    kind = body.get("kind", "write")
    if kind != "write":
        raise ProtocolError(f"write descriptor: unknown kind {kind!r}; expected 'write'")
    return WriteRequest.from_body(body)


@dataclass(frozen=True)
class WriteResult(Reply):
    """The `do_put` reply (PutResult metadata): the one snapshot the write committed, or the original
    one when a retried `write_id` had already been committed (`duplicate`)."""

    table: str
    snapshot_id: int
    rows: int
    files: int
    write_id: str | None = None
    duplicate: bool = False


END_OF_STREAM_KEY = "end_of_stream"


def end_marker(rows: int) -> bytes:
    """The metadata message a writer sends after its last batch, and a `do_exchange` client after its last
    entity batch (see docs/protocol.md)."""
    return json.dumps({END_OF_STREAM_KEY: True, "rows": rows}).encode()


def parse_end_marker(raw: bytes, what: str = "write") -> int:
    """Rows the client says it sent on its `what` stream; raises ProtocolError on anything else."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"{what} stream: app metadata is not valid JSON") from None
    if not isinstance(body, dict) or body.get(END_OF_STREAM_KEY) is not True:
        raise ProtocolError(f"{what} stream: unexpected app metadata {body!r}; expected the end-of-stream marker")
    rows = body.get("rows")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ProtocolError(f"{what} stream: end-of-stream marker needs a non-negative integer 'rows'")
    return rows
