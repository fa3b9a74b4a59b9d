"""The point-in-time join itself: one DuckDB query of ASOF joins, or a batch against the sorted indexes."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from flight_server.base.filters import quote
from flight_server.iceberg.lineage import ROW_BITS, commit_ranks
from flight_server.reads.duck import Engine, local_path
from flight_server.reads.paths import hides_position as hidden_names
from flight_server.reads.paths import iceberg_source
from flight_server.training.asof import AsofIndex
from flight_server.training.codes import entity_micros
from flight_server.training.entities import ROW, TS, TS_UP, entity_bounds
from flight_server.training.plan import FeatureGroup, HistoricalPlan, partition_predicate, share_predicate

log = logging.getLogger(__name__)

FILES = "__pit_files_{}"  # a group's data files and their rank in commit order (`file_ranks`), registered per query


_LAST = "9223372036854775807"  # above every row's order: an entity row's side of the ASOF inequality


def join_sql(
    plan: HistoricalPlan,
    relation: str,
    params: list[Any],
    low: dt.datetime | None,
    high: dt.datetime | None,
    files: dict[int, list[str]] | None = None,
) -> tuple[str, list[Any]]:
    """The whole point-in-time join as one query over the entity `relation`; the groups in `files` read just
    those data files (their share's buckets, `share_files`) instead of their whole snapshot."""
    files = files or {}
    args = list(params)
    ctes = [f"ent AS (SELECT * FROM {relation})"]
    joins: list[str] = []
    selected = {}
    for i, group in enumerate(plan.groups):
        spec, alias = group.spec, f"f{i}"
        keys = ", ".join(quote(k) for k in spec.entity_keys)
        features = ", ".join(f"{quote(f)} AS __pit_{i}_{j}" for j, f in enumerate(group.features))
        created = f", {quote(spec.created_time)} AS __pit_created" if spec.created_time else ""
        if group.snapshot_id is None or high is None or files.get(i) == []:
            # An empty feature table (or no entity rows): keep the shape, match nothing.
            nulls = ", ".join(f"NULL AS __pit_{i}_{j}" for j in range(len(group.features)))
            ctes.append(
                f"{alias} AS (SELECT {keys}, NULL::TIMESTAMPTZ AS {TS}, NULL::TIMESTAMPTZ AS __pit_created, "
                f"NULL::BIGINT AS __pit_order, {nulls} FROM ent WHERE FALSE)"
            )
        else:
            bound = f"{quote(spec.event_time)} <= ?"
            if i in files:
                source, args_here = "read_parquet(?, hive_partitioning => false)", [files[i], high]
            else:
                source = iceberg_source(group.table, group.snapshot_id, group.read)
                args_here = [plan.metadata_file(group.table), group.snapshot_id, high]
            if spec.ttl_seconds and plan.apply_ttl and low is not None:
                bound += f" AND {quote(spec.event_time)} >= ?"
                args_here.append(low - dt.timedelta(seconds=spec.ttl_seconds))
            partition = plan.request.partition
            if partition is not None and spec.entity_keys == plan.groups[0].spec.entity_keys:
                bound += " AND " + partition_predicate("", spec.entity_keys, group.key_types)
                args_here += [partition[1], partition[0]]
            share = plan.share(group)
            if share is not None:  # entity rows of one share meet only feature rows of the same share
                predicate, share_args = share_predicate("", share, group.key_types[spec.entity_keys.index(share.key)])
                bound += " AND " + predicate
                args_here += share_args
            if hides_position(group):  # ties settled as DuckDB meets them (`hides_position`)
                order, scan = "0::BIGINT AS __pit_order", f"{source} AS s"
            else:
                # Full ties (keys, event time, created time) go to the later row in commit order, as in the sorted
                # index: the row's file ranked by `file_ranks` (registered as FILES), then its row number in it.
                order = f"coalesce(o.__pit_rank, 0) * {1 << ROW_BITS} + s.file_row_number AS __pit_order"
                scan = f"{source} AS s LEFT JOIN {FILES.format(i)} AS o USING (filename)"
            ctes.append(
                f"{alias} AS (SELECT {keys}, CAST({quote(spec.event_time)} AS TIMESTAMPTZ) AS {TS}{created}, "
                f"{order}, {features} FROM {scan} WHERE {bound})"
            )
            args += args_here
        on = " AND ".join(f"ent.{quote(k)} = {alias}.{quote(k)}" for k in spec.entity_keys)
        if spec.created_time:
            inequality = (
                f"struct_pack(t := ent.{TS}, c := 'infinity'::TIMESTAMPTZ, o := {_LAST}) >= struct_pack(t := "
                f"{alias}.{TS}, c := coalesce({alias}.__pit_created, '-infinity'::TIMESTAMPTZ), o := "
                f"{alias}.__pit_order)"
            )
        else:
            inequality = (
                f"struct_pack(t := ent.{TS}, o := {_LAST}) >= struct_pack(t := {alias}.{TS}, o := {alias}.__pit_order)"
            )
        joins.append(f"ASOF LEFT JOIN {alias} ON {on} AND {inequality}")
        ttl = spec.ttl_seconds if plan.apply_ttl else None
        conditions = [f"{alias}.{TS} >= ent.{TS_UP} - to_seconds({int(ttl)})"] if ttl else []
        conditions.append(f"ent.{TS} IS NOT NULL")  # a null time in the struct would compare as latest
        for j in range(len(group.features)):
            value = f"{alias}.__pit_{i}_{j}"
            selected[(i, j)] = f"CASE WHEN {' AND '.join(conditions)} THEN {value} END"
    outputs = [f"ent.{quote(n)}" for n in plan.entity_schema.names]
    outputs += [f"{selected[(i, j)]} AS {quote(name)}" for i, j, name in plan.columns]
    sql = f"WITH {', '.join(ctes)} SELECT {', '.join(outputs)} FROM ent {' '.join(joins)} ORDER BY ent.{ROW}"
    return sql, args


def run_historical(
    plan: HistoricalPlan,
    cursor: duckdb.DuckDBPyConnection,
    relation: str,
    params: list[Any],
    batch_rows: int,
    files: dict[int, list[str]] | None = None,
) -> pa.RecordBatchReader:
    """Execute the join over `relation` (registered or created on `cursor`) and stream the result."""
    low, high = entity_bounds(cursor, relation, params)
    for i, group in enumerate(plan.groups):
        hidden = hides_position(group) if group.snapshot_id is not None else set()
        if hidden:
            log.warning(
                "training set: DuckDB joins %s, whose column(s) %s hide DuckDB's own of the same name (each row's "
                "file and row number): its rows that tie on keys, event time and created time are settled in the "
                "order DuckDB meets them, not by commit order as in the sorted index; rename the column(s) to get "
                "the same row either way",
                group.name,
                ", ".join(sorted(hidden)),
            )
        elif group.snapshot_id is not None:
            cursor.register(FILES.format(i), file_ranks(group))
    sql, args = join_sql(plan, relation, params, low, high, files)
    return cursor.execute(sql, args).to_arrow_reader(batch_rows).cast(plan.schema)


def hides_position(group: FeatureGroup) -> set[str]:
    """The group's columns at its snapshot that hide DuckDB's virtual columns (`reads.paths.hides_position`)."""
    return hidden_names(field.name for field in group.read.fields)


def file_ranks(group: FeatureGroup) -> pa.Table:
    """Each data file of the group's snapshot and its rank in commit order (`commit_order`), under the path DuckDB
    names it by (`filename`: the manifest's for `iceberg_scan`, the local one for `read_parquet` of share files),
    so that DuckDB settles full ties as the sorted index does, which reads the files in that order."""
    assert group.snapshot_id is not None, "an empty table has no files"
    paths: list[str] = []
    ranks: list[int] = []
    for path, rank in commit_ranks(group.table, group.snapshot_id).items():
        for name in dict.fromkeys((path, local_path(path))):
            paths.append(name)
            ranks.append(rank)
    return pa.table({"filename": pa.array(paths, pa.string()), "__pit_rank": pa.array(ranks, pa.int64())})


def join_batch(
    plan: HistoricalPlan,
    indexes: Sequence[AsofIndex | None],
    batch: pa.RecordBatch,
    joined: pa.RecordBatch | None = None,
) -> pa.RecordBatch:
    """One batch of entity rows with their features, in their order, through the sorted indexes; the features of
    tables without one (None) come from `joined`, DuckDB's join of the same rows to those tables (by output name)."""
    batch = plan.entity_rows(batch)
    entity_us, entity_up_us, valid = entity_micros(batch.column(plan.request.entity_time))
    found: dict[tuple[int, int], pa.Array] = {}
    for i, (group, index) in enumerate(zip(plan.groups, indexes, strict=True)):
        if index is None:
            assert joined is not None, "DuckDB joined the tables without an index"
            for j, name in ((j, name) for g, j, name in plan.columns if g == i):
                found[(i, j)] = joined.column(name)
            continue
        keys = [batch.column(k) for k in group.spec.entity_keys]
        at, known = index.match(keys, entity_us, valid, plan.apply_ttl, entity_up_us)
        for j, feature in enumerate(group.features):
            found[(i, j)] = index.take(feature, at, known)
    arrays = [*batch.columns, *(found[(i, j)] for i, j, _ in plan.columns)]
    schema = plan.schema
    arrays = [a if a.type == f.type else a.cast(f.type) for a, f in zip(arrays, schema, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def use_storage(engine: Engine, plan: HistoricalPlan) -> None:
    """Ready `engine` for the plan's tables: their credentials, and the metadata files DuckDB reads for them."""
    for table in [g.table for g in plan.groups] + ([plan.entity_table] if plan.entity_table else []):
        engine.use_storage(table.io.properties)
        plan.metadata_files[table.metadata_location] = engine.metadata_file(table.metadata_location, table.metadata)


def keep_alive(reader: pa.RecordBatchReader, cursor: duckdb.DuckDBPyConnection) -> pa.RecordBatchReader:
    """A reader that holds `cursor` (and the entities registered on it) until it is consumed."""

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        finally:
            cursor.close()

    return pa.RecordBatchReader.from_batches(reader.schema, batches())
