"""Feature tables sorted for point-in-time lookups, kept per snapshot between training-set requests."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table import Table

from flight_server.base.locks import LockPool
from flight_server.base.schemas import micros
from flight_server.iceberg.catalog import FeatureSpec, table_name
from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import Engine
from flight_server.reads.paths import open_scan
from flight_server.reads.plan import plan_table_scan
from flight_server.training.codes import KeyCodes, TimeAxis, Values, column_values
from flight_server.wire.errors import LimitError
from flight_server.wire.reads import ScanRequest

log = logging.getLogger(__name__)

_BLOCK = 64  # stamps per fence entry

_READ_BATCH_ROWS = 262_144


@dataclass(frozen=True)
class AsofIndex:
    """One feature table at one snapshot: its columns as read, and a stamp per (keys, event time) sorted for search."""

    name: str
    snapshot_id: int | None
    spec: FeatureSpec
    columns: dict[str, Values]  # every column of the snapshot, in read order
    keys: KeyCodes
    axis: TimeAxis
    stamps: np.ndarray  # sorted: code * axis.span + offset, then _BLOCK padding stamps above any other
    fence: np.ndarray  # every _BLOCK-th stamp: small enough to stay in cache while searching
    positions: np.ndarray  # the row of `columns` of each stamp
    event_us: np.ndarray

    @classmethod
    def build(cls, name: str, snapshot_id: int | None, spec: FeatureSpec, rows: pa.Table) -> AsofIndex:
        key_columns = [rows.column(k) for k in spec.entity_keys]
        event_us, valid = micros(rows.column(spec.event_time))
        for column in key_columns:
            valid &= pc.is_valid(column).to_numpy(zero_copy_only=False)
        usable = np.flatnonzero(valid)  # a null key or event time never matches
        if len(usable) < rows.num_rows:
            key_columns = [c.take(usable) for c in key_columns]
            event_us = event_us[usable]
        keys, code = KeyCodes.build(key_columns)
        axis, offset = TimeAxis.build(event_us, keys.count)
        stamps = code * axis.span + offset
        order = np.argsort(stamps)
        stamps = stamps[order]
        tied = stamps[1:] == stamps[:-1]
        if spec.created_time and tied.any():
            created, known = micros(rows.column(spec.created_time))
            created = np.where(known, created, np.iinfo(np.int64).min)[usable]  # unknown: oldest
            in_tie = np.zeros(len(stamps), dtype=bool)
            in_tie[1:] |= tied
            in_tie[:-1] |= tied
            runs = np.flatnonzero(in_tie)  # sorting just these by created keeps each run in place
            order[runs] = order[runs][np.lexsort((created[order[runs]], stamps[runs]))]
        last = np.ones(len(stamps), dtype=bool)
        last[:-1] = ~tied  # of rows tied on (keys, event time), the last: the latest created
        order = order[last]
        return cls(
            name,
            snapshot_id,
            spec,
            {n: column_values(rows.column(n)) for n in rows.column_names},
            keys,
            axis,
            np.concatenate([stamps[last], np.full(_BLOCK, np.iinfo(np.int64).max)]),
            stamps[last][::_BLOCK].copy(),
            usable[order],
            event_us[order],
        )

    def nbytes(self) -> int:
        arrays = self.stamps.nbytes + self.fence.nbytes + self.positions.nbytes + self.event_us.nbytes
        return sum(c.nbytes() for c in self.columns.values()) + self.keys.nbytes() + arrays

    def match(
        self,
        keys: list[pa.Array | pa.ChunkedArray],
        entity_us: np.ndarray,
        valid: np.ndarray,
        ttl: bool,
        entity_up_us: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each entity row, the row of `columns` it gets, and whether it gets one: equal keys, the latest
        event time at or before the entity's, and within the TTL when `ttl` says to apply it. Entity times
        in nanoseconds come rounded down (`entity_us`) and up (`entity_up_us`, `codes.entity_micros`):
        the TTL counts from the latter, so that its bound is exact."""
        if len(self.fence) == 0:
            return np.zeros(len(entity_us), dtype=np.int64), np.zeros(len(entity_us), dtype=bool)
        code = self.keys.encode(keys)
        known = valid & (code >= 0)
        wanted = code * self.axis.span + self.axis.offsets(entity_us)
        by_stamp = np.argsort(wanted)  # searching in order keeps the searches in cache
        found = np.empty(len(wanted), dtype=np.int64)
        found[by_stamp] = self._last_at_or_below(wanted[by_stamp])
        at = np.maximum(found, 0)
        known &= (found >= 0) & (self.stamps[at] > code * self.axis.span)  # same key, not the one before
        if ttl and self.spec.ttl_seconds:
            since = entity_us if entity_up_us is None else entity_up_us
            known &= self.event_us[at] >= since - int(self.spec.ttl_seconds * 1_000_000)
        return self.positions[at], known

    def _last_at_or_below(self, wanted: np.ndarray) -> np.ndarray:
        """The position of the last stamp <= each wanted one (-1: none): the block from the fence, then
        a branch-free binary search inside it, all blocks at once (twice numpy's searchsorted here)."""
        block = np.searchsorted(self.fence, wanted, side="right") - 1
        base = np.maximum(block, 0) * _BLOCK
        size = _BLOCK
        while size > 1:
            half = size >> 1
            middle = base + half
            base = np.where(self.stamps[middle] <= wanted, middle, base)
            size -= half
        return np.where(block >= 0, base, -1)

    def take(self, column: str, at: np.ndarray, known: np.ndarray) -> pa.Array:
        """Column `column` at the rows `match` found (null where it found none)."""
        values = self.columns[column]
        if len(self.fence) == 0:
            return pa.nulls(len(at), values.type)
        return values.take(at, known)


