"""Entity rows of a training set: sent inline, streamed, or read by the server from a table."""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from flight_server.base.filters import quote, to_sql
from flight_server.base.locks import LockPool
from flight_server.base.memory import MemoryBudget
from flight_server.base.schemas import UTC_MICROS
from flight_server.iceberg.catalog import FeatureCatalog, table_name
from flight_server.reads.paths import iceberg_source
from flight_server.training.codes import entity_micros
from flight_server.training.plan import HistoricalPlan, partition_expression, plan_historical, share_predicate
from flight_server.wire.codec import parse_timestamp
from flight_server.wire.errors import ProtocolError, RequestError
from flight_server.wire.reads import HistoricalRequest

ROW = "__pit_row"

TS = "__pit_ts"

TS_UP = "__pit_ts_up"  # the entity time rounded up to whole microseconds: the TTL counts from it (join_sql)


def prepare_entities(batch: pa.RecordBatch | pa.Table, plan: HistoricalPlan, first_row: int) -> pa.Table:
    """Entity rows for the DuckDB join: with their position and their timestamp as UTC microseconds, rounded
    down and, for the TTL, up (`entity_micros`).

    DuckDB keeps time-zone-aware timestamps in microseconds only, so such a column in nanoseconds (not a key,
    which must match the feature tables' keys) goes through the join as its int64 values; the plan's schema
    casts it back, so it comes out unchanged, as the contract says of every entity column."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    keys = {key for group in plan.groups for key in group.spec.entity_keys}
    for i, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_timestamp(kind) and kind.unit == "ns" and kind.tz is not None and field.name not in keys:
            table = table.set_column(i, field.name, table.column(i).cast(pa.int64()))
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    down, up, valid = entity_micros(batch.column(plan.request.entity_time))
    ts, ts_up = (pa.array(values, UTC_MICROS, mask=~valid) for values in (down, up))
    return table.append_column(ROW, rows).append_column(TS, ts).append_column(TS_UP, ts_up)


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


def entity_bounds(
    cursor: duckdb.DuckDBPyConnection, relation: str, params: list[Any]
) -> tuple[dt.datetime | None, dt.datetime | None]:
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
    columns, source, order, params = _entity_source(plan)
    partition = plan.request.partition
    if partition is not None:
        source += f" AND {_part_expression(plan)} = ?"
        params += [partition[1], partition[0]]
    time = quote(plan.request.entity_time)
    if numbered:
        sql = (
            f"(SELECT {columns}, row_number() OVER (ORDER BY {order}) AS {ROW}, "
            f"CAST({time} AS TIMESTAMPTZ) AS {TS}, CAST({time} AS TIMESTAMPTZ) AS {TS_UP} {source})"
        )
    else:
        sql = f"SELECT {columns} {source} ORDER BY {order}"
    return sql, params


def _entity_source(plan: HistoricalPlan) -> tuple[str, str, str, list[Any]]:
    """The entity columns, `FROM ... WHERE ...` of the rows a request reads (its filter, its replica's share) but
    for the partition, their order, and the parameters of the source."""
    assert plan.entity_table is not None
    if plan.entity_snapshot_id is None:
        raise RequestError(f"entity table {table_name(plan.entity_table)!r} has no rows")
    assert plan.entity_read is not None, "planned with the entity table"
    where, params = to_sql(plan.entity_filter, plan.entity_read)
    keys = list(dict.fromkeys(k for g in plan.groups for k in g.spec.entity_keys))
    time = plan.request.entity_time
    share = plan.request.shard
    if share is not None:  # one replica's share (`endpoint_requests`), then perhaps a part of it
        predicate, args = share_predicate("", share, plan.entity_schema.field(share.key).type)
        where += " AND " + predicate
        params += args
    rest = [n for n in plan.entity_schema.names if n != time and n not in keys]
    order = ", ".join(quote(c) for c in [time, *keys, *rest])
    columns = ", ".join(quote(n) for n in plan.entity_schema.names)
    source = f"FROM {iceberg_source(plan.entity_table, plan.entity_snapshot_id, plan.entity_read)} WHERE {where}"
    return columns, source, order, [plan.metadata_file(plan.entity_table), plan.entity_snapshot_id, *params]


def _part_expression(plan: HistoricalPlan) -> str:
    """`hash(keys) % ?`: the part of the request's partitions an entity row falls in, by the first table's keys
    (tables keyed the same way are split alike in join_sql)."""
    split = plan.groups[0].spec.entity_keys
    return partition_expression("", split, [plan.entity_schema.field(k).type for k in split])


PART = "__pit_part"

_VARIABLE_WIDTH = 32  # bytes a row of a string or binary entity column is estimated at (`EntitySplits`)
_REMEMBERED = 256  # splits made but not kept whose real size `EntitySplits` remembers (least recently used go first)


class EntitySplits:
    """Entity tables split once into a request's partitions, kept within `max_bytes` of the server's memory budget
    (least recently used go first).

    The endpoints of a training set over an entity table each read a part of its rows: by themselves, each would
    scan the whole table, hash its keys and keep its share, 8 endpoints 8 scans. Here the first endpoint to come
    splits the table in one scan and sort, and each endpoint (of this epoch or the next) takes its part from
    memory, in the order its own query gives. A split whose estimated size does not fit in the budget's free room is
    not made (it never evicts other caches' entries): its endpoints read their parts by themselves
    (`server_entities`).
    """

    def __init__(self, max_bytes: int, budget: MemoryBudget | None = None):
        self._splits: OrderedDict[Hashable, list[pa.Table]] = OrderedDict()
        self._account = (budget or MemoryBudget(max_bytes)).account("entity_splits", max_bytes, self._splits.pop)
        self._building = LockPool()
        # The real bytes of splits made but not kept (their estimate was low): their endpoints read their parts by
        # themselves while that size does not fit, instead of each making the whole split again in turn.
        self._too_big: OrderedDict[Hashable, int] = OrderedDict()
        self.builds = 0  # splits made

    def part(self, plan: HistoricalPlan, cursor: duckdb.DuckDBPyConnection) -> pa.Table | None:
        """The request's part of its entity table, sorted as `server_entities(plan, numbered=False)` sorts it; None
        when the request is neither partitioned nor a replica's share, or its split would not fit (read it with
        `server_entities`). A share unpartitioned is kept as a split of one part: finding its rows hashes every key
        of the table in Python (`key_slots`), two thirds of a replica's training set over 100,000 entity rows."""
        partition = plan.request.partition
        if partition is None and plan.request.shard is not None:
            partition = [0, 1]
        if partition is None or plan.entity_table is None or self._account.cap <= 0:
            return None
        columns, source, order, params = _entity_source(plan)
        index, count = partition
        uuid = str(plan.entity_table.metadata.table_uuid)
        key = (uuid, columns, source, repr(params), order, _part_expression(plan), count)
        with self._building(key):
            with self._account.lock:
                parts = self._splits.get(key)
                if parts is not None:
                    self._account.touch(key)
                    return parts[index]
                estimate = self._too_big.get(key) or _estimated_bytes(plan)
            if estimate is None or not self._reserve_free(estimate):
                return None
            try:
                sql = split_sql(columns, source, order, _part_expression(plan))
                split = cursor.execute(sql, [count, *params]).to_arrow_table()
            except BaseException:
                self._account.release(estimate)
                raise
            sizes = np.bincount(split.column(PART).to_numpy(), minlength=count)
            split = split.drop_columns([PART])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            parts = [split.slice(starts[i], sizes[i]) for i in range(count)]
            self.builds += 1
            with self._account.lock:
                self._account.release(estimate)
                if self._free(split.nbytes) and self._account.admit(key, split.nbytes):
                    self._splits[key] = parts
                    self._too_big.pop(key, None)
                else:
                    self._too_big[key] = split.nbytes
                    self._too_big.move_to_end(key)
                    if len(self._too_big) > _REMEMBERED:
                        self._too_big.popitem(last=False)
            return parts[index]

    def _free(self, size: int) -> bool:
        """Whether `size` bytes fit in the budget's free room (call under the lock). A split is made only from free
        room, evicting at most older splits (its cap): evicting a training-set index, perhaps the very one its
        request reads, would have the two evict each other endpoint after endpoint."""
        budget = self._account.budget
        return budget.used + size <= budget.total and size <= self._account.cap

    def _reserve_free(self, size: int) -> bool:
        """Reserve `size` bytes for a split if they fit in the free room (`_free`)."""
        with self._account.lock:
            return self._free(size) and self._account.reserve(size)


def split_sql(columns: str, source: str, order: str, part: str) -> str:
    """The rows of `source` with their part (`part`, an expression of one `?`, the part count) as a BIGINT: as
    DuckDB types `hash(...) % ?`, a HUGEINT, it would reach Arrow as decimal128, and numpy as a Python object a row."""
    return f"SELECT {columns}, CAST({part} AS BIGINT) AS {PART} {source} ORDER BY {PART}, {order}"


def _estimated_bytes(plan: HistoricalPlan) -> int | None:
    """The Arrow size of an entity table's rows (before its filter: at most that, but for strings, guessed), from its
    snapshot's row count; None when the snapshot does not say."""
    assert plan.entity_table is not None and plan.entity_snapshot_id is not None
    snapshot = plan.entity_table.metadata.snapshot_by_id(plan.entity_snapshot_id)
    records = snapshot.summary.get("total-records") if snapshot is not None and snapshot.summary else None
    if records is None:
        return None
    width = 0.0
    for field in plan.entity_schema:
        try:
            width += field.type.bit_width / 8 + 1 / 8  # the values and a validity bit
        except ValueError:  # variable width
            width += _VARIABLE_WIDTH
    return int(int(records) * width) + 1


def plan_request(catalog: FeatureCatalog, request: HistoricalRequest) -> tuple[HistoricalPlan, pa.Table | None]:
    """Plan a request whose entities are on the server or inline (not a do_exchange stream)."""
    if request.entities is None:
        raise RequestError(
            "this request has no 'entities': stream the entity rows with do_exchange, "
            "or name an entity table or inline rows"
        )
    if request.entities.rows is not None:
        entities = inline_entities(request.entities.rows, request.entity_time)
        return plan_historical(catalog, request, entities.schema, empty=not entities.num_rows), entities
    return plan_historical(catalog, request), None


def append_entities(cursor: duckdb.DuckDBPyConnection, rows: pa.Table, create: bool = False) -> None:
    """Add entity rows to the cursor's temporary table `__pit_entities` (DuckDB spills it if large)."""
    cursor.register("__pit_batch", rows)
    if create:
        cursor.execute("CREATE TEMP TABLE __pit_entities AS SELECT * FROM __pit_batch")
    else:
        cursor.execute("INSERT INTO __pit_entities SELECT * FROM __pit_batch")
    cursor.unregister("__pit_batch")
