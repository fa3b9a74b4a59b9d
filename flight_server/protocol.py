"""The wire protocol: JSON tickets, descriptors and action bodies, versioned.

Both the server and `flight_client` build and parse requests here, so the two can never
disagree about a field. `docs/protocol.md` describes the same format for clients written in
other languages.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20
MAX_INLINE_ENTITIES = 10_000
# A `do_exchange` online lookup kept open between lookups carries this header (value "1"): it waits on
# its client by design, so it holds no slot of the concurrency limits and the idle timeout spares it.
ONLINE_SESSION_HEADER = "x-online-session"
WRITE_MODES = ("append", "overwrite")
DELETE_MODES = ("copy-on-write", "merge-on-read")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")
_PIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class ProtocolError(ValueError):
    """A request that is not well formed; the message says what is wrong."""


class RequestTooLargeError(ProtocolError):
    """A request above the size limit: stream its rows (`do_exchange`) instead of sending them inline."""


def parse_table_name(name: Any, default_namespace: str = "default") -> tuple[str, ...]:
    """Split `ns.table` (or `table`, which lands in the default namespace) into an identifier."""
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise ProtocolError(f"invalid table name {name!r}: use 'namespace.table' with letters, digits, '_' or '-'")
    parts = tuple(name.split("."))
    return parts if len(parts) > 1 else (default_namespace, parts[0])


def parse_timestamp(value: Any, what: str) -> dt.datetime:
    """An ISO-8601 string or epoch milliseconds, as an aware UTC datetime (naive means UTC)."""
    if isinstance(value, bool):
        raise ProtocolError(f"{what} must be an ISO-8601 timestamp or epoch milliseconds, got {value!r}")
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value / 1000, tz=dt.timezone.utc)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ProtocolError(f"{what} is not an ISO-8601 timestamp: {value!r}") from None
        return parsed.replace(tzinfo=dt.timezone.utc) if parsed.tzinfo is None else parsed
    raise ProtocolError(f"{what} must be an ISO-8601 timestamp or epoch milliseconds, got {value!r}")


def format_timestamp(value: dt.datetime) -> str:
    """ISO-8601 in UTC, the form the protocol sends."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()


