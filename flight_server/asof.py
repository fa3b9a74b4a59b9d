"""Feature tables sorted for point-in-time lookups, kept per snapshot between training-set requests.

A snapshot never changes, so its rows can be sorted once by (keys, event time) and then serve
every training set asked of it: each entity row finds its feature row with one binary search,
and the feature values are gathered with Arrow's `take`. That is an order of magnitude cheaper
than re-reading and re-joining the table for every request, and it answers entity rows batch by
batch, as they arrive, in their own order, with nothing held between batches.

Keys become dense integer codes (a dictionary per key column; composite keys combine them), event
times become offsets from the table's earliest time (or ranks among its distinct times when the
packed value would not fit 62 bits), and a row's stamp `code * span + offset` orders rows by key,
then time. Rows that tie on (keys, event time) keep only the latest created time. The cache holds
the most recently used snapshots up to a memory budget; a table that would not fit is left to the
DuckDB join.
"""

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

from flight_server.catalog import FeatureSpec, table_name
from flight_server.commits import LockPool
from flight_server.duck import Engine
from flight_server.errors import LimitError, RequestError
from flight_server.protocol import ScanRequest
from flight_server.scans import open_scan, plan_table_scan
from flight_server.schemas import micros

log = logging.getLogger(__name__)

_STAMP_LIMIT = 1 << 62
_BLOCK = 64  # stamps per fence entry
_READ_BATCH_ROWS = 262_144


_DENSE_MAX = 1 << 26  # entries of a value-indexed code table (256 MiB of int32 at most)


@dataclass(frozen=True)
class IntCodes:
    """Codes of int64 values: a table indexed by value when their range is small (a gather), else
    binary search over the sorted distinct values."""

    low: int
    table: np.ndarray | None  # code of each value - low, or -1
    distinct: np.ndarray | None  # sorted distinct values; a value's code is its position

    @classmethod
    def build(cls, values: np.ndarray) -> tuple[IntCodes, np.ndarray]:
        """Codes for the distinct `values`, and the code of each of them."""
        if len(values) == 0:
            return cls(0, None, values), values
        low, high = int(values.min()), int(values.max())
        if high - low < max(4 * len(values), 1 << 16) and high - low < _DENSE_MAX:
            present = np.zeros(high - low + 1, dtype=bool)
            present[values - low] = True
            table = np.where(present, np.cumsum(present, dtype=np.int64) - 1, -1)
            return cls(low, table, None), table[values - low]
        distinct, codes = np.unique(values, return_inverse=True)
        return cls(low, None, distinct), codes.astype(np.int64, copy=False)

    @property
    def count(self) -> int:
        if self.table is not None:
            return int(self.table.max()) + 1 if len(self.table) else 0
        return len(self.distinct) if self.distinct is not None else 0

    def codes(self, values: np.ndarray) -> np.ndarray:
        """The code of each value, -1 for values never seen."""
        if self.table is not None:
            at = values - self.low
            inside = (at >= 0) & (at < len(self.table))
            return np.where(inside, self.table[np.where(inside, at, 0)], -1)
        distinct = self.distinct if self.distinct is not None else np.empty(0, np.int64)
        if len(distinct) == 0:
            return np.full(len(values), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(distinct, values), len(distinct) - 1)
        return np.where(distinct[at] == values, at, -1)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.table, self.distinct) if a is not None)


