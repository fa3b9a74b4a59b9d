"""Entity keys and feature values in the forms the sorted index searches and gathers quickly."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flight_server.base.schemas import micros
from flight_server.wire.errors import RequestError

_STAMP_LIMIT = 1 << 62

_DENSE_MAX = 1 << 26  # entries of a value-indexed code table (256 MiB of int32 at most)


def entity_micros(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entity timestamps as int64 UTC microseconds rounded down and rounded up, and which are not null.

    Feature times are whole microseconds (Iceberg's unit), so for an entity time `t` in nanoseconds
    `feature <= t` holds exactly when `feature <= floor(t)`, and the TTL's `feature >= t - ttl` exactly
    when `feature >= ceil(t) - ttl`: with `t` truncated, rows up to 999 ns too old passed the TTL.
    """
    if not (pa.types.is_timestamp(column.type) and column.type.unit == "ns"):
        values, valid = micros(column)
        return values, values, valid
    raw = pc.cast(column, pa.int64())
    nanos = raw.fill_null(0).to_numpy(zero_copy_only=False)
    return nanos // 1000, -(-nanos // 1000), pc.is_valid(raw).to_numpy(zero_copy_only=False)


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

    def values(self) -> np.ndarray:
        """The distinct values in code order (their codes are ranks, so sorted)."""
        if self.table is not None:
            return np.flatnonzero(self.table >= 0) + self.low
        return self.distinct if self.distinct is not None else np.empty(0, np.int64)

    def extend(self, values: np.ndarray) -> tuple[IntCodes, np.ndarray, np.ndarray]:
        """Codes for the values known and `values`; the new code of each old code (ranks both, so it rises
        with the old code), and the code of each of `values`."""
        known = self.values()
        codes, both = IntCodes.build(np.concatenate([known, values]))
        return codes, both[: len(known)], both[len(known) :]

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

    def extend(self, column: pa.Array | pa.ChunkedArray) -> tuple[HashCodes, np.ndarray, np.ndarray]:
        """`IntCodes.extend` for hashed values: unseen ones go after the known ones, which keep their codes."""
        unseen = pc.unique(pc.filter(column, pc.invert(pc.is_in(column, value_set=self.dictionary))))
        unseen = unseen.combine_chunks() if isinstance(unseen, pa.ChunkedArray) else unseen
        codes = HashCodes(pa.concat_arrays([self.dictionary, unseen.cast(self.dictionary.type)]))
        return codes, np.arange(self.count, dtype=np.int64), codes.codes(column)

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

    def extend(self, columns: list[pa.Array | pa.ChunkedArray]) -> tuple[KeyCodes, np.ndarray, np.ndarray]:
        """Codes for the key tuples known and those of `columns` (non-null): the new code of each old code, which
        rises with it (so stamps sorted by old code stay sorted), and the code of each new row."""
        per_column: list[IntCodes | HashCodes] = []
        steps: list[IntCodes] = []
        renumber = code = np.empty(0, dtype=np.int64)
        for i, (column, lookup) in enumerate(zip(columns, self.columns, strict=True)):
            extended: IntCodes | HashCodes
            if isinstance(lookup, IntCodes):
                extended, old, own = lookup.extend(_int64(column)[0])
            else:
                extended, old, own = lookup.extend(column.cast(lookup.dictionary.type))
            per_column.append(extended)
            if i == 0:
                renumber, code = old, own
                continue
            # Old pairs (previous code, own code) in their code order, renumbered; then the new rows' pairs.
            pairs = self.steps[i - 1].values()
            before, mine = np.divmod(pairs, max(lookup.count, 1))
            known = renumber[before] * extended.count + old[mine]
            step, both = IntCodes.build(np.concatenate([known, code * extended.count + own]))
            renumber, code = both[: len(known)], both[len(known) :]
            steps.append(step)
        return KeyCodes(per_column, steps), renumber, code.astype(np.int64, copy=False)

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

    def extend(self, known_us: np.ndarray, event_us: np.ndarray, keys: int) -> TimeAxis:
        """An axis for the event times `known_us` it was built for and the new `event_us`, for `keys` key codes;
        `feature_offsets` places both on it."""
        if len(known_us) == 0:
            return TimeAxis.build(event_us, keys)[0]
        low, high = (self.start, self.start + self.span - 2) if self.distinct is None else self.distinct[[0, -1]]
        start = min(int(low), int(event_us.min())) if len(event_us) else int(low)
        end = max(int(high), int(event_us.max())) if len(event_us) else int(high)
        if max(keys, 1) * (end - start + 2) < _STAMP_LIMIT:
            return TimeAxis(start, end - start + 2, None)
        distinct = np.union1d(self.distinct if self.distinct is not None else known_us, event_us)
        return TimeAxis(start, len(distinct) + 1, distinct)

    def feature_offsets(self, event_us: np.ndarray) -> np.ndarray:
        """The offsets of feature event times, which the axis covers (`build` returns those of its own)."""
        if self.distinct is not None:
            return np.searchsorted(self.distinct, event_us, side="left").astype(np.int64) + 1
        return event_us - (self.start - 1)

    def offsets(self, entity_us: np.ndarray) -> np.ndarray:
        if self.distinct is not None:
            return np.searchsorted(self.distinct, entity_us, side="right").astype(np.int64)
        return np.clip(entity_us - (self.start - 1), 0, self.span - 1)


