"""Point-in-time correct training sets: entity rows joined to features as they were known then.

For every entity row and feature table, the row chosen has equal keys (a null key matches
nothing), an event time at or before the entity's timestamp and, when the table has a TTL, no
older than the TTL; the latest event time wins and ties go to the latest created time. One row
comes out per entity row, in input order, with every entity column unchanged.

Two ways to run it, same answer. Usually each feature table's snapshot is sorted once into an
`AsofIndex` (asof.py, cached between requests) and entity rows are answered batch by batch with a
binary search and a `take`. A table too large for that cache makes the whole request one DuckDB
query: a chain of ASOF LEFT JOINs, where the created-time tie-break rides in the single ASOF
inequality as a (event time, created time) struct and the TTL nulls matches that are too old.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.table import Table

from flight_server.asof import AsofCache, AsofIndex
from flight_server.catalog import FeatureCatalog, FeatureSpec, feature_spec, table_name
from flight_server.duck import Engine, local_path
from flight_server.errors import LimitError, NotFoundError, RequestError
from flight_server.filters import parse_filter, quote, to_sql
from flight_server.protocol import HistoricalRequest, ProtocolError, parse_feature_ref, parse_timestamp
from flight_server.scans import resolve_snapshot, snapshot_schema
from flight_server.schemas import UTC_MICROS, micros, table_arrow_schema
from flight_server.streams import chunks, stream_schema

log = logging.getLogger(__name__)

ROW = "__pit_row"
TS = "__pit_ts"
SNAPSHOTS_METADATA_KEY = b"flight.snapshots"


@dataclass(frozen=True)
class FeatureGroup:
    """The features a request takes from one table, at one snapshot."""

    table: Table
    spec: FeatureSpec
    snapshot_id: int | None
    features: list[str]
    types: list[pa.DataType]
    key_types: list[pa.DataType]

    @property
    def name(self) -> str:
        return table_name(self.table)


def partition_predicate(alias: str, keys: tuple[str, ...], types: list[pa.DataType]) -> str:
    """`hash(keys) % ? = ?` over keys cast to one type per kind, so that an int32 entity key and
    an int64 feature key of equal value land in the same part."""
    cast = [
        f"CAST({alias}{quote(k)} AS BIGINT)" if pa.types.is_integer(t) else f"{alias}{quote(k)}"
        for k, t in zip(keys, types, strict=True)
    ]
    return f"hash({', '.join(cast)}) % ? = ?"


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
    apply_ttl: bool = True

    def snapshots(self) -> dict[str, Any]:
        """What the result was computed from; passing these back reproduces it exactly."""
        entities = None
        if self.entity_table is not None:
            entities = {"table": table_name(self.entity_table), "snapshot_id": self.entity_snapshot_id}
        return {"features": {g.name: g.snapshot_id for g in self.groups}, "entities": entities}

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
    catalog: FeatureCatalog, request: HistoricalRequest, entity_schema: pa.Schema | None = None
) -> HistoricalPlan:
    """Check the request against the catalog and the entity columns; nothing is read yet."""
    entity_table = entity_snapshot = None
    entity_filter: BooleanExpression = AlwaysTrue()
    source = request.entities
    if source is not None and source.table is not None:
        entity_table = catalog.read(source.table)
        pinned = (request.snapshot_ids or {}).get(source.table, source.snapshot_id)
        entity_snapshot = resolve_snapshot(entity_table, pinned, None)
        schema = snapshot_schema(entity_table, entity_snapshot)
        entity_schema = table_arrow_schema(schema)
        entity_filter = parse_filter(source.filter, schema)
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
        table = catalog.read(table_ref)
        name = table_name(table)
        if name not in by_table:
            spec = feature_spec(table)
            for key in spec.entity_keys:
                if entity_schema.get_field_index(key) < 0:
                    raise RequestError(
                        f"the entity rows lack key column {key!r} of {name!r} (columns: {entity_schema.names})"
                    )
            pins = request.snapshot_ids or {}
            pinned = pins.get(name, pins.get(table_ref))
            snapshot_id = resolve_snapshot(table, pinned, None if pinned is not None else as_of)
            schema = table_arrow_schema(snapshot_schema(table, snapshot_id))
            for key in spec.entity_keys:
                entity_type, feature_type = entity_schema.field(key).type, schema.field(key).type
                if not _compatible(entity_type, feature_type):
                    raise RequestError(
                        f"entity column {key!r} is {entity_type} but {name!r} keys it as {feature_type}; cast it first"
                    )
            by_table[name] = len(groups)
            key_types = [schema.field(k).type for k in spec.entity_keys]
            groups.append(FeatureGroup(table, spec, snapshot_id, [], [], key_types))
        group = groups[by_table[name]]
        schema = table_arrow_schema(snapshot_schema(group.table, group.snapshot_id))
        if schema.get_field_index(feature) < 0:
            raise NotFoundError(f"feature {ref!r}: {name!r} has no column {feature!r} (columns: {schema.names})")
        if feature not in group.features:
            group.features.append(feature)
            group.types.append(schema.field(feature).type)
        output = f"{name.split('.')[-1]}__{feature}" if request.full_feature_names else feature
        columns.append((by_table[name], group.features.index(feature), output))

    names = entity_schema.names + [c[2] for c in columns]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        hint = "" if request.full_feature_names else "; full_feature_names=true prefixes features with their table"
        raise RequestError(f"output column name(s) {clashes} would appear twice{hint}")
    return HistoricalPlan(request, entity_schema, groups, columns, entity_table, entity_snapshot, entity_filter)


def prepare_entities(batch: pa.RecordBatch | pa.Table, entity_time: str, first_row: int) -> pa.Table:
    """Entity rows with their position and their timestamp as UTC microseconds for the join."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    ts = pc.cast(table.column(entity_time), UTC_MICROS, safe=False)
    return table.append_column(ROW, rows).append_column(TS, ts)


