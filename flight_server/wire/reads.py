"""Read requests on the wire: scans, training sets (historical) and online lookups."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from flight_server.wire.codec import (
    INT64_MAX,
    MAX_REQUEST_BYTES,
    Fields,
    decode,
    encode,
    format_timestamp,
    parse_snapshot_id,
    parse_timestamp,
)
from flight_server.wire.errors import ProtocolError, UnknownFieldsError

MAX_INLINE_ENTITIES = 10_000
# Arrow IPC body codecs a reader may ask results in (`compression`): for networks slower than the codec.
COMPRESSIONS = ("lz4", "zstd")

SHARD_SLOTS_MAX = 4096  # slots a ticket's share may be out of (it lists the ones it owns)


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
    compression: str | None = None
    since_snapshot: int | None = None  # only the rows appended after this snapshot, up to the one read
    schema_id: int | None = None  # set in endpoint tickets: the schema the read was planned in (`read_schema`)
    kind: str = field(default="scan", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ScanRequest:
        f = Fields(
            body,
            "scan request",
            {
                "table",
                "columns",
                "filter",
                "snapshot_id",
                "as_of",
                "limit",
                "partitions",
                "part",
                "compression",
                "since_snapshot",
                "schema_id",
            },
        )
        as_of = body.get("as_of")
        if as_of is not None:
            as_of = format_timestamp(parse_timestamp(as_of, "scan request: field 'as_of'"))
        request = cls(
            table=f.required_str("table"),
            columns=f.str_list("columns"),
            filter=f.str("filter"),
            snapshot_id=f.snapshot_id("snapshot_id"),
            as_of=as_of,
            limit=f.int("limit"),
            partitions=f.int("partitions", minimum=1),
            part=f.part("part"),
            compression=f.choice("compression", COMPRESSIONS),
            since_snapshot=f.snapshot_id("since_snapshot"),
            schema_id=f.int("schema_id"),
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
    schema_id: int | None = None  # set in endpoint tickets: the schema the entity table was read in

    @classmethod
    def from_body(cls, body: Any) -> EntitySource:
        if not isinstance(body, dict):
            raise ProtocolError("historical request: field 'entities' must be an object")
        f = Fields(body, "historical request: entities", {"table", "filter", "snapshot_id", "rows", "schema_id"})
        rows = body.get("rows")
        source = cls(f.str("table"), f.str("filter"), f.snapshot_id("snapshot_id"), rows, f.int("schema_id"))
        if (source.table is None) == (rows is None):
            raise ProtocolError("historical request: 'entities' needs either 'table' or 'rows'")
        if rows is not None:
            if not isinstance(rows, dict) or not rows or not all(isinstance(v, list) for v in rows.values()):
                raise ProtocolError("historical request: 'entities.rows' must map column names to lists of values")
            if len({len(v) for v in rows.values()}) != 1:
                raise ProtocolError("historical request: the lists in 'entities.rows' must have equal lengths")
            if source.filter is not None or source.snapshot_id is not None or source.schema_id is not None:
                raise ProtocolError(
                    "historical request: 'filter', 'snapshot_id' and 'schema_id' apply to an entity table only"
                )
        return source


@dataclass(frozen=True)
class KeyShare:
    """One replica's share of a training set's keys (a ticket's `shard`): the entity rows whose `key` falls in
    one of the `owned` slots of `slots` (Iceberg's bucket transform), joined to the same share of each feature
    table keyed by `key`."""

    key: str
    slots: int
    owned: tuple[int, ...]

    @classmethod
    def from_body(cls, body: Any) -> KeyShare:
        if not isinstance(body, dict):
            raise ProtocolError("historical request: field 'shard' must be an object")
        f = Fields(body, "historical request: shard", {"key", "slots", "owned"})
        slots = f.int("slots", minimum=1)
        owned = body.get("owned")
        if slots is None or slots > SHARD_SLOTS_MAX:
            raise ProtocolError(f"historical request: 'shard.slots' must be an integer from 1 to {SHARD_SLOTS_MAX}")
        if (
            not isinstance(owned, list)
            or not owned
            or not all(type(v) is int and 0 <= v < slots for v in owned)
            or owned != sorted(set(owned))
        ):
            raise ProtocolError(
                f"historical request: 'shard.owned' must list distinct slots from 0 to {slots - 1}, ascending"
            )
        return cls(f.required_str("key"), slots, tuple(owned))


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
    schema_ids: dict[str, int] | None = None  # set in endpoint tickets: each table's schema read (`read_schema`)
    compression: str | None = None
    shard: KeyShare | None = None
    end_marker: bool = False
    kind: str = field(default="historical", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> HistoricalRequest:
        f = Fields(
            body,
            "historical request",
            {
                "features",
                "entities",
                "entity_time",
                "full_feature_names",
                "snapshot_ids",
                "schema_ids",
                "as_of",
                "partitions",
                "partition",
                "compression",
                "shard",
                "end_marker",
            },
        )
        features = f.str_list("features")
        if not features:
            raise ProtocolError("historical request: field 'features' must list at least one 'table:feature'")
        for ref in features:
            parse_feature_ref(ref)
        snapshot_ids = body.get("snapshot_ids")
        if snapshot_ids is not None:
            if not isinstance(snapshot_ids, dict):
                raise ProtocolError("historical request: 'snapshot_ids' must map table names to snapshot ids")
            snapshot_ids = {
                table: parse_snapshot_id(value, f"historical request: 'snapshot_ids' of {table!r}")
                for table, value in snapshot_ids.items()
            }
        schema_ids = body.get("schema_ids")
        if schema_ids is not None and not (
            isinstance(schema_ids, dict)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT64_MAX for v in schema_ids.values())
        ):
            raise ProtocolError("historical request: 'schema_ids' must map table names to schema ids")
        as_of = body.get("as_of")
        if as_of is not None:
            as_of = format_timestamp(parse_timestamp(as_of, "historical request: field 'as_of'"))
        entities, shard = body.get("entities"), body.get("shard")
        return cls(
            features=features,
            entities=EntitySource.from_body(entities) if entities is not None else None,
            entity_time=f.str("entity_time") or "event_timestamp",
            full_feature_names=f.bool("full_feature_names"),
            snapshot_ids=snapshot_ids,
            schema_ids=schema_ids,
            as_of=as_of,
            partitions=f.int("partitions", minimum=1),
            partition=f.part("partition"),
            compression=f.choice("compression", COMPRESSIONS),
            shard=KeyShare.from_body(shard) if shard is not None else None,
            end_marker=f.bool("end_marker"),
        )

    def to_bytes(self) -> bytes:
        body = asdict(self)
        if self.entities is not None:
            body["entities"] = {k: v for k, v in asdict(self.entities).items() if v is not None}
        for flag in ("full_feature_names", "end_marker"):
            if not body[flag]:
                body[flag] = None
        return encode(body)


def one_batch(table: pa.Table) -> pa.RecordBatch:
    """The table as a single record batch: an online stream answers each batch of keys with one."""
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.concat_batches(batches) if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


def dictionary_values(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A dictionary-encoded column (pandas' `category`, polars' `Categorical` and `Enum`) as its values, of type
    `values_type`. Each chunk's dictionary is cast, then taken by its indices: Arrow can neither take from nor
    cast a dictionary of views (polars' `dictionary<string_view>`)."""
    kind = values_type(column.type)
    if isinstance(column, pa.ChunkedArray):
        return pa.chunked_array([c.dictionary.cast(kind).take(c.indices) for c in column.chunks], kind)
    return column.dictionary.cast(kind).take(column.indices)


def values_type(dictionary: pa.DictionaryType) -> pa.DataType:
    """The type `dictionary_values` decodes to: the dictionary's values, text as plain strings and bytes as plain
    binary, the types tables store."""
    kind = dictionary.value_type
    if pa.types.is_string_view(kind) or pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_binary_view(kind) or pa.types.is_large_binary(kind):
        return pa.binary()
    return kind


@dataclass(frozen=True)
class OnlineRequest:
    """The latest features of a few entities: keys inline (`do_get`) or streamed (`do_exchange`)."""

    features: list[str]
    entities: dict[str, list[Any]] | None = None
    full_feature_names: bool = False
    as_of: str | None = None
    request_time: str | None = None
    apply_ttl: bool = True
    end_marker: bool = False
    kind: str = field(default="online", init=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> OnlineRequest:
        f = Fields(
            body,
            "online request",
            {"features", "entities", "full_feature_names", "as_of", "request_time", "apply_ttl", "end_marker"},
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
        return cls(
            features,
            entities,
            f.bool("full_feature_names"),
            times["as_of"],
            times["request_time"],
            apply_ttl,
            f.bool("end_marker"),
        )

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
                "end_marker": self.end_marker or None,
            }
        )


def parse_ticket(
    raw: bytes, what: str = "ticket", limit: int = MAX_REQUEST_BYTES
) -> ScanRequest | HistoricalRequest | OnlineRequest:
    """A `do_get` ticket or `get_flight_info` command; its `kind` chooses the query."""
    body = decode(raw, what, limit)
    kind = body.get("kind", "scan")
    try:
        if kind == "scan":
            return ScanRequest.from_body(body)
        if kind == "historical":
            return HistoricalRequest.from_body(body)
        if kind == "online":
            return OnlineRequest.from_body(body)
    except UnknownFieldsError as exc:
        if what != "ticket":
            raise
        # Servers mint tickets that an older release reads whenever the answer allows (docs/protocol.md,
        # "Compatibility"): one that it cannot read came from a newer replica, or was written by hand.
        raise UnknownFieldsError(f"{exc}. {NEWER_TICKET}") from None
    raise ProtocolError(f"{what}: unknown kind {kind!r}; expected 'scan', 'historical' or 'online'")


NEWER_TICKET = (
    "If this ticket came from get_flight_info, a replica of a newer release made it (a rolling upgrade in progress): "
    "ask get_flight_info again, or read it from a replica of that release"
)