class AsofCache:
    """Indexes of recently used snapshots, together at most `max_bytes`; least recently used go first."""

    def __init__(self, engine: Engine, caches: ReadCaches, max_bytes: int):
        self.engine, self.caches = engine, caches
        self.max_bytes = max_bytes
        self.builds = 0
        self._indexes: OrderedDict[tuple[str, int | None, FeatureSpec], AsofIndex] = OrderedDict()
        self._too_large: set[tuple[str, int | None, FeatureSpec]] = set()
        self._lock = threading.Lock()
        self._building = LockPool()  # one build per snapshot at a time: requests for it wait for the first

    def peek(self, table: Table, snapshot_id: int | None, spec: FeatureSpec) -> AsofIndex | None:
        """The index if it is built already; never builds."""
        with self._lock:
            return self._indexes.get((str(table.metadata.table_uuid), snapshot_id, spec))

    def get(self, table: Table, snapshot_id: int | None, spec: FeatureSpec) -> AsofIndex | None:
        """The index of `table` at `snapshot_id`, built now if need be; None if it would not fit."""
        if self.max_bytes <= 0:
            return None
        key = (str(table.metadata.table_uuid), snapshot_id, spec)
        with self._building(key):
            with self._lock:
                if key in self._too_large:
                    return None
                if key in self._indexes:
                    self._indexes.move_to_end(key)
                    return self._indexes[key]
            try:
                index = self._build(table, snapshot_id, spec)
            except LimitError as exc:
                log.info("training sets from %s at snapshot %s use DuckDB: %s", table_name(table), snapshot_id, exc)
                with self._lock:
                    self._too_large.add(key)
                return None
            with self._lock:
                self._indexes[key] = index
                self.builds += 1
                while sum(i.nbytes() for i in self._indexes.values()) > self.max_bytes and len(self._indexes) > 1:
                    self._indexes.popitem(last=False)
            return index

    def snapshots(self, table_uuid: str) -> set[int]:
        """The snapshots of one table (by uuid) whose index is cached: snapshot expiry keeps them."""
        with self._lock:
            return {snapshot for uuid, snapshot, _ in self._indexes if uuid == table_uuid and snapshot is not None}

    def stats(self) -> dict[str, int]:
        with self._lock:
            indexes = list(self._indexes.values())
        return {
            "snapshots": len(indexes),
            "bytes": sum(i.nbytes() for i in indexes),
            "max_bytes": self.max_bytes,
            "builds": self.builds,
        }

    def _build(self, table: Table, snapshot_id: int | None, spec: FeatureSpec) -> AsofIndex:
        """Read the snapshot whole (deletes applied) and sort it; refused past `max_bytes`."""
        started = time.perf_counter()
        plan = plan_table_scan(table, ScanRequest(table=table_name(table), snapshot_id=snapshot_id), self.caches)
        if snapshot_id is None:  # no snapshot when planned: stay empty even if a write has since made one
            plan = replace(plan, snapshot_id=None)
        reader, path = open_scan(plan, self.engine, _READ_BATCH_ROWS)
        batches, taken = [], 0
        for batch in reader:
            batches.append(batch)
            taken += batch.nbytes + batch.num_rows * 24
            if taken > self.max_bytes:
                reader.close()
                raise LimitError(f"its rows pass the training-set cache's {self.max_bytes >> 20} MiB")
        rows = pa.Table.from_batches(batches, plan.schema)
        index = AsofIndex.build(table_name(table), snapshot_id, spec, rows)
        log.info(
            "training-set index of %s at snapshot %s: %d rows, %.1f MiB, %s read, %.2f s",
            index.name,
            snapshot_id,
            rows.num_rows,
            index.nbytes() / 2**20,
            path,
            time.perf_counter() - started,
        )
        return index
