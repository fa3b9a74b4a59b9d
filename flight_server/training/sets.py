"""Runs training-set requests: each feature table through its sorted per-snapshot index when it fits their
cache, the others as one DuckDB query.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from flight_server.base.streams import entity_chunks, stream_schema
from flight_server.iceberg.catalog import FeatureCatalog
from flight_server.reads.duck import Engine
from flight_server.training.asof import AsofCache, AsofIndex
from flight_server.training.buckets import share_files
from flight_server.training.entities import (
    EntitySplits,
    append_entities,
    plan_request,
    prepare_entities,
    server_entities,
)
from flight_server.training.join import join_batch, keep_alive, run_historical, use_storage
from flight_server.training.plan import FeatureGroup, HistoricalPlan, plan_historical, slot_functions
from flight_server.wire.errors import LimitError, RequestError
from flight_server.wire.reads import HistoricalRequest

log = logging.getLogger(__name__)

_FINDERS = 4  # threads that index a request's feature tables together (most wait: for a read, or another's build)


def held_snapshots(plan: HistoricalPlan) -> list[tuple[str, int | None]]:
    """The (table uuid, snapshot) pairs a training set reads: its feature tables' and its entity table's."""
    tables = [(g.table, g.snapshot_id) for g in plan.groups]
    if plan.entity_table is not None:
        tables.append((plan.entity_table, plan.entity_snapshot_id))
    return [(str(table.metadata.table_uuid), snapshot_id) for table, snapshot_id in tables]


class TrainingSets:
    """Runs training-set requests: through the sorted per-snapshot indexes (`training/asof.py`) of the feature
    tables that fit their cache, and one DuckDB query (`join_sql`) for the others, if any."""

    def __init__(
        self,
        catalog: FeatureCatalog,
        engine: Engine,
        cache: AsofCache,
        batch_rows: int,
        max_exchange_bytes: int = 0,
        splits: EntitySplits | None = None,
    ):
        self.catalog, self.engine, self.cache = catalog, engine, cache
        self.splits = splits or EntitySplits(0)  # entity tables split once for all the parts of a training set
        self.batch_rows = batch_rows
        self.max_exchange_bytes = max_exchange_bytes
        # Batches are joined on every core, a few ahead of the one being sent (numpy and Arrow release the GIL).
        self._workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="training-set")
        # A request's feature tables are indexed together, one thread each (reads and sorts release the GIL): while
        # one waits for the extension the refresh thread is doing, the others are brought forward beside it.
        self._finders = ThreadPoolExecutor(_FINDERS, thread_name_prefix="training-set-index")

    def close(self) -> None:
        """Stop the join workers, once no call uses them (the server has stopped), and the cache's refreshes."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._finders.shutdown(wait=False, cancel_futures=True)
        self.cache.close()

    def open(self, request: HistoricalRequest, is_cancelled: Callable[[], bool] | None = None) -> pa.RecordBatchReader:
        """Stream the training set for a `do_get` ticket; the query that computes it before the first batch
        is interrupted once `is_cancelled()` (the client cancelled or went away)."""
        plan, inline = plan_request(self.catalog, request)
        in_use, held = self.cache.caches.in_use, held_snapshots(plan)
        if plan.entity_table is not None:  # the job's next epoch asks it again: kept as its feature tables' indexes
            in_use.remember([(str(plan.entity_table.metadata.table_uuid), plan.entity_snapshot_id)])
        with in_use.hold(held):  # from planning until the stream ends, expiry keeps its snapshots
            return in_use.holding(held, self._open(plan, inline, is_cancelled))  # taken before `hold` lets go

    def _open(
        self, plan: HistoricalPlan, inline: pa.Table | None, is_cancelled: Callable[[], bool] | None
    ) -> pa.RecordBatchReader:
        if inline is not None:
            return self.run_inline(plan, inline, is_cancelled=is_cancelled)
        use_storage(self.engine, plan)
        indexes = self._indexes(plan)
        cursor = self.engine.cursor()
        slot_functions(cursor)
        with self.engine.interruptible(cursor, is_cancelled):
            if None in indexes:
                relation, params = server_entities(plan)
                return keep_alive(self._duckdb(plan, indexes, cursor, relation, params), cursor)
            part = self.splits.part(plan, cursor)
            if part is not None:
                return keep_alive(self._joined(plan, indexes, part.to_batches(self.batch_rows)), cursor)
            sql, params = server_entities(plan, numbered=False)
            entities = cursor.execute(sql, params).to_arrow_reader(self.batch_rows)
        return keep_alive(self._joined(plan, indexes, entities), cursor)

    def run_inline(
        self,
        plan: HistoricalPlan,
        entities: pa.Table,
        build: bool = True,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> pa.RecordBatchReader:
        """Join entity rows held in memory (inline in a ticket, or an online `as_of` lookup).

        Without `build`, snapshots not sorted yet are left to DuckDB: a few online keys should not
        wait for a whole table to be sorted (a table written often would be sorted again each time).
        """
        indexes = self._indexes(plan, build)
        if None not in indexes:
            return self._joined(plan, indexes, entities.to_batches(self.batch_rows))
        use_storage(self.engine, plan)
        cursor = self.engine.cursor()
        append_entities(cursor, prepare_entities(entities, plan, 0), create=True)
        with self.engine.interruptible(cursor, is_cancelled):
            return keep_alive(self._duckdb(plan, indexes, cursor, "__pit_entities", []), cursor)

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
        with self.cache.caches.in_use.hold(held_snapshots(plan)):
            return self._exchange(plan, reader, writer, is_cancelled)

    def _exchange(
        self,
        plan: HistoricalPlan,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        is_cancelled: Callable[[], bool],
    ) -> int:
        indexes = self._indexes(plan)
        if None in indexes:
            return self._exchange_duckdb(plan, indexes, reader, writer, is_cancelled)
        writer.begin(plan.schema)
        rows = 0

        def entities() -> Iterator[pa.RecordBatch]:
            nonlocal rows
            for chunk in entity_chunks(reader, "entity", plan.request.end_marker):
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
        indexes: list[AsofIndex | None],
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
        is_cancelled: Callable[[], bool],
    ) -> int:
        use_storage(self.engine, plan)
        cursor = self.engine.cursor()
        rows = received = 0
        append_entities(cursor, prepare_entities(reader.schema.empty_table(), plan, 0), create=True)
        for chunk in entity_chunks(reader, "entity", plan.request.end_marker):
            if chunk.data is not None and chunk.data.num_rows:
                received += chunk.data.nbytes
                if self.max_exchange_bytes and received > self.max_exchange_bytes:
                    cursor.close()
                    raise LimitError(
                        f"the entity rows passed {self.max_exchange_bytes:,} bytes after {rows:,} rows, this "
                        "server's limit per training set (--max-exchange-mb): split them, or write them to a "
                        "table and name it"
                    )
                append_entities(cursor, prepare_entities(chunk.data, plan, rows))
                rows += chunk.data.num_rows
        if is_cancelled():
            return 0
        with self.engine.interruptible(cursor, is_cancelled):
            result = self._duckdb(plan, indexes, cursor, "__pit_entities", [])
            writer.begin(result.schema)
            for batch in result:
                writer.write_batch(batch)
        cursor.close()
        return rows

    def _duckdb(
        self,
        plan: HistoricalPlan,
        indexes: list[AsofIndex | None],
        cursor: duckdb.DuckDBPyConnection,
        relation: str,
        params: list[Any],
    ) -> pa.RecordBatchReader:
        """DuckDB's join of the entity `relation` to the tables without an index: all of them, or some, whose
        features then meet the others' from their indexes batch by batch, so that a table too large for the cache
        slows down only its own part of the join."""
        missing = [i for i, index in enumerate(indexes) if index is None]
        if len(missing) == len(plan.groups):
            return run_historical(plan, cursor, relation, params, self.batch_rows, self._share_files(plan))
        part = replace(
            plan,
            # The entity rows of a part are split by the first table's keys, not necessarily by these tables'.
            request=replace(plan.request, partition=None),
            groups=[plan.groups[i] for i in missing],
            columns=[(missing.index(g), j, name) for g, j, name in plan.columns if g in missing],
        )
        joined = run_historical(part, cursor, relation, params, self.batch_rows, self._share_files(part))
        width = len(plan.entity_schema)

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in joined:
                entities = pa.RecordBatch.from_arrays(batch.columns[:width], schema=plan.entity_schema)
                yield join_batch(plan, indexes, entities, batch)

        return pa.RecordBatchReader.from_batches(plan.schema, batches())

    def _share_files(self, plan: HistoricalPlan) -> dict[int, list[str]]:
        """Per group joined by DuckDB for a share, the data files of the share's buckets, where those alone
        can be read (`share_files`)."""
        found = {}
        for i, group in enumerate(plan.groups):
            share = plan.share(group)
            if share is not None and group.snapshot_id is not None:
                files = share_files(group.table, group.snapshot_id, share, self.cache.caches)
                if files is not None:
                    log.info("training set: DuckDB reads %d file(s) of %s for its share", len(files), group.name)
                    found[i] = files
        return found

    def _joined(
        self, plan: HistoricalPlan, indexes: list[AsofIndex | None], batches: Iterable[pa.RecordBatch]
    ) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(plan.schema, self._in_order(plan, indexes, batches))

    def _in_order(
        self, plan: HistoricalPlan, indexes: list[AsofIndex | None], batches: Iterable[pa.RecordBatch]
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

    def _indexes(self, plan: HistoricalPlan, build: bool = True) -> list[AsofIndex | None]:
        """Every feature table's sorted index; None for one that does not fit (or, without `build`, is not sorted
        yet): DuckDB joins those."""
        find = self.cache.get if build else self.cache.peek

        def index_of(group: FeatureGroup) -> AsofIndex | None:
            return find(group.table, group.snapshot_id, group.spec, plan.share(group))

        if build and len(plan.groups) > 1:
            indexes = list(self._finders.map(index_of, plan.groups))
        else:
            indexes = [index_of(group) for group in plan.groups]
        for group, index in zip(plan.groups, indexes, strict=True):
            if index is None:
                why = "too large for the training-set cache" if build else "not sorted yet"
                log.info("training set: DuckDB joins %s (%s)", group.name, why)
        return indexes
