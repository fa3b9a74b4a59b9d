"""Point-in-time correct training sets: entity rows joined to features as they were known then.

For every entity row and feature table, the row chosen has equal keys (a null key matches
nothing), an event time at or before the entity's timestamp and, when the table has a TTL, no
older than the TTL; the latest event time wins, ties go to the latest created time, and ties on that too
to the row committed last (the later file in commit order, then the later row in its file). One row
comes out per entity row, in input order, with every entity column unchanged.

Two ways to run it, same answer. Usually each feature table's snapshot is sorted once into an
`AsofIndex` (asof.py, cached between requests) and entity rows are answered batch by batch with a
binary search and a `take`. The tables too large for that cache are joined by one DuckDB query
(and the others through their indexes, on its batches): a chain of ASOF LEFT JOINs, where the
tie-breaks ride in the single ASOF inequality as an (event time, created time, commit order) struct,
the last from each row's file (`filename`, ranked by a registered table) and its row number in it,
and the TTL nulls matches that are too old.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
from duckdb import sqltypes
from duckdb.func import FunctionNullHandling, PythonUDFType
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import BucketTransform

from flight_server.base.filters import parse_filter, quote
from flight_server.base.schemas import table_arrow_schema
from flight_server.base.shards import UNBUCKETED_SLOTS, key_slots, owned, shardable
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, feature_spec, table_name
from flight_server.iceberg.snapshots import read_schema, resolve_snapshot, ticket_schema_id
from flight_server.wire.errors import NotFoundError, RequestError
from flight_server.wire.reads import (
    SHARD_SLOTS_MAX,
    HistoricalRequest,
    KeyShare,
    dictionary_values,
    parse_feature_ref,
    values_type,
)

SNAPSHOTS_METADATA_KEY = b"flight.snapshots"

Rows = TypeVar("Rows", pa.RecordBatch, pa.Table)


@dataclass(frozen=True)
class FeatureGroup:
    """The features a request takes from one table, at one snapshot."""

    table: Table
    spec: FeatureSpec
    snapshot_id: int | None
    features: list[str]
    types: list[pa.DataType]
    key_types: list[pa.DataType]
    read: Schema  # the schema read (`read_schema`): the table's current one, the snapshot's for time travel

    @property
    def name(self) -> str:
        return table_name(self.table)


def partition_expression(alias: str, keys: tuple[str, ...], types: list[pa.DataType]) -> str:
    """`hash(keys) % ?`, a row's part, over keys cast to one type per kind, so that an int32 entity key and
    an int64 feature key of equal value land in the same part."""
    cast = [
        f"CAST({alias}{quote(k)} AS BIGINT)" if pa.types.is_integer(t) else f"{alias}{quote(k)}"
        for k, t in zip(keys, types, strict=True)
    ]
    return f"hash({', '.join(cast)}) % ?"


def partition_predicate(alias: str, keys: tuple[str, ...], types: list[pa.DataType]) -> str:
    """`hash(keys) % ? = ?`: the rows of one part (`partition_expression`)."""
    return partition_expression(alias, keys, types) + " = ?"


def _slot_function(keys: pa.ChunkedArray, slots: pa.ChunkedArray) -> pa.Array:
    return pa.array(key_slots(keys, slots[0].as_py() if len(slots) else 1), pa.int64())


_SLOT_FUNCTIONS = {"__pit_slot_int": sqltypes.BIGINT, "__pit_slot_text": sqltypes.VARCHAR}


def slot_functions(cursor: duckdb.DuckDBPyConnection) -> None:
    """Give the cursor's database the SQL form of `key_slots` (one function per key kind), so that DuckDB splits
    rows exactly as the sorted indexes do; defined once per database, for all its cursors."""
    for name, kind in _SLOT_FUNCTIONS.items():
        with contextlib.suppress(duckdb.CatalogException):  # defined by an earlier request
            cursor.create_function(
                name,
                _slot_function,
                [kind, sqltypes.INTEGER],
                sqltypes.BIGINT,
                type=PythonUDFType.ARROW,
                null_handling=FunctionNullHandling.SPECIAL,  # a null key has a slot too (`key_slots`)
            )


def share_predicate(alias: str, share: KeyShare, kind: pa.DataType) -> tuple[str, list[Any]]:
    """`slot(key) IN (owned...)` for the rows of a share, in the SQL form of `key_slots` (`slot_functions`)."""
    if pa.types.is_integer(kind):
        key, function = f"CAST({alias}{quote(share.key)} AS BIGINT)", "__pit_slot_int"
    else:
        key, function = f"CAST({alias}{quote(share.key)} AS VARCHAR)", "__pit_slot_text"
    marks = ", ".join("?" for _ in share.owned)
    return f"{function}({key}, CAST(? AS INTEGER)) IN ({marks})", [share.slots, *share.owned]


@dataclass(frozen=True)
class HistoricalPlan:
    """A checked training-set request: where entities come from, and what joins to them."""

    request: HistoricalRequest
    entity_schema: pa.Schema
    groups: list[FeatureGroup]
    columns: list[tuple[int, int, str]]  # per requested feature: group, feature index, output name
    entity_table: Table | None = None
    entity_snapshot_id: int | None = None
    entity_filter: BooleanExpression = field(default_factory=AlwaysTrue)
    entity_read: Schema | None = None  # the entity table's schema read (`read_schema`)
    apply_ttl: bool = True
    # What DuckDB's `iceberg_scan` reads for each table's metadata location (`Engine.metadata_file`), set with the
    # credentials (`join.use_storage`) before any query of the plan.
    metadata_files: dict[str, str] = field(default_factory=dict)

    def metadata_file(self, table: Table) -> str:
        return self.metadata_files[table.metadata_location]

    def snapshots(self) -> dict[str, Any]:
        """What the result was computed from; passing these back reproduces it exactly: the snapshots as
        `snapshot_ids`, and the schemas read as `schema_ids` (a schema change commits no snapshot, and a pinned
        snapshot alone reads in its own schema)."""
        entities = None
        if self.entity_table is not None:
            assert self.entity_read is not None, "planned with the entity table"
            entities = {
                "table": table_name(self.entity_table),
                "snapshot_id": self.entity_snapshot_id,
                "schema_id": self.entity_read.schema_id,
            }
        return {
            "features": {g.name: g.snapshot_id for g in self.groups},
            "schema_ids": {g.name: g.read.schema_id for g in self.groups},
            "entities": entities,
        }

    def entity_rows(self, rows: Rows) -> Rows:
        """Entity rows as the sorted indexes join them: categorical (dictionary-encoded) key columns as their
        values, the plan's types (Arrow cannot compare polars' `dictionary<string_view>`; DuckDB reads any)."""
        for i, wanted in enumerate(self.entity_schema):
            column = rows.column(i)
            if column.type != wanted.type and pa.types.is_dictionary(column.type):
                rows = rows.set_column(i, wanted, dictionary_values(column))
        return rows

    def share(self, group: FeatureGroup) -> KeyShare | None:
        """The share of `group`'s rows this part joins (the request's `shard`), or None: all its rows, when the
        part is not a share or the table is not keyed by the share's key."""
        share = self.request.shard
        if share is None or share.key not in group.spec.entity_keys:
            return None
        return share if shardable(group.key_types[group.spec.entity_keys.index(share.key)]) else None

    @cached_property  # asked for by every joined batch
    def schema(self) -> pa.Schema:
        fields = list(self.entity_schema)
        for group_index, feature_index, name in self.columns:
            fields.append(pa.field(name, self.groups[group_index].types[feature_index]))
        metadata = {SNAPSHOTS_METADATA_KEY: json.dumps(self.snapshots()).encode()}
        return pa.schema(fields, metadata=metadata)