def inline_entities(rows: dict[str, list[Any]], entity_time: str) -> pa.Table:
    """Inline rows from a ticket; the timestamp column holds ISO-8601 strings or epoch milliseconds."""
    if entity_time not in rows:
        raise RequestError(f"the inline entity rows have no column {entity_time!r}; name it with entity_time")
    columns: dict[str, pa.Array] = {}
    for name, values in rows.items():
        try:
            if name == entity_time:
                parsed = [None if v is None else parse_timestamp(v, f"entity {name!r}") for v in values]
                columns[name] = pa.array(parsed, UTC_MICROS)
            else:
                columns[name] = pa.array(values)
        except (pa.ArrowException, ProtocolError) as exc:
            raise RequestError(f"inline entity column {name!r}: {exc}") from None
    return pa.table(columns)


def entity_bounds(cursor: Any, relation: str, params: list[Any]) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The earliest and latest entity timestamps: feature rows outside them are never read."""
    sql = f"SELECT min({TS}) AS low, max({TS}) AS high FROM {relation}"
    bounds = cursor.execute(sql, params).to_arrow_table().to_pylist()[0]
    return bounds["low"], bounds["high"]


def server_entities(plan: HistoricalPlan, numbered: bool = True) -> tuple[str, list[Any]]:
    """The entity-table rows, partitioned by a hash of the key columns when asked for, in (timestamp,
    keys, other columns) order, so the output order is the same every time the same snapshot is read.

    `numbered`: a relation for `join_sql`, with that order as row numbers and the timestamp as UTC;
    otherwise a query of just the entity columns, sorted.
    """
    assert plan.entity_table is not None
    if plan.entity_snapshot_id is None:
        raise RequestError(f"entity table {table_name(plan.entity_table)!r} has no rows")
    schema = snapshot_schema(plan.entity_table, plan.entity_snapshot_id)
    where, params = to_sql(plan.entity_filter, schema)
    keys = list(dict.fromkeys(k for g in plan.groups for k in g.spec.entity_keys))
    time = plan.request.entity_time
    partition = plan.request.partition
    if partition is not None:
        # Split by the first table's keys; tables keyed the same way are split alike in join_sql.
        split = plan.groups[0].spec.entity_keys
        where += " AND " + partition_predicate("", split, [plan.entity_schema.field(k).type for k in split])
        params += [partition[1], partition[0]]
    rest = [n for n in plan.entity_schema.names if n != time and n not in keys]
    order = ", ".join(quote(c) for c in [time, *keys, *rest])
    columns = ", ".join(quote(n) for n in plan.entity_schema.names)
    source = f"FROM iceberg_scan(?, snapshot_from_id => ?) WHERE {where}"
    if numbered:
        sql = (
            f"(SELECT {columns}, row_number() OVER (ORDER BY {order}) AS {ROW}, "
            f"CAST({quote(time)} AS TIMESTAMPTZ) AS {TS} {source})"
        )
    else:
        sql = f"SELECT {columns} {source} ORDER BY {order}"
    return sql, [local_path(plan.entity_table.metadata_location), plan.entity_snapshot_id, *params]


def join_sql(
    plan: HistoricalPlan, relation: str, params: list[Any], low: dt.datetime | None, high: dt.datetime | None
) -> tuple[str, list[Any]]:
    """The whole point-in-time join as one query over the entity `relation`."""
    args = list(params)
    ctes = [f"ent AS (SELECT * FROM {relation})"]
    joins: list[str] = []
    selected = {}
    for i, group in enumerate(plan.groups):
        spec, alias = group.spec, f"f{i}"
        keys = ", ".join(quote(k) for k in spec.entity_keys)
        features = ", ".join(f"{quote(f)} AS __pit_{i}_{j}" for j, f in enumerate(group.features))
        created = f", {quote(spec.created_time)} AS __pit_created" if spec.created_time else ""
        if group.snapshot_id is None or high is None:
            # An empty feature table (or no entity rows): keep the shape, match nothing.
            nulls = ", ".join(f"NULL AS __pit_{i}_{j}" for j in range(len(group.features)))
            ctes.append(
                f"{alias} AS (SELECT {keys}, NULL::TIMESTAMPTZ AS {TS}, NULL::TIMESTAMPTZ AS __pit_created, "
                f"{nulls} FROM ent WHERE FALSE)"
            )
        else:
            bound = f"{quote(spec.event_time)} <= ?"
            args_here: list[Any] = [local_path(group.table.metadata_location), group.snapshot_id, high]
            if spec.ttl_seconds and plan.apply_ttl and low is not None:
                bound += f" AND {quote(spec.event_time)} >= ?"
                args_here.append(low - dt.timedelta(seconds=spec.ttl_seconds))
            partition = plan.request.partition
            if partition is not None and spec.entity_keys == plan.groups[0].spec.entity_keys:
                bound += " AND " + partition_predicate("", spec.entity_keys, group.key_types)
                args_here += [partition[1], partition[0]]
            ctes.append(
                f"{alias} AS (SELECT {keys}, CAST({quote(spec.event_time)} AS TIMESTAMPTZ) AS {TS}{created}, "
                f"{features} FROM iceberg_scan(?, snapshot_from_id => ?) WHERE {bound})"
            )
            args += args_here
        on = " AND ".join(f"ent.{quote(k)} = {alias}.{quote(k)}" for k in spec.entity_keys)
        if spec.created_time:
            inequality = (
                f"struct_pack(t := ent.{TS}, c := 'infinity'::TIMESTAMPTZ) >= struct_pack(t := {alias}.{TS}, "
                f"c := coalesce({alias}.__pit_created, '-infinity'::TIMESTAMPTZ))"
            )
        else:
            inequality = f"ent.{TS} >= {alias}.{TS}"
        joins.append(f"ASOF LEFT JOIN {alias} ON {on} AND {inequality}")
        ttl = spec.ttl_seconds if plan.apply_ttl else None
        conditions = [f"{alias}.{TS} >= ent.{TS} - to_seconds({int(ttl)})"] if ttl else []
        if spec.created_time:
            conditions.append(f"ent.{TS} IS NOT NULL")  # a null time in the struct would compare as latest
        for j in range(len(group.features)):
            value = f"{alias}.__pit_{i}_{j}"
            selected[(i, j)] = f"CASE WHEN {' AND '.join(conditions)} THEN {value} END" if conditions else value
    outputs = [f"ent.{quote(n)}" for n in plan.entity_schema.names]
    outputs += [f"{selected[(i, j)]} AS {quote(name)}" for i, j, name in plan.columns]
    sql = f"WITH {', '.join(ctes)} SELECT {', '.join(outputs)} FROM ent {' '.join(joins)} ORDER BY ent.{ROW}"
    return sql, args


def run_historical(
    plan: HistoricalPlan, cursor: Any, relation: str, params: list[Any], batch_rows: int
) -> pa.RecordBatchReader:
    """Execute the join over `relation` (registered or created on `cursor`) and stream the result."""
    low, high = entity_bounds(cursor, relation, params)
    sql, args = join_sql(plan, relation, params, low, high)
    return cursor.execute(sql, args).to_arrow_reader(batch_rows).cast(plan.schema)


def plan_request(catalog: FeatureCatalog, request: HistoricalRequest) -> tuple[HistoricalPlan, pa.Table | None]:
    """Plan a request whose entities are on the server or inline (not a do_exchange stream)."""
    if request.entities is None:
        raise RequestError(
            "this request has no 'entities': stream the entity rows with do_exchange, "
            "or name an entity table or inline rows"
        )
    if request.entities.rows is not None:
        entities = inline_entities(request.entities.rows, request.entity_time)
        return plan_historical(catalog, request, entities.schema), entities
    return plan_historical(catalog, request), None


def join_batch(plan: HistoricalPlan, indexes: list[AsofIndex], batch: pa.RecordBatch) -> pa.RecordBatch:
    """One batch of entity rows with their features, in their order, through the sorted indexes."""
    entity_us, valid = micros(batch.column(plan.request.entity_time))
    found: dict[tuple[int, int], pa.Array] = {}
    for i, (group, index) in enumerate(zip(plan.groups, indexes, strict=True)):
        at, known = index.match([batch.column(k) for k in group.spec.entity_keys], entity_us, valid, plan.apply_ttl)
        for j, feature in enumerate(group.features):
            found[(i, j)] = index.take(feature, at, known)
    arrays = [*batch.columns, *(found[(i, j)] for i, j, _ in plan.columns)]
    schema = plan.schema
    arrays = [a if a.type == f.type else a.cast(f.type) for a, f in zip(arrays, schema, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class TrainingSets:
    """Runs training-set requests: through the sorted per-snapshot indexes (`asof.py`) when every
    feature table fits their cache, else as one DuckDB query (`join_sql`)."""

    def __init__(
        self, catalog: FeatureCatalog, engine: Engine, cache: AsofCache, batch_rows: int, max_exchange_bytes: int = 0
    ):
        self.catalog, self.engine, self.cache = catalog, engine, cache
        self.batch_rows = batch_rows
        self.max_exchange_bytes = max_exchange_bytes
        # Batches are joined on every core, a few ahead of the one being sent (numpy and Arrow release the GIL).
        self._workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="training-set")

    def open(self, request: HistoricalRequest) -> pa.RecordBatchReader:
        """Stream the training set for a `do_get` ticket."""
        plan, inline = plan_request(self.catalog, request)
        if inline is not None:
            return self.run_inline(plan, inline)
        _use_storage(self.engine, plan)
        indexes = self._indexes(plan)
        cursor = self.engine.cursor()
        if indexes is None:
            relation, params = server_entities(plan)
            return _keep_alive(run_historical(plan, cursor, relation, params, self.batch_rows), cursor)
        sql, params = server_entities(plan, numbered=False)
        entities = cursor.execute(sql, params).to_arrow_reader(self.batch_rows)
        return _keep_alive(self._joined(plan, indexes, entities), cursor)

    def run_inline(self, plan: HistoricalPlan, entities: pa.Table, build: bool = True) -> pa.RecordBatchReader:
        """Join entity rows held in memory (inline in a ticket, or an online `as_of` lookup).

        Without `build`, snapshots not sorted yet are left to DuckDB: a few online keys should not
        wait for a whole table to be sorted (a table written often would be sorted again each time).
        """
        indexes = self._indexes(plan, build)
        if indexes is not None:
            return self._joined(plan, indexes, entities.to_batches(self.batch_rows))
        _use_storage(self.engine, plan)
        cursor = self.engine.cursor()
        _append_entities(cursor, prepare_entities(entities, plan.request.entity_time, 0), create=True)
        return _keep_alive(run_historical(plan, cursor, "__pit_entities", [], self.batch_rows), cursor)

    def exchange(
        self,
        request: HistoricalRequest,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        is_cancelled: Callable[[], bool],
    ) -> int:
        """`do_exchange`: take the client's entity stream, answer with the joined rows on the same call.

        Through the indexes, each entity batch is answered as it arrives, so nothing accumulates
        and the client must read while it writes. Otherwise the entity rows go into a DuckDB
        temporary table (which spills to disk beyond the memory limit) and the answer follows the
        last of them; more than `max_exchange_bytes` of them (Arrow size; 0: no limit) are refused,
        so one client cannot fill the spill disk. Either way no state outlives the call.
        """
        if request.entities is not None:
            raise RequestError("a do_exchange request takes its entity rows from the stream: drop 'entities'")
        plan = plan_historical(self.catalog, request, stream_schema(reader, "entity row"))
        indexes = self._indexes(plan)
        if indexes is None:
            return self._exchange_duckdb(plan, reader, writer, is_cancelled)
        writer.begin(plan.schema)
        rows = 0

        def entities() -> Iterator[pa.RecordBatch]:
            nonlocal rows
            for chunk in chunks(reader, "entity"):
                if is_cancelled():
                    return
                if chunk.data is not None and chunk.data.num_rows:
                    rows += chunk.data.num_rows
                    yield chunk.data

        for batch in self._in_order(plan, indexes, entities()):
            writer.write_batch(batch)
        return rows

    def _exchange_duckdb(
        self,
        plan: HistoricalPlan,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        is_cancelled: Callable[[], bool],
    ) -> int:
        _use_storage(self.engine, plan)
        cursor = self.engine.cursor()
        rows = received = 0
        entity_time = plan.request.entity_time
        _append_entities(cursor, prepare_entities(reader.schema.empty_table(), entity_time, 0), create=True)
        for chunk in chunks(reader, "entity"):
            if chunk.data is not None and chunk.data.num_rows:
                received += chunk.data.nbytes
                if self.max_exchange_bytes and received > self.max_exchange_bytes:
                    cursor.close()
                    raise LimitError(
                        f"the entity rows passed {self.max_exchange_bytes:,} bytes after {rows:,} rows, this "
                        "server's limit per training set (--max-exchange-mb): split them, or write them to a "
                        "table and name it"
                    )
                _append_entities(cursor, prepare_entities(chunk.data, entity_time, rows))
                rows += chunk.data.num_rows
        if is_cancelled():
            return 0
        result = run_historical(plan, cursor, "__pit_entities", [], self.batch_rows)
        writer.begin(result.schema)
        for batch in result:
            writer.write_batch(batch)
        cursor.close()
        return rows

    def _joined(
        self, plan: HistoricalPlan, indexes: list[AsofIndex], batches: Iterable[pa.RecordBatch]
    ) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(plan.schema, self._in_order(plan, indexes, batches))

    def _in_order(
        self, plan: HistoricalPlan, indexes: list[AsofIndex], batches: Iterable[pa.RecordBatch]
    ) -> Iterator[pa.RecordBatch]:
        """The joined batches, in entity order, computed by the pool up to `workers` batches ahead."""
        pending: deque[Future[pa.RecordBatch]] = deque()
        try:
            for batch in batches:
                pending.append(self._pool.submit(join_batch, plan, indexes, batch))
                if len(pending) > self._workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def _indexes(self, plan: HistoricalPlan, build: bool = True) -> list[AsofIndex] | None:
        """Every feature table's sorted index, or None (a DuckDB join) if one of them does not fit
        (or, without `build`, is not sorted yet)."""
        indexes = []
        for group in plan.groups:
            find = self.cache.get if build else self.cache.peek
            index = find(group.table, group.snapshot_id, group.spec)
            if index is None:
                why = "too large for the training-set cache" if build else "not sorted yet"
                log.info("training set: DuckDB join (%s is %s)", group.name, why)
                return None
            indexes.append(index)
        return indexes


def endpoint_requests(plan: HistoricalPlan, partitions: int) -> list[HistoricalRequest]:
    """Tickets for the parts of a training set: snapshots pinned, entity keys split by hash.

    Their union is exactly the whole result, so clients may fetch them in parallel, anywhere.
    """
    request = plan.request
    pins = {g.name: g.snapshot_id for g in plan.groups if g.snapshot_id is not None}
    entities = request.entities
    if entities is not None and entities.table is not None:
        entities = replace(entities, snapshot_id=plan.entity_snapshot_id)
    else:
        partitions = 1
    return [
        replace(
            request,
            entities=entities,
            snapshot_ids=pins,
            as_of=None,
            partitions=None,
            partition=[i, partitions] if partitions > 1 else None,
        )
        for i in range(partitions)
    ]


def _append_entities(cursor: Any, rows: pa.Table, create: bool = False) -> None:
    """Add entity rows to the cursor's temporary table `__pit_entities` (DuckDB spills it if large)."""
    cursor.register("__pit_batch", rows)
    if create:
        cursor.execute("CREATE TEMP TABLE __pit_entities AS SELECT * FROM __pit_batch")
    else:
        cursor.execute("INSERT INTO __pit_entities SELECT * FROM __pit_batch")
    cursor.unregister("__pit_batch")


def _use_storage(engine: Engine, plan: HistoricalPlan) -> None:
    for table in [g.table for g in plan.groups] + ([plan.entity_table] if plan.entity_table else []):
        engine.use_storage(table.io.properties)


def _keep_alive(reader: pa.RecordBatchReader, cursor: Any) -> pa.RecordBatchReader:
    """A reader that holds `cursor` (and the entities registered on it) until it is consumed."""

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        finally:
            cursor.close()

    return pa.RecordBatchReader.from_batches(reader.schema, batches())
