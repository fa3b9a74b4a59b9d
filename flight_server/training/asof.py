"""Feature tables sorted for point-in-time lookups, kept per snapshot between training-set requests."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.table import Table

from flight_server.base.locks import LockPool
from flight_server.base.memory import MemoryBudget
from flight_server.base.schemas import micros
from flight_server.base.shards import key_slots
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, table_name
from flight_server.iceberg.lineage import appended_since
from flight_server.iceberg.snapshots import snapshot_schema
from flight_server.reads.caches import ReadCaches
from flight_server.reads.duck import Engine
from flight_server.reads.paths import direct_files, direct_reader, open_scan
from flight_server.reads.plan import ScanPlan, plan_table_scan, renamed
from flight_server.training.buckets import share_tasks
from flight_server.training.codes import KeyCodes, TimeAxis, Values, column_values, extend_values
from flight_server.wire.errors import LimitError, NotFoundError
from flight_server.wire.reads import KeyShare, ScanRequest

log = logging.getLogger(__name__)

_BLOCK = 64  # stamps per fence entry

_READ_BATCH_ROWS = 262_144

_ANCESTORS = 100  # snapshots looked back for a cached index to extend

_Key = tuple[str, int | None, FeatureSpec, KeyShare | None]  # table uuid, snapshot, spec, share (None: all rows)


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
    row_count: int  # rows in `columns`

    @classmethod
    def build(cls, name: str, snapshot_id: int | None, spec: FeatureSpec, rows: pa.Table) -> AsofIndex:
        key_columns, event_us, usable = _usable(spec, rows)
        keys, code = KeyCodes.build(key_columns)
        axis, offset = TimeAxis.build(event_us, keys.count)
        stamps, order = _latest(code * axis.span + offset, spec, rows, usable)
        return cls(
            name,
            snapshot_id,
            spec,
            {n: column_values(rows.column(n)) for n in rows.column_names},
            keys,
            axis,
            np.concatenate([stamps, np.full(_BLOCK, np.iinfo(np.int64).max)]),
            stamps[::_BLOCK].copy(),
            usable[order],
            event_us[order],
            rows.num_rows,
        )

    def extend(self, snapshot_id: int, rows: pa.Table) -> AsofIndex:
        """The index of a later snapshot whose rows are this one's plus `rows` (appended): the known stamps are
        renumbered without sorting (new key codes and time offsets rise with the old ones, so they stay sorted),
        only `rows` are sorted, and the two sorted runs are merged in one pass. This index answers as before."""
        if rows.num_rows == 0:
            return replace(self, snapshot_id=snapshot_id)
        if len(self.fence) == 0:  # no row that can match: nothing to keep
            return AsofIndex.build(self.name, snapshot_id, self.spec, rows)
        key_columns, event_us, usable = _usable(self.spec, rows)
        keys, renumber, code = self.keys.extend(key_columns)
        axis = self.axis.extend(self.event_us, event_us, keys.count)
        known = self.stamps[:-_BLOCK]
        old = renumber[known // self.axis.span] * axis.span + axis.feature_offsets(self.event_us)
        new, order = _latest(code * axis.span + axis.feature_offsets(event_us), self.spec, rows, usable)
        rows_at = usable[order]
        positions, new_us = self.row_count + rows_at, event_us[order]
        at = np.searchsorted(old, new)
        tied = at < len(old)
        tied[tied] = old[at[tied]] == new[tied]
        wins = tied.copy()  # a tie on (keys, event time) goes to the latest created; on that too, to the newer row
        if self.spec.created_time and tied.any():
            created = self.columns[self.spec.created_time]
            before = _created(created.take(self.positions[at[tied]], np.ones(int(tied.sum()), bool)))
            after = _created(rows.column(self.spec.created_time).take(pa.array(rows_at[tied])))
            wins[tied] = after >= before
        added = ~tied
        inserted = at[added]
        merged = np.insert(old, inserted, new[added])
        merged_positions = np.insert(self.positions, inserted, positions[added])
        merged_us = np.insert(self.event_us, inserted, new_us[added])
        replaced = at[wins]
        replaced += np.searchsorted(inserted, replaced, side="right")
        merged_positions[replaced], merged_us[replaced] = positions[wins], new_us[wins]
        return AsofIndex(
            self.name,
            snapshot_id,
            self.spec,
            {n: extend_values(self.columns[n], rows.column(n)) for n in self.columns},
            keys,
            axis,
            np.concatenate([merged, np.full(_BLOCK, np.iinfo(np.int64).max)]),
            merged[::_BLOCK].copy(),
            merged_positions,
            merged_us,
            self.row_count + rows.num_rows,
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


def _usable(spec: FeatureSpec, rows: pa.Table) -> tuple[list[pa.ChunkedArray], np.ndarray, np.ndarray]:
    """The key columns and event times of the rows that can match (a null key or event time never does),
    and which rows those are."""
    key_columns = [rows.column(k) for k in spec.entity_keys]
    event_us, valid = micros(rows.column(spec.event_time))
    for column in key_columns:
        valid &= pc.is_valid(column).to_numpy(zero_copy_only=False)
    usable = np.flatnonzero(valid)
    if len(usable) < rows.num_rows:
        key_columns = [c.take(usable) for c in key_columns]
        event_us = event_us[usable]
    return key_columns, event_us, usable


def _created(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Created times as microseconds; unknown ones are the oldest."""
    created, known = micros(column)
    return np.where(known, created, np.iinfo(np.int64).min)


