"""Feature tables sorted for point-in-time lookups, kept per snapshot between training-set requests."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.manifest import DataFile, FileFormat
from pyiceberg.table import FileScanTask, Table

from flight_server.base.locks import LockPool
from flight_server.base.memory import MemoryBudget
from flight_server.base.schemas import micros
from flight_server.base.shards import key_slots
from flight_server.iceberg.catalog import FeatureCatalog, FeatureSpec, table_name
from flight_server.iceberg.lineage import Appended, changed_since, commit_order
from flight_server.iceberg.positions import referenced_data_file
from flight_server.iceberg.snapshots import snapshot_schema
from flight_server.reads.caches import ReadCaches
from flight_server.reads.deleted import deleted_positions
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

_SMALL_RUN = 1 << 16  # stamps of a run searched without sorting the entity rows first

_FOLD_RUNS = 1  # runs after the first past which the cache folds them in the background (`AsofIndex.fold_start`):
# each search encodes every entity key once per run (55 ms per 1M keys in a run of sparse keys), and small runs fold
# among themselves for their own rows' cost

_FOLD_RATIO = 16  # ... or once they hold more than 1/16 of the first run's stamps: then into the first

_TOO_LARGE_KEYS = 1024  # snapshots remembered as too large for the whole cap (the oldest forgotten first)

_MAX_RUNS = 16  # runs past which an index is folded even while new snapshots keep the refresh thread busy

_FORCE_RATIO = 2  # ... or reads run: runs past _MAX_RUNS or 1/2 of the first's stamps are folded whatever runs

_FOLD_PATIENCE = 5.0  # seconds a fold into the first run waits for no read to stream, at most: a stream that a slow
# consumer keeps open would keep it waiting for good

_MASK_RATIO = 4  # deletes are masked while the masked rows stay under 1/4 of the columns; beyond, the index is rebuilt

_RUN_ROW_BYTES = 96  # what sorting a row into a run allocates, at most: a dozen 8-byte arrays (codes, stamps, order)

_FOLD_COPIES = 2  # a fold allocates its runs' arrays anew, and as much again in temporaries while it merges

_RECENT_SECONDS = 600.0  # an older generation a request asked for this recently stays cached (and its snapshot kept
# from expiry): a training job's next epoch, or its next ticket, asks the same snapshot again

_RECENT_GENERATIONS = 4  # ... the most recently asked of them per table and share, at most: older generations cost
# little memory each, so without a bound a table put to every minute would keep a snapshot a minute

_Key = tuple[str, int | None, FeatureSpec, KeyShare | None]  # table uuid, snapshot, spec, share (None: all rows)


@dataclass(frozen=True)
class Run:
    """Some rows of an index sorted for search, with key codes and a time axis of their own: a stamp per usable
    row (code * axis.span + offset), ties on (keys, event time) ordered by created time then row, so that the
    last stamp at or below a wanted one is the row that wins (the latest created; on that too, the newer row)."""

    keys: KeyCodes
    axis: TimeAxis
    stamps: np.ndarray  # sorted, then _BLOCK padding stamps above any other
    fence: np.ndarray  # every _BLOCK-th stamp: small enough to stay in cache while searching
    positions: np.ndarray  # the row of the index's columns of each stamp
    event_us: np.ndarray

    @classmethod
    def sorted(
        cls, keys: KeyCodes, axis: TimeAxis, stamps: np.ndarray, positions: np.ndarray, event_us: np.ndarray
    ) -> Run:
        """The run of these stamps, already in order (`stamps` may come padded already)."""
        if len(stamps) == len(positions):
            stamps = np.concatenate([stamps, np.full(_BLOCK, np.iinfo(np.int64).max)])
        return cls(keys, axis, stamps, stamps[: len(positions) : _BLOCK].copy(), positions, event_us)

    @classmethod
    def build(cls, spec: FeatureSpec, rows: pa.Table, first: int, created: Created) -> Run | None:
        """The run of `rows`, which are the index's rows from `first` on; None if none of them can match."""
        key_columns, event_us, usable = _usable(spec, rows)
        if len(usable) == 0:
            return None
        keys, code = KeyCodes.build(key_columns)
        axis, offset = TimeAxis.build(event_us, keys.count)
        stamps, positions = code * axis.span + offset, usable + first
        order = np.argsort(stamps, kind="stable")  # data files come sorted by (keys, event time): merged runs
        stamps, positions, event_us = stamps[order], positions[order], event_us[order]
        _settle_ties(stamps, positions, event_us, created)
        return cls.sorted(keys, axis, stamps, positions, event_us)

    def __len__(self) -> int:
        return len(self.positions)

    def merged(self, spec: FeatureSpec, columns: dict[str, Values], positions: np.ndarray, created: Created) -> Run:
        """This run with the rows at `positions` (usable ones of the same columns) merged in: the known stamps are
        renumbered without sorting (new key codes and time offsets rise with the old ones, so they stay sorted),
        only the new rows are sorted, and the two sorted sequences are merged in one pass."""
        everywhere = np.ones(len(positions), dtype=bool)
        key_columns = [columns[k].take(positions, everywhere) for k in spec.entity_keys]
        event_us = micros(columns[spec.event_time].take(positions, everywhere))[0]
        keys, renumber, code = self.keys.extend(key_columns)
        axis = self.axis.extend(self.event_us, event_us, keys.count)
        old = renumber[self.stamps[: len(self)] // self.axis.span] * axis.span + axis.feature_offsets(self.event_us)
        new = code * axis.span + axis.feature_offsets(event_us)
        by_stamp = np.argsort(new, kind="stable")  # the rows of each run's files, each sorted: merged runs
        new, positions, event_us = new[by_stamp], positions[by_stamp], event_us[by_stamp]
        # Where each new stamp goes: after the old stamps at or below it, and after the new ones before it.
        at = np.searchsorted(old, new, side="right") + np.arange(len(new))
        total = len(old) + len(new)
        kept = np.ones(total, dtype=bool)
        kept[at] = False
        stamps = np.full(total + _BLOCK, np.iinfo(np.int64).max)  # with the padding
        merged_positions, merged_us = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64)
        for into, known, more in (
            (stamps, old, new),
            (merged_positions, self.positions, positions),
            (merged_us, self.event_us, event_us),
        ):
            into[at], into[:total][kept] = more, known
        _settle_ties(stamps[:total], merged_positions, merged_us, created, at)
        return Run.sorted(keys, axis, stamps, merged_positions, merged_us)

    def masked(self, alive: np.ndarray) -> Run | None:
        """This run without the stamps of rows that are not `alive` (by row of the columns); None if none is left.
        Ties keep their order, so the latest surviving row of a tie wins: nothing needs sorting again."""
        kept = alive[self.positions]
        if kept.all():
            return self
        if not kept.any():
            return None
        return Run.sorted(
            self.keys, self.axis, self.stamps[: len(self)][kept], self.positions[kept], self.event_us[kept]
        )

    def search(
        self,
        keys: list[pa.Array | pa.ChunkedArray],
        entity_us: np.ndarray,
        valid: np.ndarray,
        by_stamp: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The entity rows that get a row here (equal keys, the latest event time at or before the entity's), and
        the stamp (index into this run) each gets. A small run is searched for the entity rows whose keys it holds
        only; a large one in stamp order, which keeps the searches in cache: `by_stamp` is that order of the entity
        rows, if known (the runs' key codes mostly rise with the keys, so one run's order suits the next), which
        comes back for the next run."""
        code = self.keys.encode(keys)
        if len(self) < _SMALL_RUN:  # fits in cache whatever the order
            rows = np.flatnonzero(valid & (code >= 0))
            code = code[rows]
            wanted = code * self.axis.span + self.axis.offsets(entity_us[rows])
            found = np.searchsorted(self.stamps[: len(self)], wanted, side="right") - 1
        else:
            rows = np.arange(len(code))
            wanted = code * self.axis.span + self.axis.offsets(entity_us)
            by_stamp = np.argsort(wanted) if by_stamp is None else by_stamp
            found = np.empty(len(wanted), dtype=np.int64)
            found[by_stamp] = self._last_at_or_below(wanted[by_stamp])
            found[~valid | (code < 0)] = -1
        at = np.maximum(found, 0)
        hit = (found >= 0) & (self.stamps[at] > code * self.axis.span)  # same key, not the one before
        return rows[hit], at[hit], by_stamp

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

    def nbytes(self) -> int:
        arrays = self.stamps.nbytes + self.fence.nbytes + self.positions.nbytes + self.event_us.nbytes
        return self.keys.nbytes() + arrays


@dataclass(frozen=True)
class FileSpan:
    """Where the rows of one data file are among an index's columns: `count` rows from row `first`, the file's
    rows in order without the positions `absent` (sorted), deleted when it was read. A position delete committed
    later names rows of the file, which this turns into rows of the columns to mask (`masked`: those so far)."""

    file: DataFile
    first: int
    count: int
    absent: np.ndarray
    masked: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, FileSpan]:
        """The rows of the columns at the file's `positions` (sorted, unique) not deleted already, and the span
        with those masked too."""
        fresh = positions[~np.isin(positions, self.absent) & ~np.isin(positions, self.masked)]
        rows = self.first + fresh - np.searchsorted(self.absent, fresh)
        return rows, replace(self, masked=np.union1d(self.masked, fresh))


@dataclass(frozen=True)
class AsofIndex:
    """One feature table at one snapshot: its columns as read, and sorted runs of their rows for search.

    The first run comes from a full build; each append since adds a run of its own rows (a sort of those alone),
    and the cache folds runs into the first in the background (`folded`). Every run is searched and the latest
    event time found wins; on a tie, the latest created, and on that too the newer run, as within one run.
    Rows deleted since the build are masked (`masked`): their stamps leave the runs, their values stay in the
    columns, unreachable."""

    name: str
    snapshot_id: int | None
    spec: FeatureSpec
    columns: dict[str, Values]  # every column of the snapshot, in read order, and masked rows
    runs: tuple[Run, ...]  # oldest first
    row_count: int  # rows in `columns`
    spans: tuple[FileSpan, ...] | None = None  # each data file's rows, when known (read file by file)
    dead: int = 0  # rows of `columns` masked by deletes

    @classmethod
    def build(
        cls,
        name: str,
        snapshot_id: int | None,
        spec: FeatureSpec,
        rows: pa.Table,
        spans: tuple[FileSpan, ...] | None = None,
    ) -> AsofIndex:
        columns = {n: column_values(rows.column(n)) for n in rows.column_names}
        run = Run.build(spec, rows, 0, _created_of(spec, columns))
        return cls(name, snapshot_id, spec, columns, (run,) if run is not None else (), rows.num_rows, spans)

    def extend(self, snapshot_id: int, rows: pa.Table, spans: tuple[FileSpan, ...] | None = None) -> AsofIndex:
        """The index of a later snapshot whose rows are this one's plus `rows` (appended, in files `spans` says,
        numbered from 0 within `rows`): only `rows` are sorted, into a run of their own. This index answers as
        before (the columns grow in room only later generations see)."""
        if self.spans is not None and spans is not None:
            spans = self.spans + tuple(replace(s, first=s.first + self.row_count) for s in spans)
        else:
            spans = None
        if rows.num_rows == 0:
            return replace(self, snapshot_id=snapshot_id, spans=spans)
        columns = {n: extend_values(self.columns[n], rows.column(n)) for n in self.columns}
        run = Run.build(self.spec, rows, self.row_count, _created_of(self.spec, columns))
        runs = self.runs + ((run,) if run is not None else ())
        return replace(
            self,
            snapshot_id=snapshot_id,
            columns=columns,
            runs=runs,
            row_count=self.row_count + rows.num_rows,
            spans=spans,
        )

    def extension_bytes(self, rows: pa.Table) -> int:
        """What `extend` by `rows` allocates, at most: each column's growth (a copy where it cannot grow in place),
        and the sort of their run."""
        growth = sum(values.growth(rows.column(name)) for name, values in self.columns.items())
        return growth + rows.num_rows * _RUN_ROW_BYTES

    def fold_start(self) -> int:
        """The first run a fold merges the later ones into: the second while the runs after the first hold no more
        than 1/_FOLD_RATIO of its stamps (small appends merged among themselves cost their own rows, not a pass
        over the first run's: a table appended to a little at a time would pay that every few appends), else the
        first."""
        later = sum(len(run) for run in self.runs[1:])
        return 1 if len(self.runs) > 2 and later * _FOLD_RATIO <= len(self.runs[0]) else 0

    def folded(self) -> AsofIndex:
        """The same index with its runs from `fold_start` on merged into one (it answers exactly as this one)."""
        if len(self.runs) < 2:
            return self
        start = self.fold_start()
        positions = np.sort(np.concatenate([run.positions for run in self.runs[start + 1 :]]))
        run = self.runs[start].merged(self.spec, self.columns, positions, _created_of(self.spec, self.columns))
        return replace(self, runs=(*self.runs[:start], run))

    def masked(self, snapshot_id: int, rows: np.ndarray, spans: tuple[FileSpan, ...] | None) -> AsofIndex:
        """The index of a later snapshot that deleted `rows` (of the columns, not masked yet) of this one's."""
        alive = np.ones(self.row_count, dtype=bool)
        alive[rows] = False
        runs = tuple(r for r in (run.masked(alive) for run in self.runs) if r is not None)
        return replace(self, snapshot_id=snapshot_id, runs=runs, spans=spans, dead=self.dead + len(rows))

    def crowded(self, max_runs: int, ratio: int) -> bool:
        """Whether its runs after the first pass `max_runs`, or 1/`ratio` of the first's stamps."""
        if len(self.runs) < 2:
            return False
        return len(self.runs) - 1 > max_runs or sum(len(r) for r in self.runs[1:]) * ratio > len(self.runs[0])

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.columns.values()) + sum(r.nbytes() for r in self.runs)

    def shared_bytes(self, other: AsofIndex) -> int:
        """Bytes of this index that `other` holds too: the runs it kept, and the column arrays it extended in place
        (views of one buffer from the same start, `other`'s the longer)."""
        runs = sum(run.nbytes() for run in self.runs if any(run is kept for kept in other.runs))
        theirs = {_start(a) for values in other.columns.values() for a in values.arrays()}
        columns = sum(a.nbytes for values in self.columns.values() for a in values.arrays() if _start(a) in theirs)
        return runs + columns

    def match(
        self,
        keys: list[pa.Array | pa.ChunkedArray],
        entity_us: np.ndarray,
        valid: np.ndarray,
        ttl: bool,
        entity_up_us: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each entity row, the row of `columns` it gets, and whether it gets one: equal keys, the latest
        event time at or before the entity's (of tied ones the latest created, then the newer run), and within
        the TTL when `ttl` says to apply it. Entity times in nanoseconds come rounded down (`entity_us`) and up
        (`entity_up_us`, `codes.entity_micros`): the TTL counts from the latter, so that its bound is exact."""
        rows = np.zeros(len(entity_us), dtype=np.int64)
        found_us = np.zeros(len(entity_us), dtype=np.int64)
        known = np.zeros(len(entity_us), dtype=bool)
        created = _created_of(self.spec, self.columns)
        by_stamp = None
        for run in self.runs:
            hit, at, by_stamp = run.search(keys, entity_us, valid, by_stamp)
            at_rows, at_us = run.positions[at], run.event_us[at]
            before, before_us = known[hit], found_us[hit]
            wins = ~before | (at_us > before_us)
            tied = np.flatnonzero(before & (at_us == before_us))
            if len(tied):  # the newer run wins a tie on created time too
                wins[tied] = created(at_rows[tied]) >= created(rows[hit[tied]]) if created is not None else True
            taken = hit[wins]
            rows[taken], found_us[taken], known[taken] = at_rows[wins], at_us[wins], True
        if ttl and self.spec.ttl_seconds:
            since = entity_us if entity_up_us is None else entity_up_us
            known &= found_us >= since - int(self.spec.ttl_seconds * 1_000_000)
        return rows, known

    def take(self, column: str, at: np.ndarray, known: np.ndarray) -> pa.Array:
        """Column `column` at the rows `match` found (null where it found none)."""
        values = self.columns[column]
        if not self.runs:
            return pa.nulls(len(at), values.type)
        return values.take(at, known)


Created = Callable[[np.ndarray], np.ndarray] | None  # the created times of rows of the columns, if the table has any


def _created_of(spec: FeatureSpec, columns: dict[str, Values]) -> Created:
    """The created times of rows of `columns` (unknown ones the oldest), or None when the table has none."""
    if not spec.created_time:
        return None
    values = columns[spec.created_time]
    return lambda rows: _created(values.take(rows, np.ones(len(rows), dtype=bool)))


def _settle_ties(
    stamps: np.ndarray, rows: np.ndarray, event_us: np.ndarray, created: Created, around: np.ndarray | None = None
) -> None:
    """Order each run of equal `stamps` (sorted) by created time, then row, in place: its last wins. With `around`
    (ascending positions), only the runs of equal stamps that hold one of them: the others are in order already (a
    fold settles the ties its new stamps joined, not again the tenth of a large run's stamps that tie)."""
    if around is None:
        tied = stamps[1:] == stamps[:-1]
        if not tied.any():
            return
        in_tie = np.zeros(len(stamps), dtype=bool)
        in_tie[1:] |= tied
        in_tie[:-1] |= tied
        runs = np.flatnonzero(in_tie)
    else:
        low = np.searchsorted(stamps, stamps[around], side="left")
        high = np.searchsorted(stamps, stamps[around], side="right")
        tie = high - low > 1
        tie[1:] &= low[1:] != low[:-1]  # each run of equal stamps once (`low` ascends with `around`)
        if not tie.any():
            return
        low, length = low[tie], (high - low)[tie]
        runs = np.arange(int(length.sum())) + np.repeat(low - (np.cumsum(length) - length), length)
    # Sorting just these by (stamp, created, row) keeps each tie in place.
    chosen = rows[runs]
    later = created(chosen) if created is not None else np.zeros(len(chosen), dtype=np.int64)
    order = np.lexsort((chosen, later, stamps[runs]))
    rows[runs], event_us[runs] = chosen[order], event_us[runs][order]


def _in_commit_order(plan: ScanPlan, tasks: list[FileScanTask]) -> list[FileScanTask]:
    """The tasks in the order their files were committed (`commit_order`), so that on a full tie the later
    commit's row wins in an index read whole as in one brought forward append by append (plans list the newest
    files first). Files appended since an older snapshot are listed in that order already."""
    if len(tasks) < 2 or plan.snapshot_id is None or plan.appended is not None:
        return tasks
    order = commit_order(plan.table, plan.snapshot_id)
    return sorted(tasks, key=lambda task: order[task.file.file_path])


def _start(array: np.ndarray) -> int:
    """Where an array's memory starts."""
    return int(array.__array_interface__["data"][0])


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


def _kept(reader: pa.RecordBatchReader, batch: pa.RecordBatch, room: int, taken: int, work: _Work) -> int:
    """The bytes a batch read for an index counts (its rows, and 24 a row for sorting them), reserved in `work`; the
    read is closed and refused once the rows read pass `room` bytes, or the room is not there now."""
    size = batch.nbytes + batch.num_rows * 24
    try:
        if taken + size > room:
            raise LimitError(f"its rows pass the {room >> 20} MiB the training-set cache has room for")
        work.take(size, "its rows")
    except LimitError:
        reader.close()
        raise
    return size


class _NoRoom(LimitError):
    """The work of bringing an index forward (`_Work`) does not fit in the room the cache has now: `size` more
    bytes were wanted. `_build` refuses it as not fitting beside the indexes in use (`_NotBeside`)."""

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


class _Work:
    """Bytes of the cache's account reserved for bringing one index forward (the appended rows read, the columns'
    growth, the sort of their run), as the work goes, so that what the cache holds and what the extension allocates
    beside it stay within the cap together; the index takes them over once admitted (`Account.admit`), else they
    are released. Only room to spare, after dropping older generations: never another table's index, which would be
    read whole at its next use. A build from scratch (`bounded` False) reserves nothing: its reads stop at the
    cap, and admitting it evicts the least recently used indexes."""

    def __init__(self, cache: AsofCache, key: _Key):
        self.cache, self.key = cache, key
        self.bounded = False
        self.reserved = 0

    def take(self, size: int, what: str) -> None:
        """Reserve `size` more bytes for `what` (if `bounded`); `_NoRoom` if they do not fit."""
        if not self.bounded:
            return
        if not self.cache.reserve(self.key, size):
            raise _NoRoom(f"{what} ({size >> 20} MiB) does not fit in the room the training-set cache has now", size)
        self.reserved += size

    def release(self) -> None:
        """Give back what is still reserved (nothing once the index was admitted)."""
        self.cache.release(self.reserved)
        self.reserved = 0


class _NotBeside(LimitError):
    """An index brought forward from `base` (a snapshot) would take `size` bytes, more than the room beside the
    other followed tables' indexes: refused while those stay."""

    def __init__(self, message: str, base: int | None, size: int):
        super().__init__(message)
        self.base, self.size = base, size


def _created(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Created times as microseconds; unknown ones are the oldest."""
    created, known = micros(column)
    return np.where(known, created, np.iinfo(np.int64).min)


class AsofCache:
    """Indexes of recently used snapshots, together at most `max_bytes`; least recently used go first.

    A snapshot that only appended to one already indexed, or deleted rows by position delete files, is indexed by
    bringing that index forward (`_forward`): the appended files' rows sorted into a run of their own, deleted rows
    masked, not the table read and sorted again; a background thread folds an index's later runs once there are
    several (`_FOLD_RUNS`), among themselves while small, into the first once large (`_FOLD_RATIO`), never holding
    up a request. With a `catalog`, the same thread also brings forward the index of each table last used at its
    current snapshot as soon as a new snapshot lands (polled every `refresh_seconds`, or at once on `notify` after a
    change through this server), so that the next training set finds it ready: one table at a time, within the same
    byte cap.

    An index brought forward shares most of its memory with the one it came from (the same runs, columns extended
    in place): that memory is counted once, with the newer index, and the older one is charged only for the rest
    (its columns before a copy, its runs before a fold) and is evicted with the newer one. So two generations of a
    table near the cap do not count twice and push out the other tables' indexes, which would then be read whole.
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
        self.deletes_masked = 0  # indexes brought forward past deletes by masking rows, not rebuilt
        self.folds = 0  # indexes whose runs the background thread merged into one
        self.too_large = 0  # indexes not kept for want of room: their tables' training sets at that snapshot use DuckDB
        self._to_fold: set[_Key] = set()
        self._unfolded: set[_Key] = set()  # folds waiting for room (logged once)
        self._waiting_since: float | None = None  # when a fold first waited for no read to stream (`_waits`)
        self._indexes: OrderedDict[_Key, AsofIndex] = OrderedDict()
        self._too_large: dict[_Key, None] = {}  # larger than the whole cap (an ordered set, pruned)
        # A followed table's index refused beside the others': (its base snapshot, the bytes it needed), until the
        # cache frees bytes (an eviction, a table no longer followed); its later snapshots from the same base need
        # as much or more, so they are refused before their files are read.
        self._not_beside: dict[tuple[str, FeatureSpec, KeyShare | None], tuple[int | None, int]] = {}
        self._owner: dict[_Key, _Key] = {}  # an older generation -> the newer one its shared memory is counted with
        self._used_alone: set[_Key] = set()  # older generations that requests used since they became part of another
        self._asked: dict[_Key, float] = {}  # when a request last asked for a cached index (`time.monotonic`)
        self._current: dict[tuple[str, FeatureSpec, KeyShare | None], _Key] = {}  # a followed table's latest index
        # The byte cap and the server's memory budget: evictions for either drop indexes here, under its lock.
        self._account = (budget or MemoryBudget(max_bytes)).account("training_set", max_bytes, self._evicted)
        self._lock = self._account.lock
        self._building = LockPool()  # one build per snapshot at a time: requests for it wait for the first
        # (table name, share) -> (uuid, spec) to bring forward
        self._follow: dict[tuple[str, KeyShare | None], tuple[str, FeatureSpec]] = {}
        # A followed table -> what it was followed as and the metadata file its last refresh found: not refreshed
        # again while the catalog points there (`refresh`)
        self._polled: dict[tuple[str, KeyShare | None], tuple[str, FeatureSpec, str]] = {}
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        if catalog is not None and max_bytes > 0:
            self._start()

    def _start(self) -> None:
        """The background thread: refreshes (with a catalog) and folds."""
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
        """The index if it is built already; never builds. A request's: a cached index counts as asked for now."""
        key = (str(table.metadata.table_uuid), snapshot_id, spec, share)
        with self._lock:
            index = self._indexes.get(key)
            if index is not None:
                self._asked[key] = time.monotonic()
            return index

    def get(
        self, table: Table, snapshot_id: int | None, spec: FeatureSpec, share: KeyShare | None = None
    ) -> AsofIndex | None:
        """The index of `table` at `snapshot_id` (of its rows in `share` only, if given), built now if need be;
        None if it would not fit. A request's: the index counts as asked for now (`_drop_generations`)."""
        return self._get(table, snapshot_id, spec, share, asked=True)

    def _get(
        self, table: Table, snapshot_id: int | None, spec: FeatureSpec, share: KeyShare | None, asked: bool
    ) -> AsofIndex | None:
        """`get`, for a request (`asked`) or for the refresh thread, which asks for no snapshot itself."""
        if self.max_bytes <= 0:
            return None
        uuid = str(table.metadata.table_uuid)
        key = (uuid, snapshot_id, spec, share)
        current = table.current_snapshot()
        # Used at its current snapshot: kept current once its index is cached (the refresh thread stops following
        # a table whose indexes are all gone, so following it from the start of its build would lose it); only
        # with a catalog to look up its new snapshots in.
        follow = self.catalog is not None and current is not None and current.snapshot_id == snapshot_id
        with self._building(key):
            with self._lock:
                if key in self._too_large:
                    self.misses += 1
                    return None
                if key in self._indexes:
                    self.hits += 1
                    self._account.touch(key)  # least recently used across the server's caches go first
                    if asked:
                        self._asked[key] = time.monotonic()
                    if key in self._owner:  # kept alone if its newer generation is evicted (`_evicted`)
                        self._used_alone.add(key)
                    if follow:
                        self._follow[(table_name(table), share)] = (uuid, spec)
                    return self._indexes[key]
                self.misses += 1
            # Its cap, or less while the server's memory budget cannot free more: an index that could not be
            # kept is not built (the request goes to DuckDB), and is tried again only when the cap allowed it.
            room = self._account.limit()
            with self._lock:
                beside = self._account.room_beside(self._in_use(key))
            work = _Work(self, key)
            try:
                return self._keep(key, table, spec, share, follow, asked, room, beside, work)
            finally:
                work.release()

    def _keep(
        self,
        key: _Key,
        table: Table,
        spec: FeatureSpec,
        share: KeyShare | None,
        follow: bool,
        asked: bool,
        room: int,
        beside: int,
        work: _Work,
    ) -> AsofIndex | None:
        """Build `key`'s index (its work reserved in `work`) and keep it if it fits: `get` once it was not cached."""
        uuid, snapshot_id = key[0], key[1]
        streaming = self.caches.in_use.snapshots(uuid)  # before the lock: the running reads' own lock is taken alone
        try:
            index, how, base = self._build(table, snapshot_id, spec, share, room, beside, work)
        except LimitError as exc:
            log.info("training sets from %s at snapshot %s use DuckDB: %s", table_name(table), snapshot_id, exc)
            with self._lock:
                self.too_large += 1
                if isinstance(exc, _NotBeside):
                    self._not_beside[(uuid, spec, share)] = (exc.base, exc.size)
                elif room >= self.max_bytes:
                    self._refuse(key)
            return None
        with self._lock:
            keep = self._in_use(key) if base is not None else set()
            if keep and not self._beside(key, index, keep):
                assert base is not None, "only an index brought forward is refused beside the others"
                self._not_beside[(uuid, spec, share)] = (base.snapshot_id, index.nbytes())
                return None
            older = self._lean(key, index, base)
            # Else (the room taken meanwhile) it serves this request only.
            admitted = self._account.admit(key, index.nbytes(), work.reserved, keep=keep)
            work.reserved = 0  # given back by `admit`: the index's charge now, if admitted
            if admitted:
                self._indexes[key] = index
                if asked:
                    self._asked[key] = time.monotonic()
                if base is not None:  # its fold, if due, is the newer one's now: the older one's is wasted
                    older_key = (uuid, base.snapshot_id, spec, share)
                    if older_key in self._to_fold:
                        self._to_fold.discard(older_key)
                        self._to_fold.add(key)
                if follow:
                    self._follow[(table_name(table), share)] = (uuid, spec)
                    self._current[(uuid, spec, share)] = key
                if index.crowded(_FOLD_RUNS, _FOLD_RATIO):
                    self._to_fold.add(key)
                    if self._thread is None:
                        self._start()
                    if threading.current_thread() is not self._thread:  # else its every round bails out
                        self._wake.set()
                self._drop_generations(uuid, streaming)  # those it replaced go, unless a request may ask soon
            elif older is not None:
                self._alone(older)
            if how == "built":
                self.builds += 1
            else:
                self.incremental_builds += 1
                self.deletes_masked += how == "masked"
        return index

    def _in_use(self, key: _Key) -> set[_Key]:
        """The indexes that bringing `key`'s table forward must not evict: the latest of each other table kept
        current (followed). Under the lock."""
        followed = {(uuid, spec, share) for (_, share), (uuid, spec) in self._follow.items()}
        table = (key[0], key[2], key[3])
        return {k for t, k in self._current.items() if t in followed and t != table and k in self._indexes}

    def _beside(self, key: _Key, index: AsofIndex, keep: set[_Key]) -> bool:
        """Whether `index`, brought forward, fits beside the indexes `keep` of the other tables kept current: else
        evicting one of them would have it read whole at its next use, pushing out another, and so on (thrashing).
        Then that snapshot's training sets join the table with DuckDB (a warning says so, and `too_large` in the
        stats counts it), until the cache has room again. Under the lock."""
        room = self._account.room_beside(keep)
        if index.nbytes() <= room:
            return True
        log.warning(
            "training-set index of %s at snapshot %s (%.1f MiB) does not fit beside the indexes of the tables in "
            "use (room for %.1f MiB): its training sets at that snapshot use DuckDB; --historical-cache-mb sets the "
            "room",
            index.name,
            key[1],
            index.nbytes() / 2**20,
            room / 2**20,
        )
        self.too_large += 1
        return False

    def _refuse(self, key: _Key) -> None:
        """Remember `key` as larger than the whole cap (not tried again), forgetting the oldest such past
        `_TOO_LARGE_KEYS`. Under the lock."""
        self._too_large[key] = None
        while len(self._too_large) > _TOO_LARGE_KEYS:
            del self._too_large[next(iter(self._too_large))]

    def _lean(self, key: _Key, index: AsofIndex, base: AsofIndex | None) -> _Key | None:
        """Charge `base`, the cached index `index` was brought forward from, only for the memory `index` does not
        share with it, and count it as part of `index` from now on (unless it is part of another already): its
        key, if so. Under the lock, before `index` is admitted (so that evictions for it see the lower charge)."""
        if base is None:
            return None
        older = (key[0], base.snapshot_id, key[2], key[3])
        if self._indexes.get(older) is not base or older in self._owner:
            return None
        self._owner[older] = key
        self._used_alone.discard(older)
        self._account.resize(older, base.nbytes() - base.shared_bytes(index))
        return older

    def _alone(self, older: _Key) -> None:
        """`older` is part of no newer index after all (that one was not admitted): charged in full again, or
        evicted when that no longer fits."""
        if self._owner.pop(older, None) is None:
            return
        index = self._indexes.get(older)
        if index is None or not self._account.resize(older, index.nbytes()):
            self._account.discard(older)

    def _recharge(self, key: _Key) -> None:
        """Charge the indexes counted as part of `key` anew after it changed (a folded index no longer holds their
        runs): `_part_of`."""
        index = self._indexes.get(key)
        if index is not None:
            for older in [k for k, owner in self._owner.items() if owner == key]:
                self._part_of(older, index)

    def _part_of(self, older: _Key, index: AsofIndex) -> None:
        """Charge `older` for what it does not share with `index`, the newer generation it is part of now: if the
        growth fits in room to spare, else evict it (never another index for an older generation). Under the
        lock."""
        old = self._indexes.get(older)
        if old is None:
            return
        charge = old.nbytes() - old.shared_bytes(index)
        growth = charge - self._account.charge(older)
        if growth > self._account.limit() - self._account.held or not self._account.resize(older, charge):
            self._account.discard(older)

    def _drop_generations(self, uuid: str, streaming: set[int]) -> None:
        """Drop the indexes of `uuid` that a newer one replaced and that no request may ask for soon, so that older
        generations do not pile up (each costs little memory: the byte cap would let thousands stay) and their
        snapshots may expire. Replaced: an older generation (part of a newer one), and, of a followed table, every
        index but its current one (a compaction has the current one rebuilt, not brought forward). Of those, the
        ones whose snapshot a running read holds (`streaming`) stay, and the `_RECENT_GENERATIONS` that requests
        asked for most recently, within `_RECENT_SECONDS`: an index only brought forward ahead (never asked for)
        goes as soon as a newer one replaces it. Under the lock."""
        since = time.monotonic() - _RECENT_SECONDS
        lines: dict[tuple[str, FeatureSpec, KeyShare | None], list[_Key]] = {}
        for key in self._indexes:
            if key[0] == uuid:
                lines.setdefault((key[0], key[2], key[3]), []).append(key)
        for line, keys in lines.items():
            current = self._current.get(line)
            replaced = [k for k in keys if k != current and (k in self._owner or current is not None)]
            recent = sorted((k for k in replaced if self._asked.get(k, since) > since), key=self._asked.__getitem__)
            kept = set(recent[-_RECENT_GENERATIONS:]) | {k for k in replaced if k[1] in streaming}
            for key in replaced:
                if key not in kept and key in self._indexes:
                    self._drop_generation(key)

    def _drop_generation(self, key: _Key) -> None:
        """Drop `key`'s index, replaced by a newer one: the older generations counted as part of it become part of
        its own newer generation (charged for what they do not share with that), or, if it has none, stay alone if
        that fits in room to spare (`_detach`). Under the lock."""
        newer = self._owner.get(key)
        parts = [k for k, owner in self._owner.items() if owner == key]
        for part in parts:
            if newer is not None:
                self._owner[part] = newer
            else:
                del self._owner[part]
        # An older generation frees only what it held alone, as good as held before it was ever dropped: not the
        # room an index refused beside the others waits for (it would read its appends again at each put here).
        refused = dict(self._not_beside) if newer is not None else {}
        self._account.discard(key)
        self._not_beside.update(refused)
        index = self._indexes.get(newer) if newer is not None else None
        for part in parts:
            if index is not None:
                self._part_of(part, index)
            elif not self._detach(part):
                self._account.discard(part)

    def _evicted(self, key: _Key) -> None:
        """The account dropped `key` (under the lock): the older indexes counted as part of it go with it."""
        self._indexes.pop(key, None)
        self._owner.pop(key, None)
        self._used_alone.discard(key)
        self._asked.pop(key, None)
        self._unfolded.discard(key)
        self._not_beside.clear()  # room freed: refused indexes may fit now
        self._polled.clear()  # ... and the followed tables are looked at again (an index gone unfollows its table)
        if self._current.get((key[0], key[2], key[3])) == key:
            del self._current[(key[0], key[2], key[3])]
        for older in [k for k, owner in self._owner.items() if owner == key]:
            del self._owner[older]
            if older in self._used_alone and self._detach(older):
                continue
            self._account.discard(older)

    def _detach(self, older: _Key) -> bool:
        """Keep `older`, in use (a job pinned at its snapshot), alone after its newer generation went: charged in
        full if that fits in the room to spare (else the next use would read it whole). Under the lock."""
        self._used_alone.discard(older)
        index = self._indexes.get(older)
        if index is None:
            return False
        growth = index.nbytes() - self._account.charge(older)
        spare = min(self._account.limit() - self._account.held, self._account.budget.total - self._account.budget.used)
        return growth <= spare and self._account.resize(older, index.nbytes())

    def snapshots(self, table_uuid: str) -> set[int]:
        """The snapshots of one table (by uuid) whose index is cached and was asked for by a request, once the
        replaced indexes no request may ask for soon are dropped (`_drop_generations`): snapshot expiry keeps them.
        An index the refresh thread brought forward that no request asked for keeps nothing: the table's newest
        snapshots stay anyway (expiry keeps the newest), and one that a compaction replaced would otherwise stay
        until the index is rebuilt."""
        streaming = self.caches.in_use.snapshots(table_uuid)
        with self._lock:
            self._drop_generations(table_uuid, streaming)
            return {key[1] for key in self._asked if key[0] == table_uuid and key[1] is not None}

    def stats(self) -> dict[str, int]:
        with self._lock:
            indexes = list(self._indexes.values())
        return {
            "snapshots": len(indexes),
            "bytes": self._account.held,  # memory shared by generations counted once
            "max_bytes": self.max_bytes,
            "builds": self.builds,
            "incremental_builds": self.incremental_builds,
            "refreshed_ahead": self.refreshed_ahead,
            "tables_followed": len(self._follow),
            "deletes_masked": self.deletes_masked,
            "folds": self.folds,
            "too_large": self.too_large,
            "runs": sum(len(i.runs) for i in indexes),
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
                "rows": index.row_count - index.dead,
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
        self,
        table: Table,
        snapshot_id: int | None,
        spec: FeatureSpec,
        share: KeyShare | None,
        room: int,
        beside: int,
        work: _Work,
    ) -> tuple[AsofIndex, str, AsofIndex | None]:
        """The snapshot's index (of the rows in `share` only, if given), how, and from which: "built", or brought
        forward from a cached ancestor's ("extended", or "masked" when it masked deleted rows) when only appends
        and deletes it can mask happened since (in the same schema), else read whole (deletes applied) and sorted.
        Refused past `room` bytes, or, brought forward, when the ancestor's alone pass `beside` (`_beside`)."""
        started = time.perf_counter()
        request = ScanRequest(table=table_name(table), snapshot_id=snapshot_id, schema_id=spec.schema_id)
        plan = plan_table_scan(table, request, self.caches)
        base = self._ancestor(table, snapshot_id, spec, share) if snapshot_id is not None else None
        if base is not None and base.snapshot_id is not None and not renamed(table):
            assert snapshot_id is not None, "only a snapshot has ancestors"
            changes = changed_since(table, base.snapshot_id, snapshot_id)
            same_schema = (
                snapshot_schema(table, base.snapshot_id).schema_id == snapshot_schema(table, snapshot_id).schema_id
            )
            forward = changes.files is not None and same_schema
            with self._lock:
                refused = self._not_beside.get((str(table.metadata.table_uuid), spec, share))
            # Brought forward, it would only grow (from the size already refused, from the same base): not worth
            # the read.
            need = max(base.nbytes(), refused[1] if refused is not None and refused[0] == base.snapshot_id else 0)
            if forward and need > beside:
                raise _NotBeside(
                    f"its index would pass the {beside >> 20} MiB the training-set cache has room for beside the "
                    "indexes of the tables in use",
                    base.snapshot_id,
                    need,
                )
            work.bounded = forward
            try:
                index = self._forward(base, plan, changes, share, room, work) if forward else None
            except _NoRoom as exc:  # its later snapshots from the same base need as much or more: not tried again
                raise _NotBeside(str(exc), base.snapshot_id, base.nbytes() + work.reserved + exc.size) from exc
            if index is not None:
                if index.nbytes() > room:
                    raise LimitError(f"its index passes the {room >> 20} MiB the training-set cache has room for")
                assert changes.files is not None, "brought forward only from a list of changes"
                log.info(
                    "training-set index of %s at snapshot %s: extended from snapshot %s by %d row(s) in %d file(s), "
                    "%d row(s) masked by %d delete file(s), %d run(s), %.1f MiB, %.2f s",
                    index.name,
                    snapshot_id,
                    base.snapshot_id,
                    index.row_count - base.row_count,
                    len(changes.files),
                    index.dead - base.dead,
                    len(changes.deletes),
                    len(index.runs),
                    index.nbytes() / 2**20,
                    time.perf_counter() - started,
                )
                return index, "masked" if index.dead > base.dead else "extended", base
        work.bounded = False
        if snapshot_id is None:  # no snapshot when planned: stay empty even if a write has since made one
            plan = replace(plan, snapshot_id=None)
        # `_read` probes and logs the read path itself: a second probe here would list the files twice.
        files = direct_files(plan)[0] if share is None and plan.snapshot_id is not None else None
        if files is not None:  # file by file, so that later deletes can be masked
            rows, spans = self._read_files(plan, _in_commit_order(plan, files), room, work)
            index, path = AsofIndex.build(table_name(table), snapshot_id, spec, rows, spans), "direct"
        else:
            rows, path = self._read(plan, share, room, work)
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
        return index, "built", None

    def _forward(
        self, base: AsofIndex, plan: ScanPlan, changes: Appended, share: KeyShare | None, room: int, work: _Work
    ) -> AsofIndex | None:
        """`base` brought forward to the plan's snapshot: the appended files read and sorted into a run of their
        own, the rows that position delete files delete since masked. None when a delete cannot be masked here
        (an equality delete, a delete of a file the index did not read file by file, or masked rows past
        1/`_MASK_RATIO` of the columns): the caller reads the table whole."""
        assert changes.files is not None and plan.snapshot_id is not None, "a list of changes to a snapshot"
        appended = {f.file_path: f for f in changes.files}
        spans = {span.file.file_path: span for span in base.spans or ()}
        on_appended: dict[str, set[DataFile]] = {}
        on_spans: dict[str, set[DataFile]] = {}
        for delete_file in changes.deletes:
            target = referenced_data_file(delete_file)  # None: an equality delete, or one of several data files
            if delete_file.file_format != FileFormat.PARQUET:  # a deletion vector
                return None
            if target in appended:
                on_appended.setdefault(target, set()).add(delete_file)
            elif target in spans:
                on_spans.setdefault(target, set()).add(delete_file)
            else:
                return None
        dead: list[np.ndarray] = []
        if on_spans:
            tasks = [FileScanTask(spans[path].file, files) for path, files in on_spans.items()]
            for path, positions in deleted_positions(plan.table.io, tasks, self.caches.positions).items():
                rows, spans[path] = spans[path].rows(positions)
                dead.append(rows)
        masked = np.concatenate(dead) if dead else np.empty(0, dtype=np.int64)
        if (base.dead + len(masked)) * _MASK_RATIO > base.row_count:
            return None
        reading = replace(plan, appended=changes.files)
        if base.spans is not None and direct_files(reading)[0] is not None:
            tasks = [FileScanTask(f, on_appended.get(f.file_path)) for f in changes.files]
            added, added_spans = self._read_files(plan, tasks, room, work)
        elif on_appended:
            return None
        else:
            added, added_spans = self._read(reading, share, room, work)[0], None
        work.take(base.extension_bytes(added), "extending its index")
        forward = base.masked(plan.snapshot_id, masked, tuple(spans.values())) if len(masked) else base
        return forward.extend(plan.snapshot_id, added, added_spans)

    def _read_files(
        self, plan: ScanPlan, tasks: list[FileScanTask], room: int, work: _Work
    ) -> tuple[pa.Table, tuple[FileSpan, ...]]:
        """The rows of `tasks` (their delete files applied), file after file in one scan (a scan per file costs
        more than a small append's rows), and where each file's rows are: its record count less its deleted
        positions; refused as soon as they pass `room` bytes, each batch reserved in `work`."""
        deleted = deleted_positions(plan.table.io, [t for t in tasks if t.delete_files], self.caches.positions)
        empty = np.empty(0, dtype=np.int64)
        spans: list[FileSpan] = []
        first = 0
        for task in tasks:
            absent = deleted.get(task.file.file_path, empty)
            spans.append(FileSpan(task.file, first, task.file.record_count - len(absent), absent))
            first += spans[-1].count
        batches: list[pa.RecordBatch] = []
        taken = 0
        reader = direct_reader(plan, tasks, _READ_BATCH_ROWS)  # in the tasks' order
        reader = reader if reader.schema == plan.schema else reader.cast(plan.schema)
        for batch in reader:
            batches.append(batch)
            taken += _kept(reader, batch, room, taken, work)
        rows = pa.Table.from_batches(batches, plan.schema)
        if rows.num_rows != first:
            raise RuntimeError(f"read {rows.num_rows} rows of {plan.name}'s files, whose manifests count {first}")
        return rows, tuple(spans)

    def _read(self, plan: ScanPlan, share: KeyShare | None, room: int, work: _Work) -> tuple[pa.Table, str]:
        """The planned rows (those in `share` only, if given), and their read path; refused as soon as they
        pass `room` bytes, each batch reserved in `work`."""
        files = direct_files(plan)[0] if share is not None and plan.snapshot_id is not None else None
        if share is not None and files is not None:  # only the files of the share's buckets
            kept = _in_commit_order(plan, share_tasks(plan.table, share, files))
            reader, path = direct_reader(plan, kept, _READ_BATCH_ROWS), f"direct ({len(kept)} of {len(files)} files)"
        else:
            reader, path = open_scan(plan, self.engine, _READ_BATCH_ROWS)
        batches, taken = [], 0
        owned = np.array(share.owned if share is not None else [], dtype=np.int64)
        for batch in reader:
            if share is not None:  # keep only this share: the cap counts what is kept
                batch = batch.filter(pa.array(np.isin(key_slots(batch.column(share.key), share.slots), owned)))
            batches.append(batch)
            taken += _kept(reader, batch, room, taken, work)
        return pa.Table.from_batches(batches, plan.schema), path

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_seconds)
            self._wake.clear()
            self.refresh()  # first: the next training set may be waiting for it, never for a fold
            self._fold_all()

    def refresh(self) -> None:
        """Bring each followed table's index forward to its current snapshot now (one round of the thread). Where the
        catalog says where it points every table in one query (SQL catalogs), a table still at the metadata file its
        last refresh found is left alone: a round over many unchanged tables costs that one query, not one each."""
        # Where the catalog points every followed table now, in one query (None: it cannot say, or has no catalog).
        pointers = None if self.catalog is None else self.catalog.metadata_locations({n for n, _ in list(self._follow)})
        for followed, (uuid, spec) in list(self._follow.items()):
            if self._stop.is_set():
                return
            pointer = pointers.get(followed[0]) if pointers is not None else None
            if pointer is not None and self._polled.get(followed) == (uuid, spec, pointer):
                continue
            try:
                self._refresh(followed, uuid, spec)
            except Exception:
                log.exception("training-set index of %s: not brought forward; requests will build it", followed[0])
                self._unfollow(followed, uuid, spec)
            with self._lock:
                if pointer is not None and self._follow.get(followed) == (uuid, spec):
                    self._polled[followed] = (uuid, spec, pointer)

    def _fold_all(self) -> None:
        """Merge the runs of each index that has too many into one, while requests keep using the index as it
        is; the merged one replaces it (it answers exactly alike). The merge's new arrays are reserved in the
        memory budget while it runs; without room it waits for a later turn (queued again). The most crowded
        first; a new snapshot to bring forward leaves the rest for later, but only after one fold, and never the
        folds of indexes past `_MAX_RUNS` (else puts landing every round would starve folds and the runs that
        every search goes through would grow without limit). Older generations are not folded (their fold is
        their newer one's). A fold into the first run waits until no read streams (`_waits`;
        `SnapshotsInUse.when_quiet` wakes the thread then): beside a training set on two cores, the fold of a large
        index (0.3 s of memory-bound numpy per 10M rows) made it slower than the one more run it searches; past
        `_FOLD_PATIENCE`, `_FORCE_RATIO` or `_MAX_RUNS` it is folded whatever runs, since searching the runs then
        costs every read more than the fold costs one."""
        with self._lock:
            waiting = sorted(
                (k for k in self._to_fold if k in self._indexes and k not in self._owner),
                key=lambda k: len(self._indexes[k].runs),
                reverse=True,
            )
            self._to_fold = set()
        deferred = False
        for at, key in enumerate(waiting):
            if self._stop.is_set():
                return
            with self._lock:
                index = self._indexes.get(key)
                if index is None or key in self._owner:  # evicted, or superseded by a newer generation meanwhile
                    continue
            if at > 0 and self._wake.is_set() and len(index.runs) <= _MAX_RUNS:
                with self._lock:  # a new snapshot to bring forward first: fold the rest after it
                    self._to_fold.update(waiting[at:])
                return
            if self._waits(index):
                with self._lock:
                    self._to_fold.add(key)
                deferred = True
                continue
            extra = _FOLD_COPIES * sum(run.nbytes() for run in index.runs[index.fold_start() :])
            if not self.reserve(key, extra):
                with self._lock:
                    if key not in self._unfolded:
                        log.info("training-set index of %s: runs not folded yet, no room beside them", index.name)
                    self._unfolded.add(key)
                    self._to_fold.add(key)
                continue
            self._unfolded.discard(key)
            started = time.perf_counter()
            try:
                folded = index.folded()
            except Exception:
                log.exception("training-set index of %s: runs not folded", index.name)
                continue
            finally:
                self.release(extra)
            if folded is index:  # masked deletes left one run: nothing to fold
                continue
            with self._lock:
                if self._indexes.get(key) is not index:  # evicted or replaced meanwhile
                    continue
                # Folded key codes may take more room than the runs' (codes by distinct values): that growth
                # must fit in room to spare (older generations dropped for it), never evicting an index in use.
                growth = folded.nbytes() - index.nbytes()
                if key in self._owner or (growth > 0 and not self._make_free(key, growth)):
                    log.info("training-set index of %s: runs not folded, no room beside the indexes", index.name)
                    continue
                self._indexes[key] = folded
                if not self._account.resize(key, folded.nbytes()):
                    self._indexes[key] = index
                    log.info("training-set index of %s: runs not folded, the folded index would not fit", index.name)
                    continue
                self.folds += 1
                self._recharge(key)
            log.info(
                "training-set index of %s at snapshot %s: %d runs folded, %.1f -> %.1f MiB, %.2f s",
                index.name,
                index.snapshot_id,
                len(index.runs),
                index.nbytes() / 2**20,
                folded.nbytes() / 2**20,
                time.perf_counter() - started,
            )
        if deferred:  # fold them once no read streams, before the next poll
            self.caches.in_use.when_quiet(self._wake.set)

    def _waits(self, index: AsofIndex) -> bool:
        """Whether `index`'s fold waits for no read to stream: one into the first run (a pass over its rows; small
        runs merged among themselves cost their own), for `_FOLD_PATIENCE` at most since a fold first waited, and
        never past `_FORCE_RATIO` or `_MAX_RUNS`."""
        if index.fold_start() > 0 or index.crowded(_MAX_RUNS, _FORCE_RATIO):
            return False
        if not self.caches.in_use.busy():
            self._waiting_since = None
            return False
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < _FOLD_PATIENCE:
            return True
        self._waiting_since = None  # waited long enough: this one folds now, the next waits afresh
        return False

    def reserve(self, key: _Key, extra: int) -> bool:
        """Reserve `extra` bytes for work on `key`'s index (folding its runs, bringing it forward: `_Work`), never by
        evicting an index that is the newest of its table (it would be read whole at its next use, and its room taken
        again by the next fold: thrashing): only room to spare, after dropping older generations, `key`'s own first
        (the work leaves them holding the old runs alone). False if that is not enough: a fold leaves the runs as
        they are (searched together, as correct), an extension leaves that snapshot to DuckDB."""
        with self._lock:
            return self._make_free(key, extra) and self._account.reserve(extra)

    def release(self, extra: int) -> None:
        """Give back `extra` reserved bytes that no index took over."""
        self._account.release(extra)

    def _make_free(self, key: _Key, size: int) -> bool:
        """Whether `size` bytes fit beside the cached indexes once older generations are dropped (`key`'s own
        first), as many as that takes. Under the lock."""
        own = [k for k, owner in self._owner.items() if owner == key]
        for older in own + [k for k in self._owner if k not in own]:
            if self._account.limit() - self._account.held >= size:
                break
            self._account.discard(older)
        return self._account.limit() - self._account.held >= size

    def _refresh(self, followed: tuple[str, KeyShare | None], uuid: str, spec: FeatureSpec) -> None:
        """Index the table's current snapshot if the index of an earlier one is cached; stop following a table
        whose indexes are all gone (evicted, or the table was replaced or redefined)."""
        assert self.catalog is not None, "tables are followed only with a catalog"
        name, share = followed
        try:
            table = self.catalog.read(name)
        except NotFoundError:
            self._unfollow(followed, uuid, spec)
            return
        # Redefined, or its schema changed (with or without a snapshot): requests read it in the new schema, under
        # another spec, and follow it again.
        same = (
            str(table.metadata.table_uuid) == uuid
            and FeatureSpec.from_properties(table.metadata.properties) == replace(spec, schema_id=None)
            and spec.schema_id in (None, table.metadata.current_schema_id)
        )
        with self._lock:  # as one with a request caching a new index (which follows the table again)
            held = any(k[0] == uuid and k[2] == spec and k[3] == share for k in self._indexes)
            if not held or not same:
                self._unfollow(followed, uuid, spec)
                return
        current = table.current_snapshot()
        if current is None:
            return
        with self._lock:  # refused already: not asked again (a request would count a miss and plan it again)
            if (uuid, current.snapshot_id, spec, share) in self._indexes:
                return
            for key in [k for k in self._too_large if k[0] == uuid and k[2] == spec and k[3] == share]:
                if key[1] != current.snapshot_id:  # an older snapshot than the one followed
                    del self._too_large[key]
            if (uuid, current.snapshot_id, spec, share) in self._too_large or (uuid, spec, share) in self._not_beside:
                return
        if self._get(table, current.snapshot_id, spec, share, asked=False) is not None:
            with self._lock:
                self.refreshed_ahead += 1

    def _unfollow(self, followed: tuple[str, KeyShare | None], uuid: str, spec: FeatureSpec) -> None:
        """Stop following the table, unless a request has since followed it as another table of the same name."""
        with self._lock:
            if self._follow.get(followed) == (uuid, spec):
                del self._follow[followed]
                self._not_beside.clear()  # its index no longer kept beside the others': they may fit now
                self._polled.clear()