def decode(raw: bytes, what: str, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Parse a JSON request body, checking size (at most `limit` bytes), shape and protocol version."""
    if len(raw) > limit:
        raise RequestTooLargeError(
            f"{what} is {len(raw)} bytes; this server accepts at most {limit} bytes inline: "
            "stream entity rows with do_exchange instead"
        )
    if not raw:
        raise ProtocolError(f"{what} is empty: expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(body).__name__}")
    version = body.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} has protocol version {version!r}; this server speaks {PROTOCOL_VERSION}")
    return body


def encode(body: dict[str, Any]) -> bytes:
    """Serialise a request or reply, dropping unset optional fields."""
    return json.dumps({"v": PROTOCOL_VERSION, **{k: v for k, v in body.items() if v is not None}}).encode()


class _Fields:
    """Typed access to a request's fields, with errors that name the field."""

    def __init__(self, body: dict[str, Any], what: str, allowed: set[str]):
        unknown = sorted(set(body) - allowed - {"v", "kind"})
        if unknown:
            raise ProtocolError(f"{what}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        self.body, self.what = body, what

    def _bad(self, name: str, expected: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: field {name!r} must be {expected}, got {self.body[name]!r}")

    def str(self, name: str, required: bool = False) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise ProtocolError(f"{self.what}: field {name!r} is required")
            return None
        if not isinstance(value, str) or not value:
            raise self._bad(name, "a non-empty string")
        return value

    def int(self, name: str, minimum: int = 0) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(name, f"an integer >= {minimum}")
        return value

    def bool(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def str_list(self, name: str) -> list[str] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._bad(name, "a list of non-empty strings")
        if len(set(value)) != len(value):
            raise self._bad(name, "a list without duplicates")
        return value

    def part(self, name: str) -> list[int] | None:
        """`[index, count]`: one of `count` endpoint shares of a result."""
        value = self.body.get(name)
        if value is None:
            return None
        if not (
            isinstance(value, list)
            and len(value) == 2
            and all(type(v) is int for v in value)
            and 0 <= value[0] < value[1]
        ):
            raise self._bad(name, "[index, count] with 0 <= index < count")
        return value


@dataclass(frozen=True)
class ScanRequest:
    """`do_get` / `get_flight_info` request for rows of one table."""

    table: str
    columns: list[str] | None = None
    filter: str | None = None
    snapshot_id: int | None = None
    as_of: str | None = None
    limit: int | None = None
    partitions: int | None = None
    part: list[int] | None = None
    kind: str = field(default="scan", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ScanRequest:
        f = _Fields(
            body, "scan request", {"table", "columns", "filter", "snapshot_id", "as_of", "limit", "partitions", "part"}
        )
        as_of = body.get("as_of")
        if as_of is not None:
            as_of = format_timestamp(parse_timestamp(as_of, "scan request: field 'as_of'"))
        request = cls(
            table=f.str("table", required=True),  # type: ignore[arg-type]
            columns=f.str_list("columns"),
            filter=f.str("filter"),
            snapshot_id=f.int("snapshot_id", minimum=-(1 << 63)),
            as_of=as_of,
            limit=f.int("limit"),
            partitions=f.int("partitions", minimum=1),
            part=f.part("part"),
        )
        if request.snapshot_id is not None and request.as_of is not None:
            raise ProtocolError("scan request: give either 'snapshot_id' or 'as_of', not both")
        if request.partitions is not None and request.part is not None:
            raise ProtocolError(
                "scan request: 'partitions' asks get_flight_info for endpoints and 'part' names one of them: not both"
            )
        return request

    def to_bytes(self) -> bytes:
        return encode(asdict(self))


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
        f = _Fields(
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
            table=f.str("table", required=True),  # type: ignore[arg-type]
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


def parse_feature_ref(ref: str) -> tuple[str, str]:
    """`namespace.table:feature` into (table, feature)."""
    table, sep, feature = ref.rpartition(":")
    if not sep or not table or not feature:
        raise ProtocolError(
            f"feature reference {ref!r} is not of the form 'table:feature' (or 'namespace.table:feature')"
        )
    return table, feature


@dataclass(frozen=True)
class EntitySource:
    """Where a training set's entity rows come from: a table on the server, or rows inline."""

    table: str | None = None
    filter: str | None = None
    snapshot_id: int | None = None
    rows: dict[str, list[Any]] | None = None

    @classmethod
    def from_body(cls, body: Any) -> EntitySource:
        if not isinstance(body, dict):
            raise ProtocolError("historical request: field 'entities' must be an object")
        f = _Fields(body, "historical request: entities", {"table", "filter", "snapshot_id", "rows"})
        rows = body.get("rows")
        source = cls(f.str("table"), f.str("filter"), f.int("snapshot_id", minimum=-(1 << 63)), rows)
        if (source.table is None) == (rows is None):
            raise ProtocolError("historical request: 'entities' needs either 'table' or 'rows'")
        if rows is not None:
            if not isinstance(rows, dict) or not rows or not all(isinstance(v, list) for v in rows.values()):
                raise ProtocolError("historical request: 'entities.rows' must map column names to lists of values")
            if len({len(v) for v in rows.values()}) != 1:
                raise ProtocolError("historical request: the lists in 'entities.rows' must have equal lengths")
            if source.filter is not None or source.snapshot_id is not None:
                raise ProtocolError("historical request: 'filter' and 'snapshot_id' apply to an entity table only")
        return source


@dataclass(frozen=True)
class HistoricalRequest:
    """A point-in-time correct training set: entity rows joined to features as of their timestamps."""

    features: list[str]
    entities: EntitySource | None = None
    entity_time: str = "event_timestamp"
    full_feature_names: bool = False
    snapshot_ids: dict[str, int] | None = None
    as_of: str | None = None
    partitions: int | None = None
    partition: list[int] | None = None
    kind: str = field(default="historical", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> HistoricalRequest:
        f = _Fields(
            body,
            "historical request",
            {
                "features",
                "entities",
                "entity_time",
                "full_feature_names",
                "snapshot_ids",
                "as_of",
                "partitions",
                "partition",
            },
        )
        features = f.str_list("features")
        if not features:
            raise ProtocolError("historical request: field 'features' must list at least one 'table:feature'")
        for ref in features:
            parse_feature_ref(ref)
        snapshot_ids = body.get("snapshot_ids")
        if snapshot_ids is not None and not (
            isinstance(snapshot_ids, dict)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in snapshot_ids.values())
        ):
            raise ProtocolError("historical request: 'snapshot_ids' must map table names to snapshot ids")
        as_of = body.get("as_of")
        if as_of is not None:
            as_of = format_timestamp(parse_timestamp(as_of, "historical request: field 'as_of'"))
        entities = body.get("entities")
        return cls(
            features=features,
            entities=EntitySource.from_body(entities) if entities is not None else None,
            entity_time=f.str("entity_time") or "event_timestamp",
            full_feature_names=f.bool("full_feature_names"),
            snapshot_ids=snapshot_ids,
            as_of=as_of,
            partitions=f.int("partitions", minimum=1),
            partition=f.part("partition"),
        )

    def to_bytes(self) -> bytes:
        body = asdict(self)
        if self.entities is not None:
            body["entities"] = {k: v for k, v in asdict(self.entities).items() if v is not None}
        if not body["full_feature_names"]:
            body["full_feature_names"] = None
        return encode(body)


def one_batch(table: pa.Table) -> pa.RecordBatch:
    """The table as a single record batch: an online stream answers each batch of keys with one."""
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.concat_batches(batches) if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


@dataclass(frozen=True)
class OnlineRequest:
    """The latest features of a few entities: keys inline (`do_get`) or streamed (`do_exchange`)."""

    features: list[str]
    entities: dict[str, list[Any]] | None = None
    full_feature_names: bool = False
    as_of: str | None = None
    request_time: str | None = None
    apply_ttl: bool = True
    kind: str = field(default="online", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> OnlineRequest:
        f = _Fields(
            body, "online request", {"features", "entities", "full_feature_names", "as_of", "request_time", "apply_ttl"}
        )
        features = f.str_list("features")
        if not features:
            raise ProtocolError("online request: field 'features' must list at least one 'table:feature'")
        for ref in features:
            parse_feature_ref(ref)
        entities = body.get("entities")
        if entities is not None:
            if (
                not isinstance(entities, dict)
                or not entities
                or not all(isinstance(k, str) and isinstance(v, list) for k, v in entities.items())
            ):
                raise ProtocolError("online request: 'entities' must map key columns to lists of values")
            lengths = {len(v) for v in entities.values()}
            if len(lengths) != 1:
                raise ProtocolError("online request: the lists in 'entities' must have equal lengths")
            if lengths.pop() > MAX_INLINE_ENTITIES:
                raise ProtocolError(
                    f"online request: more than {MAX_INLINE_ENTITIES} entities inline; stream them with do_exchange"
                )
        times = {}
        for name in ("as_of", "request_time"):
            value = body.get(name)
            parsed = None if value is None else parse_timestamp(value, f"online request: {name!r}")
            times[name] = None if parsed is None else format_timestamp(parsed)
        apply_ttl = body.get("apply_ttl", True)
        if not isinstance(apply_ttl, bool):
            raise ProtocolError(f"online request: field 'apply_ttl' must be true or false, got {apply_ttl!r}")
        return cls(features, entities, f.bool("full_feature_names"), times["as_of"], times["request_time"], apply_ttl)

    def to_bytes(self) -> bytes:
        return encode(
            {
                "kind": self.kind,
                "features": self.features,
                "entities": self.entities,
                "full_feature_names": self.full_feature_names or None,
                "as_of": self.as_of,
                "request_time": self.request_time,
                "apply_ttl": None if self.apply_ttl else False,
            }
        )


@dataclass(frozen=True)
class TableRequest:
    """Action body naming one table (`describe`)."""

    table: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TableRequest:
        f = _Fields(body, "action body", {"table"})
        return cls(table=f.str("table", required=True))  # type: ignore[arg-type]


@dataclass(frozen=True)
class DeleteRequest:
    """`delete` action: remove the rows of some entities (`keys`) and/or matching a `filter`."""

    table: str
    keys: dict[str, list[Any]] | None = None
    filter: str | None = None
    mode: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> DeleteRequest:
        f = _Fields(body, "delete request", {"table", "keys", "filter", "mode"})
        keys = body.get("keys")
        if keys is not None:
            if (
                not isinstance(keys, dict)
                or not keys
                or not all(isinstance(k, str) and isinstance(v, list) and v for k, v in keys.items())
            ):
                raise ProtocolError("delete request: 'keys' must map key columns to non-empty lists of values")
            if len({len(v) for v in keys.values()}) != 1:
                raise ProtocolError("delete request: the lists in 'keys' must have equal lengths")
            if not all(
                v is None or (isinstance(v, (int, str)) and not isinstance(v, bool)) for vs in keys.values() for v in vs
            ):
                raise ProtocolError("delete request: key values must be integers, strings or null")
        mode = f.str("mode")
        if mode is not None and mode not in DELETE_MODES:
            raise ProtocolError(f"delete request: unknown mode {mode!r}; use one of {list(DELETE_MODES)}")
        request = cls(f.str("table", required=True), keys, f.str("filter"), mode)  # type: ignore[arg-type]
        if request.keys is None and request.filter is None:
            raise ProtocolError("delete request: name the rows to delete with 'keys', 'filter' or both")
        return request


@dataclass(frozen=True)
class CompactRequest:
    """`compact` action: rewrite a table's data and delete files (or those a `filter` touches) into
    well-sized data files."""

    table: str
    filter: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> CompactRequest:
        f = _Fields(body, "compact request", {"table", "filter"})
        return cls(f.str("table", required=True), f.str("filter"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ExpireRequest:
    """`expire_snapshots` action: forget snapshots older than `older_than` beyond the last `retain_last`,
    and delete the files only they used; pinned snapshots stay unless `force`."""

    table: str
    older_than: str | None = None
    retain_last: int | None = None
    force: bool = False

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ExpireRequest:
        f = _Fields(body, "expire_snapshots request", {"table", "older_than", "retain_last", "force"})
        older_than = body.get("older_than")
        if older_than is not None:
            older_than = format_timestamp(parse_timestamp(older_than, "expire_snapshots request: 'older_than'"))
        return cls(
            f.str("table", required=True),  # type: ignore[arg-type]
            older_than,
            f.int("retain_last", minimum=1),
            f.bool("force"),
        )


def _pin_name(f: _Fields, required: bool) -> str | None:
    name = f.str("name", required=required)
    if name is not None and (not _PIN_NAME.match(name) or name == "main"):
        raise ProtocolError(f"{f.what}: invalid pin name {name!r}: use letters, digits, '_', '-' or '.', not 'main'")
    return name


@dataclass(frozen=True)
class PinRequest:
    """`pin` action: keep a snapshot (default: the current one) from expiring, as an Iceberg tag `name`
    (default `pin-<snapshot id>`)."""

    table: str
    snapshot_id: int | None = None
    name: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PinRequest:
        f = _Fields(body, "pin request", {"table", "snapshot_id", "name"})
        return cls(
            f.str("table", required=True),  # type: ignore[arg-type]
            f.int("snapshot_id", minimum=-(1 << 63)),
            _pin_name(f, required=False),
        )


@dataclass(frozen=True)
class UnpinRequest:
    """`unpin` action: drop the pin (tag) `name`; the snapshot may then expire."""

    table: str
    name: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> UnpinRequest:
        f = _Fields(body, "unpin request", {"table", "name"})
        return cls(f.str("table", required=True), _pin_name(f, required=True))  # type: ignore[arg-type]


def parse_ticket(
    raw: bytes, what: str = "ticket", limit: int = MAX_REQUEST_BYTES
) -> ScanRequest | HistoricalRequest | OnlineRequest:
    """A `do_get` ticket or `get_flight_info` command; its `kind` chooses the query."""
    body = decode(raw, what, limit)
    kind = body.get("kind", "scan")
    if kind == "scan":
        return ScanRequest.from_body(body)
    if kind == "historical":
        return HistoricalRequest.from_body(body)
    if kind == "online":
        return OnlineRequest.from_body(body)
    raise ProtocolError(f"{what}: unknown kind {kind!r}; expected 'scan', 'historical' or 'online'")


def parse_write(raw: bytes, limit: int = MAX_REQUEST_BYTES) -> WriteRequest:
    """A `do_put` descriptor command."""
    body = decode(raw, "write descriptor", limit)
    kind = body.get("kind", "write")
    if kind != "write":
        raise ProtocolError(f"write descriptor: unknown kind {kind!r}; expected 'write'")
    return WriteRequest.from_body(body)


@dataclass(frozen=True)
class WriteResult:
    """The `do_put` reply (PutResult metadata): the one snapshot the write committed, or the original
    one when a retried `write_id` had already been committed (`duplicate`)."""

    table: str
    snapshot_id: int
    rows: int
    files: int
    write_id: str | None = None
    duplicate: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> WriteResult:
        return cls(**json.loads(raw))


END_OF_STREAM_KEY = "end_of_stream"


def end_marker(rows: int) -> bytes:
    """The metadata message a writer sends after its last batch (see docs/protocol.md)."""
    return json.dumps({END_OF_STREAM_KEY: True, "rows": rows}).encode()


def parse_end_marker(raw: bytes) -> int:
    """Rows the writer says it sent; raises ProtocolError on anything else."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("write stream: app metadata is not valid JSON") from None
    if not isinstance(body, dict) or body.get(END_OF_STREAM_KEY) is not True:
        raise ProtocolError(f"write stream: unexpected app metadata {body!r}; expected the end-of-stream marker")
    rows = body.get("rows")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ProtocolError("write stream: end-of-stream marker needs a non-negative integer 'rows'")
    return rows