class Room:
    """Spare capacity after an append-only array, shared by the generations of an index that extend one another:
    the generation whose rows end where the used part ends appends in place (earlier generations are views of a
    prefix that never changes); any other copies into a new, larger buffer. So a column is copied once per 25 %
    of growth rather than at every append (copies of large arrays cost page faults on fresh memory)."""

    def __init__(self, buffer: np.ndarray, used: int):
        self.buffer, self.used = buffer, used
        self.lock = threading.Lock()


def appended(values: np.ndarray, room: Room | None, more: np.ndarray) -> tuple[np.ndarray, Room]:
    """`values` followed by `more`, in `room` when `values` ends where its used part does."""
    end = len(values) + len(more)
    if room is not None:
        with room.lock:
            if room.used == len(values) and len(room.buffer) >= end:
                room.buffer[len(values) : end] = more
                room.used = end
                return room.buffer[:end], room
    buffer = np.empty(end + end // 4 + 64, dtype=values.dtype)
    buffer[: len(values)] = values
    buffer[len(values) : end] = more
    return buffer[:end], Room(buffer, end)


def appended_bytes(array: np.ndarray | None, room: Room | None, length: int, rows: int, itemsize: int) -> int:
    """The memory `appended` fills to add `rows` items to `array` (of `length`; None: a validity mask made whole):
    the rows where it grows in place, else the whole copied into a new buffer (whose spare quarter is not touched,
    so takes no memory, until later generations use it)."""
    end = length + rows
    if array is not None and room is not None and room.used == len(array) and len(room.buffer) >= end:
        return rows * itemsize
    return end * itemsize


def _appended_valid(
    valid: np.ndarray | None, room: Room | None, length: int, more: np.ndarray | None, extra: int
) -> tuple[np.ndarray | None, Room | None]:
    """The validity mask of `length` rows then `extra` more (None: all valid)."""
    if valid is None and more is None:
        return None, None
    return appended(_all_valid(valid, length), room if valid is not None else None, _all_valid(more, extra))


@dataclass(frozen=True)
class FixedValues:
    """A fixed-width column (integers, floats, times) as raw bytes, gathered by numpy: far cheaper than
    Arrow's `take` with null indices, and nulls become a validity mask."""

    type: pa.DataType
    values: np.ndarray  # unsigned integers as wide as the type
    valid: np.ndarray | None  # None: no nulls
    rooms: tuple[Room | None, Room | None] = (None, None)  # of `values` and `valid`, once extended

    def take(self, at: np.ndarray, known: np.ndarray) -> pa.Array:
        valid = known & self.valid[at] if self.valid is not None else known
        nulls = len(valid) - int(np.count_nonzero(valid))
        bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
        return pa.Array.from_buffers(self.type, len(at), [bitmap, pa.py_buffer(self.values[at])], nulls)

    def nbytes(self) -> int:
        return self.values.nbytes + (self.valid.nbytes if self.valid is not None else 0)

    def arrays(self) -> list[np.ndarray]:
        """Its numpy arrays, which later generations extended in place share (see `Room`)."""
        return [a for a in (self.values, self.valid) if a is not None]

    def growth(self, column: pa.ChunkedArray) -> int:
        """Bytes that extending by `column` allocates, at most: its rows combined, and where they go."""
        rows, width = len(column), self.values.itemsize
        values = appended_bytes(self.values, self.rooms[0], len(self.values), rows, width)
        if self.valid is None and not column.null_count:
            return rows * width + values
        return rows * (width + 1) + values + appended_bytes(self.valid, self.rooms[1], len(self.values), rows, 1)

    def extend(self, more: FixedValues) -> FixedValues:
        values, room = appended(self.values, self.rooms[0], more.values)
        valid, valid_room = _appended_valid(self.valid, self.rooms[1], len(self.values), more.valid, len(more.values))
        return FixedValues(self.type, values, valid, (room, valid_room))


@dataclass(frozen=True)
class DictionaryValues:
    """A repetitive column (category strings) as codes into its distinct values: gathering 4-byte codes
    and then the few values is several times faster than gathering the strings themselves."""

    type: pa.DataType
    dictionary: pa.Array
    codes: np.ndarray  # int32
    valid: np.ndarray | None
    rooms: tuple[Room | None, Room | None] = (None, None)  # of `codes` and `valid`, once extended

    def take(self, at: np.ndarray, known: np.ndarray) -> pa.Array:
        valid = known & self.valid[at] if self.valid is not None else known
        return self.dictionary.take(pa.array(self.codes[at], mask=~valid))

    def nbytes(self) -> int:
        return self.dictionary.nbytes + self.codes.nbytes + (self.valid.nbytes if self.valid is not None else 0)

    def arrays(self) -> list[np.ndarray]:
        """Its numpy arrays, which later generations extended in place share (see `Room`)."""
        return [a for a in (self.codes, self.valid) if a is not None]

    def growth(self, column: pa.ChunkedArray) -> int:
        """Bytes that extending by `column` allocates, at most: its codes found (through Arrow, then numpy), and
        where they go (new values of the dictionary aside)."""
        rows = len(column)
        codes = appended_bytes(self.codes, self.rooms[0], len(self.codes), rows, 4)
        valid = (
            0
            if self.valid is None and not column.null_count
            else rows + appended_bytes(self.valid, self.rooms[1], len(self.codes), rows, 1)
        )
        return 3 * rows * 4 + codes + valid

    def extend(self, column: pa.ChunkedArray) -> DictionaryValues:
        """More rows coded against this dictionary; values it lacks are added to it."""
        unseen = pc.unique(pc.filter(column, pc.invert(pc.is_in(column, value_set=self.dictionary))))
        unseen = unseen.combine_chunks() if isinstance(unseen, pa.ChunkedArray) else unseen
        dictionary = pa.concat_arrays([self.dictionary, unseen.drop_null().cast(self.dictionary.type)])
        found = pc.index_in(column, value_set=dictionary)
        valid = pc.is_valid(found).to_numpy(zero_copy_only=False)
        more = found.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
        codes, room = appended(self.codes, self.rooms[0], more)
        known, valid_room = _appended_valid(
            self.valid, self.rooms[1], len(self.codes), None if valid.all() else valid, len(more)
        )
        return DictionaryValues(self.type, dictionary, codes, known, (room, valid_room))


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

    def arrays(self) -> list[np.ndarray]:
        """None: an extension concatenates a new array."""
        return []

    def growth(self, column: pa.ChunkedArray) -> int:
        """Bytes that extending by `column` allocates, at most: its rows combined, and the array concatenated
        anew."""
        return self.array.nbytes + 2 * column.nbytes


Values = FixedValues | DictionaryValues | ArrowValues


def _valid(array: pa.Array) -> np.ndarray | None:
    return array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else None


def _all_valid(valid: np.ndarray | None, length: int) -> np.ndarray:
    return valid if valid is not None else np.ones(length, dtype=bool)


def extend_values(values: Values, column: pa.ChunkedArray) -> Values:
    """`values` followed by the rows of `column` (of the same type), kept in the form `values` has."""
    if isinstance(values, DictionaryValues):
        return values.extend(column)
    if isinstance(values, FixedValues):
        more = column_values(column)
        assert isinstance(more, FixedValues), "a column of the same type takes the same form"
        return values.extend(more)
    return ArrowValues(pa.concat_arrays([values.array, column.combine_chunks().cast(values.type)]))


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