@dataclass(frozen=True)
class HashCodes:
    """Codes of values of any other type (strings, dates, decimals): positions in a hashed dictionary."""

    dictionary: pa.Array

    @classmethod
    def build(cls, column: pa.Array | pa.ChunkedArray) -> tuple[HashCodes, np.ndarray]:
        dictionary = pc.unique(column)
        dictionary = dictionary.combine_chunks() if isinstance(dictionary, pa.ChunkedArray) else dictionary
        codes = cls(dictionary)
        return codes, codes.codes(column)

    @property
    def count(self) -> int:
        return len(self.dictionary)

    def codes(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        found = pc.index_in(column, value_set=self.dictionary).fill_null(-1)
        return found.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    def nbytes(self) -> int:
        return self.dictionary.nbytes


def _text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _int64(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Integers as int64 (so int32 meets int64 without overflow) and which are not null."""
    try:
        values = column.cast(pa.int64())
    except pa.ArrowInvalid as exc:
        raise RequestError(f"an entity key cannot be compared with the feature keys: {exc}") from None
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    return values.fill_null(0).to_numpy(zero_copy_only=False), valid


@dataclass(frozen=True)
class KeyCodes:
    """Dense integer codes for key tuples: codes per column, combined column by column."""

    columns: list[IntCodes | HashCodes]
    steps: list[IntCodes]  # per column after the first: codes of (code so far, column code) pairs

    @classmethod
    def build(cls, columns: list[pa.Array | pa.ChunkedArray]) -> tuple[KeyCodes, np.ndarray]:
        """The codes of feature rows (whose keys are all non-null), and how to code entity keys alike."""
        per_column: list[IntCodes | HashCodes] = []
        steps: list[IntCodes] = []
        code = np.zeros(len(columns[0]) if columns else 0, dtype=np.int64)
        for i, column in enumerate(columns):
            lookup: IntCodes | HashCodes
            if pa.types.is_integer(column.type):
                lookup, own = IntCodes.build(_int64(column)[0])
            else:
                lookup, own = HashCodes.build(column.cast(pa.large_string()) if _text(column.type) else column)
            per_column.append(lookup)
            if i == 0:
                code = own
            else:
                step, code = IntCodes.build(code * lookup.count + own)
                steps.append(step)
        return cls(per_column, steps), code.astype(np.int64, copy=False)

    @property
    def count(self) -> int:
        if not self.columns:
            return 0
        return self.steps[-1].count if self.steps else self.columns[0].count

    def encode(self, columns: list[pa.Array | pa.ChunkedArray]) -> np.ndarray:
        """Codes of entity keys: -1 when any key is null or the tuple never occurs in the table."""
        code = np.empty(0, dtype=np.int64)
        for i, (column, lookup) in enumerate(zip(columns, self.columns, strict=True)):
            if isinstance(lookup, IntCodes):
                values, valid = _int64(column)
                own = np.where(valid, lookup.codes(values), -1)
            else:
                try:
                    own = lookup.codes(column.cast(lookup.dictionary.type))
                except pa.ArrowInvalid as exc:
                    raise RequestError(f"an entity key cannot be compared with the feature keys: {exc}") from None
            if i == 0:
                code = own
            else:
                both = (code >= 0) & (own >= 0)
                pairs = self.steps[i - 1].codes(np.where(both, code * lookup.count + own, -1))
                code = np.where(both, pairs, -1)
        return code

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.columns) + sum(s.nbytes() for s in self.steps)


@dataclass(frozen=True)
class TimeAxis:
    """Event times as small non-negative offsets, so that (key code, offset) packs into one int64.

    Feature offsets are >= 1; an entity time maps to the largest offset at or before it (0: before
    every feature row), so `feature offset <= entity offset` exactly when `feature time <= entity time`.
    """

    start: int
    span: int  # offsets are below it
    distinct: np.ndarray | None  # sorted distinct event times, when offsets are ranks among them

    @classmethod
    def build(cls, event_us: np.ndarray, keys: int) -> tuple[TimeAxis, np.ndarray]:
        if len(event_us) == 0:
            return cls(0, 1, None), event_us
        start, end = int(event_us.min()), int(event_us.max())
        span = end - start + 2
        if max(keys, 1) * span < _STAMP_LIMIT:
            return cls(start, span, None), event_us - (start - 1)
        distinct, rank = np.unique(event_us, return_inverse=True)
        return cls(start, len(distinct) + 1, distinct), rank.astype(np.int64) + 1

    def offsets(self, entity_us: np.ndarray) -> np.ndarray:
        if self.distinct is not None:
            return np.searchsorted(self.distinct, entity_us, side="right").astype(np.int64)
        return np.clip(entity_us - (self.start - 1), 0, self.span - 1)


@dataclass(frozen=True)
class FixedValues:
    """A fixed-width column (integers, floats, times) as raw bytes, gathered by numpy: far cheaper than
    Arrow's `take` with null indices, and nulls become a validity mask."""

    type: pa.DataType
    values: np.ndarray  # unsigned integers as wide as the type
    valid: np.ndarray | None  # None: no nulls

    def take(self, at: np.ndarray, known: np.ndarray) -> pa.Array:
        valid = known & self.valid[at] if self.valid is not None else known
        nulls = len(valid) - int(np.count_nonzero(valid))
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
        return pa.Array.from_buffers(self.type, len(at), [bitmap, pa.py_buffer(self.values[at])], nulls)

    def nbytes(self) -> int:
        return self.values.nbytes + (self.valid.nbytes if self.valid is not None else 0)


@dataclass(frozen=True)
class DictionaryValues:
    """A repetitive column (category strings) as codes into its distinct values: gathering 4-byte codes
    and then the few values is several times faster than gathering the strings themselves."""

    type: pa.DataType
    dictionary: pa.Array
    codes: np.ndarray  # int32
    valid: np.ndarray | None

    def take(self, at: np.ndarray, known: np.ndarray) -> pa.Array:
        valid = known & self.valid[at] if self.valid is not None else known
        return self.dictionary.take(pa.array(self.codes[at], mask=~valid))

    def nbytes(self) -> int:
        return self.dictionary.nbytes + self.codes.nbytes + (self.valid.nbytes if self.valid is not None else 0)


@dataclass(frozen=True)
class ArrowValues:
    """Any other column (decimals, booleans, lists, distinct strings), gathered by Arrow's `take`."""

    array: pa.Array

    @property
    def type(self) -> pa.DataType:
        return self.array.type

    def take(self, at: np.ndarray, known: np.ndarray) -> pa.Array:
        return self.array.take(pa.array(at, mask=~known))

    def nbytes(self) -> int:
        return self.array.nbytes


Values = FixedValues | DictionaryValues | ArrowValues


def _valid(array: pa.Array) -> np.ndarray | None:
    return array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else None


def column_values(column: pa.ChunkedArray) -> Values:
    """A column in the form cheapest to gather from (see the three classes above)."""
    t = column.type
    if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t)) and t.bit_width % 8 == 0:
        array = column.combine_chunks()
        raw = np.frombuffer(array.buffers()[1], dtype=f"u{t.bit_width // 8}", count=len(array), offset=array.offset)
        return FixedValues(t, raw, _valid(array))
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        encoded = column.combine_chunks().dictionary_encode()
        if len(encoded.dictionary) <= len(encoded) // 2:
            codes = encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)
            return DictionaryValues(t, encoded.dictionary, codes, _valid(encoded))
    return ArrowValues(column.combine_chunks())


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
        self, keys: list[pa.Array | pa.ChunkedArray], entity_us: np.ndarray, valid: np.ndarray, ttl: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each entity row, the row of `columns` it gets, and whether it gets one: equal keys, the latest
        event time at or before the entity's, and within the TTL when `ttl` says to apply it."""
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
            known &= self.event_us[at] >= entity_us - int(self.spec.ttl_seconds * 1_000_000)
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

    def __init__(self, engine: Engine, max_bytes: int):
        self.engine = engine
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
        plan = plan_table_scan(table, ScanRequest(table=table_name(table), snapshot_id=snapshot_id))
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