def _latest(stamps: np.ndarray, spec: FeatureSpec, rows: pa.Table, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stamps of the usable rows sorted, one per (keys, event time): of tied rows the latest created; and
    where each comes from among the usable rows."""
    order = np.argsort(stamps)
    stamps = stamps[order]
    tied = stamps[1:] == stamps[:-1]
    if spec.created_time and tied.any():
        created = _created(rows.column(spec.created_time))[usable]
        in_tie = np.zeros(len(stamps), dtype=bool)
        in_tie[1:] |= tied
        in_tie[:-1] |= tied
        runs = np.flatnonzero(in_tie)  # sorting just these by created keeps each run in place
        order[runs] = order[runs][np.lexsort((created[order[runs]], stamps[runs]))]
    last = np.ones(len(stamps), dtype=bool)
    last[:-1] = ~tied  # of rows tied on (keys, event time), the last: the latest created
    return stamps[last], order[last]


class AsofCache:
    """Indexes of recently used snapshots, together at most `max_bytes`; least recently used go first.

    A snapshot that only appended to one already indexed is indexed by extending that index with the appended
    files' rows (`AsofIndex.extend`), not by reading and sorting the table again. With a `catalog`, a thread
    also brings forward the index of each table last used at its current snapshot as soon as a new snapshot
    lands (polled every `refresh_seconds`, or at once on `notify` after a change through this server), so
    that the next training set finds it ready: one table at a time, within the same byte cap.
    """

    def __init__(
        self,
        engine: Engine,
        caches: ReadCaches,
        max_bytes: int,
        catalog: FeatureCatalog | None = None,
        refresh_seconds: float = 0.5,
        budget: MemoryBudget | None = None,
    ):
        self.engine, self.caches = engine, caches
        self.max_bytes = max_bytes
        self.hits = self.misses = 0  # requests that found their index built, or not (for the server's metrics)
        self.catalog, self.refresh_seconds = catalog, refresh_seconds
        self.builds = 0  # indexes sorted from a whole snapshot
        self.incremental_builds = 0  # indexes extended from an older snapshot's by the files appended since
        self.refreshed_ahead = 0  # indexes built by the refresh thread, before any request asked
        self._indexes: OrderedDict[_Key, AsofIndex] = OrderedDict()
        self._too_large: set[_Key] = set()
        # The byte cap and the server's memory budget: evictions for either drop indexes here, under its lock.
        self._account = (budget or MemoryBudget(max_bytes)).account("training_set", max_bytes, self._indexes.pop)
        self._lock = self._account.lock
        self._building = LockPool()  # one build per snapshot at a time: requests for it wait for the first
        # (table name, share) -> (uuid, spec) to bring forward
        self._follow: dict[tuple[str, KeyShare | None], tuple[str, FeatureSpec]] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        if catalog is not None and max_bytes > 0:
            self._thread = threading.Thread(target=self._run, name="training-set-refresh", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the refresh thread (after the refresh it is doing, if any)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def notify(self, ref: str) -> None:
        """A change through this server committed to `ref`: bring its index forward now, not at the next poll."""
        if self.catalog is not None:
            name = ".".join(self.catalog.identifier(ref))
            if any(followed == name for followed, _ in list(self._follow)):
                self._wake.set()

    def peek(
        self, table: Table, snapshot_id: int | None, spec: FeatureSpec, share: KeyShare | None = None
    ) -> AsofIndex | None:
        """The index if it is built already; never builds."""
        with self._lock:
            return self._indexes.get((str(table.metadata.table_uuid), snapshot_id, spec, share))

    def get(
        self, table: Table, snapshot_id: int | None, spec: FeatureSpec, share: KeyShare | None = None
    ) -> AsofIndex | None:
        """The index of `table` at `snapshot_id` (of its rows in `share` only, if given), built now if need be;
        None if it would not fit."""
        if self.max_bytes <= 0:
            return None
        uuid = str(table.metadata.table_uuid)
        key = (uuid, snapshot_id, spec, share)
        current = table.current_snapshot()
        # Used at its current snapshot: kept current once its index is cached (the refresh thread stops following
        # a table whose indexes are all gone, so following it from the start of its build would lose it).
        follow = snapshot_id is not None and current is not None and current.snapshot_id == snapshot_id
        with self._building(key):
            with self._lock:
                if key in self._too_large:
                    self.misses += 1
                    return None
                if key in self._indexes:
                    self.hits += 1
                    self._account.touch(key)  # least recently used across the server's caches go first
                    if follow:
                        self._follow[(table_name(table), share)] = (uuid, spec)
                    return self._indexes[key]
                self.misses += 1
            # Its cap, or less while the server's memory budget cannot free more: an index that could not be
            # kept is not built (the request goes to DuckDB), and is tried again only when the cap allowed it.
            room = self._account.limit()
            try:
                index, extended = self._build(table, snapshot_id, spec, share, room)
            except LimitError as exc:
                log.info("training sets from %s at snapshot %s use DuckDB: %s", table_name(table), snapshot_id, exc)
                if room >= self.max_bytes:
                    with self._lock:
                        self._too_large.add(key)
                return None
            with self._lock:
                if self._account.admit(key, index.nbytes()):  # else (the room taken meanwhile) serves this request
                    self._indexes[key] = index
                    if follow:
                        self._follow[(table_name(table), share)] = (uuid, spec)
                if extended:
                    self.incremental_builds += 1
                else:
                    self.builds += 1
            return index

    def snapshots(self, table_uuid: str) -> set[int]:
        """The snapshots of one table (by uuid) whose index is cached: snapshot expiry keeps them."""
        with self._lock:
            return {key[1] for key in self._indexes if key[0] == table_uuid and key[1] is not None}

    def stats(self) -> dict[str, int]:
        with self._lock:
            indexes = list(self._indexes.values())
        return {
            "snapshots": len(indexes),
            "bytes": sum(i.nbytes() for i in indexes),
            "max_bytes": self.max_bytes,
            "builds": self.builds,
            "incremental_builds": self.incremental_builds,
            "refreshed_ahead": self.refreshed_ahead,
            "tables_followed": len(self._follow),
        }

    def index_rows(self) -> list[dict[str, Any]]:
        """Each cached index: its table, snapshot, share (None: all rows) and rows, most recently used last."""
        with self._lock:
            cached = list(self._indexes.items())
        return [
            {
                "table": index.name,
                "snapshot_id": snapshot_id,
                "share": asdict(share) if share is not None else None,
                "rows": index.row_count,
            }
            for (_, snapshot_id, _, share), index in cached
        ]

    def _ancestor(self, table: Table, snapshot_id: int, spec: FeatureSpec, share: KeyShare | None) -> AsofIndex | None:
        """The cached index of the nearest ancestor of `snapshot_id` (up to `_ANCESTORS` snapshots back)."""
        uuid = str(table.metadata.table_uuid)
        snapshot = table.snapshot_by_id(snapshot_id)
        for _ in range(_ANCESTORS):
            parent = snapshot.parent_snapshot_id if snapshot is not None else None
            if parent is None:
                return None
            with self._lock:
                index = self._indexes.get((uuid, parent, spec, share))
            if index is not None:
                return index
            snapshot = table.snapshot_by_id(parent)
        return None

    def _build(
        self, table: Table, snapshot_id: int | None, spec: FeatureSpec, share: KeyShare | None, room: int
    ) -> tuple[AsofIndex, bool]:
        """The snapshot's index (of the rows in `share` only, if given), and whether it extends an older one:
        from the rows appended since a cached ancestor when only appends happened since (in the same schema),
        else read whole (deletes applied) and sorted. Refused past `room` bytes."""
        started = time.perf_counter()
        request = ScanRequest(table=table_name(table), snapshot_id=snapshot_id)
        plan = plan_table_scan(table, request, self.caches)
        base = self._ancestor(table, snapshot_id, spec, share) if snapshot_id is not None else None
        if base is not None and base.snapshot_id is not None and not renamed(table):
            assert snapshot_id is not None, "only a snapshot has ancestors"
            appended = appended_since(table, base.snapshot_id, snapshot_id)
            same_schema = (
                snapshot_schema(table, base.snapshot_id).schema_id == snapshot_schema(table, snapshot_id).schema_id
            )
            if appended.files is not None and same_schema:
                rows, path = self._read(replace(plan, appended=appended.files), share, room)
                index = base.extend(snapshot_id, rows)
                if index.nbytes() > room:
                    raise LimitError(f"its index passes the {room >> 20} MiB the training-set cache has room for")
                log.info(
                    "training-set index of %s at snapshot %s: extended from snapshot %s by %d row(s) in %d file(s), "
                    "%.1f MiB, %s read, %.2f s",
                    index.name,
                    snapshot_id,
                    base.snapshot_id,
                    rows.num_rows,
                    len(appended.files),
                    index.nbytes() / 2**20,
                    path,
                    time.perf_counter() - started,
                )
                return index, True
        if snapshot_id is None:  # no snapshot when planned: stay empty even if a write has since made one
            plan = replace(plan, snapshot_id=None)
        rows, path = self._read(plan, share, room)
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
        return index, False

    def _read(self, plan: ScanPlan, share: KeyShare | None, room: int) -> tuple[pa.Table, str]:
        """The planned rows (those in `share` only, if given), and their read path; refused as soon as they
        pass `room` bytes."""
        files = direct_files(plan)[0] if share is not None and plan.snapshot_id is not None else None
        if share is not None and files is not None:  # only the files of the share's buckets
            kept = share_tasks(plan.table, share, files)
            reader, path = direct_reader(plan, kept, _READ_BATCH_ROWS), f"direct ({len(kept)} of {len(files)} files)"
        else:
            reader, path = open_scan(plan, self.engine, _READ_BATCH_ROWS)
        batches, taken = [], 0
        owned = np.array(share.owned if share is not None else [], dtype=np.int64)
        for batch in reader:
            if share is not None:  # keep only this share: the cap counts what is kept
                batch = batch.filter(pa.array(np.isin(key_slots(batch.column(share.key), share.slots), owned)))
            batches.append(batch)
            taken += batch.nbytes + batch.num_rows * 24
            if taken > room:
                reader.close()
                raise LimitError(f"its rows pass the {room >> 20} MiB the training-set cache has room for")
        return pa.Table.from_batches(batches, plan.schema), path

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_seconds)
            self._wake.clear()
            self.refresh()

    def refresh(self) -> None:
        """Bring each followed table's index forward to its current snapshot now (one round of the thread)."""
        for followed in list(self._follow):
            if self._stop.is_set():
                return
            try:
                self._refresh(followed)
            except Exception:
                log.exception("training-set index of %s: not brought forward; requests will build it", followed[0])
                self._follow.pop(followed, None)

    def _refresh(self, followed: tuple[str, KeyShare | None]) -> None:
        """Index the table's current snapshot if the index of an earlier one is cached; stop following a table
        whose indexes are all gone (evicted, or the table was replaced or redefined)."""
        assert self.catalog is not None, "the refresh thread runs only with a catalog"
        name, share = followed
        uuid, spec = self._follow[followed]
        try:
            table = self.catalog.read(name)
        except NotFoundError:
            self._unfollow(followed, uuid, spec)
            return
        same = str(table.metadata.table_uuid) == uuid and FeatureSpec.from_properties(table.metadata.properties) == spec
        with self._lock:  # as one with a request caching a new index (which follows the table again)
            held = any(k[0] == uuid and k[2] == spec and k[3] == share for k in self._indexes)
            if not held or not same:
                self._unfollow(followed, uuid, spec)
                return
        current = table.current_snapshot()
        if current is None or self.peek(table, current.snapshot_id, spec, share) is not None:
            return
        if self.get(table, current.snapshot_id, spec, share) is not None:
            with self._lock:
                self.refreshed_ahead += 1

    def _unfollow(self, followed: tuple[str, KeyShare | None], uuid: str, spec: FeatureSpec) -> None:
        """Stop following the table, unless a request has since followed it as another table of the same name."""
        with self._lock:
            if self._follow.get(followed) == (uuid, spec):
                del self._follow[followed]