def _compatible(entity: pa.DataType, feature: pa.DataType) -> bool:
    """Key types that join without surprises (DuckDB casts within these families)."""
    families = (
        pa.types.is_integer,
        pa.types.is_string,
        pa.types.is_large_string,
        pa.types.is_timestamp,
        pa.types.is_date,
        pa.types.is_binary,
        pa.types.is_decimal,
    )
    if entity == feature:
        return True
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    if any(t(entity) for t in text) and any(t(feature) for t in text):
        return True
    return any(family(entity) and family(feature) for family in families)


def plan_historical(
    catalog: FeatureCatalog, request: HistoricalRequest, entity_schema: pa.Schema | None = None, empty: bool = False
) -> HistoricalPlan:
    """Check the request against the catalog and the entity columns; nothing is read yet. `empty` says the entity
    rows are known to be none (inline rows of empty lists): their untyped (null) key columns then take the keys'
    types, where a null column of rows is refused, since it is most likely a mistake."""
    entity_table = entity_snapshot = entity_read = None
    entity_filter: BooleanExpression = AlwaysTrue()
    source = request.entities
    pins = _pins(catalog, request)
    if source is not None and source.table is not None:
        pinned = pins.get(_full_name(catalog, source.table), source.snapshot_id)
        entity_table = catalog.read_snapshot(source.table, pinned)
        entity_snapshot = resolve_snapshot(entity_table, pinned, None)
        entity_read = read_schema(entity_table, entity_snapshot, pinned is not None, source.schema_id)
        entity_schema = table_arrow_schema(entity_read)
        entity_filter = parse_filter(source.filter, entity_read)
    if entity_schema is None:
        raise RequestError("a historical request needs entity rows: a table, inline rows, or a do_exchange stream")
    for name in entity_schema.names:
        if name.startswith("__pit_"):
            raise RequestError(f"entity column {name!r}: names starting with '__pit_' are reserved")
    time_index = entity_schema.get_field_index(request.entity_time)
    if time_index < 0:
        raise RequestError(
            f"the entity rows have no timestamp column {request.entity_time!r} "
            f"(columns: {entity_schema.names}); name it with entity_time"
        )
    if not pa.types.is_timestamp(entity_schema.field(time_index).type):
        raise RequestError(
            f"entity column {request.entity_time!r} must be a timestamp, got {entity_schema.field(time_index).type}"
        )

    groups: list[FeatureGroup] = []
    by_table: dict[str, int] = {}
    columns: list[tuple[int, int, str]] = []
    as_of = request.as_of
    for ref in request.features:
        table_ref, feature = parse_feature_ref(ref)
        table = catalog.read_snapshot(table_ref, pins.get(_full_name(catalog, table_ref)))
        name = table_name(table)
        if name not in by_table:
            pinned = pins.get(name)
            snapshot_id = resolve_snapshot(table, pinned, None if pinned is not None else as_of)
            travel = pinned is not None or as_of is not None
            read = read_schema(table, snapshot_id, travel, (request.schema_ids or {}).get(name))
            spec = replace(feature_spec(table, read), schema_id=read.schema_id)
            for key in spec.entity_keys:
                if entity_schema.get_field_index(key) < 0:
                    raise RequestError(
                        f"the entity rows lack key column {key!r} of {name!r} (columns: {entity_schema.names})"
                    )
            schema = table_arrow_schema(read)
            for key in spec.entity_keys:
                entity_type, feature_type = entity_schema.field(key).type, schema.field(key).type
                if pa.types.is_dictionary(entity_type):  # a categorical column: joined by its values
                    entity_type = values_type(entity_type)
                if not (_compatible(entity_type, feature_type) or (empty and pa.types.is_null(entity_type))):
                    raise RequestError(
                        f"entity column {key!r} is {entity_type} but {name!r} keys it as {feature_type}; cast it first"
                    )
            by_table[name] = len(groups)
            key_types = [schema.field(k).type for k in spec.entity_keys]
            groups.append(FeatureGroup(table, spec, snapshot_id, [], [], key_types, read))
        group = groups[by_table[name]]
        schema = table_arrow_schema(group.read)
        if schema.get_field_index(feature) < 0:
            raise NotFoundError(f"feature {ref!r}: {name!r} has no column {feature!r} (columns: {schema.names})")
        if feature not in group.features:
            group.features.append(feature)
            group.types.append(schema.field(feature).type)
        columns.append((by_table[name], group.features.index(feature), feature))
    if request.full_feature_names:
        labels = table_labels([g.name for g in groups])
        columns = [(i, j, f"{labels[groups[i].name]}__{feature}") for i, j, feature in columns]

    entity_schema = _keyed(entity_schema, groups)
    if request.shard is not None:
        _check_shard(request.shard, entity_table is not None, entity_schema)
    names = entity_schema.names + [c[2] for c in columns]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        hint = "" if request.full_feature_names else "; full_feature_names=true prefixes features with their table"
        raise RequestError(f"output column name(s) {clashes} would appear twice{hint}")
    return HistoricalPlan(
        request, entity_schema, groups, columns, entity_table, entity_snapshot, entity_filter, entity_read=entity_read
    )


def table_labels(names: list[str]) -> dict[str, str]:
    """What output columns call each of a request's tables (`<label>__<column>`: full feature names, an online
    answer's event times): its name without the namespace, or with it when another of the tables has the same
    one (`drivers.stats` and `riders.stats`), so that no two tables' columns share a name."""
    short = [name.split(".")[-1] for name in names]
    return {name: s if short.count(s) == 1 else name for name, s in zip(names, short, strict=True)}


def _keyed(entity_schema: pa.Schema, groups: list[FeatureGroup]) -> pa.Schema:
    """The entity columns as the plan takes them: its categorical (dictionary-encoded) keys as their values, which
    the join compares and the answer carries, and untyped (null) keys, which `plan_historical` lets through only
    when there are no rows, as the first table keys them."""
    key_types: dict[str, pa.DataType] = {}
    for group in groups:
        for key, kind in zip(group.spec.entity_keys, group.key_types, strict=True):
            key_types.setdefault(key, kind)
    fields = []
    for f in entity_schema:
        if f.name in key_types and pa.types.is_dictionary(f.type):
            f = f.with_type(values_type(f.type))
        elif f.name in key_types and pa.types.is_null(f.type):
            f = f.with_type(key_types[f.name])
        fields.append(f)
    return pa.schema(fields, metadata=entity_schema.metadata)


def _check_shard(share: KeyShare, entity_table: bool, entity_schema: pa.Schema) -> None:
    if not entity_table:
        raise RequestError("'shard' splits a training set over an entity table; these entity rows are not one")
    index = entity_schema.get_field_index(share.key)
    if index < 0 or not shardable(entity_schema.field(index).type):
        raise RequestError(f"'shard' key {share.key!r} must be an integer or text entity column")


def table_slots(table: Table, key: str) -> int:
    """The slots a table's keys are shared out by: its buckets when its partition spec buckets `key` (so a
    share is whole buckets), else `UNBUCKETED_SLOTS`."""
    field_id = table.schema().find_field(key).field_id
    for part in table.spec().fields:
        transform = part.transform
        if part.source_id == field_id and isinstance(transform, BucketTransform):
            return transform.num_buckets if transform.num_buckets <= SHARD_SLOTS_MAX else UNBUCKETED_SLOTS
    return UNBUCKETED_SLOTS


def _full_name(catalog: FeatureCatalog, table: str) -> str:
    return ".".join(catalog.identifier(table))


def _pins(catalog: FeatureCatalog, request: HistoricalRequest) -> dict[str, int]:
    """`snapshot_ids` by full table name, each a table the request uses: a pin of any other table would pin
    nothing, and a typo would silently give an unpinned, irreproducible training set."""
    pins: dict[str, int] = {}
    for table, snapshot_id in (request.snapshot_ids or {}).items():
        name = _full_name(catalog, table)
        if pins.setdefault(name, snapshot_id) != snapshot_id:
            raise RequestError(f"snapshot_ids pin {name!r} twice, to different snapshots")
    used = [_full_name(catalog, parse_feature_ref(ref)[0]) for ref in request.features]
    if request.entities is not None and request.entities.table is not None:
        used.append(_full_name(catalog, request.entities.table))
    unknown = sorted(set(pins) - set(used))
    if unknown:
        raise RequestError(
            f"snapshot_ids pin table(s) {unknown} that this request does not use; it uses {sorted(set(used))}"
        )
    return pins


def endpoint_requests(
    plan: HistoricalPlan, partitions: int, replicas: list[str] | None = None
) -> list[tuple[HistoricalRequest, int | None]]:
    """Tickets for the parts of a training set (snapshots pinned, entity keys split by hash), each with the
    index in `replicas` of the replica that owns its keys (None: any).

    Split over several `replicas`, the parts are the replicas' shares of the first feature table's first key
    (`base/shards.py`), at least one per replica that owns keys, so each replica joins (and caches) only its
    share of every table keyed alike. Their union is exactly the whole result, so clients may fetch them in
    parallel; any replica answers any of them.
    """
    request = plan.request
    pins = {g.name: g.snapshot_id for g in plan.groups if g.snapshot_id is not None}
    # Each schema read, unless it is its pinned snapshot's own (`ticket_schema_id`): the ticket then stays readable
    # by the previous release. `end_marker` is for do_exchange, never a ticket's.
    schemas = {g.name: s for g in plan.groups if (s := ticket_schema_id(g.table, g.snapshot_id, g.read)) is not None}
    entities = request.entities
    if entities is not None and entities.table is not None:
        assert plan.entity_table is not None and plan.entity_read is not None, "planned with the entity table"
        schema_id = ticket_schema_id(plan.entity_table, plan.entity_snapshot_id, plan.entity_read)
        entities = replace(entities, snapshot_id=plan.entity_snapshot_id, schema_id=schema_id)
    else:
        partitions = 1
    base = replace(
        request,
        entities=entities,
        snapshot_ids=pins,
        schema_ids=schemas or None,
        as_of=None,
        partitions=None,
        shard=None,
        end_marker=False,
    )
    key = plan.groups[0].spec.entity_keys[0]
    if partitions == 1 or replicas is None or len(replicas) < 2 or not _shardable_key(plan, key):
        return [(replace(base, partition=[i, partitions] if partitions > 1 else None), None) for i in range(partitions)]
    slots = table_slots(plan.groups[0].table, key)
    shares = owned(replicas, slots)
    holders = [r for r, share in enumerate(shares) if share]
    total = max(partitions, len(holders))
    parts: list[tuple[HistoricalRequest, int | None]] = []
    for n, holder in enumerate(holders):
        count = total // len(holders) + (1 if n < total % len(holders) else 0)
        share = KeyShare(key, slots, tuple(shares[holder]))
        for i in range(count):
            parts.append((replace(base, shard=share, partition=[i, count] if count > 1 else None), holder))
    return parts


def _shardable_key(plan: HistoricalPlan, key: str) -> bool:
    """Whether entity rows can be shared out by `key`: an integer or text key on both sides."""
    return shardable(plan.entity_schema.field(key).type) and shardable(plan.groups[0].key_types[0])
